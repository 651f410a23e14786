"""GPU tests of the mma.sp SpMM kernels, packing and the CUDA ops.

Skipped (with the reason) when there is no CUDA GPU or vnm was built without CUDA. Every check
poisons the output with NaN first, draws fresh random data, and compares with the CPU reference
(relative error < 1e-2); on small-integer data the GPU must equal the CPU emulation of the same
kernel bit for bit (the layout proof on hardware).
"""

from __future__ import annotations

import pytest
import torch

import vnm
from vnm import VNMTensor, cuda_ops
from vnm._native import _C
from _util import masked, rel_err

HAS_GPU = torch.cuda.is_available() and vnm.CUDA_BUILT
_reason = (
    "vnm was built without CUDA" if not vnm.CUDA_BUILT
    else "no CUDA GPU visible" if not torch.cuda.is_available()
    else ""
)
pytestmark = pytest.mark.skipif(not HAS_GPU, reason=_reason or "needs a CUDA GPU and a CUDA build")
if HAS_GPU and torch.cuda.get_device_capability()[0] < 8:
    pytestmark = pytest.mark.skip(reason="the mma.sp kernels need compute capability 8.0+")

DEV = "cuda"
CODES = {torch.float16: 1, torch.bfloat16: 2}
VS = [16, 32, 64, 128]
MS = [4, 5, 8, 16, 32]
NS = [1, 7, 16, 128, 1000, 4096]
R_ODD, K_ODD = 203, 333


def _make(pattern, R, K, dtype, gen, perm=False, integer=False, device=DEV, rows=False):
    if integer:
        w = torch.randint(-3, 4, (R, K), generator=gen).to(dtype)
    else:
        w = torch.randn(R, K, generator=gen).to(dtype)
    mask = vnm.select_mask(torch.rand(R, K, generator=gen), pattern)
    mask &= torch.rand(R, K, generator=gen) > 0.1  # rows keeping fewer than 2 in some groups
    pm = torch.randperm(K, generator=gen) if perm else None
    rp = torch.randperm(R, generator=gen) if rows else None
    t = VNMTensor.from_dense(w, mask, pattern, perm=pm, row_perm=rp)
    return t.to(device), w, mask, pm


def _reference(x, w, mask, perm, bias, rows=None):
    """float64 on the CPU: y[:, rows] = x[:, perm] @ (w * mask).T, plus bias (output order)."""
    xd = x.detach().cpu().double()
    if perm is not None:
        xd = xd[:, perm.long()]
    ys = xd @ masked(w, mask).double().T
    y = ys if rows is None else torch.empty_like(ys).index_copy_(1, rows.detach().cpu().long(), ys)
    return y if bias is None else y + bias.detach().cpu().double()


def _run(p: cuda_ops.PackedVNM, x, bias, path=0, force_gather=False, decode_splits=0):
    """The kernel into a NaN-poisoned output (every element must be written)."""
    R, K = p.shape
    y = torch.full((x.shape[0], R), float("nan"), dtype=x.dtype, device=x.device)
    cuda_ops._spmm_packed_into(x, p.values, p.meta, p.kidx, bias, p.pattern_text, R, K,
                               p.has_perm, y, path=path, force_gather=force_gather, rows=p.rows,
                               decode_splits=decode_splits)
    torch.cuda.synchronize()
    assert bool(torch.isfinite(y).all()), "the kernel left output elements unwritten"
    return y


