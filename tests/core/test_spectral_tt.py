import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from sttp_compress import compress, compress_module, compressed_layers, count_parameters, decompress
from sttp_compress.core.householder import frame
from sttp_compress.core.spectral_tt import SpectralTT
from sttp_compress.core.tt import svdp_dof
from sttp_compress.io.checkpoint import read_compressed  # noqa: E402

MODULES = [
    lambda: nn.Linear(64, 32),
    lambda: nn.Linear(997, 10),
    lambda: nn.Linear(10, 1000),
    lambda: nn.Conv1d(6, 8, 5),
    lambda: nn.Conv2d(8, 16, 3, padding=1),
    lambda: nn.Conv3d(4, 6, (2, 3, 1)),
    lambda: nn.ConvTranspose1d(6, 4, 3),
    lambda: nn.ConvTranspose2d(8, 12, 3, stride=2),
    lambda: nn.ConvTranspose3d(2, 4, 2),
    lambda: nn.Embedding(100, 24),
]


def _input(m: nn.Module) -> torch.Tensor:
    if isinstance(m, nn.Embedding):
        return torch.randint(0, m.num_embeddings, (7, 5))
    if isinstance(m, nn.Linear):
        return torch.randn(7, m.in_features)
    spatial = {1: (11,), 2: (9, 10), 3: (5, 6, 7)}[m.weight.dim() - 2]
    return torch.randn(2, m.in_channels, *spatial)


def layer_originals(m):
    pl = m.parametrizations.weight
    return [getattr(pl, f"original{i}") for i in range(len([n for n, _ in pl.named_parameters()]))]


@pytest.mark.parametrize("make", MODULES)
@pytest.mark.parametrize("spectrum", ["free", "lipschitz"])
def test_full_rank_conversion_is_exact_and_outputs_match(make, spectrum):
    torch.manual_seed(0)
    m = make()
    x = _input(m)
    with torch.no_grad():
        y0 = m(x)
        W0 = m.weight.clone()
    p = compress_module(m, rank=10_000, spectrum=spectrum)
    with torch.no_grad():
        assert (m.weight - W0).norm() / W0.norm() < 1e-5
        torch.testing.assert_close(m(x), y0, rtol=1e-4, atol=1e-5)
    # at full TT-rank the manifold is the whole space: DOF == numel (of the zero-padded weight for 997)
    assert p.dof() == math.prod(p.tt.modes) == (W0.numel() if 997 not in W0.shape else 1000 * 10)


@pytest.mark.parametrize("make", MODULES)
@pytest.mark.parametrize("spectrum", ["free", "lipschitz", "identity"])
@pytest.mark.parametrize("method", ["sttp", "svdp"])
def test_trainable_values_equal_dof(make, spectrum, method):
    m = make()
    bias = m.bias.numel() if getattr(m, "bias", None) is not None else 0
    p = compress_module(m, rank=3, method=method, spectrum=spectrum)
    assert count_parameters(m) - bias == p.dof()
    if method == "svdp":
        d_out, d_in = p.tt.d_out, p.tt.d_in
        assert p.dof() == svdp_dof(d_out, d_in, min(3, d_out, d_in), spectrum)


def test_cp_structured_conv_converts_exactly():
    """A conv kernel whose tensor over binary modes has CP rank 2 is exact at r = 2."""
    g = torch.Generator().manual_seed(1)
    t = torch.ones((), dtype=torch.float64)
    W = 0
    for _ in range(2):
        t = torch.ones((), dtype=torch.float64)
        for _ in range(4 + 3 + 2):  # C_out 16, C_in 8, kernel 2×2
            t = torch.tensordot(t, torch.randn(2, generator=g, dtype=torch.float64), dims=0)
        W = W + t
    conv = nn.Conv2d(8, 16, 2).double()
    with torch.no_grad():
        conv.weight.copy_(W.reshape(16, 8, 2, 2))
    x = torch.randn(3, 8, 6, 6, dtype=torch.float64)
    y0 = conv(x).detach()
    compress_module(conv, rank=2)
    assert conv.parametrizations.weight[0].dof() < W.numel() / 4
    torch.testing.assert_close(conv(x), y0, rtol=1e-7, atol=1e-9)


