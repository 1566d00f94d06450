"""Rank allocation: the lazily profiled greedy allocation gives the ranks of the exhaustive one."""

import json
import math
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from sttp_compress.compress import allocate as A
from sttp_compress.core.tt import TTShape

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())  # the project
SHARED = ROOT.parent / "shared" / "models"
STORED = ROOT / "tests" / "fixtures" / "allocation_resnet18_cifar.json"


def gift_wrap(dofs, cost):
    """Reference lower hull: from each vertex, the point removing the most cost per DOF (farthest on ties)."""
    chain = [0]
    while True:
        a = chain[-1]
        cand = [i for i in range(a + 1, len(dofs)) if cost[i] < cost[a]]
        if not cand:
            return chain
        best = max(cand, key=lambda i: ((cost[a] - cost[i]) / (dofs[i] - dofs[a]), i))
        chain.append(best)


def test_hull_is_the_gift_wrapping_chain_including_ties():
    rng = random.Random(0)
    for _ in range(3000):
        n = rng.randint(2, 12)
        dofs = sorted(rng.sample(range(1, 60), n))
        # small integers: many exact ties and flat or rising stretches (exact in floats)
        cost = [rng.randint(0, 8) for _ in range(n - 1)] + [0]
        assert A._hull(dofs, cost) == gift_wrap(dofs, cost), (dofs, cost)


class _Table:
    """A made-up error profile {rank: err2} that counts its calls, with valid lower bounds when `bounded`."""

    def __init__(self, table, calls, name, rng, bounded):
        self.table, self.calls, self.name = table, calls, name
        if bounded:
            self.lower_bounds = lambda shapes: [min(table[sh.rank], 0.999) * rng.uniform(0.3, 1.0) for sh in shapes]

    def __call__(self, shape: TTShape) -> float:
        self.calls.append((self.name, shape.rank))
        return min(self.table[shape.rank], 0.999)


def _options_with_profile(shapes, rng, integer: bool, bounded: bool = False, sensitive: bool = False):
    """Real layer grids (DOF, TT shapes) with random error profiles (and sensitivities); counts profile calls."""
    opts, calls = [], []
    for li, (d_out, d_in) in enumerate(shapes):
        o = A.layer_options(f"l{li}", nn.Linear(d_in, d_out, bias=False), with_errors=False)
        n = len(o.ranks) - 1
        if integer:  # coarse values: ties between layers and within a layer, non-monotone steps
            vals = [rng.randint(1, 6) / 8 for _ in range(n)]
        else:
            vals = sorted((rng.random() for _ in range(n)), reverse=True)
            vals = [v * rng.uniform(0.9, 1.1) for v in vals]  # mostly decreasing, sometimes not
        o.profile = _Table(dict(zip(o.ranks[:-1], vals)), calls, o.name, rng, bounded)
        if sensitive:
            o.sensitivity = rng.choice([0.05, 1.0, 3.0, 40.0])
        opts.append(o)
    return opts, calls


@pytest.mark.parametrize("sensitive", [False, True])
@pytest.mark.parametrize("bounded", [False, True])
@pytest.mark.parametrize("integer", [False, True])
def test_lazy_greedy_equals_exhaustive_greedy_on_random_profiles(integer, bounded, sensitive):
    rng = random.Random(1 + integer + 2 * bounded + 4 * sensitive)
    shapes = [(64, 96), (96, 64), (128, 128), (48, 200), (256, 64), (30, 90)]
    for trial in range(60):
        pick = rng.sample(shapes, rng.randint(1, len(shapes)))
        lazy, calls = _options_with_profile(pick, random.Random(trial), integer, bounded, sensitive)
        full, _ = _options_with_profile(pick, random.Random(trial), integer, sensitive=sensitive)
        assert [o.sensitivity for o in lazy] == [o.sensitivity for o in full]
        lo = sum(o.dofs[0] for o in lazy)
        hi = sum(o.numel for o in lazy)
        budget = rng.randint(lo, hi)
        assert A.allocate(lazy, budget) == A._greedy_exhaustive(full, budget)
        assert len(calls) == len(set(calls))  # each grid rank profiled at most once