def _pattern(V, M):
    return f"{V}:2:{M}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("V", VS)
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("N", NS)
def test_spmm_matches_reference(dtype, V, M, N, gen):
    # perm, output rows and bias alternate over the grid so that every (V, M) and every N meets
    # each of them.
    use_perm = (V // 16 + M + N) % 2 == 0
    use_bias = (V // 16 + M) % 2 == 1
    use_rows = (V // 16 + N) % 2 == 1
    t, w, mask, perm = _make(_pattern(V, M), R_ODD, K_ODD, dtype, gen, perm=use_perm, rows=use_rows)
    x = torch.randn(N, K_ODD, generator=gen).to(dtype)
    bias = torch.randn(R_ODD, generator=gen).to(dtype) if use_bias else None
    p = cuda_ops.pack(t)
    y = _run(p, x.to(DEV), None if bias is None else bias.to(DEV))
    assert rel_err(y.cpu(), _reference(x, w, mask, perm, bias, t.row_perm)) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pattern", ["2:4", "16:2:5", "32:2:8", "48:2:7", "64:2:16", "128:2:32"])
@pytest.mark.parametrize("use_perm,use_bias", [(False, False), (True, True), (True, False), (False, True)])
def test_both_kernels_and_b_paths(dtype, pattern, use_perm, use_bias, gen):
    """Decode and tiled kernels forced on the same inputs (N across the threshold), and for
    M == 4 the contiguous and the gather B path; through vnm.spmm as well."""
    R, K = 190, 264  # K % 8 == 0: the contiguous B path applies to 2:4 without perm
    t, w, mask, perm = _make(pattern, R, K, dtype, gen, perm=use_perm, rows=use_bias)
    p = cuda_ops.pack(t)
    for N in (1, 31, 33, 300):
        x = torch.randn(N, K, generator=gen).to(dtype)
        bias = torch.randn(R, generator=gen).to(dtype) if use_bias else None
        ref = _reference(x, w, mask, perm, bias, t.row_perm)
        xd, bd = x.to(DEV), None if bias is None else bias.to(DEV)
        for path in (1, 2):
            for gather in (False, True):
                assert rel_err(_run(p, xd, bd, path, gather).cpu(), ref) < 1e-2, (N, path, gather)
        assert rel_err(vnm.spmm(t, xd, bd).cpu(), ref) < 1e-2


@pytest.mark.parametrize("pattern", ["2:4", "64:2:8", "16:2:5", "32:2:16"])
def test_gpu_equals_cpu_emulation_bit_for_bit_on_integers(pattern, gen):
    """Small integers make every sum exact, so the GPU must reproduce the CPU emulation of the
    same kernel exactly: the packed layout, fragment maps and metadata are right on hardware."""
    R, K = 150, 200
    for dtype in (torch.float16, torch.bfloat16):
        t, w, mask, perm = _make(pattern, R, K, dtype, gen, perm=True, integer=True, rows=True)
        p = cuda_ops.pack(t)
        pc = p.to("cpu")
        for N, path in ((5, 1), (70, 2)):
            x = torch.randint(-3, 4, (N, K), generator=gen).to(dtype)
            y_gpu = _run(p, x.to(DEV), None, path).cpu()
            y_cpu = torch.full((N, R), float("nan"), dtype=dtype)
            err = _C._emulate_spmm(t.pattern, R, K, CODES[dtype], pc.values.view(torch.int16),
                                   pc.meta, pc.kidx, pc.rows, x.view(torch.int16), N, None,
                                   y_cpu.view(torch.int16), path, False)
            assert err == ""
            assert torch.equal(y_gpu, y_cpu), (dtype, N, path)
            # the exact integer result, rounded once to the output type
            assert torch.equal(y_gpu, _reference(x, w, mask, perm, None, t.row_perm).to(dtype))


# The decode kernel (N <= 32) on the grid its CPU emulation covers (tests/test_mma_model.py):
# every M, R < V, R = V and R not a multiple of V, odd K, N in {1, 7, 16, 32}, perm and row_perm,
# its own k split and forced ones (1: direct store; 3: workspace and reduction pass).
DECODE_VR = [(16, 13), (16, 16), (32, 32), (32, 75), (48, 40), (48, 100), (64, 40), (64, 64),
             (64, 150), (128, 200)]


@pytest.mark.parametrize("V,R", DECODE_VR)
@pytest.mark.parametrize("M", MS)
def test_decode_kernel_equals_cpu_emulation_bit_for_bit(V, R, M, gen):
    """Integer data: the decode kernel's output equals its CPU emulation bit for bit (same
    gather, same k split, same reduction order) and the exact result rounded once."""
    pattern = _pattern(V, M) if M > 4 or V > 16 else "2:4"
    K = 333 if M % 2 else 517
    for dtype in (torch.float16, torch.bfloat16):
        t, w, mask, perm = _make(pattern, R, K, dtype, gen, perm=True, integer=True, rows=True)
        p = cuda_ops.pack(t)
        pc = p.to("cpu")
        for N in (1, 7, 16, 32):
            x = torch.randint(-3, 4, (N, K), generator=gen).to(dtype)
            ref = _reference(x, w, mask, perm, None, t.row_perm).to(dtype)
            for splits in (0, 1, 3):
                y_gpu = _run(p, x.to(DEV), None, path=1, decode_splits=splits).cpu()
                y_cpu = torch.full((N, R), float("nan"), dtype=dtype)
                err = _C._emulate_spmm(t.pattern, R, K, CODES[dtype], pc.values.view(torch.int16),
                                       pc.meta, pc.kidx, pc.rows, x.view(torch.int16), N, None,
                                       y_cpu.view(torch.int16), 1, False, splits)
                assert err == ""
                assert torch.equal(y_gpu, y_cpu), (dtype, N, splits)
                assert torch.equal(y_gpu, ref), (dtype, N, splits)


def test_decode_split_k_is_deterministic_and_its_workspace_checked(gen):
    """Same bits on every run (no atomics); the workspace the C++ entry allocates itself on the
    stream (None) gives the same result as the torch one; a too small one is refused."""
    R, K, N = 4096, 4096, 16
    t, w, mask, perm = _make("64:2:8", R, K, torch.float16, gen, perm=True, rows=True)
    p = cuda_ops.pack(t)
    assert _C._decode_plan(t.pattern, R, K, N)["splits"] > 1
    x = torch.randn(N, K, generator=gen).half().to(DEV)
    runs = [_run(p, x, None) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    assert rel_err(runs[0].cpu(), _reference(x, w, mask, perm, None, t.row_perm)) < 1e-2
    stream = torch.cuda.current_stream().cuda_stream
    dl = cuda_ops._dl
    y = torch.full((N, R), float("nan"), dtype=torch.float16, device=DEV)
    _C.cuda_spmm(t.pattern, R, K, 1, dl(p.values), dl(p.meta), dl(p.kidx), True, dl(p.rows), dl(x),
                 N, None, dl(y), x.device.index, stream, 0, False, workspace=None, decode_splits=0)
    torch.cuda.synchronize()
    assert torch.equal(y, runs[0])
    small = torch.empty(10, dtype=torch.float32, device=DEV)
    with pytest.raises(ValueError, match="workspace holds 10 floats but .* are needed"):
        _C.cuda_spmm(t.pattern, R, K, 1, dl(p.values), dl(p.meta), dl(p.kidx), True, dl(p.rows),
                     dl(x), N, None, dl(y), x.device.index, stream, 0, False, workspace=dl(small),
                     decode_splits=0)


def test_large_layer_against_dense_matmul(gen):
    """LLaMA-7B MLP shape, decode and prefill token counts, fp16 64:2:8 vs fp32 dense on GPU."""
    R, K = 11008, 4096
    w = torch.randn(R, K, generator=gen).half()
    mask = vnm.select_mask(w.float().abs(), "64:2:8")
    t = VNMTensor.from_dense(w, mask, "64:2:8").to(DEV)
    dense = masked(w, mask).float().to(DEV)
    for N in (1, 2048):
        x = torch.randn(N, K, generator=gen).half().to(DEV)
        y = _run(cuda_ops.packed_for(t), x, None)
        assert rel_err(y.float(), x.float() @ dense.T) < 1e-2


@pytest.mark.parametrize("pattern", ["64:2:8", "2:4", "16:2:5"])
def test_pack_unpack_on_gpu_equal_cpu(pattern, gen):
    t_cpu, _, _, _ = _make(pattern, 141, 99, torch.bfloat16, gen, perm=True, device="cpu")
    p_cpu = cuda_ops.pack(t_cpu)
    p_gpu = cuda_ops.pack(t_cpu.to(DEV))
    for name in ("values", "meta", "kidx"):
        assert torch.equal(getattr(p_gpu, name).cpu(), getattr(p_cpu, name)), name
    back = cuda_ops.unpack(p_gpu)
    for name in ("values", "meta", "columns", "perm"):
        assert torch.equal(getattr(back, name).cpu(), getattr(t_cpu, name)), name


def test_spmm_caches_the_packed_form_and_backward_works(gen):
    t, w, mask, perm = _make("32:2:6", 96, 80, torch.float16, gen, perm=True, rows=True)
    x = torch.randn(9, 80, generator=gen).half().to(DEV).requires_grad_()
    b = torch.randn(96, generator=gen).half().to(DEV).requires_grad_()
    y = vnm.spmm(t, x, b)
    p = t._packed
    assert p is not None and vnm.spmm(t, x, b) is not None and t._packed is p
    go = torch.randn_like(y)
    (y.float() * go.float()).sum().backward()
    dense = masked(w, mask).double()
    gx = torch.zeros(9, 80, dtype=torch.float64)
    gx[:, perm.long()] = go.cpu().double()[:, t.row_perm.cpu().long()] @ dense
    assert rel_err(x.grad.cpu(), gx) < 1e-2
    assert rel_err(b.grad.cpu(), go.cpu().double().sum(0)) < 1e-2


@pytest.mark.parametrize("N", [8, 40])  # decode (split-K workspace from the graph's pool), tiled
def test_cuda_graph_capture_on_a_side_stream(N, gen):
    t, w, mask, perm = _make("64:2:8", 256, 512, torch.float16, gen, perm=True, rows=True)
    bias = torch.randn(256, generator=gen).half().to(DEV)
    x_static = torch.randn(N, 512, generator=gen).half().to(DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up: packs once and caches
            vnm.spmm(t, x_static, bias)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        y_static = vnm.spmm(t, x_static, bias)
    for _ in range(3):
        x_new = torch.randn(N, 512, generator=gen).half()
        x_static.copy_(x_new.to(DEV))
        y_static.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(y_static.cpu(), _reference(x_new, w, mask, perm, bias.cpu(), t.row_perm)) < 1e-2


@pytest.mark.parametrize("with_extras", [False, True])
def test_opcheck_on_cuda(with_extras, gen):
    t, _, _, _ = _make("16:2:5", 48, 40, torch.float16, gen, perm=with_extras, rows=with_extras)
    R, K, pt = 48, 40, t.pattern_text
    torch.library.opcheck(torch.ops.vnm.pack.default, (t.values, t.meta, t.columns, t.perm, pt, R, K))
    p = cuda_ops.pack(t)
    torch.library.opcheck(torch.ops.vnm.unpack.default, (p.values, p.meta, p.kidx, p.perm, pt, R, K))
    torch.library.opcheck(torch.ops.vnm.packed_to_dense.default, (p.values, p.meta, p.kidx, pt, R, K))
    x = torch.randn(7, K, generator=gen).half().to(DEV)
    bias = torch.randn(R, generator=gen).half().to(DEV) if with_extras else None
    torch.library.opcheck(torch.ops.vnm.spmm_packed.default,
                          (x, p.values, p.meta, p.kidx, p.rows, bias, pt, R, K, p.has_perm))
    torch.library.opcheck(torch.ops.vnm.spmm.default,
                          (x, t.values, t.meta, t.columns, t.perm, t.row_perm, bias, pt, R, K))


@pytest.mark.parametrize("N", [5, 100])
def test_misaligned_x_view_falls_back_to_the_gather_path(N, gen):
    """2:4 with K % 8 == 0 reads x with 16-byte loads only when x is 16-byte aligned: a view at an
    odd element offset (contiguous, 2-byte aligned) must take the gather path and stay right."""
    R, K = 96, 128
    t, w, mask, _ = _make("2:4", R, K, torch.float16, gen)
    x = torch.randn(N, K, generator=gen).half()
    storage = torch.empty(N * K + 1, dtype=torch.float16, device=DEV)
    xv = storage[1:].view(N, K).copy_(x.to(DEV))
    assert xv.is_contiguous() and xv.data_ptr() % 16 != 0
    assert rel_err(vnm.spmm(t, xv).cpu(), _reference(x, w, mask, None, None)) < 1e-2


def test_errors_name_the_fix(gen):
    w = torch.randn(32, 16, generator=gen)
    t32 = VNMTensor.from_dense(w, vnm.select_mask(w.abs(), "16:2:8"), "16:2:8").to(DEV)
    with pytest.raises(TypeError, match=r"CUDA kernels \(mma.sp\) take torch.float16 or torch.bfloat16"):
        vnm.spmm(t32, torch.randn(4, 16, device=DEV))
    with pytest.raises(TypeError, match="float16 or torch.bfloat16"):
        cuda_ops.pack(t32)
    t16 = t32.to(dtype=torch.float16)
    with pytest.raises(ValueError, match="x is on cpu but the weight is on cuda"):
        vnm.spmm(t16, torch.randn(4, 16).half())
    p = cuda_ops.pack(t16)
    x = torch.randn(4, 16, device=DEV).half()
    # A packed array that lost its 16-byte alignment (a view at an odd offset) is refused.
    storage = torch.empty(p.values.numel() + 1, dtype=torch.float16, device=DEV)
    shifted = storage[1:].view(p.values.shape).copy_(p.values)
    y = torch.empty(4, 32, dtype=torch.float16, device=DEV)
    with pytest.raises(ValueError, match="16-byte"):
        cuda_ops._spmm_packed_into(x, shifted, p.meta, p.kidx, None, "16:2:8", 32, 16, False, y)
    with pytest.raises(ValueError, match=r"packed values has shape"):
        cuda_ops.PackedVNM(p.values[:, :0], p.meta, p.kidx, "16:2:8", (32, 16))


# ---- the tiled kernel (N > 32): its plan, its two B paths, the transposed x ------------------

TILED_GPU_CASES = [
    # pattern, R, K, N: R < V, R == V, R % V != 0 for every M > 4; odd K; KS odd; 2 CTA columns
    ("2:4", 100, 1000, 40), ("64:2:4", 50, 75, 33),
    ("64:2:5", 40, 77, 35), ("32:2:5", 32, 701, 40),
    ("64:2:8", 64, 256, 40), ("64:2:8", 48, 1100, 37), ("64:2:8", 100, 129, 300),
    ("192:2:8", 200, 100, 40), ("128:2:16", 100, 2100, 40), ("128:2:16", 300, 161, 45),
    ("16:2:32", 20, 300, 50), ("32:2:32", 32, 257, 33), ("48:2:7", 100, 950, 35),
]


@pytest.mark.parametrize("pattern,R,K,N", TILED_GPU_CASES)
def test_tiled_kernel_equals_cpu_emulation_bit_for_bit(pattern, R, K, N, gen):
    """The dispatched tiled kernel on integer data: the CPU emulation of the same plan, bit for
    bit, and the exact result rounded once; with and without perm, row_perm and bias."""
    for extras in (False, True):
        for dtype in (torch.float16, torch.bfloat16):
            t, w, mask, perm = _make(pattern, R, K, dtype, gen, perm=extras, integer=True, rows=extras)
            p = cuda_ops.pack(t)
            pc = p.to("cpu")
            x = torch.randint(-3, 4, (N, K), generator=gen).to(dtype)
            bias = torch.randint(-3, 4, (R,), generator=gen).to(dtype) if extras else None
            path, bm, contiguous, needs_xt = _C.cuda_plan(t.pattern, R, K, N, p.has_perm)
            assert path == 2 and needs_xt == (not contiguous)
            assert contiguous == (t.pattern.M == 4 and K % 8 == 0 and not extras)
            y_gpu = _run(p, x.to(DEV), None if bias is None else bias.to(DEV)).cpu()
            y_cpu = torch.full((N, R), float("nan"), dtype=dtype)
            err = _C._emulate_spmm(t.pattern, R, K, CODES[dtype], pc.values.view(torch.int16),
                                   pc.meta, pc.kidx, pc.rows, x.view(torch.int16), N,
                                   None if bias is None else bias.view(torch.int16),
                                   y_cpu.view(torch.int16), 0, contiguous)
            assert err == ""
            assert torch.equal(y_gpu, y_cpu), (pattern, dtype, extras)
            assert torch.equal(y_gpu, _reference(x, w, mask, perm, bias, t.row_perm).to(dtype))


def test_layers_share_one_transposed_x(gen):
    """q/k/v-style: three layers reading the same x take one transpose_x(x) and give what each
    gives when it makes its own."""
    K, N = 264, 100
    x = torch.randn(N, K, generator=gen).half().to(DEV)
    xt = cuda_ops.transpose_x(x)
    assert xt.shape == (K, 104) and torch.equal(xt[:, :N], x.t()) and not xt[:, N:].any()
    for pattern, R in (("64:2:8", 192), ("128:2:16", 256), ("32:2:5", 96)):
        t, w, mask, _ = _make(pattern, R, K, torch.float16, gen)
        p = cuda_ops.pack(t)
        y_own = _run(p, x, None)
        y_shared = cuda_ops.spmm_packed(p, x, xt=xt)
        assert torch.equal(y_shared, y_own)
        torch.library.opcheck(torch.ops.vnm.spmm_packed.default,
                              (x, p.values, p.meta, p.kidx, p.rows, None, p.pattern_text, R, K,
                               p.has_perm, xt))
        assert rel_err(y_own.cpu(), _reference(x, w, mask, None, None)) < 1e-2


def test_tiled_gather_without_xt_names_the_fix(gen):
    t, _, _, _ = _make("64:2:8", 128, 256, torch.float16, gen)
    p = cuda_ops.pack(t)
    x = torch.randn(64, 256, generator=gen).half().to(DEV)
    y = torch.empty(64, 128, dtype=torch.float16, device=DEV)
    with pytest.raises(Exception, match="pass xt"):
        _C.cuda_spmm(t.pattern, 128, 256, 1, p.values.detach().__dlpack__(stream=-1),
                     p.meta.__dlpack__(stream=-1), p.kidx.__dlpack__(stream=-1), False, None,
                     x.__dlpack__(stream=-1), 64, None, y.__dlpack__(stream=-1), 0,
                     torch.cuda.current_stream().cuda_stream)
    short = torch.zeros(256, 56, dtype=torch.float16, device=DEV)  # fewer columns than tokens
    with pytest.raises(ValueError, match="transpose_x"):
        cuda_ops._spmm_packed_into(x, p.values, p.meta, p.kidx, None, "64:2:8", 128, 256, False, y,
                                   xt=short)
    with pytest.raises(TypeError, match="transpose_x"):
        cuda_ops._spmm_packed_into(x, p.values, p.meta, p.kidx, None, "64:2:8", 128, 256, False, y,
                                   xt=cuda_ops.transpose_x(x).to(torch.bfloat16))