def test_identity_spectrum_is_a_scaled_orthogonal_projection():
    torch.manual_seed(0)
    m = nn.Linear(32, 32)
    compress_module(m, rank=32, method="svdp", spectrum="identity")
    W = m.weight.detach()
    scale = m.parametrizations.weight[0].scale
    torch.testing.assert_close(W @ W.T / scale ** 2, torch.eye(32), atol=1e-5, rtol=0)


def test_lipschitz_spectrum_is_bounded_by_the_scale():
    torch.manual_seed(0)
    m = nn.Linear(48, 40)
    compress_module(m, rank=8, spectrum="lipschitz")
    p = m.parametrizations.weight[0]
    opt = torch.optim.Adam(m.parameters(), lr=0.1)
    for _ in range(20):
        loss = -m.weight.norm()
        opt.zero_grad()
        loss.backward()
        opt.step()
    s = torch.linalg.svdvals(m.weight.detach())
    assert s.max() <= p.scale * (1 + 1e-5)


@pytest.mark.parametrize("spectrum", ["free", "lipschitz", "identity"])
def test_frames_stay_orthonormal_after_500_adam_steps(spectrum):
    torch.manual_seed(0)
    m = nn.Conv2d(16, 32, 3)
    p = compress_module(m, rank=8, spectrum=spectrum)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    G = torch.randn_like(m.weight)
    x = torch.randn(4, 16, 6, 6)
    for _ in range(500):
        loss = (m.weight * G).sum() + m(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for (d, r, red), P in zip(p.groups, layer_originals(m)):
        X = frame(P.detach(), d, r, red)
        assert (X.transpose(-1, -2) @ X - torch.eye(r)).abs().max() < 1e-5


@pytest.mark.parametrize("spectrum", ["free", "lipschitz", "identity"])
@pytest.mark.parametrize("method", ["sttp", "svdp"])
def test_gradcheck_float64(spectrum, method):
    torch.manual_seed(0)
    m = nn.Conv2d(4, 6, 2).double()
    p = compress_module(m, rank=3, method=method, spectrum=spectrum)
    origs = tuple(o.detach().clone().requires_grad_() for o in layer_originals(m))
    assert torch.autograd.gradcheck(lambda *o: p(*o), origs)


def test_eval_mode_caches_weight_until_parameters_change(monkeypatch):
    m = nn.Linear(32, 16)
    compress_module(m, rank=4)
    calls = []
    orig = SpectralTT.weight_from_frames
    monkeypatch.setattr(SpectralTT, "weight_from_frames", lambda self, *a: calls.append(1) or orig(self, *a))
    x = torch.randn(3, 32)
    m.eval()
    with torch.no_grad():
        y1 = m(x)
        y2 = m(x)
    assert len(calls) == 1 and torch.equal(y1, y2)
    with torch.no_grad():
        layer_originals(m)[-1].mul_(2)  # spectrum changed in place → rebuild
        y3 = m(x)
    assert len(calls) == 2
    torch.testing.assert_close(y3 - m.bias, 2 * (y1 - m.bias))
    m.train()
    m(x)
    m(x)
    assert len(calls) == 4  # training mode: rebuilt every call so gradients flow
    m.eval()
    m(x).sum().backward()  # eval with grad: rebuilt, and gradients reach the parameters
    trainable = [o for o in layer_originals(m) if o.requires_grad]  # all but the 0-sized ones (−I frames)
    assert trainable and all(o.grad is not None for o in trainable)


def test_decompress_gives_plain_modules_with_current_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.Flatten(),
                          nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))
    x = torch.randn(2, 3, 8, 8)
    layers = compress(model, rank=4)
    assert sorted(layers) == ["2", "4"]  # first conv and classifier stay dense
    with torch.no_grad():
        y = model(x)
    n_comp = count_parameters(model)
    decompress(model)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert type(model[2]) is nn.Conv2d and isinstance(model[2].weight, nn.Parameter)
    assert count_parameters(model) > n_comp
    assert compressed_layers(model) == {}
    torch.testing.assert_close(model(x), y)


