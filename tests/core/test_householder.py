import pytest
import torch

from sttp_compress.core.householder import FramePlan, frame, frame_inverse, frame_numel, reflectors

SHAPES = [(5, 3), (4, 4), (10, 1), (7, 2), (64, 16), (3, 1)]


def _sequential_product(V: torch.Tensor) -> torch.Tensor:
    """Reference: H1 H2 ... Hr I_{d×r}, one reflector at a time."""
    *batch, d, r = V.shape
    Q = torch.eye(d, dtype=V.dtype).expand(*batch, d, d)
    for i in range(r):
        h = V[..., :, i:i + 1]
        Q = Q @ (torch.eye(d, dtype=V.dtype) - 2 * h @ h.transpose(-1, -2) / (h * h).sum((-2, -1), keepdim=True))
    return Q[..., :, :r]


def _random_reduced(batch, d, r, dtype=torch.float64):
    """A random St_U frame: orthonormal with upper-triangular leading r×r block."""
    X = torch.linalg.qr(torch.randn(batch, d, r, dtype=dtype)).Q
    J = torch.flip(torch.eye(r, dtype=dtype), [0])
    Q0, _ = torch.linalg.qr((J @ X[:, :r]).transpose(-1, -2))
    return X @ (J @ Q0.transpose(-1, -2)).transpose(-1, -2)


@pytest.mark.parametrize("reduced", [False, True])
@pytest.mark.parametrize("d,r", SHAPES)
def test_frame_matches_sequential_reflectors_and_torch(d, r, reduced):
    torch.manual_seed(d * 10 + r)
    p = torch.randn(3, frame_numel(d, r, reduced), dtype=torch.float64)
    X = frame(p, d, r, reduced)
    V = reflectors(p, d, r, reduced)
    torch.testing.assert_close(X, _sequential_product(V), rtol=0, atol=1e-12)
    tau = 2 / (V * V).sum(-2)
    torch.testing.assert_close(X, torch.linalg.householder_product(V, tau), rtol=0, atol=1e-12)
    torch.testing.assert_close(X.transpose(-1, -2) @ X, torch.eye(r, dtype=torch.float64).expand(3, r, r),
                               rtol=0, atol=1e-12)
    if reduced:  # leading block upper triangular
        assert torch.tril(X[:, :r], -1).abs().max() < 1e-12 if r > 1 else True


def test_free_entry_counts():
    assert frame_numel(512, 64) == 512 * 64 - 64 * 65 // 2
    assert frame_numel(512, 64, reduced=True) == 512 * 64 - 64 * 64
    assert frame_numel(4, 4, reduced=True) == 0
    with pytest.raises(ValueError):
        frame_numel(3, 4)
    # structural zeros and ones are not parameters: every packed entry changes the frame
    p = torch.randn(frame_numel(6, 3), dtype=torch.float64, requires_grad=True)
    g = torch.autograd.grad(frame(p, 6, 3).sum(), p)[0]
    assert (g != 0).all()


@pytest.mark.parametrize("reduced", [False, True])
@pytest.mark.parametrize("d,r", [(5, 3), (4, 4), (64, 16), (1, 1), (9, 1)])
def test_inverse_reproduces_frame_up_to_signs_float32(d, r, reduced):
    torch.manual_seed(r)
    X = (_random_reduced(4, d, r) if reduced else torch.linalg.qr(torch.randn(4, d, r, dtype=torch.float64)).Q)
    X32 = X.float()
    p, s = frame_inverse(X32, reduced)
    assert p.dtype == torch.float32 and p.shape == (4, frame_numel(d, r, reduced))
    assert set(s.unique().tolist()) <= {-1.0, 1.0}
    Y = frame(p, d, r, reduced) * s.unsqueeze(-2)
    assert (Y - X32).abs().max() < 1e-5


def test_inverse_of_identity_like_frames_needs_sign_flips():
    # e_i columns need no reflection (LAPACK tau = 0); our reflector flips them, the sign undoes it
    X = torch.eye(5, 3, dtype=torch.float64)
    for reduced in (False, True):
        p, s = frame_inverse(X, reduced)
        torch.testing.assert_close(frame(p, 5, 3, reduced) * s, X, rtol=0, atol=1e-12)
        assert (s == -1).all()


def test_gradcheck_full_and_reduced():
    torch.manual_seed(0)
    for reduced in (False, True):
        p = torch.randn(2, frame_numel(7, 3, reduced), dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda q: frame(q, 7, 3, reduced), (p,))


def test_batched_equals_one_by_one():
    p = torch.randn(5, frame_numel(12, 4), dtype=torch.float64)
    torch.testing.assert_close(frame(p, 12, 4), torch.stack([frame(q, 12, 4) for q in p]))


def test_frame_plan_equals_frame_per_shape():
    """Padded batched frames of many shapes (with reorderings and −I frames) equal frame() per shape."""
    torch.manual_seed(0)
    shapes = [(2, 2, True), (1, 1, False), (8, 4, False), (8, 4, True), (12, 4, True), (16, 8, False),
              (9, 3, False), (64, 64, False), (6, 6, False)]
    counts = [3, 2, 4, 5, 2, 3, 1, 2, 3]
    orders = [None, None, [3, 1, 0, 2], None, [1, 0], None, None, None, None]
    params = [torch.randn(c, frame_numel(d, r, red), dtype=torch.float64)
              for (d, r, red), c in zip(shapes, counts)]
    plan = FramePlan(shapes, counts, orders)
    assert 1 < len(plan.buckets) < len(shapes)  # batched across shapes, but not all padded to 64x64
    for b in plan.buckets:  # padding at most doubles the entries computed
        assert b.n * b.D * b.R <= 2 * sum(counts[i] * shapes[i][0] * shapes[i][1] for i in b.entries)
    out = plan(params)
    for i, ((d, r, red), o) in enumerate(zip(shapes, orders)):
        ref = frame(params[i], d, r, red)
        ref = ref if o is None else ref[o]
        torch.testing.assert_close(out[i], ref, rtol=0, atol=1e-12)
    assert torch.equal(out[0], -torch.eye(2, dtype=torch.float64).expand(3, 2, 2))
    # a list of row blocks per entry is the same as their concatenation
    split = plan([list(p.split([1, p.shape[0] - 1])) if p.shape[0] > 1 else p for p in params])
    for a, b in zip(out, split):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_frame_plan_gradcheck():
    torch.manual_seed(1)
    shapes, counts = [(5, 2, False), (6, 3, True), (3, 3, True), (4, 4, False)], [2, 1, 2, 1]
    plan = FramePlan(shapes, counts, [[1, 0], None, None, None])
    params = [torch.randn(c, frame_numel(d, r, red), dtype=torch.float64, requires_grad=True)
              for (d, r, red), c in zip(shapes, counts)]
    torch.autograd.gradcheck(lambda *p: tuple(plan(list(p))), tuple(params))
    sum(x.sum() for x in plan(params)).backward()
    assert params[2].grad is not None and params[2].grad.shape == (2, 0)  # −I frames still get a gradient
