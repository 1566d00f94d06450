"""The compression report: report.json, report.md and PNG plots in a folder, plus the terminal summary.

Everything is rendered in memory first (JSON text, Markdown, PNG bytes) and only then written, each
file through :func:`~sttp_compress.loading.atomic_write`, so a failure never leaves a half-written
file; files and folders created by a failed call are removed again. Plots use matplotlib's object
API (``Figure`` + ``FigureCanvasAgg``), so no global backend is set and pyplot is never imported.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from sttp_compress.errors import UserError
from sttp_compress.io.outputs import atomic_write

__all__ = ["write_report", "render_report", "is_report_file", "render_markdown", "summary_table", "human_bytes"]

# Plot files in the order they are embedded in report.md.
PLOT_FILES = ("params.png", "rel_error.png", "spectra.png", "finetune.png")
MAX_SPECTRA = 4
SUMMARY_ROWS = 30
_DASH = "—"
_DPI = 100


# --------------------------------------------------------------------------- number formatting


def human_bytes(n: int) -> str:
    """A byte count in decimal units with one decimal, e.g. 44_700_000 → '44.7 MB' (below 1 kB: '512 B')."""
    n = int(n)
    sign = "-" if n < 0 else ""
    value = float(abs(n))
    if value < 1000:
        return f"{sign}{int(value)} B"
    for unit in ("kB", "MB", "GB", "TB", "PB"):
        value /= 1000.0
        # Promote when rounding would print "1000.0 kB" instead of "1.0 MB".
        if round(value, 1) < 1000 or unit == "PB":
            return f"{sign}{value:.1f} {unit}"
    raise AssertionError("unreachable")


def _mb(n: Any) -> str:
    """Bytes as MB with 2 decimals (the report's size unit); tiny sizes fall back to human_bytes."""
    if not isinstance(n, (int, float)):
        return _DASH
    return f"{n / 1e6:.2f} MB" if abs(n) >= 10_000 else human_bytes(int(n))


def _count(n: Any) -> str:
    """An integer with thousands separators, or a dash when absent."""
    return f"{int(n):,}" if isinstance(n, (int, float)) else _DASH


def _short_count(n: Any) -> str:
    """A parameter count in compact form for the terminal: 950, 12.3k, 2.36M, 1.2B."""
    if not isinstance(n, (int, float)):
        return _DASH
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            value = n / div
            return f"{value:.3g}{suffix}" if value < 1000 else f"{value:.0f}{suffix}"
    return f"{int(n)}"


def _ratio(original: Any, compressed: Any) -> str:
    """original / compressed as '10.07x', or a dash when undefined."""
    if not isinstance(original, (int, float)) or not isinstance(compressed, (int, float)) or compressed <= 0:
        return _DASH
    return f"{original / compressed:.2f}x"


def _times(x: Any) -> str:
    """A ratio value as '10.07x'."""
    return f"{x:.2f}x" if isinstance(x, (int, float)) and math.isfinite(x) else _DASH


def _percent(x: Any) -> str:
    """A value already in percent as '76.13 %', or 'n/a' when absent."""
    return f"{x:.2f} %" if isinstance(x, (int, float)) else "n/a"


def _seconds(s: Any) -> str:
    """A duration as '1.23 s', '42.1 s' or '3 min 07 s'."""
    if not isinstance(s, (int, float)):
        return _DASH
    if s < 10:
        return f"{s:.2f} s"
    if s < 60:
        return f"{s:.1f} s"
    minutes, rest = divmod(round(s), 60)
    return f"{minutes} min {rest:02d} s"


def _error(x: Any) -> str:
    """A relative error to 3 decimals."""
    return f"{x:.3f}" if isinstance(x, (int, float)) else _DASH


def _target(target: Any) -> str:
    """The requested target: 'ratio 10x', 'rank 32' (or key=value pairs for anything else)."""
    if not isinstance(target, Mapping) or not target:
        return _DASH
    parts = []
    for key, value in target.items():
        if key == "ratio" and isinstance(value, (int, float)):
            parts.append(f"ratio {value:g}x")
        else:
            parts.append(f"{key} {value}")
    return ", ".join(parts)


def _join(values: Any, sep: str) -> str:
    """Join a list of numbers (modes, shape, ranks) with sep."""
    if not isinstance(values, Sequence) or isinstance(values, str) or not values:
        return _DASH
    return sep.join(str(v) for v in values)


def _value(x: Any) -> str:
    """Any scalar for the evaluation table: floats to 4 significant digits."""
    if isinstance(x, bool) or x is None:
        return str(x).lower() if isinstance(x, bool) else "n/a"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Flatten nested dicts/lists into (dotted key, scalar) pairs."""
    if isinstance(obj, Mapping):
        items = [(f"{prefix}.{k}" if prefix else str(k), v) for k, v in obj.items()]
    elif isinstance(obj, (list, tuple)):
        items = [(f"{prefix}[{i}]", v) for i, v in enumerate(obj)]
    else:
        return [(prefix, obj)]
    out: list[tuple[str, Any]] = []
    for key, value in items:
        out.extend(_flatten(value, key))
    return out


# --------------------------------------------------------------------------- markdown


def _cell(text: Any) -> str:
    """Make text safe inside a Markdown table cell (no pipes or newlines)."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _code(text: Any) -> str:
    """A Markdown code span for a layer name (so underscores are not read as emphasis)."""
    text = _cell(text).replace("`", "'")
    return f"`{text}`"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> list[str]:
    """A GitHub-flavoured Markdown table; align is one char per column ('l' or 'r')."""
    align = align or "l" * len(header)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _layers(report: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The report's layer entries (an empty list when absent)."""
    return [layer for layer in (report.get("layers") or []) if isinstance(layer, Mapping)]


def _finetune(report: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The fine-tune block, or None when there was no fine-tuning."""
    block = report.get("finetune")
    return block if isinstance(block, Mapping) else None


def _summary_rows(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows of the summary table in report.md."""
    totals = report.get("totals") or {}
    model = report.get("model") or {}
    timings = report.get("timings") or {}
    rows = []
    if model.get("path") is not None:
        rows.append(("Model", _code(model["path"])))
    if model.get("arch"):
        rows.append(("Architecture", _code(model["arch"])))
    rows += [
        ("Method", str(report.get("method", _DASH))),
        ("Spectrum", str(report.get("spectrum", _DASH))),
        ("Target", _target(report.get("target"))),
    ]
    if report.get("allocation"):
        rows.append(("Rank allocation", str(report["allocation"])))
    rows += [
        ("Achieved ratio", _times(totals.get("ratio"))),
        ("Z", _percent(totals.get("z_percent"))),
        ("Parameters", f"{_count(totals.get('params_original'))} → {_count(totals.get('params_compressed'))}"),
        ("Size on disk", f"{_mb(totals.get('size_bytes_original'))} → {_mb(totals.get('size_bytes_compressed'))}"
                         + (f" ({_times(totals['size_ratio'])} smaller, {report.get('dtype', 'float32')})"
                            if totals.get("size_ratio") else "")),
        ("Layers", f"{len(_layers(report))} compressed, {len(report.get('skipped') or [])} skipped"),
    ]
    if report.get("batchnorm_folded"):
        rows.append(("BatchNorms", f"{report['batchnorm_folded']} stored as their eval-mode affine (y = a·x + b)"))
    if timings:
        rows.append(("Time", ", ".join(f"{k} {_seconds(v)}" for k, v in timings.items())))
    return rows


def _finetune_lines(block: Mapping[str, Any]) -> list[str]:
    """The fine-tune section of report.md."""
    before, after = block.get("val_accuracy_before"), block.get("val_accuracy_after")
    gain = ""
    if isinstance(before, (int, float)) and isinstance(after, (int, float)):
        gain = f" ({after - before:+.2f} pts)"
    epochs = block.get("epochs", _DASH)
    if isinstance(block.get("steps"), int):
        epochs = f"{epochs} ({block['steps']:,} steps)"
    text = "texts_per_s" in block  # text distillation runs in steps over texts
    if text and isinstance(block.get("steps"), int):
        epochs = f"{block['steps']:,} steps ({block.get('epochs', _DASH)} passes over the texts)"
    rate = block.get("texts_per_s" if text else "images_per_s")
    rows = [
        ("Val. accuracy, original model", _percent(block.get("original_val_accuracy"))),
        ("Val. accuracy, before fine-tuning", _percent(before)),
        ("Val. accuracy, after fine-tuning", _percent(after) + gain),
    ]
    if isinstance(block.get("val_cosine_after"), (int, float)):  # text distillation: embeddings, no labels
        rows = [("Val. cosine to the original, before → after", f"{block.get('val_cosine_before', 0):.4f} → "
                 f"{block['val_cosine_after']:.4f}"),
                ("Val. nearest-neighbour agreement, before → after",
                 f"{_percent(block.get('val_nn_agreement_before'))} → {_percent(block.get('val_nn_agreement_after'))}")]
        if isinstance(block.get("val_similarity_spearman_after"), (int, float)):
            rho = block.get("val_similarity_spearman_before")
            rows.append(("Val. pair-similarity rank correlation, before → after",
                         f"{_DASH if rho is None else f'{rho:.4f}'} → "
                         f"{block['val_similarity_spearman_after']:.4f}"))
    if isinstance(block.get("test_accuracy_after"), (int, float)):  # reported only, never chosen on
        rows.append(("Test accuracy, original → before → after fine-tuning",
                     f"{_percent(block.get('original_test_accuracy'))} → {_percent(block.get('test_accuracy_before'))}"
                     f" → {_percent(block['test_accuracy_after'])}"))
    if block.get("stored_dtype"):  # the model as the checkpoint stores it (int8 / float16 rounding)
        rows.append((f"Accuracy as stored ({block['stored_dtype']}), val. / test",
                     f"{_percent(block.get('val_accuracy_stored'))} / {_percent(block.get('test_accuracy_stored'))}"))
    validation = block.get("validation")
    if isinstance(validation, Mapping):
        rows.append(("Validation (best-state choice)", _validation_text(validation)))
    if block.get("chosen_epoch") == 0:
        rows.append(("Kept", "the converted model: no fine-tuning checkpoint validated better"))
    elif block.get("chosen_epoch") is not None:
        rows.append(("Kept", f"the state after epoch {block['chosen_epoch']}"))
    rows += [
        ("Steps" if text else "Epochs", str(epochs)),
        ("Throughput", f"{rate:,.0f} {'texts' if text else 'images'}/s" if isinstance(rate, (int, float)) else _DASH),
        ("Device", str(block.get("device", _DASH))),
        ("Time", _seconds(block.get("seconds")) + (f" (budget {_seconds(block['time_budget'])})"
                                                     if block.get("time_budget") else "")),
    ]
    return ["## Fine-tuning", "", *_table(["", ""], rows), ""]


def _validation_text(v: Mapping[str, Any]) -> str:
    """Where the images that chose the best state came from, e.g. '5,000 images held out of data/train (of 50,000)'."""
    if v.get("source") is None:
        return "none (too few training images to hold any out): the last state is kept"
    count = v.get("images") if v.get("images") is not None else v.get("texts")
    size = _DASH if count is None else f"{count:,} {'texts' if v.get('texts') is not None else 'images'}"
    of = f" (of {v['of']:,})" if isinstance(v.get("of"), int) else ""
    return f"{size}, {v['source']}{of}"


def _layer_lines(layers: list[Mapping[str, Any]]) -> list[str]:
    """The per-layer table of report.md."""
    header = ["Layer", "Type", "Shape", "Modes", "TT-ranks", "Rank", "Params original → compressed",
              "Ratio", "Rel. error"]
    stored = any("storage_rel_error" in layer for layer in layers)  # a float16/bfloat16/int8 checkpoint
    if stored:
        header.append("Storage error")
    rows = []
    for layer in layers:
        po, pc = layer.get("params_original"), layer.get("params_compressed")
        rows.append([
            _code(layer.get("name", "?")),
            layer.get("type", _DASH),
            _join(layer.get("shape"), "×"),
            _join(layer.get("modes"), "·"),
            _join(layer.get("tt_ranks"), ", "),
            layer.get("rank", _DASH),
            f"{_count(po)} → {_count(pc)}",
            _ratio(po, pc),
            _error(layer.get("rel_error")),
        ] + ([_error(layer.get("storage_rel_error"))] if stored else []))
    return [f"## Layers ({len(layers)})", "", *_table(header, rows, "lllllrrrr" + "r" * stored), ""]


def render_markdown(report: Mapping[str, Any], images: list[str]) -> str:
    """Render report.md from the report dict, embedding the given image files by relative link."""
    method = str(report.get("method") or "").upper() or "Compression"
    lines = [f"# {method} compression report", ""]
    lines += [f"Written by sttp-compress {report.get('tool_version', '?')} "
              f"(report format {report.get('format_version', '?')}).", ""]
    lines += ["## Summary", "", *_table(["", ""], _summary_rows(report)), ""]

    block = _finetune(report)
    if block is not None:
        lines += _finetune_lines(block)

    evaluation = report.get("evaluation")
    if isinstance(evaluation, Mapping) and evaluation:
        rows = [(key, _value(value)) for key, value in _flatten(evaluation)]
        lines += ["## Evaluation", "", *_table(["Metric", "Value"], rows, "lr"), ""]

    if images:
        lines += ["## Plots", ""]
        for image in images:
            name = Path(image).name
            lines += [f"![{Path(name).stem}]({name})", ""]

    layers = _layers(report)
    if layers:
        lines += _layer_lines(layers)

    skipped = [s for s in (report.get("skipped") or []) if isinstance(s, Mapping)]
    if skipped:
        lines += [f"## Skipped layers ({len(skipped)})", ""]
        lines += [f"- {_code(s.get('name', '?'))}: {_cell(s.get('reason', 'no reason given'))}" for s in skipped]
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


# --------------------------------------------------------------------------- terminal summary


def largest_layers(layers: Sequence[Mapping[str, Any]], max_rows: int) -> tuple[set[int], int, int]:
    """Indices of the (at most max_rows) largest layers, and the original/compressed parameters of the rest."""
    shown = set(range(len(layers)))
    if len(layers) > max_rows:
        biggest = sorted(range(len(layers)), key=lambda i: -(layers[i].get("params_original") or 0))
        shown = set(biggest[: max(max_rows, 0)])
    hidden = [layers[i] for i in range(len(layers)) if i not in shown]
    return (shown, sum(l.get("params_original") or 0 for l in hidden),
            sum(l.get("params_compressed") or 0 for l in hidden))


def summary_table(report: Mapping[str, Any], max_rows: int = SUMMARY_ROWS) -> Table:
    """The terminal summary: the largest layers (model order, at most max_rows), a '… N more' row and totals."""
    totals = report.get("totals") or {}
    title = (f"{report.get('method', '?')} / {report.get('spectrum', '?')} spectrum, "
             f"target {_target(report.get('target'))}")
    caption = (f"{_times(totals.get('ratio'))} fewer parameters (Z {_percent(totals.get('z_percent'))}), "
               f"size {human_bytes(totals['size_bytes_original']) if 'size_bytes_original' in totals else _DASH}"
               f" → {human_bytes(totals['size_bytes_compressed']) if 'size_bytes_compressed' in totals else _DASH}"
               + (f" ({_times(totals['size_ratio'])} smaller file)" if totals.get("size_ratio") else ""))
    table = Table(title=escape(title), caption=escape(caption), show_lines=False)
    table.add_column("Layer", overflow="fold")
    table.add_column("Type")
    table.add_column("Shape")
    table.add_column("Rank", justify="right")
    table.add_column("Params", justify="right")
    table.add_column("Ratio", justify="right")
    table.add_column("Rel. err", justify="right")

    layers = _layers(report)
    shown, hidden_po, hidden_pc = largest_layers(layers, max_rows)
    for i, layer in enumerate(layers):
        po, pc = layer.get("params_original"), layer.get("params_compressed")
        if i not in shown:
            continue
        table.add_row(
            escape(str(layer.get("name", "?"))),
            escape(str(layer.get("type", _DASH))),
            _join(layer.get("shape"), "×"),
            str(layer.get("rank", _DASH)),
            f"{_short_count(po)} → {_short_count(pc)}",
            _ratio(po, pc),
            _error(layer.get("rel_error")),
        )
    hidden = len(layers) - len(shown)
    if hidden > 0:
        table.add_row(f"[dim]… {hidden} more layers[/dim]", "", "", "",
                      f"[dim]{_short_count(hidden_po)} → {_short_count(hidden_pc)}[/dim]",
                      f"[dim]{_ratio(hidden_po, hidden_pc)}[/dim]", "")
    skipped = len(report.get("skipped") or [])
    table.add_section()
    table.add_row(
        f"[bold]Total[/bold] ({len(layers)} compressed, {skipped} skipped)", "", "", "",
        f"[bold]{_short_count(totals.get('params_original'))} → {_short_count(totals.get('params_compressed'))}[/bold]",
        f"[bold]{_times(totals.get('ratio'))}[/bold]", "",
    )
    return table


# --------------------------------------------------------------------------- plots


def _label(text: Any, limit: int = 48) -> str:
    """A plot label: shortened from the left (the end of a layer path is the informative part), '$' escaped."""
    text = str(text)
    if len(text) > limit:
        text = "…" + text[-(limit - 1):]
    return text.replace("$", r"\$")


def _new_figure(width: float, height: float) -> Any:
    """A Figure with an Agg canvas attached (no pyplot, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    """Render a figure to PNG bytes (no timestamp metadata, so output is reproducible)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    return buf.getvalue()


def _bar_height(n: int) -> float:
    """Figure height in inches for n horizontal bar groups: readable at ~60 layers, capped for huge models."""
    return min(max(2.5, 1.4 + 0.24 * n), 300.0)


def _number(x: Any) -> float:
    """A float for plotting; absent or non-numeric becomes NaN."""
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


def _plot_params(layers: list[Mapping[str, Any]]) -> bytes:
    """params.png: original vs compressed parameter count per layer (grouped horizontal bars, log x)."""
    n = len(layers)
    names = [_label(layer.get("name", "?")) for layer in layers]
    po = [_number(layer.get("params_original")) for layer in layers]
    pc = [_number(layer.get("params_compressed")) for layer in layers]
    fig = _new_figure(10.0, _bar_height(n))
    ax = fig.add_subplot()
    y = list(range(n))
    h = 0.4
    ax.barh([i - h / 2 for i in y], po, height=h, color="#9aa5b1", label="original")
    ax.barh([i + h / 2 for i in y], pc, height=h, color="#1f77b4", label="compressed")
    ax.set_xscale("log")
    finite = [v for v in po + pc if math.isfinite(v) and v > 0]
    if finite:
        ax.set_xlim(min(finite) / 2, max(finite) * 4)
    for i, (o, c) in enumerate(zip(po, pc)):
        if math.isfinite(o) and math.isfinite(c) and c > 0:
            ax.text(max(o, c) * 1.15, i, f"{o / c:.1f}x", va="center", fontsize=7, color="#444444")
    ax.set_yticks(y, names, fontsize=8 if n > 25 else 9)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlabel("parameters (log scale)")
    ax.set_title("Parameters per layer")
    ax.grid(axis="x", which="major", alpha=0.3)
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=2, fontsize=8, frameon=False)
    return _png(fig)


def _plot_rel_error(layers: list[Mapping[str, Any]]) -> bytes:
    """rel_error.png: relative weight error ‖W − Ŵ‖/‖W‖ per layer (horizontal bars)."""
    n = len(layers)
    names = [_label(layer.get("name", "?")) for layer in layers]
    err = [_number(layer.get("rel_error")) for layer in layers]
    fig = _new_figure(9.0, min(max(2.5, 1.4 + 0.2 * n), 300.0))
    ax = fig.add_subplot()
    y = list(range(n))
    ax.barh(y, [0.0 if math.isnan(e) else e for e in err], height=0.7, color="#d62728")
    top = max([e for e in err if math.isfinite(e)], default=0.0)
    for i, e in enumerate(err):
        text = f"{e:.3f}" if math.isfinite(e) else "n/a"
        ax.text((e if math.isfinite(e) else 0.0) + top * 0.01, i, text, va="center", fontsize=7)
    ax.set_xlim(0, top * 1.15 if top > 0 else 1.0)
    ax.set_yticks(y, names, fontsize=8 if n > 25 else 9)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlabel("relative weight error ‖W − Ŵ‖ / ‖W‖")
    ax.set_title("Relative weight error per layer")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


SPECTRUM_FLOOR = 1e-6  # singular values below this fraction of the largest are rounding (float32), not spectrum


def meaningful_singular_values(values: Sequence[Any]) -> list[float]:
    """The singular values above rounding (SPECTRUM_FLOOR × the largest), descending: a compressed weight of rank r
    has r of them; the rest are float noise that would stretch the log axis down to 1e-16."""
    positive = [x for x in _positive(values) if math.isfinite(x)]
    if not positive:
        return []
    top = max(positive)
    return [x for x in positive if x >= SPECTRUM_FLOOR * top]


def _positive(values: Sequence[Any]) -> list[float]:
    """Singular values as floats, non-positive ones as NaN (so a log axis skips them)."""
    out = []
    for v in values:
        x = float(v)
        out.append(x if x > 0 and math.isfinite(x) else math.nan)
    return out


def _pick_spectra(report: Mapping[str, Any], spectra: Mapping[str, Any]) -> list[str]:
    """The (at most 4) layers of spectra to plot: the largest by original parameter count, in model order."""
    size = {layer.get("name"): layer.get("params_original") or 0 for layer in _layers(report)}
    order = {layer.get("name"): i for i, layer in enumerate(_layers(report))}
    names = list(spectra)
    biggest = sorted(names, key=lambda k: (-size.get(k, 0), -len(spectra[k][0])))[:MAX_SPECTRA]
    return sorted(biggest, key=lambda k: (order.get(k, len(order)), names.index(k)))


def _plot_spectra(report: Mapping[str, Any], spectra: Mapping[str, Any]) -> bytes:
    """spectra.png: singular values before/after compression of the largest layers (log y)."""
    chosen = _pick_spectra(report, spectra)
    cols, rows = {1: (1, 1), 2: (2, 1), 3: (3, 1), 4: (2, 2)}[len(chosen)]
    fig = _new_figure(4.6 * cols, 3.6 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    rows = {row.get("name"): row for row in report.get("layers") or [] if isinstance(row, Mapping)}
    for ax, name in zip(axes, chosen):
        before, after = spectra[name]
        row = rows.get(name, {})
        sb, sa = meaningful_singular_values(before), meaningful_singular_values(after)
        rank = row.get("spectrum_rank", len(sa))
        sa = sa[:rank]  # the compressed weight has rank <= the size of σ: what follows is float rounding
        ax.plot(range(1, len(sb) + 1), sb, "-", color="#7f7f7f", lw=1.5, label="original")
        ax.plot(range(1, len(sa) + 1), sa, "-o", color="#1f77b4", lw=1.0,
                ms=2.5 if len(sa) > 40 else 4, label=f"compressed (rank {row.get('rank', rank)}, {rank} values of σ)")
        ax.set_yscale("log")
        shown = [x for x in sb + sa if math.isfinite(x)]
        if shown:
            ax.set_ylim(bottom=0.5 * min(shown))
        ax.set_title(_label(name, 40), fontsize=10)
        ax.set_xlabel("index")
        ax.set_ylabel("singular value σ")
        ax.grid(which="major", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Singular spectra before / after compression")
    return _png(fig)


def _has_curve(report: Mapping[str, Any]) -> bool:
    """True when the report has a fine-tune block with a non-empty curve."""
    block = _finetune(report)
    return block is not None and bool(block.get("curve"))


def _plot_finetune(block: Mapping[str, Any]) -> bytes:
    """finetune.png: train loss (left) and val accuracy (right) per epoch, reference accuracies dashed."""
    curve = [p for p in block["curve"] if isinstance(p, Mapping)]
    fig = _new_figure(8.0, 4.5)
    ax = fig.add_subplot()
    loss_pts = [(_number(p.get("epoch")), _number(p.get("train_loss"))) for p in curve]
    loss_pts = [(e, v) for e, v in loss_pts if math.isfinite(e) and math.isfinite(v)]
    handles = []
    if loss_pts:
        handles += ax.plot(*zip(*loss_pts), "-o", color="#1f77b4", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss", color="#1f77b4")
    ax.grid(alpha=0.3)

    acc_pts = [(_number(p.get("epoch")), _number(p.get("val_accuracy"))) for p in curve]
    acc_pts = [(e, v) for e, v in acc_pts if math.isfinite(e) and math.isfinite(v)]
    refs = [(block.get("original_val_accuracy"), "original model", "#2ca02c"),
            (block.get("val_accuracy_before"), "before fine-tuning", "#7f7f7f")]
    refs = [(v, label, color) for v, label, color in refs if isinstance(v, (int, float))]
    if acc_pts or refs:
        ax2 = ax.twinx()
        if acc_pts:
            handles += ax2.plot(*zip(*acc_pts), "-s", color="#ff7f0e", label="val accuracy")
        for value, label, color in refs:
            handles.append(ax2.axhline(value, ls="--", lw=1.2, color=color, label=f"{label} ({value:.2f} %)"))
        ax2.set_ylabel("val accuracy (%)", color="#ff7f0e")
        values = [v for _, v in acc_pts] + [v for v, _, _ in refs]
        low, high = min(values), max(values)
        pad = max(high - low, 1.0) * 0.08
        ax2.set_ylim(low - pad, high + pad)
    epochs = [e for e, _ in loss_pts + acc_pts]
    if epochs and all(float(e).is_integer() for e in epochs):
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if handles:
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=min(len(handles), 4),
                  fontsize=8, frameon=False)
    ax.set_title("Fine-tuning")
    return _png(fig)


def _render_plots(report: Mapping[str, Any], spectra: Mapping[str, Any] | None) -> dict[str, bytes]:
    """All PNGs this report gets, file name → bytes, in PLOT_FILES order."""
    plots: dict[str, bytes] = {}
    layers = _layers(report)
    if layers:
        plots["params.png"] = _plot_params(layers)
        plots["rel_error.png"] = _plot_rel_error(layers)
    if spectra:
        plots["spectra.png"] = _plot_spectra(report, spectra)
    if _has_curve(report):
        plots["finetune.png"] = _plot_finetune(_finetune(report))  # type: ignore[arg-type]
    return plots


# --------------------------------------------------------------------------- writing


def _make_dir(folder: Path) -> list[Path]:
    """Create folder (and missing parents); return the folders created, outermost first."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"cannot write the report: {folder} exists and is not a folder")
    missing = []
    p = folder.absolute()
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    if p.exists() and not p.is_dir():
        raise UserError(f"cannot create report folder {folder}: {p} is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create report folder {folder}: {exc.strerror or exc}") from exc
    return missing[::-1]


def _writer(data: bytes) -> Callable[[str], None]:
    """A write callback for atomic_write that stores data at the temp path."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
    return write


def render_report(report: dict, spectra: dict[str, tuple[list[float], list[float]]] | None = None
                  ) -> dict[str, bytes]:
    """The report folder's files, name -> bytes: the PNG plots, report.md and report.json."""
    json_text = json.dumps(report, indent=2, ensure_ascii=False) + "\n"
    plots = _render_plots(report, spectra)
    markdown = render_markdown(report, list(plots))
    return {**plots, "report.md": markdown.encode("utf-8"), "report.json": json_text.encode("utf-8")}


def is_report_file(name: str) -> bool:
    """Whether a file of this name belongs in a report folder (what a rerun with --force may replace)."""
    return name in ("report.json", "report.md", *PLOT_FILES)


def write_report(
    report: dict,
    report_dir: str | Path,
    spectra: dict[str, tuple[list[float], list[float]]] | None = None,
) -> dict[str, Path]:
    """Write report.json, report.md and the PNG plots into report_dir; return {kind: path} of the files written."""
    rendered = render_report(report, spectra)  # everything first: a bug or bad value here leaves nothing on disk
    plots = {name: data for name, data in rendered.items() if name.endswith(".png")}
    folder = Path(report_dir)
    created_dirs = _make_dir(folder)
    files: list[tuple[str, str, bytes]] = [(name[:-4], name, data) for name, data in plots.items()]
    files += [("md", "report.md", rendered["report.md"]), ("json", "report.json", rendered["report.json"])]

    written: dict[str, Path] = {}
    new_files: list[Path] = []
    try:
        for key, name, data in files:
            path = folder / name
            existed = path.exists() or path.is_symlink()
            atomic_write(path, _writer(data), force=True)
            if not existed:
                new_files.append(path)
            written[key] = path
    except BaseException:
        # Undo what this call created; files it replaced cannot be restored but are never half-written.
        for path in new_files:
            try:
                path.unlink()
            except OSError:
                pass
        for d in reversed(created_dirs):
            try:
                d.rmdir()
            except OSError:
                break
        raise

    # Plots left from an earlier report in this folder would contradict the new one.
    for name in PLOT_FILES:
        if name not in plots:
            stale = folder / name
            if stale.is_file() and not stale.is_symlink():
                try:
                    stale.unlink()
                except OSError:
                    pass
    return {key: written[key] for key in ("json", "md", *[n[:-4] for n in plots])}