def test_lazy_greedy_leaves_unreachable_ranks_unprofiled():
    torch.manual_seed(0)
    layers = {f"l{i}": nn.Linear(256, 256, bias=False) for i in range(3)}
    with torch.no_grad():  # a decaying spectrum, like trained weights
        for m in layers.values():
            U, _, V = torch.linalg.svd(m.weight)
            m.weight.copy_(U @ torch.diag(torch.logspace(0, -2, 256)) @ V)
    opts = [A.layer_options(n, m) for n, m in layers.items()]
    budget = sum(o.dofs[0] for o in opts) + 40_000  # far below any layer's top grid rank
    ranks = A.allocate(opts, budget)
    full = [A.layer_options(n, m, eager=True) for n, m in layers.items()]
    assert ranks == A._greedy_exhaustive(full, budget)
    for o in opts:
        assert o.err2[len(o.ranks) - 2] is None  # the most expensive rank is never computed
        assert o.profiled() <= len(o.ranks) - 4


def test_a_lone_layer_fills_its_budget_without_profiling_anything():
    """Nothing to weigh it against: the largest rank that fits, the greedy's answer, with no error computed (a
    4096 x 11008 Linear's profile was 7.6 s of its 11.2 s conversion on 2 cores)."""
    torch.manual_seed(0)
    layer = nn.Linear(512, 256, bias=False)
    opts = [A.layer_options("l", layer)]
    o = opts[0]
    j = o.ranks.index(64)
    budget = (o.dofs[j] + o.dofs[j + 1]) // 2  # between grid ranks 64 and the next
    ranks = A.allocate(opts, budget)
    full = [A.layer_options("l", layer, eager=True)]
    assert ranks == A._greedy_exhaustive(full, budget)
    assert 64 < ranks["l"] < o.ranks[j + 1] and o.dof(ranks["l"] + 1) > budget  # the largest rank that fits
    assert o.profiled() == 0 and o.lower is None and o.gram() is None  # no error, bound or Gram computed


def test_the_fill_leaves_a_step_unprofiled_when_its_gain_bound_cannot_win():
    rng = random.Random(0)
    opts, calls = _options_with_profile([(64, 96), (64, 96)], rng, integer=False)
    a, b = opts
    for o in opts:  # every grid rank known but b's rank above 16, whose lower bound is just under b's error at 16
        for i in range(len(o.err2) - 1):
            o.err2[i] = 0.9 ** i
    j = b.ranks.index(24)
    truth = b.err2[j - 1] - 5e-10  # b's error barely drops above 16
    b.err2[j] = None
    b.lower = [0.0] * len(b.ranks)
    b.lower[j] = b.err2[j - 1] - 1e-9  # b's steps above 16 can remove almost nothing
    left = 3 * (a.dof(17) - a.dof(16))
    ranks = A._fill(opts, {"l0": 16, "l1": 16}, left)
    assert calls == [] and b.err2[j] is None  # b's rank 24 never profiled
    assert ranks["l1"] == 16 and ranks["l0"] > 16  # a's steps, the same size as b's, won each time
    b.err2[j] = truth  # with every gain computed the same steps are taken
    assert A._fill(opts, {"l0": 16, "l1": 16}, left) == ranks


def test_a_more_sensitive_layer_gets_more_of_the_budget_than_its_twin():
    torch.manual_seed(0)
    twin = nn.Linear(128, 128, bias=False)
    with torch.no_grad():
        U, _, V = torch.linalg.svd(twin.weight)
        twin.weight.copy_(U @ torch.diag(torch.logspace(0, -1, 128)) @ V)
    layers = {"a": twin, "b": nn.Linear(128, 128, bias=False)}
    layers["b"].load_state_dict(twin.state_dict())
    budget = 2 * A.layer_options("a", twin).dof(16)
    plain = [A.layer_options(n, m) for n, m in layers.items()]
    ranks = A.allocate(plain, budget)
    assert ranks["a"] == ranks["b"] == 16
    weighted = [A.layer_options(n, m) for n, m in layers.items()]
    weighted[1].sensitivity = 10.0
    ranks = A.allocate(weighted, budget)
    assert ranks["b"] > 16 > ranks["a"]
    assert sum(o.dof(ranks[o.name]) for o in weighted) <= budget


