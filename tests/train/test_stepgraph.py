"""StepGraph: a training step replayed as CUDA graphs equals the eager step; what it cannot graph runs eagerly.

The CUDA tests run on a GPU machine only (benchmarks' device calls); on CPU the wrapper is a pass-through.
"""

import copy
import gc
import warnings

import pytest
import torch
from torch import nn

from sttp_compress.train.bank import WeightBank
from sttp_compress.compress.convert import compress
from sttp_compress.train.stepgraph import StepGraph, _Shell

cuda = pytest.mark.gpu  # skipped without CUDA (conftest.py)


def model(device="cpu"):
    """Convs with BatchNorm (buffers the capture's warm-up must not change) and compressed layers."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16),
                      nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 12), nn.ReLU(), nn.Linear(12, 10))
    compress(m, rank={"0": 4, "3": 4, "7": 5})
    return m.to(device).train()


def run_steps(net, params, batches, amp=False):
    """SGD steps as finetune takes them (nothing of a step's autograd graph kept into the next); returns the
    losses and the outputs of the last step."""
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    losses = []
    for x in batches:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out = net(x)
            loss = out.float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        last = out.detach().clone()
        del out, loss
    return losses, last


def test_cpu_is_a_pass_through():
    m = model()
    net = StepGraph(m)
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(net(x), copy.deepcopy(m)(x))
    assert not net.graphs and net.failed is None
    net.eval()
    assert not m.training


class FakeCapture(StepGraph):
    """StepGraph's dispatch on CPU: every training call has a key, and a 'capture' wraps the model in a
    recorder, or fails for batches of 3."""

    def _key(self, tensors, n_args, names):
        if not self.model.training or not torch.is_grad_enabled():
            return None
        return (n_args, names, tuple(tuple(t.shape) for t in tensors))

    def _capture(self, key, tensors, n_args, names):
        if tensors[0].shape[0] == 3:
            self.failed = "no"
            return None
        self.graphs[key] = lambda *t: ("graph", key, self.model(*t))
        return self.graphs[key]


def test_dispatch_capture_limits_and_a_failure_keep_earlier_graphs():
    m = nn.Linear(4, 2)
    net = FakeCapture(m, max_graphs=2, capture_at=2)
    x2, x3, x5, x7 = (torch.randn(n, 4) for n in (2, 3, 5, 7))
    assert not isinstance(net(x2), tuple)  # first batch of a shape: eager (capture_at=2)
    assert net(x2)[0] == "graph" and net(x2)[0] == "graph"  # captured at the second, replayed after
    net(x5)
    assert net(x5)[0] == "graph" and len(net.graphs) == 2
    net(x7), net(x7)
    assert not isinstance(net(x7), tuple)  # beyond max_graphs: eager
    net.max_graphs = 4
    net(x3), net(x3)  # its capture fails ...
    assert net.failed and not isinstance(net(x3), tuple)
    assert net(x2)[0] == "graph"  # ... the graphs captured before still replay
    assert not isinstance(net(x7), tuple) and len(net.graphs) == 2  # and nothing new is captured
    with torch.no_grad():
        assert not isinstance(net(x2), tuple)
    net.eval()
    assert not isinstance(net(x2), tuple)


def pair(bank_graph=False, **kw):
    """Two equal models on the GPU, each with its weight bank attached; the second wrapped in StepGraph."""
    a, b = model("cuda"), model("cuda")
    WeightBank(a, cuda_graph=bank_graph).attach()
    bank = WeightBank(b, cuda_graph=bank_graph).attach()
    return a, b, StepGraph(b, bank=bank, **kw)


@cuda
@pytest.mark.parametrize("amp", [False, True])
def test_graphed_steps_equal_eager_steps(amp):
    """Losses, trained parameters and BatchNorm statistics match the eager steps (warm-up rolled back)."""
    a, b, net = pair()
    torch.manual_seed(1)
    batches = [torch.randn(16, 3, 8, 8, device="cuda") for _ in range(5)]
    losses_a, out_a = run_steps(a, [p for p in a.parameters() if p.requires_grad], batches, amp)
    losses_b, out_b = run_steps(net, [p for p in b.parameters() if p.requires_grad], batches, amp)
    assert len(net.graphs) == 1 and net.failed is None
    tol = dict(rtol=2e-2, atol=2e-3) if amp else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(losses_b), torch.tensor(losses_a), **tol)
    torch.testing.assert_close(out_b, out_a, **tol)
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        torch.testing.assert_close(sb[k].float(), sa[k].float(), **tol, msg=lambda m, k=k: f"{k}: {m}")
    assert int(sb["1.num_batches_tracked"]) == 5  # the capture's warm-up passes are not counted


@cuda
def test_no_cross_stream_gradient_accumulation_after_a_capture():
    """A capture raises none of PyTorch's warnings: the capture's side stream does not leak into the training
    steps' gradient accumulation (the AccumulateGrad stream-mismatch warning), and the engine's CUDA thread has
    its cuBLAS handle before the capture ("no current CUDA context"); both seen on CLI runs. PyTorch warns
    once per process (TORCH_WARN_ONCE), so the steps run in a fresh interpreter: in this one an earlier test may
    have spent the warning already, and the check could not fail."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    script = textwrap.dedent(f"""
        import sys, warnings
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import torch
        import test_stepgraph as t
        _, b, net = t.pair()
        batches = [torch.randn(16, 3, 8, 8, device="cuda") for _ in range(3)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t.run_steps(net, [p for p in b.parameters() if p.requires_grad], batches)
        print(len(net.graphs), net.failed is None,
              sum("AccumulateGrad" in str(w.message) or "no current CUDA context" in str(w.message) for w in caught))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["1", "True", "0"], res.stderr[-2000:]


@cuda
def test_interleaved_shapes_equal_eager_steps():
    """Graphs of three shapes replayed in an order unlike their capture's (length-grouped text batches come
    so) end where the eager steps end."""
    a, b, net = pair()
    torch.manual_seed(2)
    batches = [torch.randn(n, 3, 8, 8, device="cuda") for n in (16, 48, 16, 32, 48, 32, 16, 48)]
    losses_a, out_a = run_steps(a, [p for p in a.parameters() if p.requires_grad], batches)
    losses_b, out_b = run_steps(net, [p for p in b.parameters() if p.requires_grad], batches)
    assert len(net.graphs) == 3 and net.failed is None
    torch.testing.assert_close(torch.tensor(losses_b), torch.tensor(losses_a), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_b, out_a, rtol=1e-4, atol=1e-5)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(vb.float(), va.float(), rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


@cuda
def test_new_shapes_eval_and_no_grad_run_eagerly():
    a, b, net = pair(bank_graph=True, max_graphs=2, capture_at=1)
    x = torch.randn(16, 3, 8, 8, device="cuda")
    run_steps(net, [p for p in b.parameters() if p.requires_grad], [x])
    run_steps(a, [p for p in a.parameters() if p.requires_grad], [x])
    assert len(net.graphs) == 1
    y = torch.randn(5, 3, 8, 8, device="cuda")  # a second shape gets its own graph, up to max_graphs
    torch.testing.assert_close(net(y), a(y), rtol=1e-4, atol=1e-5)
    assert len(net.graphs) == 2
    z = torch.randn(3, 3, 8, 8, device="cuda")  # beyond max_graphs: eager
    torch.testing.assert_close(net(z), a(z), rtol=1e-4, atol=1e-5)
    assert len(net.graphs) == 2
    with torch.no_grad():
        torch.testing.assert_close(net(x), a(x), rtol=1e-4, atol=1e-5)
    net.eval()
    a.eval()
    assert not b.training
    torch.testing.assert_close(net(x), a(x), rtol=1e-4, atol=1e-5)
    assert len(net.graphs) == 2


class Syncing(nn.Module):
    """A forward that reads a value back to the CPU: no CUDA graph can capture it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x) * (2.0 if x.sum().item() > 0 else 1.0)


@cuda
def test_capture_failure_warns_once_and_runs_eagerly():
    torch.manual_seed(0)
    m = Syncing().cuda().train()
    net = StepGraph(m)
    x = torch.randn(8, 4, device="cuda")
    with pytest.warns(UserWarning, match="step graph: CUDA graph capture of the training step failed"):
        out = net(x)
    assert net.failed and not net.graphs
    torch.testing.assert_close(out, m(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net(x).sum().backward()  # eager from now on, no second warning
    assert m.lin.weight.grad is not None
    # the failed capture left the CUDA random generator usable
    assert torch.randn(3, device="cuda").isfinite().all()
    assert torch.nn.functional.dropout(torch.ones(100, device="cuda"), 0.5).eq(0).any()


@cuda
def test_capture_at_2_captures_a_shape_at_its_second_batch():
    a, b, net = pair(capture_at=2)
    x = torch.randn(16, 3, 8, 8, device="cuda")
    params = [p for p in b.parameters() if p.requires_grad]
    run_steps(net, params, [x, torch.randn(7, 3, 8, 8, device="cuda")])
    assert not net.graphs  # each shape seen once: eager
    run_steps(net, params, [x])
    assert len(net.graphs) == 1


class Keyword(nn.Module):
    """A text-model-like forward: keyword tensors (an integer one among them), a dict of outputs."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.lin = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.5)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        h = self.drop(self.lin(self.emb(input_ids)))
        if token_type_ids is not None:
            h = h + token_type_ids.unsqueeze(-1)
        return {"hidden": h, "pooled": (h * attention_mask.unsqueeze(-1)).sum(1), "mask": attention_mask}


@cuda
def test_keyword_inputs_dict_outputs_and_fresh_dropout():
    torch.manual_seed(0)
    m = Keyword().cuda().train()
    ref = copy.deepcopy(m).eval()  # dropout off: compares the deterministic part
    net = StepGraph(m, capture_at=1)
    ids = torch.randint(0, 50, (4, 6), device="cuda")
    mask = (torch.rand(4, 6, device="cuda") > 0.3).long()
    # outputs are the graph's buffers, overwritten by the next replay: copy them
    outs = [{k: v.clone() for k, v in net(input_ids=ids, attention_mask=mask, token_type_ids=None).items()}
            for _ in range(3)]
    assert len(net.graphs) == 1 and net.failed is None
    assert not torch.equal(outs[1]["hidden"], outs[2]["hidden"])  # each replay draws new dropout masks
    torch.testing.assert_close(outs[2]["mask"], mask)
    net.eval()
    torch.testing.assert_close(net(input_ids=ids, attention_mask=mask)["pooled"],
                               ref(input_ids=ids, attention_mask=mask)["pooled"])
    net.train()
    out = net(input_ids=ids, attention_mask=mask)
    out["pooled"].sum().backward()
    assert m.lin.weight.grad is not None and m.emb.weight.grad is not None


@cuda
@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_finetune_with_a_custom_loss_graphs_teacher_student_and_loss(amp):
    """With a custom loss (text distillation's path) the step graph holds the teacher's forward and the loss
    too (finetune.DistillStep); the fine-tune ends where the eager-teacher fine-tune ends."""
    import torch.nn.functional as F

    from sttp_compress.train.loop import FinetuneConfig, finetune

    torch.manual_seed(2)
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16),
                            nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 12), nn.ReLU(), nn.Linear(12, 10)).cuda()
    teacher.eval()
    batches = [torch.randn(16, 3, 8, 8, device="cuda") for _ in range(6)]
    ends = []
    for step_graph in (False, True):
        student = model("cuda")
        cfg = FinetuneConfig(steps=6, lr=1e-3, device="cuda", amp=amp, workers=0, select_best=False,
                             step_graph=step_graph, loss_fn=lambda s, t: F.mse_loss(s.float(), t.float()))
        report = finetune(student, teacher, batches, None, cfg, progress=False)
        ends.append((report, student.state_dict()))
        # the graphs (in reference cycles, each with its memory pool) are freed before finetune returns: a
        # second fine-tune in the process ran out of memory when a reference kept them to a later collection
        assert not [o for o in gc.get_objects() if isinstance(o, _Shell)]
    (eager, sa), (graphed, sb) = ends
    assert eager["cuda_graph"] == "build" and graphed["cuda_graph"] == "step"
    tol = dict(rtol=2e-2, atol=2e-3) if amp == "bf16" else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(graphed["curve"][-1]["train_loss"]),
                               torch.tensor(eager["curve"][-1]["train_loss"]), **tol)
    if amp == "off":
        for k in sa:
            torch.testing.assert_close(sb[k].float(), sa[k].float(), **tol, msg=lambda m, k=k: f"{k}: {m}")
    else:
        # AdamW moves each parameter by about lr a step whatever its gradient's size, so in bf16 a near-zero
        # gradient whose sign the kernel order flips moves that element the other way (seen on an H200: one
        # bias element of 16 off by 2.8e-3 after 6 steps). A wrong graph moves most elements wrongly: allow 2%.
        off = sum(int((~torch.isclose(sb[k].float(), sa[k].float(), **tol)).sum()) for k in sa)
        assert off <= 0.02 * sum(v.numel() for v in sa.values()), off
    assert not teacher.training and all(p.grad is None for p in teacher.parameters())


