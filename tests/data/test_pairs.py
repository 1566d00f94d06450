"""pairs:FILE in sttp-eval: scored sentence pairs read strictly, and each model's Spearman correlation of pair
similarities with the scores, as sentence-similarity benchmarks compute it. Needs `transformers` (the tiny
BERT of test_hf) and skips without it."""

import gzip
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="needs the optional transformers package (pip install .[hf])")

from test_hf import TEXTS, _batch, cli, tiny  # noqa: E402,F401 - tiny is a fixture

from sttp_compress.cli import compress_app, eval_app  # noqa: E402
from sttp_compress.compress.convert import compress_to_target  # noqa: E402
from sttp_compress.errors import UserError  # noqa: E402
from sttp_compress.io.hf import load_encoder  # noqa: E402
from sttp_compress.evaluate.texts import evaluate_pairs  # noqa: E402
from sttp_compress.data.pairs import read_pairs  # noqa: E402
from sttp_compress.train.embedding_metrics import embedding_agreement, spearman  # noqa: E402

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())  # the project
PAIRS = [(TEXTS[i], TEXTS[(3 * i + 1) % len(TEXTS)], float((5 * i) % 7) / 1.2) for i in range(len(TEXTS))]


def _write(path, rows, header=None):
    lines = (["\t".join(header)] if header else []) + ["\t".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_pairs_with_and_without_a_header(tmp_path):
    plain = _write(tmp_path / "plain.tsv", PAIRS)
    a, b, scores = read_pairs(plain)
    assert a == [p[0] for p in PAIRS] and b == [p[1] for p in PAIRS]
    assert scores.dtype == torch.float64 and scores.tolist() == pytest.approx([p[2] for p in PAIRS])
    # sentence-transformers' stsbenchmark.tsv layout: named columns in another order, extra columns ignored
    rows = [("test", "news", str(p[2]), p[1], p[0]) for p in PAIRS]
    named = _write(tmp_path / "sts.tsv", rows, header=("split", "genre", "score", "sentence2", "sentence1"))
    gz = tmp_path / "sts.tsv.gz"
    gz.write_bytes(gzip.compress(named.read_bytes()))
    for path in (named, gz):
        a2, b2, s2 = read_pairs(path)
        assert a2 == a and b2 == b and torch.equal(s2, scores)


@pytest.mark.parametrize("content, match", [
    ("a\tb\n", "line 1: expected 3 tab-separated fields"),
    ("a\tb\t1\nc\td\tmuch\n", "line 2: the score 'much' is not a finite number"),
    ("a\tb\tnan\nc\td\t1\n", "line 1: the score 'nan' is not a finite number"),
    ("sentence1\tsentence2\tscore\n", "has 0 pairs; a rank correlation needs at least 2"),
    ("a\t\t1\nc\td\t2\n", "line 1: an empty sentence"),
    ("sentence1\tsentence2\tscore\nx\ty\n", "line 2: 2 tab-separated field"),
    ("\n\n", "has no pairs"),
    ("a\tb\t1\n", "has 1 pair; a rank correlation needs at least 2"),
    (b"\xff\xfe\t1", "not UTF-8"),
])
def test_malformed_pair_files_are_one_line_errors(tmp_path, content, match):
    path = tmp_path / "bad.tsv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError, match=match):
        read_pairs(path)
    with pytest.raises(UserError, match="not found"):
        read_pairs(tmp_path / 'missing.tsv')


def test_evaluate_pairs_against_direct_embeddings(tiny, tmp_path):
    path = _write(tmp_path / "pairs.tsv", PAIRS)
    ref = load_encoder(tiny).eval()
    model = load_encoder(tiny).eval()
    compress_to_target(model, rank=3)
    result, first = evaluate_pairs(model, ref, path, tiny, torch.device("cpu"), 4)
    distinct = list(dict.fromkeys([p[0] for p in PAIRS] + [p[1] for p in PAIRS]))
    assert result["samples"] == len(PAIRS) and result["texts"] == len(distinct)
    scores = torch.tensor([p[2] for p in PAIRS], dtype=torch.float64)
    with torch.no_grad():
        for key, m in (("sts_spearman", model), ("sts_spearman_reference", ref)):
            ea, eb = (m(**_batch(tiny, [p[i] for p in PAIRS])).double() for i in (0, 1))
            expected = spearman(torch.nn.functional.cosine_similarity(ea, eb), scores)
            assert result[key] == pytest.approx(expected, abs=1e-6), key
        agree = embedding_agreement(model(**_batch(tiny, distinct)), ref(**_batch(tiny, distinct)))
    assert result["cosine"] == pytest.approx(agree["cosine"], abs=1e-6)
    assert first["input_ids"].shape[0] == 4
    # the first max_batches × batch_size pairs only, and no reference: its fields stay null
    capped, _ = evaluate_pairs(model, None, path, tiny, torch.device("cpu"), 4, max_batches=2)
    assert capped["samples"] == 8 and capped["sts_spearman_reference"] is None and capped["cosine"] is None


def test_sttp_eval_on_pairs_reports_and_gates(tiny, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS * 4) + "\n")
    out = tmp_path / "tiny.sttp.safetensors"
    rc, _, err = cli(compress_app, "sttp-compress", "--arch", f"hf:{tiny}", "--rank", "4", "--output", out, "--quiet")
    assert rc == 0, err
    pairs = _write(tmp_path / "pairs.tsv", PAIRS)
    js = tmp_path / "eval.json"
    rc, stdout, err = cli(eval_app, "sttp-eval", out, "--arch", f"hf:{tiny}", "--reference", f"hf:{tiny}", "--data", f"pairs:{pairs}",
                          "--json", js, "--batch-size", "8", "--min-sts-spearman", "-1")
    assert rc == 0, err
    result = json.loads(js.read_text())
    assert result["samples"] == len(PAIRS) and result["accuracy"] is None
    assert -1 <= result["sts_spearman"] <= 1 and -1 <= result["sts_spearman_reference"] <= 1
    assert 0 < result["cosine"] <= 1
    assert "Pair scores: Spearman" in stdout and "(original " in stdout
    rc, _, err = cli(eval_app, "sttp-eval", out, "--arch", f"hf:{tiny}", "--data", f"pairs:{pairs}", "--batch-size", "8", "--quiet",
                     "--min-sts-spearman", "1")
    assert rc == 1 and f"gate failed: Spearman of pair similarities with the scores {result['sts_spearman']:.4f} < " \
                       "--min-sts-spearman 1" in err
    rc, _, err = cli(eval_app, "sttp-eval", out, "--arch", f"hf:{tiny}", "--data", f"text:{texts}", "--quiet", "--min-sts-spearman", "0")
    # a gate the data can never measure is a usage error found before any work, not a failed gate
    assert rc == 2 and "--min-sts-spearman cannot be checked without --data pairs:FILE" in err
    rc, _, err = cli(eval_app, "sttp-eval", out, "--arch", f"hf:{tiny}", "--data", f"pairs:{pairs}", "--min-sts-spearman", "2")
    assert rc == 2 and "--min-sts-spearman is a correlation between -1 and 1" in err
    # distillation takes texts, not pairs
    rc, _, err = cli(compress_app, "sttp-compress", "--arch", f"hf:{tiny}", "--rank", "4", "--output",
                     tmp_path / "x.sttp.safetensors", "--data", f"pairs:{pairs}", "--steps", "1")
    assert rc == 2 and "distil with --data text:FILE" in err and not (tmp_path / "x.sttp.safetensors").exists()


