"""Export a compressed model to a file that runs without this package: ONNX (onnxruntime) or torch.export (.pt2).

Each compressed layer is exported as its small cores, not as a dense weight, and the graph rebuilds the
weight from them with a few matmuls. Those nodes depend on constants alone: onnxruntime folds them into the
dense weight once, when it loads the model, and runs the dense convolution or matmul at dense speed from
then on. The cores are stored in skeleton form (`core.skeleton`): each core keeps the entries outside
R_k of its rows and the row order (square cores nothing), and one R × R middle per layer holds the spectrum
and the changes of basis the chains leave. That is as many values as the checkpoint's reflectors (the frames
themselves, which earlier exports stored, made the file 1.53x the checkpoint for ResNet-18 CIFAR at ratio 10;
benchmarks/results/deploy.md). Rebuilding frames from the reflectors in the graph instead (a triangular
inverse from matmuls, since ONNX has no solve) kept the checkpoint's size but made a 100,000-node graph that
took minutes to export and 13 s to load. A Linear whose factors form needs fewer FLOPs (`forms.best_form`, the rule `freeze` follows) is
exported as y = (x V σ) Uᵀ + b, with U and V rebuilt the same way.

A `.pt2` program is traced on the model's device (torch.export specialises a program to it: a model on a GPU
writes a GPU program); a CPU program moves with `.to("cuda")` when its graph creates no tensors of its own
(convolutional and MLP models; transformers make position ids, so export them on the GPU they will run on).
It runs with plain torch (`torch.export.load(path).module()`), which folds nothing: it
rebuilds the weights on every call, unless plain torch's `torch.fx.experimental.const_fold.split_const_subgraphs`
splits the rebuild off to run once (docs/usage.md; both measured in benchmarks/results/deploy.md). Inputs have a
dynamic batch size in both formats.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sttp_compress.compress.convert import layer_name
from sttp_compress.core.forms import best_form, chain_cores, crop_padding, factorable, layer_originals, mha_out_projs
from sttp_compress.core.precision import float32_precision
from sttp_compress.core.skeleton import apply_chain, skeleton_chain
from sttp_compress.core.spectral_tt import SpectralTT, is_parametrized, weight_name
from sttp_compress.errors import UserError
from sttp_compress.io.outputs import atomic_write

__all__ = ["EXPORT_FORMATS", "export_format", "exportable", "export"]

EXPORT_FORMATS = {".onnx": "onnx", ".pt2": "pt2"}
ONNX_OPSET = 18
MAX_REL_ERROR = 1e-4  # an export whose outputs differ more from the model's is not written
FOLD_LIMIT = 64  # values: constants the written ONNX graph folds (larger ones are folded by the runtime)


def export_format(path: str | os.PathLike) -> str:
    """'onnx' or 'pt2' from the file name; UserError for another suffix."""
    fmt = EXPORT_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise UserError(f"cannot tell the export format of {Path(path).name}: name it .onnx (onnxruntime) "
                        f"or .pt2 (torch.export)")
    return fmt


class StoredWeight(nn.Module):
    """A compressed layer's weight rebuilt in the graph from its cores in skeleton form (buffers, not trained).

    W = U diag(σ) Vᵀ with U = U' T_U and V = V' T_V (`core.skeleton`): per core the entries B and the row order
    are stored (nothing for a square core), and the middle M = T_U diag(σ) T_Vᵀ (R × R), with the row and column
    scales. A frame's reflectors store as many values as its skeleton, except the two cores beside σ, whose
    R(R−1)/2 more the middle's R² − R make up for: the graph holds what the checkpoint holds, and a runtime
    folds the rebuild (matmuls, concatenations, gathers) into a constant when it loads the model.
    """

    def __init__(self, p: SpectralTT, originals: tuple[Tensor, ...]):
        super().__init__()
        self.p = p  # its structure and buffers (scale, signs, row_order)
        with torch.no_grad():
            u, s, v = chain_cores(p, originals)
            ends = {}
            for side, frames, ranks in (("u", u, p.tt.u_ranks), ("v", v, p.tt.v_ranks)):
                cores, ends[side] = skeleton_chain(frames, ranks)
                for k, core in enumerate(cores):
                    order, B = (None, None) if core is None else core
                    self.register_buffer(f"{side}{k}_order", order)
                    self.register_buffer(f"{side}{k}_b", None if B is None else B.to(s.dtype))
            middle = ends["u"] @ torch.diag(s.double()) @ ends["v"].T
        self.register_buffer("middle", middle.to(s.dtype))
        rho, gamma = p.row_scale_param(originals), p.col_scale_param(originals)
        self.register_buffer("rho", None if rho is None else rho.detach().clone())
        self.register_buffer("gamma", None if gamma is None else gamma.detach().clone())

    def applied(self, side: str, Z: Tensor) -> Tensor:
        """The frame of the "u" or "v" chain times Z, from the stored skeleton."""
        ranks = self.p.tt.u_ranks if side == "u" else self.p.tt.v_ranks
        cores = [None if getattr(self, f"{side}{k}_b") is None
                 else (getattr(self, f"{side}{k}_order"), getattr(self, f"{side}{k}_b")) for k in range(len(ranks) - 1)]
        return apply_chain(cores, Z, ranks)

    def factors(self) -> tuple[Tensor, Tensor]:
        """(V', U' M) with W = (U' M) V'ᵀ: the input-side and output-side factors of the weight matrix."""
        # the identity computed in the graph, not stored, from a buffer: a factory (torch.eye) would pin the
        # device of the trace into the program, which then would not move with .to("cuda")
        eye = torch.diag(torch.ones_like(self.middle[0]))
        return self.applied("v", eye), self.applied("u", self.middle)

    def forward(self) -> Tensor:
        V, UM = self.factors()
        return self.p.weight_from_factors(UM, self.middle.new_ones(self.middle.shape[0]), V, self.rho, self.gamma)


def _weight_property(self: nn.Module) -> Tensor:
    return self.stored_weight()


def _factors_forward(self: nn.Linear, x: Tensor) -> Tensor:
    Vs, U = self.stored_weight.factors()
    return F.linear(x @ crop_padding(Vs, self.in_features), crop_padding(U, self.out_features), self.bias)


def exportable(model: nn.Module, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, str]]:
    """A float32 copy of `model` on `device` whose compressed layers rebuild their weights from the stored
    parameters in the graph; returns it and {layer name: 'dense' | 'factors'} (how each layer runs)."""
    model = copy.deepcopy(model).float().to(device).eval()
    inside_mha = mha_out_projs(model)
    forms = {}
    for module_name, m in list(model.named_modules()):
        if not is_parametrized(m):
            continue
        name, wname = layer_name(module_name, m), weight_name(m)
        plist = m.parametrizations[wname]
        if len(plist) != 1:
            raise UserError(f"layer {name} has another parametrization stacked on its compressed weight; "
                            f"it cannot be exported")
        p = plist[0]
        stored = StoredWeight(p, layer_originals(m, p))
        base = type(m).__bases__[0]  # the layer's own class (parametrize derived type(m) from it)
        del m.parametrizations
        attrs: dict[str, Any] = {wname: property(_weight_property)}
        form = "dense"
        if isinstance(m, nn.Linear) and id(m) not in inside_mha and factorable(p) and best_form(p.tt) == "factors":
            attrs["forward"], form = _factors_forward, "factors"
        m.__class__ = type(base.__name__, (base,), attrs)
        m.stored_weight = stored
        forms[name] = form
    return model, forms


def _batched(example: Tensor | Mapping[str, Tensor]) -> tuple[tuple, dict]:
    """(args, kwargs) with a batch of 2 (a batch of 1 would be specialised into the graph)."""
    def two(t: Tensor) -> Tensor:
        return t[:1].expand(2, *t.shape[1:]).clone() if t.shape[0] < 2 else t
    if isinstance(example, Mapping):
        return (), {k: two(v) for k, v in example.items()}
    return (two(example),), {}


def export(model: nn.Module, path: str | os.PathLike, example_inputs: Tensor | Mapping[str, Tensor],
           force: bool = False) -> dict[str, Any]:
    """Write `model` (compressed or not) to `path` (.onnx or .pt2) with a dynamic batch size; atomically.

    example_inputs: one input batch (a tensor, or keyword tensors such as input_ids and attention_mask).
    Returns {"format", "size_bytes", "forms", "rel_output_error"}. UserError when the model cannot be traced.
    The model's own training mode is left as it was.
    """
    fmt = export_format(path)
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    # torch.export specialises a program to the device it traces on: a .pt2 is traced where the model lives
    # (a model on a GPU writes a GPU program); ONNX always on the CPU (its runtime picks the device)
    traced_on = device if fmt == "pt2" else torch.device("cpu")
    net, forms = exportable(model, traced_on)
    args, kwargs = _batched(example_inputs)
    args, kwargs = tuple(a.to(traced_on) for a in args), {k: v.to(traced_on) for k, v in kwargs.items()}
    # DYNAMIC, not a named Dim: a guard that bounds the batch (a kernel's size check) refines its range instead of
    # failing the export, the likely cause of "Constraints violated (batch)" for the test model on an H100 (45fdd5e)
    batch = torch.export.Dim.DYNAMIC
    dynamic = ({0: batch} for _ in range(len(args) + len(kwargs)))
    shapes = {k: next(dynamic) for k in kwargs} if kwargs else (next(dynamic),)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(net, args, kwargs, dynamic_shapes=shapes, strict=False)
    except Exception as exc:  # noqa: BLE001 (tracing raises many types; the user needs the reason)
        where = _culprit(net, args, kwargs, _export_one) or _first_line(exc)
        raise UserError(f"the model cannot be exported: {where}") from None
    was_training = model.training
    # the check compares full float32 runs (no TF32): cuDNN's default TF32 convolutions alone put a random-weight
    # ResNet-18's GPU program 2.4e-4 from the model (H100, 4e75822), above MAX_REL_ERROR
    try:
        with torch.no_grad(), float32_precision(matmul="ieee", conv="ieee"):  # the model runs where it lives
            expected = _first_output(model.eval()(*(a.to(device) for a in args),
                                                   **{k: v.to(device) for k, v in kwargs.items()})).cpu()
    finally:
        model.train(was_training)
    errors: list[float | None] = []

    def write(tmp: str) -> None:
        (_write_pt2 if fmt == "pt2" else _write_onnx)(program, tmp)
        with float32_precision(matmul="ieee", conv="ieee"):
            error = _output_error(tmp, fmt, args, kwargs, expected)
        if error is not None and not error <= MAX_REL_ERROR:
            raise UserError(f"the exported model's outputs differ from the compressed model's by {error:.2g} "
                            f"(relative); nothing written")
        errors.append(error)

    atomic_write(path, write, force=force)
    return {"format": fmt, "size_bytes": Path(path).stat().st_size, "forms": forms,
            "rel_output_error": errors[0]}


def _first_output(out: Any) -> Tensor:
    """The model's main output: a tensor, the first of a tuple, or a transformers output's first field."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping):
        return next(iter(out.values()))
    return out[0]


def _output_error(path: str, fmt: str, args: tuple, kwargs: dict, expected: Tensor) -> float | None:
    """Relative error of the written file's output against the model's (None without onnxruntime)."""
    if fmt == "pt2":
        with open(path, "rb") as f, torch.no_grad():  # a file object: the temp name has no .pt2 suffix
            got = _first_output(torch.export.load(f).module()(*args, **kwargs))
    else:
        try:
            import onnxruntime
        except ImportError:
            return None
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        feeds = {n: kwargs[n].numpy() for n in names} if kwargs else {n: t.numpy() for n, t in zip(names, args)}
        got = torch.from_numpy(session.run(None, feeds)[0])
    got, expected = got.detach().float().cpu(), expected.float().cpu()
    return float((got - expected).norm() / expected.norm().clamp_min(1e-30))


def _write_pt2(program: torch.export.ExportedProgram, tmp: str) -> None:
    """torch.export.save's archive with its serialized graph deflated: the graph's JSON (1.4 MB for ResNet-18
    CIFAR, a third of the cores' bytes) compresses ~20x; the tensors stay stored as they were."""
    import zipfile

    buffer = io.BytesIO()  # a file object: the archive's inner folder is then not the temp file's name
    torch.export.save(program, buffer)
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(tmp, "w") as dst:
        for info in src.infolist():
            entry = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            dst.writestr(entry, src.read(info.filename),
                         compress_type=zipfile.ZIP_DEFLATED if info.filename.endswith(".json") else zipfile.ZIP_STORED)


def _write_onnx(program: torch.export.ExportedProgram, tmp: str) -> None:
    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError:
        raise UserError("ONNX export needs the onnx and onnxscript packages: pip install 'sttp-compress[export]'") from None
    with warnings.catch_warnings(), _quiet_loggers("torch.onnx", "onnxscript"):
        warnings.simplefilter("ignore")
        try:
            onnx_program = torch.onnx.export(program, dynamo=True, opset_version=ONNX_OPSET, verbose=False,
                                             optimize=False, external_data=False)
            # the exporter's own optimizer folds constants up to 262,144 values, which multiplies a layer's stored
            # cores out into bigger matrices: fold only what stays small (shapes, indices); onnxruntime folds the
            # weight rebuild when it loads the model
            from onnxscript import optimizer

            optimizer.optimize(onnx_program.model, input_size_limit=FOLD_LIMIT, output_size_limit=FOLD_LIMIT)
        except Exception as exc:  # noqa: BLE001
            where = _culprit(program.module(), *_example_of(program), _onnx_one)
            raise UserError(f"the model cannot be exported to ONNX: {where or _first_line(exc)}") from None
    proto = onnx_program.model_proto
    for node in proto.graph.node:  # the exporter's per-node stack traces and names of the torch ops
        del node.metadata_props[:]
        node.doc_string = ""
    import onnx

    onnx.save_model(proto, tmp)


def _culprit(net: nn.Module, args: tuple, kwargs: dict, export_one: Callable[[nn.Module, tuple, dict], Any]) -> str | None:
    """'layer NAME (Type): reason' for the first leaf module, in call order, that `export_one` cannot export
    with the inputs it sees in one eager forward; None when every leaf exports (or the forward fails)."""
    seen: dict[str, tuple[nn.Module, tuple, dict]] = {}

    def record(name: str) -> Callable:
        def hook(m: nn.Module, a: tuple, kw: dict) -> None:
            seen.setdefault(name, (m, a, kw))
        return hook

    hooks = [m.register_forward_pre_hook(record(n), with_kwargs=True)
             for n, m in net.named_modules() if n and not any(True for _ in m.children())]
    try:
        with torch.no_grad():
            net(*args, **kwargs)
    except Exception:  # noqa: BLE001 (the whole model's error is reported instead)
        return None
    finally:
        for h in hooks:
            h.remove()
    for name, (m, a, kw) in seen.items():
        try:
            with warnings.catch_warnings(), _quiet_loggers("torch.onnx", "onnxscript"):
                warnings.simplefilter("ignore")
                export_one(m, a, kw)
        except Exception as exc:  # noqa: BLE001
            return f"layer {name} ({type(m).__name__}): {_first_line(exc)}"
    return None


def _export_one(m: nn.Module, args: tuple, kwargs: dict) -> Any:
    with torch.no_grad():
        return torch.export.export(m, args, kwargs, strict=False)


def _onnx_one(m: nn.Module, args: tuple, kwargs: dict) -> Any:
    return torch.onnx.export(_export_one(m, args, kwargs), dynamo=True, opset_version=ONNX_OPSET, verbose=False,
                             optimize=False, external_data=False)


def _example_of(program: torch.export.ExportedProgram) -> tuple[tuple, dict]:
    """The example inputs the program was traced with."""
    args, kwargs = program.example_inputs
    return tuple(args), dict(kwargs)


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """Only errors from these loggers for a while (the exporter's progress lines, and the ONNX optimizer's
    notes on constant folds it skips), their levels restored after."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