@pytest.mark.parametrize("out_f,in_f", [([16], [8, 3, 3]), ([12], [12]), ([64], [64]), ([6], [4, 3]),
                                         ([96], [32]), ([32], [96, 1, 1])])
def test_tt_error2_equals_tt_error_squared(out_f, in_f):
    torch.manual_seed(0)
    d_out, d_in = math.prod(out_f), math.prod(in_f)
    W = (torch.randn(d_out, d_in) * torch.linspace(1, 0.05, d_in)).double()
    for r in [1, 2, 3, 5, 8, 12, 24, 48, 64, 96]:
        shape = TTShape.from_dims(out_f, in_f, r)
        want = A.tt_error(W, shape) ** 2
        assert A.tt_error2(W, shape) == pytest.approx(want, abs=1e-12)
        assert A.tt_error2(W, shape, gram=W @ W.T) == pytest.approx(want, abs=1e-12)


def test_profile_of_a_weight_padded_on_its_input_side_keeps_it_unpadded_with_the_same_errors():
    """Linear(4·43 -> 16): 43 pads to 45, on the input side alone, so the profile keeps the weight as it is
    (no padded copy) and pads only UᵀW; its errors equal those of the padded matrix."""
    from sttp_compress.compress.convert import compress_module
    from sttp_compress.core.tt import pad_matrix

    torch.manual_seed(0)
    lin = nn.Linear(4 * 43, 16)
    with torch.no_grad():
        lin.weight.mul_(torch.linspace(1, 0.05, 4 * 43))
    opts = A.layer_options("lin", lin)
    prof = opts.profile
    W = prof._matrix()
    assert W.shape == (16, 4 * 43) and prof._pad_in == [4 * 43]
    P = pad_matrix(lin.weight.detach().double(), [16], [4 * 43])
    for i, r in enumerate(opts.ranks[:-1]):
        shape = opts.tt(r)
        assert opts.error2(i) == pytest.approx(A.tt_error(P, shape) ** 2, abs=1e-5)  # float32 profile
    # and the conversion at a truncating rank has that error
    W0 = lin.weight.detach().clone()
    compress_module(lin, 4)
    err = float((lin.weight.detach() - W0).norm() / W0.norm())
    assert err ** 2 == pytest.approx(A.tt_error(P, opts.tt(4)) ** 2, abs=1e-5) and err > 0.1  # float32 weight


def test_layers_of_millions_of_values_profile_powers_of_two_above_rank_128():
    big = A.layer_options("big", nn.Linear(2048, 2048, bias=False), with_errors=False)  # 4,194,304 = COARSE_NUMEL
    small = A.layer_options("small", nn.Linear(2047, 2048, bias=False), with_errors=False)
    assert big.numel == A.COARSE_NUMEL > small.numel
    coarse, fine = big.ranks[:-1], small.ranks[:-1]
    assert [r for r in coarse if r <= 128] == [r for r in fine if r <= 128]
    assert [r for r in coarse if r > 128] == [256, 512, 1024] and 192 in fine and 384 in fine
    assert big.ranks[-1] == small.ranks[-1] == A.DENSE


def test_eager_profile_fills_every_rank_and_matches_lazy_values():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3)
    eager = A.layer_options("c", conv, eager=True)
    lazy = A.layer_options("c", conv)
    assert None not in eager.err2 and eager.profile is None
    assert lazy.profiled() == 0
    for i, e in enumerate(eager.err2):
        assert lazy.error2(i) == pytest.approx(e, abs=1e-5)  # float32 profile
    assert eager.err2[-1] == 0.0  # DENSE


