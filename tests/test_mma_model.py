"""The CUDA kernel layout proven on the CPU (no GPU needed).

1. The PTX facts (fragment ownership, metadata register layout) tabulated from the very C++
   functions the kernels use are compared with the PTX ISA formulas, written out here again.
2. The CPU model of mma.sp reproduces a real GPU run (LLVM's sparse-mma-2-4-f16.mlir test,
   whose expected output was produced on an sm_80 GPU) and the metadata lane map of two public
   users (MLIR's nvgpu test and XLA's SparseDot lowering), and rejects unordered metadata.
3. The kernels, emulated on the CPU thread by thread over the packed layout with that model,
   match the reference SpMM on odd shapes, every V in 16..128, M in 4..32, perm, bias, both
   kernels and both B paths; outputs are poisoned first.
4. pack / unpack are exact inverses; the packed metadata holds only valid nibbles; kidx never
   points past K; the packed ops pass opcheck on the CPU.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vnm
from vnm import VNMTensor, cuda_ops
from vnm._native import _C
from _util import masked, rel_err

CODES = {torch.float16: 1, torch.bfloat16: 2}
LEGAL_NIBBLES = {0x4, 0x8, 0x9, 0xC, 0xD, 0xE}  # PTX: ascending index pairs


# ---- 1. PTX facts ------------------------------------------------------------------------------

def test_fragment_maps_follow_the_ptx_formulas():
    """PTX ISA 9.7.14.6.2.2 (sparse m16n8k32 .f16/.bf16) and 9.7.14.5.8 (m16n8k16 B, C/D)."""
    maps = _C._fragment_maps()
    for lane, i, row, chunk, slot in maps["a"]:
        g, t = lane >> 2, lane % 4
        assert row == (g if i in (0, 1, 4, 5) else g + 8)
        firstcol = t * 4 if i < 4 else t * 4 + 16  # the 4-wide chunk holding a_i
        assert chunk == firstcol // 4 and slot == i % 2
    for lane, i, k, n in maps["b"]:
        g, t = lane >> 2, lane % 4
        assert (k, n) == (t * 2 + (i & 1) + 8 * (i // 2), g)
    for lane, i, row, n in maps["c"]:
        g, t = lane >> 2, lane % 4
        assert (row, n) == (g if i < 2 else g + 8, t * 2 + (i & 1))
    # Metadata, selector 0: lane 4g + j (j = 0, 1) holds row g in bits 15:0 and row g + 8 in
    # bits 31:16, for chunks 4j .. 4j + 3, chunk 4j + q in nibble q.
    for row, chunk, lane, shift in maps["meta"]:
        assert lane == 4 * (row % 8) + chunk // 4
        assert shift == 16 * (row // 8) + 4 * (chunk % 4)
    assert maps["meta_word_of_lane"] == [2 * (l >> 2) + (l & 1) for l in range(32)]
    # Every element owned exactly once.
    assert len({(r, c, s) for _, _, r, c, s in maps["a"]}) == 256
    assert len({(k, n) for _, _, k, n in maps["b"]}) == 256
    assert len({(r, n) for _, _, r, n in maps["c"]}) == 128


# ---- 2. the model of mma.sp ---------------------------------------------------------------------

def _h(v: float) -> int:
    return int(torch.tensor(v, dtype=torch.float16).view(torch.int16)) & 0xFFFF


def _pair(lo: int, hi: int) -> int:
    return lo | (hi << 16)


def _as_i32(words) -> torch.Tensor:
    return torch.tensor([w - (1 << 32) if w >= (1 << 31) else w for w in words], dtype=torch.int64).to(torch.int32)


def _run_model(dtype, a, b, e, selector=0, acc=None):
    a_t = _as_i32([w for lane in a for w in lane]).view(32, 4)
    b_t = _as_i32([w for lane in b for w in lane]).view(32, 4)
    e_t = _as_i32(e)
    acc_t = torch.zeros(32, 4) if acc is None else acc.clone()
    err = _C._mma_sp_model(CODES[dtype], a_t, b_t, e_t, selector, acc_t)
    return err, acc_t


def test_model_reproduces_the_mlir_gpu_test():
    """llvm-project mlir/test/Integration/Dialect/SparseTensor/GPU/CUDA/sparse-mma-2-4-f16.mlir:
    registers loaded exactly as its kernel does; C checked against its CHECK lines (GPU output)."""
    A = [[float(i + j + 1) for j in range(16)] for i in range(16)]  # compressed 16 x 16
    Bt = [[float(n - k) for k in range(32)] for n in range(8)]       # B^T: 8 x 32
    meta = [[0x8888, 0x8888] for _ in range(16)]                       # 16 x 2 x i16
    a, b, e = [], [], []
    for lane in range(32):
        quad, pair = lane // 4, lane % 2
        e.append(meta[quad][pair] | (meta[quad + 8][pair] << 16))
        qr, qc = lane // 4, 2 * (lane % 4)
        a.append([
            _pair(_h(A[qr][qc]), _h(A[qr][qc + 1])),
            _pair(_h(A[qr + 8][qc]), _h(A[qr + 8][qc + 1])),
            _pair(_h(A[qr][qc + 8]), _h(A[qr][qc + 9])),
            _pair(_h(A[qr + 8][qc + 8]), _h(A[qr + 8][qc + 9])),
        ])
        b.append([_pair(_h(Bt[qr][qc + 8 * r]), _h(Bt[qr][qc + 8 * r + 1])) for r in range(4)])
    err, acc = _run_model(torch.float16, a, b, e)
    assert err == ""
    C = [[0.0] * 8 for _ in range(16)]
    for lane in range(32):
        C[lane // 4][2 * (lane % 4)] = float(acc[lane, 0])
        C[lane // 4][2 * (lane % 4) + 1] = float(acc[lane, 1])
        C[lane // 4 + 8][2 * (lane % 4)] = float(acc[lane, 2])
        C[lane // 4 + 8][2 * (lane % 4) + 1] = float(acc[lane, 3])
    expected_rows = {  # CHECK lines of the MLIR test (first, second, ninth and last row)
        0: [-2720, -2584, -2448, -2312, -2176, -2040, -1904, -1768],
        1: [-2960, -2808, -2656, -2504, -2352, -2200, -2048, -1896],
        8: [-4640, -4376, -4112, -3848, -3584, -3320, -3056, -2792],
        15: [-6320, -5944, -5568, -5192, -4816, -4440, -4064, -3688],
    }
    for row, vals in expected_rows.items():
        assert C[row] == [float(v) for v in vals], row


def _random_tile(gen, dtype):
    """A random 2:4 tile (dense A 16 x 32), its compressed values and per-(row, chunk) nibbles."""
    vals = torch.randint(-4, 5, (16, 8, 2), generator=gen).to(dtype)
    pairs = list(itertools.combinations(range(4), 2))
    pick = torch.randint(0, 6, (16, 8), generator=gen)
    dense = torch.zeros(16, 32, dtype=torch.float64)
    nib = [[0] * 8 for _ in range(16)]
    for r in range(16):
        for c in range(8):
            i0, i1 = pairs[int(pick[r, c])]
            nib[r][c] = i0 | (i1 << 2)
            dense[r, 4 * c + i0] = float(vals[r, c, 0])
            dense[r, 4 * c + i1] = float(vals[r, c, 1])
    return vals, nib, dense


def _bits(t: torch.Tensor) -> int:
    return int(t.view(torch.int16)) & 0xFFFF


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("selector", [0, 1])
def test_model_metadata_lane_map_matches_public_users(dtype, selector, gen):
    """Metadata registers built with the formula of XLA's SparseDot lowering and MLIR's nvgpu test
    (lower 16 bits: row g, k-half t % 2; upper: row g + 8), supplied by lanes 2 * selector and
    2 * selector + 1 of each quad; the other lanes hold garbage, which the model must ignore."""
    vals, nib, dense = _random_tile(gen, dtype)
    Bm = torch.randint(-4, 5, (32, 8), generator=gen).to(dtype)
    meta16 = [[sum(nib[r][4 * h + q] << (4 * q) for q in range(4)) for h in range(2)] for r in range(16)]
    a, b, e = [], [], []
    for lane in range(32):
        g, t = lane // 4, lane % 4
        if t // 2 == selector:
            e.append(meta16[g][t % 2] | (meta16[g + 8][t % 2] << 16))
        else:
            e.append(0xDEADBEEF)
        # A: register r holds row g + 8 (r & 1), chunk t + 4 (r >> 1), low half = first non-zero
        a.append([_pair(_bits(vals[g + 8 * (r & 1), t + 4 * (r >> 1), 0]),
                        _bits(vals[g + 8 * (r & 1), t + 4 * (r >> 1), 1])) for r in range(4)])
        b.append([_pair(_bits(Bm[8 * r + 2 * t, g]), _bits(Bm[8 * r + 2 * t + 1, g])) for r in range(4)])
    acc0 = torch.randint(-8, 9, (32, 4), generator=gen).float()
    err, acc = _run_model(dtype, a, b, e, selector, acc0)
    assert err == ""
    D = dense @ Bm.double()
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for i in range(4):
            row, n = g + 8 * (i >> 1), 2 * t + (i & 1)
            assert float(acc[lane, i]) == float(D[row, n]) + float(acc0[lane, i])


@pytest.mark.parametrize("bad", [0x0, 0x1, 0x5, 0x6, 0xB, 0xF])
def test_model_rejects_metadata_ordered_metadata_forbids(bad):
    e = [0x44444444] * 32
    e[0] = (e[0] & ~0xF) | bad  # row 0, chunk 0
    zeros = [[0] * 4 for _ in range(32)]
    err, _ = _run_model(torch.float16, zeros, zeros, e)
    assert "invalid mma.sp metadata" in err and "row 0, chunk 0" in err


# ---- 3. the kernels, emulated ---------------------------------------------------------------

def _make(pattern, R, K, dtype, gen, perm=False, integer=False, rows=False):
    if integer:
        w = torch.randint(-3, 4, (R, K), generator=gen).to(dtype)
    else:
        w = torch.randn(R, K, generator=gen).to(dtype)
    mask = vnm.select_mask(torch.rand(R, K, generator=gen), pattern)
    mask &= torch.rand(R, K, generator=gen) > 0.1  # some rows keep fewer than 2 in a group
    pm = torch.randperm(K, generator=gen) if perm else None
    rp = torch.randperm(R, generator=gen) if rows else None
    return VNMTensor.from_dense(w, mask, pattern, perm=pm, row_perm=rp), w, mask, pm


def _emulate(p: cuda_ops.PackedVNM, x, bias, path, contiguous_b=False, decode_splits=0):
    R, K = p.shape
    n = x.shape[0]
    y = torch.full((n, R), float("nan"), dtype=x.dtype)  # poison: every element must be written
    err = _C._emulate_spmm(
        p.pattern, R, K, CODES[x.dtype], p.values.view(torch.int16), p.meta, p.kidx, p.rows,
        x.view(torch.int16), n, None if bias is None else bias.view(torch.int16),
        y.view(torch.int16), path, contiguous_b, decode_splits,
    )
    assert err == ""
    return y


def _reference(x, w, mask, perm, bias, rows=None):
    """float64: y[:, rows] = x[:, perm] @ (w * mask).T, plus bias in output order."""
    xd = x.double() if perm is None else x.double()[:, perm.long()]
    ys = xd @ masked(w, mask).double().T
    y = ys if rows is None else torch.empty_like(ys).index_copy_(1, rows.long(), ys)
    return y if bias is None else y + bias.double()


EMU_CASES = [
    # pattern, R, K, N, path (1 decode, 2 tiled)
    ("2:4", 45, 72, 1, 1),
    ("2:4", 70, 100, 37, 2),
    ("16:2:4", 33, 40, 9, 1),
    ("16:2:5", 50, 75, 7, 1),
    ("16:2:5", 50, 75, 40, 2),
    ("32:2:8", 70, 130, 33, 2),
    ("32:2:16", 40, 200, 20, 1),
    ("48:2:7", 100, 90, 35, 2),
    ("64:2:8", 130, 123, 5, 1),
    ("64:2:8", 130, 123, 130, 2),
    ("64:2:16", 64, 257, 17, 2),
    ("128:2:32", 150, 300, 3, 1),
    ("128:2:8", 150, 100, 50, 2),
    ("16:2:32", 20, 70, 65, 2),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pattern,R,K,N,path", EMU_CASES)
def test_emulated_kernel_matches_reference(dtype, pattern, R, K, N, path, gen):
    # plain; then input perm, output rows and bias together (the epilogue's scatter and bias read)
    for extras in (False, True):
        t, w, mask, perm = _make(pattern, R, K, dtype, gen, perm=extras, rows=extras)
        p = cuda_ops.pack(t)
        x = torch.randn(N, K, generator=gen).to(dtype)
        bias = torch.randn(R, generator=gen).to(dtype) if extras else None
        y = _emulate(p, x, bias, path)
        assert bool(torch.isfinite(y).all()), "an output element was not written"
        assert rel_err(y, _reference(x, w, mask, perm, bias, t.row_perm)) < 1e-2


@pytest.mark.parametrize("path", [1, 2])
@pytest.mark.parametrize("pattern,K", [("2:4", 64), ("64:2:4", 136)])
def test_emulated_contiguous_b_path_equals_gather_path(path, pattern, K, gen):
    """M == 4 without perm reads B without a gather: same result as the gather path, bit for bit
    (both feed identical registers to mma.sp)."""
    t, w, mask, _ = _make(pattern, 90, K, torch.float16, gen)
    p = cuda_ops.pack(t)
    x = torch.randn(40, K, generator=gen).half()
    y_contig = _emulate(p, x, None, path, contiguous_b=True)
    y_gather = _emulate(p, x, None, path, contiguous_b=False)
    assert torch.equal(y_contig, y_gather)
    assert rel_err(y_contig, _reference(x, w, mask, None, None)) < 1e-2


def test_emulated_kernels_are_exact_on_small_integers(gen):
    """With small integers every sum is exact: both kernels equal the float64 reference exactly."""
    for pattern in ("64:2:8", "16:2:5", "2:4"):
        t, w, mask, perm = _make(pattern, 77, 90, torch.float16, gen, perm=True, integer=True)
        p = cuda_ops.pack(t)
        x = torch.randint(-3, 4, (45, 90), generator=gen).half()
        ref = _reference(x, w, mask, perm, None)
        for path in (1, 2):
            assert torch.equal(_emulate(p, x, None, path).double(), ref)


# The tiled kernel (N > 32) through the plan the dispatcher picks: every M, R below, equal to
# and not a multiple of V, odd K, KS odd and even (KS not a multiple of the 2 k-steps a stage
# holds), long K (the 3-stage ring wraps several times), several CTA columns, perm and row_perm
# with bias. Row tile: 128 for M == 4 or V % 128
# == 0, 64, 32, 16 for V % 128 == 64, V % 64 == 32, V % 32 == 16.
TILED_CASES = [
    # pattern, R, K, N
    ("2:4", 100, 1000, 40),      # contiguous B without perm; gathered with it; 16 stages
    ("64:2:4", 50, 75, 33),      # M == 4, K % 8 != 0: gathered; R < V
    ("64:2:5", 40, 77, 35),      # R < V
    ("32:2:5", 32, 701, 40),     # R == V, row tile 32, 9 stages (the stage ring wraps 3 times)
    ("64:2:8", 64, 256, 40),     # R == V (the case contiguous_b's KB == 1 proxy got wrong)
    ("64:2:8", 48, 1100, 37),    # R < V, KS = 18
    ("64:2:8", 100, 129, 300),   # R % V != 0, KS = 3 (odd), two CTA columns
    ("192:2:8", 200, 100, 40),   # row tile 64 inside a 192-row block
    ("128:2:16", 100, 2100, 40), # R < V, row tile 128, KS = 17
    ("128:2:16", 300, 161, 45),  # R % V != 0
    ("16:2:32", 20, 300, 50),    # row tile 16
    ("32:2:32", 32, 257, 33),    # R == V
    ("48:2:7", 100, 950, 35),    # row tile 16 in a 48-row block, KS = 17
]


@pytest.mark.parametrize("pattern,R,K,N", TILED_CASES)
def test_emulated_tiled_kernel_through_the_dispatched_plan(pattern, R, K, N, gen):
    """Integer data: exactly the float64 reference (every sum exact, one rounding), so any
    misplaced element shows; random data: the float64 reference within fp16 rounding. The
    emulation also checks its own pipeline (two copy-landing models must agree) and the NaN
    padding of the transposed x never reaches y."""
    for extras in (False, True):
        for integer in (True, False):
            dtype = torch.float16 if integer else torch.bfloat16
            t, w, mask, perm = _make(pattern, R, K, dtype, gen, perm=extras, integer=integer, rows=extras)
            p = cuda_ops.pack(t)
            path, bm, contiguous = _C._dispatch_plan(t.pattern, R, K, N, p.has_perm)
            assert path == 2
            assert contiguous == (t.pattern.M == 4 and K % 8 == 0 and not extras)
            if integer:
                x = torch.randint(-3, 4, (N, K), generator=gen).to(dtype)
                bias = torch.randint(-3, 4, (R,), generator=gen).to(dtype) if extras else None
            else:
                x = torch.randn(N, K, generator=gen).to(dtype)
                bias = torch.randn(R, generator=gen).to(dtype) if extras else None
            y = _emulate(p, x, bias, 0, contiguous_b=contiguous)
            ref = _reference(x, w, mask, perm, bias, t.row_perm)
            if integer:
                assert torch.equal(y.double(), ref.to(dtype).double()), (pattern, extras)
            else:
                assert rel_err(y, ref) < 1e-2, (pattern, extras)


def test_spmm_packed_takes_a_shared_transposed_x(gen):
    """The op's optional xt (one transpose_x per activation, shared by q/k/v): same result and
    gradients; opcheck with it (on the CPU xt is not needed and not read)."""
    t, w, mask, _ = _make("64:2:8", 70, 96, torch.float16, gen)
    p = cuda_ops.pack(t)
    x = torch.randn(40, 96, generator=gen).half().requires_grad_()
    xt = cuda_ops.transpose_x(x.detach())
    assert xt.shape == (96, 40) and torch.equal(xt, x.detach().t())
    y = cuda_ops.spmm_packed(p, x, xt=xt)
    assert torch.equal(y, cuda_ops.spmm_packed(p, x))
    y.float().sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    torch.library.opcheck(torch.ops.vnm.spmm_packed.default,
                          (x.detach(), p.values, p.meta, p.kidx, p.rows, None, p.pattern_text, 70, 96,
                           p.has_perm, xt))


def test_emulated_tiled_kernel_refuses_contiguous_b_for_m_above_4(gen):
    """The contiguous B path is M == 4 only, also when R <= V makes kidx a single block."""
    t, _, _, _ = _make("64:2:8", 64, 256, torch.float16, gen)
    p = cuda_ops.pack(t)
    x = torch.randn(40, 256, generator=gen).half()
    y = torch.empty(40, 64, dtype=torch.float16)
    err = _C._emulate_spmm(p.pattern, 64, 256, CODES[x.dtype], p.values.view(torch.int16), p.meta,
                           p.kidx, None, x.view(torch.int16), 40, None, y.view(torch.int16), 2, True)
    assert "M == 4" in err
# ---- 3b. the decode kernel (N <= 32): its gather, k split and reductions --------------------

# (V, R): R < V, R = V and R not a multiple of V (a partial last block) for each V; V = 16, 32 and
# 48 put fewer than 4 row tiles in a CTA (warps split k inside it), V = 64 and 128 four.
DECODE_VR = [(16, 13), (16, 16), (32, 32), (32, 75), (48, 40), (48, 100), (64, 40), (64, 64),
             (64, 150), (128, 200)]
DECODE_M = [4, 5, 8, 16, 32]
DECODE_N = [1, 7, 16, 32]


def _decode_cases():
    """Every M with every (V, R) and every N over the grid, K odd and varied so that the k-steps
    fall into whole stages, a partial stage, a partial split and padding past K."""
    cases = []
    for i, (V, R) in enumerate(DECODE_VR):
        for j, M in enumerate(DECODE_M):
            K = [333, 517, 129, 1001, 75][(i + j) % 5]
            N = DECODE_N[(i + 2 * j) % 4]
            cases.append((f"{V}:2:{M}" if M > 4 or V > 16 else "2:4", R, K, N))
    return cases


DECODE_CASES = _decode_cases()


@pytest.mark.parametrize("pattern,R,K,N", DECODE_CASES)
def test_emulated_decode_kernel_is_exact_on_integers(pattern, R, K, N, gen):
    """Small integers make every sum exact: the decode kernel's emulation (gather into B-fragment
    order, per-warp k-ranges, in-CTA and cross-CTA reductions) equals the float64 reference
    rounded once, bit for bit, with perm and row_perm, for its own split and forced ones."""
    dtype = torch.float16 if (R + K) % 2 else torch.bfloat16
    extras = (R + N) % 2 == 0
    t, w, mask, perm = _make(pattern, R, K, dtype, gen, perm=extras, integer=True, rows=extras)
    p = cuda_ops.pack(t)
    x = torch.randint(-3, 4, (N, K), generator=gen).to(dtype)
    ref = _reference(x, w, mask, perm, None, t.row_perm).to(dtype)
    for splits in (0, 1, 3):
        y = _emulate(p, x, None, 1, decode_splits=splits)
        assert torch.equal(y, ref), (splits, _C._decode_plan(t.pattern, R, K, N, splits))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pattern,R,K,N", DECODE_CASES[::3])
def test_emulated_decode_kernel_matches_float64_reference(dtype, pattern, R, K, N, gen):
    t, w, mask, perm = _make(pattern, R, K, dtype, gen, perm=True, rows=True)
    p = cuda_ops.pack(t)
    x = torch.randn(N, K, generator=gen).to(dtype)
    bias = torch.randn(R, generator=gen).to(dtype)
    for splits in (0, 2):
        y = _emulate(p, x, bias, 1, decode_splits=splits)
        assert bool(torch.isfinite(y).all()), "an output element was not written"
        assert rel_err(y, _reference(x, w, mask, perm, bias, t.row_perm)) < 1e-2


def test_decode_cases_cover_every_branch_of_the_plan():
    """The cases above reach: one split and several, warps along k (kparts 2 and 4) and not, a
    last stage with a single k-step, a warp whose k-range is entirely past K, 1, 2 and 4 token
    tiles, row tiles past the last one (M = 4) and a partial last row block."""
    seen = set()
    for pattern, R, K, N in DECODE_CASES:
        pt = vnm.Pattern.parse(pattern)
        for splits in (0, 1, 3):
            d = _C._decode_plan(pt, R, K, N, splits)
            V, M = cuda_ops._pattern_numbers(pattern)
            KS = -(-(-(-K // M)) // 8)
            seen.add(("splits>1", d["splits"] > 1))
            seen.add(("kparts", d["kparts"]))
            seen.add(("nt", d["nt"]))
            for cy in range(d["splits"]):
                for part in range(d["kparts"]):
                    ks0 = cy * d["ks_cta"] + part * d["ks_warp"]
                    n_valid = max(min(d["ks_warp"], KS - ks0), 0)
                    seen.add(("odd tail", n_valid % 2 == 1))
                    seen.add(("idle warp", n_valid == 0))
            MT = -(-R // V) * V // 16
            seen.add(("tile past MT", d["row_ctas"] * d["wt"] > MT))
    for want in [("splits>1", True), ("splits>1", False), ("kparts", 1), ("kparts", 2), ("kparts", 4),
                 ("nt", 1), ("nt", 2), ("nt", 4), ("odd tail", True), ("idle warp", True),
                 ("tile past MT", True)]:
        assert want in seen, want


def test_decode_plan_for_llama_shapes():
    """The work split the decode kernel takes on the LLaMA-7B shapes: every SM of an H100 busy
    (>= 512 CTAs), shared memory within an sm_80 SM's 164 KB for 3 CTAs, the k-range covered
    exactly once, and the workspace the split needs."""
    P = vnm.Pattern.parse
    for R, K in [(4096, 4096), (11008, 4096), (4096, 11008)]:
        for N in (1, 16, 32):
            d = _C._decode_plan(P("64:2:8"), R, K, N)
            KS = -(-(K // 8) // 8)
            assert d["row_ctas"] * d["splits"] * d["token_ctas"] >= 512
            assert 3 * d["smem_bytes"] <= 164 * 1024
            assert d["ks_cta"] % (2 * d["kparts"]) == 0 and d["ks_warp"] * d["kparts"] == d["ks_cta"]
            assert (d["splits"] - 1) * d["ks_cta"] < KS <= d["splits"] * d["ks_cta"]
            assert d["workspace_floats"] == (d["splits"] * N * R if d["splits"] > 1 else 0)
            assert _C._spmm_workspace_floats(P("64:2:8"), R, K, N) == d["workspace_floats"]
    assert _C._spmm_workspace_floats(P("64:2:8"), 4096, 4096, 33) == 0  # the tiled kernel


def test_dispatch_plan():
    P = vnm.Pattern.parse
    assert _C._dispatch_plan(P("64:2:8"), 4096, 4096, 1, False) == (1, 16, False)
    assert _C._dispatch_plan(P("64:2:8"), 4096, 4096, 32, False) == (1, 16, False)
    assert _C._dispatch_plan(P("64:2:8"), 4096, 4096, 33, False) == (2, 64, False)
    assert _C._dispatch_plan(P("128:2:16"), 4096, 4096, 512, False) == (2, 128, False)
    assert _C._dispatch_plan(P("32:2:5"), 4096, 4096, 512, False) == (2, 32, False)
    assert _C._dispatch_plan(P("16:2:8"), 4096, 4096, 512, False) == (2, 16, False)
    assert _C._dispatch_plan(P("48:2:8"), 4096, 4096, 512, False) == (2, 16, False)
    assert _C._dispatch_plan(P("192:2:8"), 4096, 4096, 512, False) == (2, 64, False)
    # M == 4: one column block, any row tile; x read directly unless perm or K % 8 != 0
    assert _C._dispatch_plan(P("2:4"), 4096, 4096, 512, False) == (2, 128, True)
    assert _C._dispatch_plan(P("2:4"), 4096, 4096, 512, True) == (2, 128, False)
    assert _C._dispatch_plan(P("2:4"), 4096, 4092, 512, False) == (2, 128, False)
    # M > 4 with R <= V (kidx has one block): gathered, never the contiguous path
    assert _C._dispatch_plan(P("64:2:8"), 64, 256, 40, False) == (2, 64, False)
    assert _C._dispatch_plan(P("128:2:16"), 100, 512, 40, False) == (2, 128, False)


# R <= V: every row in one kidx column block (KB == 1). The plan once took KB == 1 for "M == 4" and
# read x columns 32 ks + k instead of the kept ones (64:2:8, R=64, K=256, N=8: 507 of 512 outputs
# wrong). For every M > 4: R < V, R = V and R not a multiple of V (R > V), both kernels (N picks
# the path), through the plan the dispatcher computes (sp::kernel_plan, what vnm::cuda::plan
# calls), with K % 8 == 0 and an aligned x so that nothing but M can rule the gather-free path out.
R_VS_V = [("lt", lambda V: V // 2 + 3), ("eq", lambda V: V), ("not_multiple", lambda V: 2 * V + 5)]


@pytest.mark.parametrize("N", [8, 40])  # decode (N <= 32) and tiled
@pytest.mark.parametrize("rcase", [c for c, _ in R_VS_V])
@pytest.mark.parametrize("pattern,K", [
    ("32:2:5", 160), ("16:2:6", 96), ("64:2:8", 256), ("128:2:8", 128), ("48:2:8", 192),
    ("128:2:16", 512), ("32:2:16", 256), ("16:2:32", 512), ("64:2:32", 512),
])
def test_dispatched_plan_is_right_for_every_m_above_4_and_r_up_to_v(pattern, K, rcase, N, gen):
    V = vnm.Pattern.parse(pattern).V
    R = dict(R_VS_V)[rcase](V)
    t, w, mask, _ = _make(pattern, R, K, torch.float16, gen)
    path, bm, contiguous_b = _C._dispatch_plan(t.pattern, R, K, N, False)
    assert path == (1 if N <= 32 else 2)
    assert not contiguous_b, f"{pattern} (M > 4) must gather x through kidx, R={R}, V={V}"
    x = torch.randn(N, K, generator=gen).half()
    assert x.data_ptr() % 16 == 0
    y = _emulate(cuda_ops.pack(t), x, None, path, contiguous_b)
    assert bool(torch.isfinite(y).all()), "an output element was not written"
    ref = _reference(x, w, mask, None, None)
    # fp32 accumulation, one fp16 rounding: the bug moved whole products (rel. error O(1))
    assert rel_err(y, ref) < 1e-2
    assert torch.allclose(y.double(), ref, rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("pattern", ["2:4", "16:2:4", "128:2:4"])
def test_dispatched_plan_reads_x_contiguously_only_for_m_4(pattern, gen):
    """M == 4 keeps every column: the plan takes the gather-free path unless a perm, K or ldx
    rules it out, and the result equals the reference (R < V and R > V alike)."""
    for R in (8, 150):
        t, w, mask, _ = _make(pattern, R, 64, torch.float16, gen)
        assert _C._dispatch_plan(t.pattern, R, 64, 40, False)[2]
        assert not _C._dispatch_plan(t.pattern, R, 64, 40, True)[2]  # perm: gather
        assert not _C._dispatch_plan(t.pattern, R, 60, 40, False)[2]  # K % 8 != 0
        for N in (8, 40):
            path, _, contiguous_b = _C._dispatch_plan(t.pattern, R, 64, N, False)
            x = torch.randn(N, 64, generator=gen).half()
            y = _emulate(cuda_ops.pack(t), x, None, path, contiguous_b)
            assert rel_err(y, _reference(x, w, mask, None, None)) < 1e-2


@pytest.mark.parametrize("path", [1, 2])
def test_emulation_refuses_the_gather_free_path_for_m_above_4(path, gen):
    t, _, _, _ = _make("64:2:8", 64, 256, torch.float16, gen)  # R == V: KB == 1, yet M == 8
    p = cuda_ops.pack(t)
    x = torch.randn(40, 256, generator=gen).half()
    y = torch.empty(40, 64, dtype=torch.float16)
    err = _C._emulate_spmm(p.pattern, 64, 256, CODES[x.dtype], p.values.view(torch.int16), p.meta,
                           p.kidx, p.rows, x.view(torch.int16), 40, None, y.view(torch.int16),
                           path, True)
    assert "needs M == 4" in err and "contiguous_b=false" in err


def test_compress_refuses_an_invalid_mask_instead_of_overrunning():
    """compress trusts check_mask; called without it on a block using 5 distinct columns (or a
    row keeping 3 in a group), it raises an error naming the check instead of writing out of
    bounds."""
    from vnm._checks import raw_bits
    from vnm.tensor import storage_shapes
    P = vnm.Pattern.parse("16:2:8")
    R, K = 16, 8
    w = torch.ones(R, K, dtype=torch.float16)
    for bad_rows in ({0: [0, 1], 1: [2, 3], 2: [4, 5]},  # 6 distinct columns in the block
                     {0: [0, 1, 2]}):  # one row keeps 3
        mask = torch.zeros(R, K, dtype=torch.bool)
        for r, cols in bad_rows.items():
            mask[r, cols] = True
        assert not vnm.is_valid_mask(mask, P)
        shapes = storage_shapes(P, R, K)
        values = torch.empty(shapes["values"], dtype=torch.float16)
        meta = torch.empty(shapes["meta"], dtype=torch.uint8)
        columns = torch.empty(shapes["columns"], dtype=torch.uint8)
        with pytest.raises(ValueError, match="not a valid 16:2:8 mask.*check_mask"):
            _C.compress(raw_bits(w), CODES[torch.float16], mask.to(torch.uint8).contiguous(), P, R,
                        K, raw_bits(values), meta, columns)


# ---- 4. packing ----------------------------------------------------------------------------

PATTERNS = ["2:4", "16:2:4", "16:2:5", "32:2:6", "64:2:8", "16:2:16", "128:2:8", "48:2:7", "16:2:32"]


@settings(max_examples=60, deadline=None)
@given(
    R=st.integers(1, 150),
    K=st.integers(1, 140),
    pattern=st.sampled_from(PATTERNS),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    use_perm=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trip_is_exact(R, K, pattern, dtype, use_perm, seed):
    g = torch.Generator().manual_seed(seed)
    t, _, _, _ = _make(pattern, R, K, dtype, g, perm=use_perm)
    p = cuda_ops.pack(t)
    shapes = cuda_ops.packed_shapes(t.pattern_text, R, K)
    assert {k: tuple(getattr(p, k).shape) for k in shapes} == shapes
    assert shapes == {k: tuple(v) for k, v in _C.packed_layout(t.pattern, R, K).items() if k in shapes}
    back = cuda_ops.unpack(p)
    for name in ("values", "meta", "columns"):
        a, b = getattr(back, name), getattr(t, name)
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name
    assert (back.perm is None) == (t.perm is None)
    if t.perm is not None:
        assert torch.equal(back.perm, t.perm)
    # Every nibble the hardware reads is legal (padding rows and groups included) ...
    words = p.meta.flatten().tolist()
    nibbles = {(w >> s) & 0xF for w in words for s in range(0, 32, 4)}
    assert nibbles <= LEGAL_NIBBLES
    # ... and x is never read past K; padding entries are negative.
    assert int(p.kidx.max()) < K
    M = t.pattern.M
    G = -(-K // M)
    kb = p.kidx[:, :G]
    cols = torch.arange(G).view(1, G, 1) * M + t.columns[: kb.shape[0]].long()
    assert torch.equal(kb < 0, cols >= K)


def test_pack_rejects_float32_and_names_the_fix():
    w = torch.randn(32, 16)
    t = VNMTensor.from_dense(w, vnm.select_mask(w.abs(), "16:2:8"), "16:2:8")
    with pytest.raises(TypeError, match=r"float16 or torch.bfloat16: cast with .half\(\)"):
        cuda_ops.pack(t)


def test_cuda_branch_without_cuda_build_names_the_fix(monkeypatch):
    monkeypatch.setattr(cuda_ops, "CUDA_BUILT", False)
    with pytest.raises(RuntimeError, match=r"built without CUDA.*pip install --no-build-isolation"):
        cuda_ops._require_cuda_build()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_spmm_packed_on_cpu_matches_reference_and_has_gradients(dtype, gen):
    t, w, mask, perm = _make("32:2:6", 70, 50, dtype, gen, perm=True, rows=True)
    p = cuda_ops.pack(t)
    x = torch.randn(3, 5, 50, generator=gen).to(dtype)
    bias = torch.randn(70, generator=gen).to(dtype)
    y = cuda_ops.spmm_packed(p, x, bias)
    assert y.shape == (3, 5, 70)
    ref = _reference(x.reshape(-1, 50), w, mask, perm, bias, t.row_perm).reshape(3, 5, 70)
    assert rel_err(y, ref) < 1e-2
    # Gradient with respect to x and bias, through the packed dense scatter.
    xf = x.float().requires_grad_()
    bf = bias.float().requires_grad_()
    xq = xf.to(dtype)
    yq = cuda_ops.spmm_packed(p, xq, bf.to(dtype))
    go = torch.randn(yq.shape, generator=gen).to(dtype)
    (yq.float() * go.float()).sum().backward()
    dense = masked(w, mask).double()
    gx_ref = torch.zeros(15, 50, dtype=torch.float64)
    gx_ref[:, perm.long()] = go.reshape(-1, 70).double()[:, t.row_perm.long()] @ dense
    assert rel_err(xf.grad.reshape(-1, 50), gx_ref) < 1e-2
    assert rel_err(bf.grad, go.double().sum((0, 1))) < 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("with_extras", [False, True])
def test_opcheck_packed_ops_on_cpu(with_extras, gen):
    t, _, _, _ = _make("16:2:5", 48, 40, torch.float16, gen, perm=with_extras, rows=with_extras)
    R, K = 48, 40
    pt = t.pattern_text
    torch.library.opcheck(torch.ops.vnm.pack.default, (t.values, t.meta, t.columns, t.perm, pt, R, K))
    p = cuda_ops.pack(t)
    torch.library.opcheck(torch.ops.vnm.unpack.default, (p.values, p.meta, p.kidx, p.perm, pt, R, K))
    torch.library.opcheck(torch.ops.vnm.packed_to_dense.default, (p.values, p.meta, p.kidx, pt, R, K))
    x = torch.randn(7, K, generator=gen).half()
    bias = torch.randn(R, generator=gen).half() if with_extras else None
    torch.library.opcheck(
        torch.ops.vnm.spmm_packed.default, (x, p.values, p.meta, p.kidx, p.rows, bias, pt, R, K, p.has_perm)
    )


def test_packed_object_validates_and_moves(gen):
    t, _, _, _ = _make("64:2:8", 100, 75, torch.bfloat16, gen)
    p = cuda_ops.pack(t)
    assert "PackedVNM(shape=(100, 75), pattern='64:2:8', dtype=torch.bfloat16" in repr(p)
    with pytest.raises(ValueError, match=r"packed kidx has shape \(1, 16, 4\), expected \(2, 16, 4\)"):
        cuda_ops.PackedVNM(p.values, p.meta, p.kidx[:1], "64:2:8", (100, 75))
    q = cuda_ops.PackedVNM(p.values, p.meta, p.kidx, "64:2:8", (100, 75))
    assert q.to("cpu").nbytes == p.nbytes


def test_packed_ops_refuse_mixed_devices(gen):
    t, _, _, _ = _make("16:2:5", 32, 20, torch.float16, gen)
    p = cuda_ops.pack(t)
    x = torch.randn(3, 20, generator=gen).half()
    y = torch.empty(3, 32, dtype=torch.float16)
    with pytest.raises(ValueError, match="kidx is on meta but the other arrays are on cpu"):
        cuda_ops._spmm_packed_into(x, p.values, p.meta, p.kidx.to("meta"), None, "16:2:5", 32, 20, False, y)


def test_packed_op_checks_dtypes(gen):
    """The kernels read raw 16-bit words: a weight, bias or output of another dtype than x, or
    index arrays that are not int32, must be refused, not misread."""
    t, _, _, _ = _make("16:2:5", 32, 20, torch.float16, gen)
    p = cuda_ops.pack(t)
    x = torch.randn(3, 20, generator=gen).half()
    y = torch.empty(3, 32, dtype=torch.float16)
    run = cuda_ops._spmm_packed_into
    with pytest.raises(TypeError, match="x is torch.bfloat16 but the packed weight is torch.float16"):
        run(x.bfloat16(), p.values, p.meta, p.kidx, None, "16:2:5", 32, 20, False, y.bfloat16())
    with pytest.raises(TypeError, match="bias is torch.bfloat16 but x is torch.float16"):
        run(x, p.values, p.meta, p.kidx, torch.zeros(32, dtype=torch.bfloat16), "16:2:5", 32, 20, False, y)
    with pytest.raises(TypeError, match="packed kidx must be torch.int32, got torch.float32"):
        run(x, p.values, p.meta, p.kidx.view(torch.float32), None, "16:2:5", 32, 20, False, y)
    with pytest.raises(TypeError, match="rows must be torch.int32, got torch.int64"):
        run(x, p.values, p.meta, p.kidx, None, "16:2:5", 32, 20, False, y, rows=torch.arange(32))
