import pytest
import torch

import vnm
from vnm import VNMTensor
from _util import masked, rel_err

TOL = {torch.float32: 1e-6, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def reference(x, stored, perm=None, bias=None, row_perm=None):
    """float64 dense reference of spmm: y[..., row_perm] = x[..., perm] @ S.T for the stored
    matrix S, plus bias (in output order)."""
    xd = x.double()
    if perm is not None:
        xd = xd[..., perm.long()]
    ys = xd @ stored.double().T
    y = ys if row_perm is None else torch.empty_like(ys).index_copy_(-1, row_perm.long(), ys)
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pattern", ["2:4", "64:2:8", "64:2:5", "16:2:5", "128:2:16", "32:2:32"])
@pytest.mark.parametrize("perms", ["none", "cols", "rows", "both"])
@pytest.mark.parametrize("use_bias", [False, True])
def test_spmm_matches_float64_reference(dtype, pattern, perms, use_bias, gen):
    R, K, N = 203, 75, 37  # nothing a multiple of V, M or the token tile
    w = torch.randn(R, K, generator=gen).to(dtype)
    mask = vnm.select_mask(torch.rand(R, K, generator=gen), pattern)
    perm = torch.randperm(K, generator=gen) if perms in ("cols", "both") else None
    row_perm = torch.randperm(R, generator=gen) if perms in ("rows", "both") else None
    bias = torch.randn(R, generator=gen).to(dtype) if use_bias else None
    t = VNMTensor.from_dense(w, mask, pattern, perm=perm, row_perm=row_perm)
    x = torch.randn(N, K, generator=gen).to(dtype)
    y = vnm.spmm(t, x, bias)
    assert y.dtype == dtype and y.shape == (N, R)
    assert rel_err(y, reference(x, masked(w, mask), perm, bias, row_perm)) < TOL[dtype]
    # the same function through the effective dense weight (both permutations undone)
    y_dense = x.double() @ t.effective_dense().double().T
    assert rel_err(y, y_dense if bias is None else y_dense + bias.double()) < TOL[dtype]


@pytest.mark.parametrize("pattern,R,K", [("64:2:8", 20, 6), ("128:2:5", 7, 300), ("16:2:16", 40, 3)])
def test_spmm_shapes_smaller_than_a_block(pattern, R, K, gen):
    """R < V and K < M: the storage is all padding but for a corner; spmm still matches."""
    w = torch.randn(R, K, generator=gen)
    mask = vnm.select_mask(torch.rand(R, K, generator=gen), pattern)
    row_perm = torch.randperm(R, generator=gen)
    t = VNMTensor.from_dense(w, mask, pattern, row_perm=row_perm)
    x = torch.randn(5, K, generator=gen)
    b = torch.randn(R, generator=gen)
    assert rel_err(vnm.spmm(t, x, b), reference(x, masked(w, mask), None, b, row_perm)) < 1e-6


def test_spmm_many_tokens_and_leading_dims(gen):
    R, K = 70, 96
    w = torch.randn(R, K, generator=gen)
    mask = vnm.select_mask(w.abs(), "64:2:8")
    t = VNMTensor.from_dense(w, mask, "64:2:8")
    x = torch.randn(3, 200, K, generator=gen)  # 600 tokens: more than one chunk
    y = vnm.spmm(t, x)
    assert y.shape == (3, 200, R)
    assert rel_err(y, reference(x, masked(w, mask))) < 1e-6


def test_spmm_non_contiguous_and_single_token(gen):
    w = torch.randn(40, 24, generator=gen)
    mask = vnm.select_mask(w.abs(), "16:2:6")
    t = VNMTensor.from_dense(w, mask, "16:2:6")
    x = torch.randn(24, 9, generator=gen).T  # non-contiguous view
    assert rel_err(vnm.spmm(t, x), reference(x, masked(w, mask))) < 1e-6
    x1 = torch.randn(24, generator=gen)
    assert vnm.spmm(t, x1).shape == (40,)
    assert vnm.spmm(t, torch.empty(0, 24)).shape == (0, 40)


def test_spmm_ignores_nonfinite_inputs_only_through_kept_weights():
    # Padding columns never read x: an Inf in the last real column stays confined to the rows
    # whose kept weights touch it.
    w = torch.ones(16, 6)
    mask = torch.zeros(16, 6, dtype=torch.bool)
    mask[:, :2] = True
    t = VNMTensor.from_dense(w, mask, "16:2:8")
    x = torch.ones(1, 6)
    x[0, 5] = float("inf")
    assert torch.equal(vnm.spmm(t, x), torch.full((1, 16), 2.0))


def test_spmm_errors_name_expected_and_actual():
    w = torch.randn(32, 16)
    t = VNMTensor.from_dense(w, vnm.select_mask(w.abs(), "16:2:8"), "16:2:8")
    with pytest.raises(ValueError, match=r"x has shape \(4, 15\): its last dimension must be K=16"):
        vnm.spmm(t, torch.randn(4, 15))
    with pytest.raises(TypeError, match=r"x is torch.float16 but the weight is torch.float32; cast x"):
        vnm.spmm(t, torch.randn(4, 16).half())
    with pytest.raises(TypeError, match="float32, torch.float16 and torch.bfloat16"):
        vnm.spmm(t, torch.randn(4, 16).double())
    with pytest.raises(ValueError, match="x is on meta but the weight is on cpu"):
        vnm.spmm(t, torch.randn(4, 16, device="meta"))
    with pytest.raises(ValueError, match=r"bias must have shape \(32,\), got \(16,\)"):
        vnm.spmm(t, torch.randn(4, 16), torch.randn(16))
    with pytest.raises(TypeError, match="bias is torch.float16 but x is torch.float32"):
        vnm.spmm(t, torch.randn(4, 16), torch.randn(32).half())
    with pytest.raises(TypeError, match="must be a vnm.VNMTensor"):
        vnm.spmm(w, torch.randn(4, 16))
    mask = vnm.select_mask(w.abs(), "16:2:8")
    with pytest.raises(ValueError, match=r"row_perm must have shape \(32,\) \(one entry per output row\)"):
        VNMTensor.from_dense(w, mask, "16:2:8", row_perm=torch.arange(16))
    with pytest.raises(ValueError, match="row_perm is not a permutation of 0..31"):
        VNMTensor.from_dense(w, mask, "16:2:8", row_perm=torch.zeros(32, dtype=torch.int64))


def test_raw_op_rejects_index_arrays_that_are_not_permutations():
    """The C++ reference writes y through row_perm and reads x through perm: the binding checks
    both (a bad call to the raw op must raise, never touch memory out of bounds)."""
    w = torch.randn(32, 16)
    t = VNMTensor.from_dense(w, vnm.select_mask(w.abs(), "16:2:8"), "16:2:8")
    x = torch.randn(4, 16)
    bad_rows = torch.full((32,), 1000, dtype=torch.int32)
    with pytest.raises(ValueError, match="row_perm is not a permutation"):
        torch.ops.vnm.spmm(x, t.values, t.meta, t.columns, None, bad_rows, None, "16:2:8", 32, 16)
    bad_cols = torch.arange(16, dtype=torch.int32)
    bad_cols[3] = -1
    with pytest.raises(ValueError, match="perm is not a permutation"):
        torch.ops.vnm.spmm(x, t.values, t.meta, t.columns, bad_cols, None, None, "16:2:8", 32, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_extras", [False, True])
def test_opcheck_cpu(dtype, with_extras, gen):
    R, K = 48, 40
    w = torch.randn(R, K, generator=gen).to(dtype)
    perm = torch.randperm(K, generator=gen) if with_extras else None
    rows = torch.randperm(R, generator=gen) if with_extras else None
    t = VNMTensor.from_dense(w, vnm.select_mask(w.float().abs(), "16:2:5"), "16:2:5", perm=perm, row_perm=rows)
    x = torch.randn(7, K, generator=gen).to(dtype).requires_grad_(dtype == torch.float32)
    bias = torch.randn(R, generator=gen).to(dtype) if with_extras else None
    args = (x, t.values, t.meta, t.columns, t.perm, t.row_perm, bias, "16:2:5", R, K)
    torch.library.opcheck(torch.ops.vnm.spmm.default, args)


def test_gradient_wrt_input_and_bias(gen):
    R, K = 40, 32
    w = torch.randn(R, K, generator=gen)
    mask = vnm.select_mask(w.abs(), "16:2:8")
    perm = torch.randperm(K, generator=gen)
    rows = torch.randperm(R, generator=gen)
    t = VNMTensor.from_dense(w, mask, "16:2:8", perm=perm, row_perm=rows)
    x = torch.randn(5, K, generator=gen, requires_grad=True)
    b = torch.randn(R, generator=gen, requires_grad=True)
    go = torch.randn(5, R, generator=gen)
    (vnm.spmm(t, x, b) * go).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    b2 = b.detach().clone().requires_grad_()
    logical = torch.empty_like(w)
    logical[rows] = masked(w, mask)  # output row rows[r] holds stored row r
    ((x2[:, perm] @ logical.T + b2) * go).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5) and torch.allclose(b.grad, b2.grad, atol=1e-5)


@pytest.mark.slow
def test_spmm_under_torch_compile_fullgraph(gen):
    w = torch.randn(64, 48, generator=gen)
    t = VNMTensor.from_dense(w, vnm.select_mask(w.abs(), "64:2:8"), "64:2:8")
    bias = torch.randn(64, generator=gen)

    def f(x):
        return torch.relu(vnm.spmm(t, x, bias)) * 2

    compiled = torch.compile(f, fullgraph=True)
    x = torch.randn(6, 48, generator=gen)
    assert torch.allclose(compiled(x), f(x))


def test_cast_hook_matches_torch_rounding_on_every_half_and_bfloat16():
    from vnm._native import _C

    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    for dtype, code in ((torch.float16, 1), (torch.bfloat16, 2)):
        src = every.view(dtype)
        out = torch.empty(src.shape, dtype=torch.float32)
        _C._cast(every, code, out, 0)
        expected = src.float()
        same = (out == expected) | (out.isnan() & expected.isnan())
        assert bool(same.all()), dtype
    # float32 -> half / bfloat16: random values across the range, halfway cases and overflow
    g = torch.Generator().manual_seed(0)
    x = torch.cat([
        torch.randn(200000, generator=g) * torch.exp2(torch.randint(-30, 20, (200000,), generator=g).float()),
        (torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
         + torch.exp2(torch.tensor(-25.0))),
        torch.tensor([65504.0, 65519.0, 65520.0, 1e6, -1e6, 6e-8, 3e-8, 2.9802322e-08, float("inf")]),
    ])
    for dtype, code in ((torch.float16, 1), (torch.bfloat16, 2)):
        out = torch.empty(x.shape, dtype=torch.int16)
        _C._cast(x, 0, out, code)
        expected = x.to(dtype)
        got = out.view(dtype)
        same = (got.view(torch.int16) == expected.view(torch.int16)) | (got.isnan() & expected.isnan())
        assert bool(same.all()), (dtype, x[~same][:5])