def test_compress_with_per_layer_ranks_and_skips_layers_that_would_grow():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 4))
    layers = compress(model, {"0": 4, "1": 4}, method="svdp")
    assert list(layers) == ["0"]  # SVDP of Linear(64→4) at rank 4: 4·68 − 16 = 256 DOF, no fewer than its weights


@pytest.mark.parametrize("make", [lambda: nn.Conv2d(8, 12, 3, groups=4, padding=1),  # grouped: 12 x (2·3·3)
                                  lambda: nn.Conv2d(12, 12, 3, groups=12, padding=1),  # depthwise: 12 x 9
                                  lambda: nn.ConvTranspose2d(8, 12, 3, groups=2)])  # stored (8, 6, 3, 3)
def test_grouped_and_depthwise_convs_compress_as_their_stored_weight_matrix(make):
    torch.manual_seed(0)
    conv = make().double()
    x = torch.randn(2, conv.in_channels, 6, 6, dtype=torch.float64)
    W0, y0 = conv.weight.detach().clone(), conv(x).detach()
    compress_module(conv, rank=10**6)  # every bond at its full rank: exact
    torch.testing.assert_close(conv.weight, W0)
    torch.testing.assert_close(conv(x), y0)
    low = make().double()
    p = compress_module(low, rank=2)
    assert low.weight.shape == W0.shape and count_parameters(low) == p.dof() + low.bias.numel()


def test_state_dict_round_trip_into_a_fresh_structure():
    torch.manual_seed(0)
    a = nn.Conv2d(8, 16, 3)
    compress_module(a, rank=4, spectrum="lipschitz")
    b = nn.Conv2d(8, 16, 3)
    compress_module(b, rank=4, spectrum="lipschitz")
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a.weight, b.weight)


def test_decompressing_a_deep_copy_leaves_the_original_compressed():
    import copy

    from sttp_compress.compress.convert import compressed_layers, decompress

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 3), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    compress(model, rank=3, keep_first_last=False)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = model(x)
    twin = decompress(copy.deepcopy(model))
    assert compressed_layers(twin) == {} and set(compressed_layers(model)) == {"0", "1", "3"}
    with torch.no_grad():
        torch.testing.assert_close(model(x), want)  # torch's remove_parametrizations broke this
        torch.testing.assert_close(twin(x), want)
    assert type(twin[1]) is nn.Conv2d and isinstance(twin[1].weight, nn.Parameter)


# --------------------------------------------------------------------------- row-scaled (weighted) conversion


def _weighted_err(W, W0, w):
    return float(((W - W0).square() * w[:, None]).sum() / (W0.square() * w[:, None]).sum()).__pow__(0.5)


@pytest.mark.parametrize("method", ["sttp", "svdp"])
def test_row_scaled_full_rank_is_exact_and_counts_the_scales(method):
    torch.manual_seed(0)
    m = nn.Embedding(222, 24).double()  # 222 = 2·3·37: zero-padded to 225 rows by STTP
    W0 = m.weight.detach().clone()
    w = torch.rand(222, dtype=torch.float64) * 50 + 0.1
    p = compress_module(m, rank=10_000, method=method, row_weight=w)
    assert p.row_scaled and p.row_weight is None  # the weight is used by the conversion only
    torch.testing.assert_close(m.weight, W0)
    assert p.dof() == p.tt.dof() + 222 == count_parameters(m)
    torch.testing.assert_close(layer_originals(m)[-1], 1 / w.sqrt())  # ρ starts at 1/√w
    assert p.config()["row_scaled"] is True


def test_row_weighted_svdp_is_the_optimal_weighted_truncation():
    """For SVDP the row-weighted conversion is the best rank-r fit in the weighted norm: its error is the
    singular-value tail of diag(√w)·W, below the plain truncated SVD's weighted error."""
    torch.manual_seed(0)
    W0 = torch.randn(60, 20, dtype=torch.float64)
    w = torch.rand(60, dtype=torch.float64).pow(4) * 100 + 0.01
    weighted, plain = nn.Linear(20, 60).double(), nn.Linear(20, 60).double()
    for m in (weighted, plain):
        m.weight.data.copy_(W0)
    compress_module(weighted, rank=5, method="svdp", row_weight=w)
    compress_module(plain, rank=5, method="svdp")
    s2 = torch.linalg.svdvals(W0 * w.sqrt()[:, None]).square()
    expected = float((s2[5:].sum() / s2.sum()).sqrt())
    assert _weighted_err(weighted.weight.detach(), W0, w) == pytest.approx(expected, rel=1e-9)
    assert _weighted_err(plain.weight.detach(), W0, w) > 1.1 * expected