def _make_text_data():
    import importlib.util
    from pathlib import Path

    path = ROOT / "benchmarks" / "make_text_data.py"
    spec = importlib.util.spec_from_file_location("make_text_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_wordnet_pair_scores_on_a_toy_taxonomy(tmp_path):
    """The benchmark's scored pairs (make_text_data.heldout_pairs): WordNet pointers parsed, Wu-Palmer by hand."""
    import random

    mtd = _make_text_data()
    hyper = {"r": [], "a": ["r"], "b": ["a"], "c": ["a"], "d": ["r"], "e": ["b", "d"]}
    score, ancestors = mtd.wup_scorer(hyper)
    assert ancestors("e") == {"e", "b", "d", "a", "r"}
    # depths r 1, a 2, b 3, c 3, d 2, e 4 (its longer path, through b)
    assert score("b", "b") == 1.0 and score("b", "c") == pytest.approx(4 / 6)
    assert score("b", "d") == pytest.approx(2 / 5) and score("b", "a") == pytest.approx(4 / 5)
    assert score("e", "c") == pytest.approx(4 / 7) and score("e", "d") == pytest.approx(4 / 6)
    share = tmp_path / "share"
    (share / "wordnet").mkdir(parents=True)
    (share / "wordnet" / "data.noun").write_text(
        "  1 licence header | not a synset\n"
        "00000001 03 n 01 thing 0 000 | a thing that is there at all; \"an example\"\n"
        "00000002 03 n 02 animal 0 beast 0 002 @ 00000001 n 0000 + 00000009 v 0101 | a living thing that moves\n"
        "00000003 05 n 01 dog 0 002 @ 00000002 n 0000 @i 00000001 n 0000 | a domestic animal that barks\n"
        "00000004 05 n 01 cat 0 001 @ 00000002 n 0000 | a small animal that purrs\n", encoding="latin-1")
    definitions, hypernyms = mtd.noun_synsets(share)
    assert definitions["00000001"] == "a thing that is there at all"
    assert hypernyms == {"00000001": [], "00000002": ["00000001"], "00000003": ["00000002", "00000001"],
                         "00000004": ["00000002"]}
    held = ["a domestic animal that barks", "a small animal that purrs", "a living thing that moves"]
    pairs = mtd.heldout_pairs(share, held, 6, random.Random(0))
    assert all(a in held and b in held and a != b for a, b, _ in pairs)  # never the distillation's definitions
    # dog (depth 3, via animal) and cat (3) share animal (2); dog or cat with animal: 2·2 / (3 + 2)
    expected = {frozenset(held[:2]): 4 / 6, frozenset((held[0], held[2])): 4 / 5,
                frozenset((held[1], held[2])): 4 / 5}
    found = {frozenset((a, b)): v for a, b, v in pairs}
    assert len(found) == len(pairs) >= 2  # each pair once
    assert all(v == pytest.approx(expected[k], abs=1e-4) for k, v in found.items())