def test_compress_to_target_uses_the_exhaustive_greedy_ranks():
    from sttp_compress.compress.convert import candidate_layers, compress_to_target, count_parameters

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 32, 3), nn.Conv2d(32, 64, 3), nn.Flatten(),
                          nn.Linear(64, 64), nn.Linear(64, 10))
    chosen, _ = candidate_layers(model)
    total = count_parameters(model)
    opts = [A.layer_options(n, m) for n, m in chosen.items()]
    fixed = total - sum(o.numel for o in opts)
    want = A._greedy_exhaustive(opts, A.budget_for_ratio(total, fixed, 4.0))
    parts = compress_to_target(model, ratio=4.0)
    got = {layer["name"]: layer["rank"] for layer in parts["layers"]}
    assert got == {n: r for n, r in want.items() if r != A.DENSE}


@pytest.mark.skipif(not (SHARED / "resnet18_cifar10.pt").exists(), reason="needs ../shared/models")
def test_resnet18_ranks_equal_those_of_the_exhaustive_profile():
    """The CIFAR ResNet-18 ranks at ratios 5/10/20/50 that the fine-tuning runs validated (stored)."""
    from sttp_compress.compress.convert import candidate_layers, count_parameters
    from sttp_compress.io.sources import load_model

    stored = json.loads(STORED.read_text())["ranks"]
    model = load_model(SHARED / "resnet18_cifar10.pt", str(SHARED / "cifar_models.py") + ":resnet18_cifar")
    chosen, _ = candidate_layers(model)
    total = count_parameters(model)
    opts = [A.layer_options(n, m) for n, m in chosen.items()]  # one lazy profile serves every ratio
    fixed = total - sum(o.numel for o in opts)
    for ratio in ["50", "20", "10", "5"]:
        assert A.allocate(opts, A.budget_for_ratio(total, fixed, float(ratio))) == stored[ratio], ratio
    assert sum(o.profiled() for o in opts) < sum(len(o.ranks) - 1 for o in opts)


def test_row_order_profiles_and_converts_the_rows_in_that_order():
    from sttp_compress.compress.convert import compress_to_target, weight_order

    torch.manual_seed(0)
    W0 = torch.randn(96, 32)
    w = torch.rand(96, dtype=torch.float64).pow(4) * 100 + 0.01
    order = weight_order(w)
    ordered, permuted = nn.Embedding(96, 32), nn.Embedding(96, 32)
    ordered.weight.data.copy_(W0)
    permuted.weight.data.copy_(W0[order])
    a = A.layer_options("a", ordered, row_weight=w, row_order=order, eager=True)
    b = A.layer_options("b", permuted, row_weight=w[order], eager=True)
    plain = A.layer_options("c", ordered, row_weight=w, eager=True)
    assert a.err2 == pytest.approx(b.err2, rel=1e-5) and a.err2 != pytest.approx(plain.err2, rel=1e-3)
    model = nn.Sequential(ordered)
    parts = compress_to_target(model, ratio=2, row_weights={"0": w}, row_orders={"0": order})
    assert parts["layers"][0]["row_ordered"] and torch.equal(model[0].parametrizations.weight[0].row_order, order)


def test_an_unreachable_ratio_names_the_largest_dense_layers_and_the_way_to_include_them():
    from torch import nn

    from sttp_compress.compress.convert import compress_to_target
    from sttp_compress.errors import UserError

    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.Conv2d(32, 32, 3, groups=32), nn.Conv2d(32, 32, 3), nn.Flatten(),
                          nn.Linear(32, 32), nn.Linear(32, 1000))
    with pytest.raises(UserError) as err:
        compress_to_target(model, ratio=8)
    text = str(err.value)
    assert text.startswith("ratio 8 is unreachable: the largest reachable ratio is ")
    assert "most in 5 (33,000: final classifier kept dense), 0 (896: first convolution kept dense);" in text
    assert text.endswith("; include '*' makes every layer a candidate, 5 included)")
    assert compress_to_target(model, ratio=8, include=["*"])["totals"]["ratio"] >= 8 * 0.97