def test_row_weighted_sttp_lowers_the_weighted_error():
    torch.manual_seed(0)
    W0 = torch.randn(96, 32, dtype=torch.float64)
    w = torch.ones(96, dtype=torch.float64)
    w[:12] = 1000.0  # a few rows matter most (frequent tokens)
    errs = {}
    for name, rw in (("weighted", w), ("plain", None)):
        m = nn.Embedding(96, 32).double()
        m.weight.data.copy_(W0)
        compress_module(m, rank=8, row_weight=rw)
        errs[name] = _weighted_err(m.weight.detach(), W0, w)
    assert errs["weighted"] < 0.6 * errs["plain"]  # measured 0.51 vs 0.90


def test_row_scaled_gradcheck_float64_and_bank_matches_forward():
    from sttp_compress.train.bank import WeightBank

    torch.manual_seed(0)
    m = nn.Embedding(30, 6).double()  # 30 = 2·3·5, no padding
    p = compress_module(m, rank=3, row_weight=torch.rand(30, dtype=torch.float64) + 0.5)
    origs = tuple(o.detach().clone().requires_grad_() for o in layer_originals(m))
    assert torch.autograd.gradcheck(lambda *o: p(*o), origs)
    model = nn.Sequential(m, nn.Linear(6, 4).double())
    compress_module(model[1], rank=2)
    bank = WeightBank(nn.Sequential(m))
    (built,) = bank._build(*bank.inputs)
    torch.testing.assert_close(built, m.weight)



# --------------------------------------------------------------------------- row-ordered conversion


def test_row_ordered_is_the_conversion_of_the_permuted_rows_put_back():
    from sttp_compress.compress.convert import weight_order

    torch.manual_seed(0)
    W0 = torch.randn(222, 24, dtype=torch.float64)  # 222 = 2·3·37: zero-padded to 225 rows by STTP
    w = torch.rand(222, dtype=torch.float64) * 50 + 0.1
    order = weight_order(w)
    assert torch.equal(order, torch.tensor(sorted(range(222), key=lambda i: -float(w[i]))))
    ordered, permuted = nn.Embedding(222, 24).double(), nn.Embedding(222, 24).double()
    ordered.weight.data.copy_(W0)
    permuted.weight.data.copy_(W0[order])
    p = compress_module(ordered, rank=6, row_weight=w, row_order=order)
    q = compress_module(permuted, rank=6, row_weight=w[order])
    assert p.row_ordered and not q.row_ordered and p.config()["row_ordered"] is True
    assert p.dof() == q.dof() == count_parameters(ordered)  # the order is a buffer, not a parameter
    for a, b in zip(layer_originals(ordered), layer_originals(permuted)):  # same parameters (ρ in the order too)
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(ordered.weight[order], permuted.weight)
    assert (ordered.weight - W0).norm() > 0.1 * W0.norm()  # a real truncation
    full = nn.Embedding(222, 24).double()
    full.weight.data.copy_(W0)
    compress_module(full, rank=10_000, row_weight=w, row_order=order)
    torch.testing.assert_close(full.weight, W0)  # exact when the ranks suffice
    with pytest.raises(ValueError, match="permutation"):
        compress_module(nn.Embedding(222, 24), rank=6, row_order=torch.arange(1, 223))