def test_no_new_capture_without_room_for_it(monkeypatch):
    """A new shape is captured only while MEMORY_MARGIN × the largest capture so far is free (driver-free
    plus PyTorch's unused cache); otherwise it runs eagerly, with one warning."""
    from sttp_compress.train import stepgraph
    gib = 2**30
    free = {"driver": 30 * gib}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["driver"], 140 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 50 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 45 * gib)
    net = StepGraph(nn.Linear(2, 2))
    device = torch.device("cpu")
    assert net._room(device)  # nothing captured yet: always
    net.graphs[("a",)], net.capture_bytes = object(), 20 * gib
    with pytest.warns(UserWarning, match=r"1 batch shapes captured; further shapes run eagerly \(35.0 GiB free"):
        assert not net._room(device) and net.full  # 30 + 5 GiB free < 2 × 20 GiB
    free["driver"] = 35 * gib
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        assert net._room(device)  # 35 + 5 >= 40
        free["driver"] = 0
        assert not net._room(device)
    assert stepgraph.MEMORY_MARGIN == 2.0


def test_release_capture_graph_leaves_other_callables_alone():
    from sttp_compress.train.stepgraph import release_capture_graph

    m = nn.Linear(3, 2)
    forward = m.forward
    assert release_capture_graph(m) is False and m.forward == forward