def test_tiered_order_tiers_by_weight_then_groups_alike_rows():
    from sttp_compress.compress.convert import tiered_order, weight_order

    torch.manual_seed(0)
    n, modes = 222, (2, 2, 2, 2, 2, 3, 3)  # 288 slots: the last 66 are padding, after the rows
    values = torch.randperm(n).double()
    W = torch.zeros(n, 5, dtype=torch.float64)
    W[:, 2] = values  # 1-D rows: each block's principal direction is that axis
    w = torch.rand(n, dtype=torch.float64)
    order = tiered_order(W, w, modes, tier_digits=2)
    assert torch.equal(order.sort().values, torch.arange(n))  # a permutation of the rows
    assert torch.equal(order, tiered_order(W, w, modes, tier_digits=2))  # deterministic
    tier = 288 // 4  # the first tier holds the heaviest rows
    assert set(order[:tier].tolist()) == set(weight_order(w)[:tier].tolist())
    # within a tier every block of a trailing digit holds a contiguous run of the values
    for size in (36, 18, 9, 3):
        for start in range(0, n, size):
            v = values[order[start:start + size]]
            same_tier = weight_order(w)[start // tier * tier:(start // tier + 1) * tier]
            inside = values[same_tier].sort().values
            rank = torch.searchsorted(inside, v)
            assert int(rank.max() - rank.min()) == len(v) - 1, (size, start)
    assert torch.equal(tiered_order(W, w, modes, tier_digits=0, dims=None).sort().values, torch.arange(n))
    with pytest.raises(ValueError, match="fewer than"):
        tiered_order(W, w, (2, 3), tier_digits=0)


def test_tiered_order_lowers_the_error_of_clustered_rows():
    from sttp_compress.compress.convert import tiered_order

    torch.manual_seed(0)
    centres = torch.randn(16, 24, dtype=torch.float64) * 3
    W0 = (centres.repeat_interleave(16, 0) + 0.05 * torch.randn(256, 24, dtype=torch.float64))[torch.randperm(256)]
    w = torch.ones(256, dtype=torch.float64)
    errors = {}
    for name, order in (("vocabulary", None), ("tiered", tiered_order(W0, w, (2,) * 8, tier_digits=0))):
        m = nn.Embedding(256, 24).double()
        m.weight.data.copy_(W0)
        compress_module(m, rank=16, row_weight=w, row_order=order)  # 16 clusters: rank 16 holds them in order
        errors[name] = float((m.weight.detach() - W0).norm() / W0.norm())
    assert errors["tiered"] < 0.05 < 0.3 < errors["vocabulary"], errors


def test_row_ordered_gradcheck_bank_and_checkpoint_round_trip(tmp_path):
    from sttp_compress.train.bank import WeightBank
    from sttp_compress.io.checkpoint import load_compressed, save_compressed

    torch.manual_seed(0)
    m = nn.Embedding(30, 6).double()
    p = compress_module(m, rank=3, row_weight=torch.rand(30, dtype=torch.float64) + 0.5,
                        row_order=torch.randperm(30))
    origs = tuple(o.detach().clone().requires_grad_() for o in layer_originals(m))
    assert torch.autograd.gradcheck(lambda *o: p(*o), origs)
    bank = WeightBank(nn.Sequential(m))
    (built,) = bank._build(*bank.inputs)
    torch.testing.assert_close(built, m.weight)
    arch = tmp_path / "net.py"
    arch.write_text("from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Embedding(30, 6))\n")
    model = nn.Sequential(m.float())
    path = tmp_path / "m.sttp.safetensors"
    save_compressed(model, path, f"{arch}:build")
    state = read_compressed(path)["state_dict"]
    torch.testing.assert_close(state["0.parametrizations.weight.0.row_order"], p.row_order)
    loaded, _ = load_compressed(path, f"{arch}:build")  # the structure from the config, the order from the state
    assert loaded[0].parametrizations.weight[0].row_ordered
    torch.testing.assert_close(loaded[0].weight, model[0].weight)


# --------------------------------------------------------------------------- column-scaled (activation-aware)


@pytest.mark.parametrize("method", ["sttp", "svdp"])
def test_col_scaled_full_rank_is_exact_and_counts_the_scales(method):
    torch.manual_seed(0)
    m = nn.Conv2d(37, 8, 3).double()  # columns 37·3·3 = 333: 37 is zero-padded to 40 by STTP
    W0 = m.weight.detach().clone()
    c = torch.rand(333, dtype=torch.float64) * 20 + 0.1
    p = compress_module(m, rank=10_000, method=method, col_weight=c)
    assert p.col_scaled and not p.row_scaled and p.col_weight is None
    torch.testing.assert_close(m.weight, W0)
    assert p.dof() == p.tt.dof() + 333 == count_parameters(m) - 8  # less the bias
    torch.testing.assert_close(layer_originals(m)[-1], 1 / c.sqrt())  # γ starts at 1/√c
    assert p.config()["col_scaled"] is True


def test_col_weighted_svdp_is_the_optimal_weighted_truncation_and_sttp_lowers_it():
    """The column-weighted error ‖(W1 − W0) diag(√c)‖ — the output error for inputs whose features have
    second moments c — is the singular-value tail of W0·diag(√c) for SVDP, and lower than plain for STTP."""
    torch.manual_seed(0)
    W0 = torch.randn(20, 64, dtype=torch.float64)
    c = torch.ones(64, dtype=torch.float64)
    c[:8] = 1000.0  # a few input features carry most of the activation energy

    def err(W):
        return float((((W - W0) * c.sqrt()).square().sum() / (W0 * c.sqrt()).square().sum()).sqrt())

    for method, rank in (("svdp", 5), ("sttp", 6)):
        errs = {}
        for name, cw in (("weighted", c), ("plain", None)):
            m = nn.Linear(64, 20).double()
            m.weight.data.copy_(W0)
            compress_module(m, rank=rank, method=method, col_weight=cw)
            errs[name] = err(m.weight.detach())
        if method == "svdp":
            s2 = torch.linalg.svdvals(W0 * c.sqrt()).square()
            assert errs["weighted"] == pytest.approx(float((s2[5:].sum() / s2.sum()).sqrt()), rel=1e-9)
        assert errs["weighted"] < 0.8 * errs["plain"], (method, errs)


def test_row_and_col_scaled_gradcheck_float64_bank_and_checkpoint_structure():
    from sttp_compress.train.bank import WeightBank

    torch.manual_seed(0)
    m = nn.Linear(12, 30).double()
    p = compress_module(m, rank=3, row_weight=torch.rand(30, dtype=torch.float64) + 0.5,
                        col_weight=torch.rand(12, dtype=torch.float64) + 0.5)
    assert p.n_originals == len(p.groups) + 3 and p.dof() == p.tt.dof() + 30 + 12
    origs = tuple(o.detach().clone().requires_grad_() for o in layer_originals(m))
    assert torch.autograd.gradcheck(lambda *o: p(*o), origs)
    bank = WeightBank(nn.Sequential(m))
    (built,) = bank._build(*bank.inputs)
    torch.testing.assert_close(built, m.weight)
    U, s, V = p.factors(*layer_originals(m))  # ρ on U's rows, γ on V's rows
    torch.testing.assert_close((U * s) @ V.T, m.weight)
    twin = nn.Linear(12, 30).double()  # the structure a checkpoint's config rebuilds, then its state
    compress_module(twin, **{k: v for k, v in p.config().items() if k in ("rank", "method", "spectrum")},
                    convert=False, row_scaled=True, col_scaled=True)
    twin.load_state_dict(m.state_dict())
    torch.testing.assert_close(twin.weight, m.weight)


def test_eval_cache_is_rebuilt_after_a_fused_optimizer_step():
    """AdamW(fused=True) updates in place without bumping version counters: the train/eval switch
    must still drop the cached weight (fine-tunes through the weight bank, whose forwards never touch
    the cache, kept the pre-training weight for evaluation)."""
    from sttp_compress.train.bank import WeightBank
    from sttp_compress.compress.convert import compress_module

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 36))
    compress_module(model[0], 5)
    model.eval()
    with torch.no_grad():
        cached = model[0].weight.clone()
    model.train()
    bank = WeightBank(model).attach()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    model(torch.randn(8, 24)).square().sum().backward()
    versions = [p._version for p in model.parameters()]
    opt.step()
    bank.detach()
    assert [p._version for p in model.parameters()] == versions  # the hazard: nothing marks the update
    model.eval()
    with torch.no_grad():
        rebuilt = model[0].weight.clone()
        model.train()
        fresh = model[0].weight.clone()
    assert not torch.allclose(rebuilt, cached)
    torch.testing.assert_close(rebuilt, fresh, rtol=0, atol=0)
