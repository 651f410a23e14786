#!/usr/bin/env python3
"""A roofline BOUND for the V:N:M SpMM kernels against dense fp16 at peak, from the compiled code.

THIS IS AN UPPER BOUND, NOT A PREDICTION: every limit below assumes the best case for the sparse
kernel (all SMs busy, no tail, no bank conflicts, perfectly coalesced accesses, caches that
never miss more than the tiling forces, mma.sync at the sparse tensor peak even on Hopper), and
the dense baseline is cuBLAS-like dense at its own peak (max of tensor time and DRAM time). A
kernel can only be slower than its ceiling.

y = x W^T with W (R x K) in a V:N:M pattern (2:4 is M = 4, row block 16), x (N x K), fp16. For
each GPU, shape and N the kernel the dispatcher picks (decode for N <= 32, tiled otherwise; x
contiguous for M == 4, gathered for M > 4) is looked up in the static SASS report
(bench/sass_report.py, run here, cached), and the time is bounded below by each limit:

* tensor:  n_mma * 2*16*8*32 flops / sparse fp16 peak; n_mma = (R'/16) * KS * ceil(N/8), KS =
  ceil(ceil(K/M)/8) k-steps of 32 logical k (each covers 8 groups of M columns);
* issue:   n_mma * (1 + non-MMA per MMA) warp instructions / (SMs * 4 schedulers * clock);
* L1:      n_mma * wavefronts per MMA / (SMs * 1 wavefront (128 B) per clock);
* L2:      bytes the tiling forces between L2 and the SMs / L2 bandwidth: the packed weights once
  per CTA column of tokens (ceil(N/BN) times), x once per CTA row (ceil(R'/BM) times), y once.
  What "x" is depends on the path: the decode kernel gathers from token-major x, which touches
  every sector of x (all of x per CTA row); the tiled kernel's contiguous path (M == 4) reads all
  of x; its gathered path reads only the kept rows of x^T (4 of every M: 4/M of x^T per CTA row).
  With split-K (decode, splits > 1) the kernel writes fp32 partials (4 B x splits x N x R)
  instead of y;
* DRAM:    packed weights (values, metadata, kidx) + x + y, each once / DRAM bandwidth (no y with
  split-K: the reduction writes it; x^T instead of x on the gathered tiled path, and not even
  that when x^T fits in L2: the transpose pass below then brought x in from DRAM);
* latency: DRAM bytes / (SMs * DRAM bytes in flight per SM / DRAM latency) (Little's law); DRAM
  bytes in flight per SM = resident warps * global load bytes one warp has in flight (its
  steady-state iteration's loads, times the cp.async groups it keeps in flight) * the DRAM share
  of the traffic (DRAM bytes / L2 bytes above); resident warps from registers, shared memory and
  threads per CTA, the grid assumed to fill every SM.

Passes that run as their own kernels add their time to the SpMM's (each bounded by its bytes over
L2 and DRAM bandwidth, max of the two):
* transpose_x (tiled kernel, gathered path): reads x (2 N K B) and writes x^T (2 K ldxt B, ldxt =
  N rounded up to 8); x^T goes to DRAM only when it does not fit in L2. One x^T serves every
  layer that reads the same x, so its time is divided by TRANSPOSE_SHARED_BY (q/k/v: 3, gate/up:
  2; the best case for the 4096x4096 shape, which is also o_proj with its own x);
* splitK_reduce (decode kernel, splits > 1): reads the fp32 partials from L2, writes y.
The "format" figure beside each ceiling counts the compulsory bytes of one layer (weights, x and y
once) and the tensor time; a shared x^T (x read from DRAM once for q/k/v) can put a ceiling
slightly above it.

Per-MMA counts (instructions, wavefronts) and per-iteration loads are the busiest warp's
steady-state path from the SASS report; warps that skip a predicated block (a cp.async issued by
a subset of threads) execute a little less, which the issue and L1 limits do not credit.

    python bench/roofline.py                      # H100 SXM, H200, A100; LLaMA-7B and DeiT-base
    python bench/roofline.py --gpu H100 --json out.json
    python bench/roofline.py --floor              # what ANY mma.sp kernel could reach (below)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]

# ---- hardware (public figures) ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str
    arch: str  # the SASS the kernels run on it
    sms: int
    dense_tflops: float  # fp16 tensor, dense, fp32 accumulate
    sparse_tflops: float  # fp16 tensor, 2:4 sparse
    flops_per_clk_per_sm: int  # dense fp16 tensor flops per SM per clock
    dram_gbs: float
    l2_bytes_per_clk: int
    smem_per_sm: int  # bytes a kernel may use per SM
    dram_latency_us: float
    l2_size: int = 0  # bytes of L2 (0: unknown, nothing assumed to stay in it)

    @property
    def clock_hz(self) -> float:
        """The clock the datasheet's tensor peak is computed at (so every limit uses one clock)."""
        return self.dense_tflops * 1e12 / (self.sms * self.flops_per_clk_per_sm)

    @property
    def l2_gbs(self) -> float:
        return self.l2_bytes_per_clk * self.clock_hz / 1e9


ISSUE_PER_CLK_PER_SM = 4  # four SM sub-partitions, one warp instruction each per clock (A100, H100 whitepapers)
WAVEFRONTS_PER_CLK_PER_SM = 1  # shared/L1: 32 banks x 4 B = 128 B per clock (CUDA C++ Programming Guide, shared memory of cc 8.x / 9.x)
REGS_PER_SM = 65536  # CUDA C++ Programming Guide, technical specifications (cc 8.0, 9.0)
MAX_THREADS_PER_SM = 2048
MAX_CTAS_PER_SM = 32

GPUS: Dict[str, GPU] = {
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): 989.4 TF fp16 dense / 1,979 sparse, 3.35 TB/s;
    # H100 whitepaper: 132 SMs, 2x A100's dense MMA rate per SM per clock (4096 flops/clk/SM),
    # 228 KB shared memory per SM (CUDA Programming Guide, cc 9.0). NVIDIA publishes no L2
    # bandwidth for H100: A100's 5120 B/clk is taken, at H100's clock (measured H100 L2 bandwidth
    # in public microbenchmarks is not higher per clock, so this errs high, as a bound should).
    # DRAM latency: an assumption, ~0.5 us (public microbenchmarks of A100/H100 report roughly
    # 0.45-0.6 us for an HBM access); a lower latency would only raise the ceiling of a kernel
    # that is latency-bound.
    # L2: 50 MB (H100 whitepaper, SXM5).
    "H100": GPU("H100 SXM", "sm_90", 132, 989.4, 1978.9, 4096, 3350, 5120, 228 * 1024, 0.5, 50 << 20),
    # NVIDIA H200 datasheet (SXM): the same tensor peaks as H100 SXM, 4.8 TB/s HBM3e; the same
    # GH100 die, so H100's 50 MB L2.
    "H200": GPU("H200 SXM", "sm_90", 132, 989.4, 1978.9, 4096, 4800, 5120, 228 * 1024, 0.5, 50 << 20),
    # NVIDIA A100 Tensor Core GPU Architecture whitepaper: 108 SMs, 312 TF fp16 dense / 624 sparse,
    # 1024 dense fp16 FMA per SM per clock (2048 flops), L2 read bandwidth 5120 B/clk; A100 80GB
    # SXM datasheet: 2,039 GB/s; 164 KB shared memory per SM (CUDA Programming Guide, cc 8.0).
    # L2: 40 MB (A100 whitepaper).
    "A100": GPU("A100 SXM 80GB", "sm_80", 108, 312.0, 624.0, 2048, 2039, 5120, 164 * 1024, 0.5, 40 << 20),
}

SHAPES = {
    "LLaMA-7B": [(4096, 4096), (11008, 4096), (4096, 11008)],  # (R = out, K = in): q/k/v/o, gate/up, down
    "DeiT-base": [(768, 768), (3072, 768), (768, 3072), (2304, 768)],  # proj, fc1, fc2, fused qkv
}
TOKENS = [1, 16, 128, 2048, 8192]
# Layers that read one x and so share one transpose_x (best case for a bound): q/k/v, gate/up.
TRANSPOSE_SHARED_BY = {(4096, 4096): 3, (11008, 4096): 2}
PATTERNS = ["2:4", "64:2:8", "64:2:5", "128:2:8"]

# ---- the kernels the dispatcher picks (update with the kernels) -------------------------------------
# (path, x) -> (kernel name in the SASS report, which of its steady-state rows, CTA rows BM, CTA
# tokens BN). "fewest"/"most": the row with the fewest / most instructions, where a kernel picks its
# x path at run time inside the loop (today: contiguous = fewest, gathered = most).
DECODE_MAX_TOKENS = 32
KERNELS = {
    # decode: see decode_kernel (the instantiation and the CTA's rows depend on N and V)
    ("tiled128", "contiguous"): ("spmm_tiled_kernel<F16,TileShape<4,8,2,2,3,2>,false>", "most", 128, 128),
    ("tiled128", "gathered"): ("spmm_tiled_kernel<F16,TileShape<4,8,2,2,3,2>,true>", "most", 128, 128),
    ("tiled64", "gathered"): ("spmm_tiled_kernel<F16,TileShape<4,8,1,4,3,2>,true>", "most", 64, 256),
    ("tiled32", "gathered"): ("spmm_tiled_kernel<F16,TileShape<2,8,1,4,3,2>,true>", "most", 32, 256),
    ("tiled16", "gathered"): ("spmm_tiled_kernel<F16,TileShape<1,8,1,4,3,2>,true>", "most", 16, 256),
}
# Dynamic shared memory (bytes) of the kernels that take it at launch, which ptxas does not report:
# sp::TileShape::SMEM_BYTES = STAGES x (KPS x (MT_CTA x (512 + 64) + 32 x BN x 2)). The decode
# kernel's depends on the shape (sp::DecodePlan::smem_bytes): decode_plan() below gives it.
DYNAMIC_SMEM = {
    KERNELS[("tiled128", "contiguous")][0]: 3 * 2 * (8 * 576 + 32 * 128 * 2),
    KERNELS[("tiled128", "gathered")][0]: 3 * 2 * (8 * 576 + 32 * 128 * 2),
    KERNELS[("tiled64", "gathered")][0]: 3 * 2 * (4 * 576 + 32 * 256 * 2),
    KERNELS[("tiled32", "gathered")][0]: 3 * 2 * (2 * 576 + 32 * 256 * 2),
    KERNELS[("tiled16", "gathered")][0]: 3 * 2 * (1 * 576 + 32 * 256 * 2),
}


# The decode kernel (cuda/src/decode.cuh, plan sp::decode_plan): one instantiation per n8 token
# tiles (NT = 1, 2, 4 for N <= 8, 16, 32), a CTA of 4 warps over 16 * wt rows that share a kidx
# block (wt = 4 when V % 64 == 0 or M == 4, 2 when V % 32 == 0, else 1), x gathered once per CTA
# (read once per CTA row: BM = 16 wt). One main-loop iteration is a round of its 4 pipeline stages
# (4 cp.async groups), so the report's "loads per iteration x groups in flight" is 4x what a warp
# keeps in flight (3 stages x 2 k-steps x 640 B): DECODE_GROUPS_PER_ITERATION divides it back.
DECODE_GROUPS_PER_ITERATION = 4


DECODE_WARPS, DECODE_STAGES, DECODE_STEPS_PER_STAGE = 4, 4, 2
DECODE_TARGET_CTAS, DECODE_MAX_B_BYTES, DECODE_MIN_UNITS = 528, 32768, 2


def decode_plan(p: "Pattern", R: int, K: int, N: int) -> Dict[str, int]:
    """sp::decode_plan (cpp/include/vnm/sp_layout.h), line for line: the work split, dynamic
    shared memory and split-K workspace of the decode kernel (tests compare it with the C++)."""
    g = packed_bytes(p, R, K)
    nt = 1 if N <= 8 else 2 if N <= 16 else 4
    wt = 4 if (g["KB"] == 1 or p.row_block % 64 == 0) else 2 if p.row_block % 32 == 0 else 1
    kparts = DECODE_WARPS // wt
    row_ctas = -(-g["MT"] // wt)
    token_ctas = -(-N // (nt * 8))
    unit = kparts * DECODE_STEPS_PER_STAGE
    units_total = -(-g["KS"] // unit)
    splits_max = -(-units_total // DECODE_MIN_UNITS)
    units_max = max(1, DECODE_MAX_B_BYTES // (nt * 32 * 16) // unit)
    splits_min = -(-units_total // units_max)
    ctas = row_ctas * max(token_ctas, 1)
    splits = max(1, max(splits_min, min(splits_max, -(-DECODE_TARGET_CTAS // ctas))))
    units_cta = -(-units_total // splits)
    ks_cta = units_cta * unit
    splits = -(-units_total // units_cta)
    pipe = DECODE_STAGES * DECODE_WARPS * DECODE_STEPS_PER_STAGE * 32 * (16 + 4)
    return {"nt": nt, "wt": wt, "kparts": kparts, "row_ctas": row_ctas, "splits": splits,
            "token_ctas": token_ctas, "ks_cta": ks_cta, "ks_warp": ks_cta // kparts,
            "smem_bytes": pipe + ks_cta * nt * 32 * 16,
            "workspace_floats": splits * N * R if splits > 1 else 0}


def decode_kernel(p: "Pattern", N: int) -> Tuple[str, str, int, int]:
    nt = 1 if N <= 8 else 2 if N <= 16 else 4
    wt = 4 if (p.M == 4 or p.row_block % 64 == 0) else 2 if p.row_block % 32 == 0 else 1
    return f"spmm_decode_kernel<F16,{nt}>", "most", 16 * wt, 8 * nt


@dataclasses.dataclass(frozen=True)
class Pattern:
    text: str
    V: Optional[int]
    M: int

    @staticmethod
    def parse(text: str) -> "Pattern":
        parts = [int(p) for p in text.split(":")]
        if len(parts) == 2:
            return Pattern(text, None, parts[1])
        return Pattern(text, parts[0], parts[2])

    @property
    def row_block(self) -> int:
        return self.V or 16


def packed_bytes(p: Pattern, R: int, K: int) -> Dict[str, int]:
    """Sizes of the packed arrays (cpp/include/vnm/sp_layout.h, PackedGeom), fp16 values."""
    Rp = math.ceil(R / p.row_block) * p.row_block
    G = math.ceil(K / p.M)
    KS = math.ceil(G / 8)
    MT = Rp // 16
    KB = 1 if p.M == 4 else Rp // p.row_block
    return {"Rp": Rp, "KS": KS, "MT": MT, "G": G, "KB": KB,
            "values": MT * KS * 32 * 8 * 2, "meta": MT * KS * 16 * 4, "kidx": KB * KS * 8 * 4 * 4}


def pick_kernel(p: Pattern, N: int) -> Tuple[str, str]:
    x = "contiguous" if p.M == 4 else "gathered"
    if N <= DECODE_MAX_TOKENS:
        return "decode", x
    if p.M == 4 or p.row_block % 128 == 0:  # sp::tiled_bm
        return "tiled128", x
    if p.row_block % 64 == 0:
        return "tiled64", x
    return ("tiled32" if p.row_block % 32 == 0 else "tiled16"), x


@dataclasses.dataclass
class KernelCounts:
    """What the roofline takes from the SASS report for one kernel and x path."""
    kernel: str
    non_mma_per_mma: float
    wavefronts_per_mma: float
    load_bytes_in_flight_per_warp: float
    resident_warps_per_sm: int


def resident_warps(rec: dict, gpu: GPU, dynamic_smem: Optional[int] = None) -> int:
    r = rec["resources"]
    threads = r["threads"] or 256
    regs = max(1, math.ceil(r["registers"] / 8) * 8)  # allocated in 8-register steps per thread
    by_regs = REGS_PER_SM // (regs * threads)
    if dynamic_smem is None:
        dynamic_smem = DYNAMIC_SMEM.get(rec["kernel"], 0)
    smem = (r["smem"] or 0) + dynamic_smem
    by_smem = gpu.smem_per_sm // smem if smem else MAX_CTAS_PER_SM
    by_threads = MAX_THREADS_PER_SM // threads
    return max(0, min(by_regs, by_smem, by_threads, MAX_CTAS_PER_SM)) * threads // 32


def counts_from_report(records: List[dict], gpu: GPU, kernel: str, which: str,
                       dynamic_smem: Optional[int] = None) -> KernelCounts:
    recs = [r for r in records if r["kernel"] == kernel and r["arch"] == gpu.arch]
    if not recs:
        raise SystemExit(f"roofline: no kernel {kernel!r} for {gpu.arch} in the SASS report; update "
                         f"KERNELS in bench/roofline.py to the kernels cuda/ now has")
    rec = recs[0]
    rows = [p for loop in rec["loops"] for p in loop]
    row = (min if which == "fewest" else max)(rows, key=lambda p: p["instructions"])
    per_iter = 0.0
    for op, n in row["global_ops"].items():
        base, bits = op.split(".")
        if base.startswith("LD"):  # loads (LDG, LDGSTS, LD); cp.async groups stay in flight longer
            depth = row["cp_async_groups_in_flight"] if base == "LDGSTS" and row["cp_async_groups_in_flight"] else 1
            per_iter += n * 32 * int(bits) / 8 * depth
    return KernelCounts(kernel, row["non_mma_per_mma"], row["wavefronts_per_mma"], per_iter,
                        resident_warps(rec, gpu, dynamic_smem))


@dataclasses.dataclass
class Bound:
    gpu: str
    shape: str
    R: int
    K: int
    N: int
    pattern: str
    kernel: str
    limits_us: Dict[str, float]
    dense_us: float
    format_ceiling: float  # speedup allowed by the format alone (tensor and DRAM limits)
    # Separate passes (transpose_x, splitK_reduce), each its own bound, added to the SpMM's time.
    passes_us: Dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def sparse_us(self) -> float:
        return max(self.limits_us.values()) + sum(self.passes_us.values())

    @property
    def binding(self) -> str:
        main = max(self.limits_us, key=self.limits_us.get)
        return "+".join([main] + [k for k, v in self.passes_us.items() if v > 0])

    @property
    def ceiling(self) -> float:
        return self.dense_us / self.sparse_us


def dense_us(gpu: GPU, R: int, K: int, N: int) -> float:
    flops = 2 * R * K * N
    bytes_ = 2 * (R * K + K * N + R * N)
    return max(flops / (gpu.dense_tflops * 1e12), bytes_ / (gpu.dram_gbs * 1e9)) * 1e6


def bound(gpu: GPU, p: Pattern, R: int, K: int, N: int, c: KernelCounts, bm: int, bn: int,
          shape: str = "", kernel: str = "", transposed_x: bool = False, splits: int = 1,
          transpose_shared_by: int = 1) -> Bound:
    """transposed_x: the tiled kernel's gathered path (reads kept rows of x^T, after a
    transpose_x pass shared by `transpose_shared_by` layers); splits: the decode kernel's k
    splits (> 1: fp32 partials and a reduction pass)."""
    g = packed_bytes(p, R, K)
    n_mma = _n_mma(p, R, K, N)
    clk = gpu.clock_hz
    weights = g["values"] + g["meta"] + g["kidx"]
    x_bytes, y_bytes = 2 * N * K, 2 * N * R
    ws_bytes = 4 * splits * N * R if splits > 1 else 0
    passes: Dict[str, float] = {}

    def pass_us(l2_bytes: float, dram_bytes: float) -> float:
        return max(l2_bytes / (gpu.l2_gbs * 1e9), dram_bytes / (gpu.dram_gbs * 1e9)) * 1e6

    if transposed_x:
        xt_bytes = 2 * K * (-(-N // 8) * 8)
        xt_in_l2 = xt_bytes <= gpu.l2_size
        passes["transpose_x"] = pass_us(x_bytes + xt_bytes, x_bytes + (0 if xt_in_l2 else xt_bytes)) \
            / transpose_shared_by
        x_dram = 0 if xt_in_l2 else xt_bytes
        # Each CTA row reads the kept rows of x^T only: 4 per group of M columns.
        x_l2_per_cta_row = xt_bytes * min(K, 4 * g["G"]) / K
    else:
        x_dram, x_l2_per_cta_row = x_bytes, x_bytes
    if ws_bytes:
        passes["splitK_reduce"] = pass_us(ws_bytes + y_bytes, y_bytes)
    dram = weights + x_dram + (0 if ws_bytes else y_bytes)
    l2 = weights * math.ceil(N / bn) + x_l2_per_cta_row * math.ceil(g["Rp"] / bm) + (ws_bytes or y_bytes)
    # Of the bytes a warp has in flight, the share that comes from DRAM (the rest hits L2): at most
    # DRAM bytes / L2 bytes of the tiling (both counted optimistically above).
    in_flight_per_sm = c.resident_warps_per_sm * c.load_bytes_in_flight_per_warp * min(1.0, dram / l2)
    latency_bw = gpu.sms * in_flight_per_sm / (gpu.dram_latency_us * 1e-6)
    limits = {
        "tensor": n_mma * 2 * 16 * 8 * 32 / (gpu.sparse_tflops * 1e12),
        "issue": n_mma * (1 + c.non_mma_per_mma) / (gpu.sms * ISSUE_PER_CLK_PER_SM * clk),
        "L1": n_mma * c.wavefronts_per_mma / (gpu.sms * WAVEFRONTS_PER_CLK_PER_SM * clk),
        "L2": l2 / (gpu.l2_gbs * 1e9),
        "DRAM": dram / (gpu.dram_gbs * 1e9),
        "latency": dram / latency_bw if latency_bw > 0 else math.inf,
    }
    limits = {k: v * 1e6 for k, v in limits.items()}
    d = dense_us(gpu, R, K, N)
    # The format alone: tensor time and the compulsory DRAM bytes (weights, x, y once).
    format_dram_us = (weights + x_bytes + y_bytes) / (gpu.dram_gbs * 1e9) * 1e6
    return Bound(gpu.name, shape, R, K, N, p.text, kernel or c.kernel, limits, d,
                 d / max(limits["tensor"], format_dram_us), passes)


# ---- the floor: the fewest shared/L1 wavefronts ANY mma.sp kernel design can execute per MMA ----------
#
# The L1 limit above takes each kernel's counted wavefronts per MMA. The floor below asks what the
# best possible design could count, for a pattern, so that a ceiling no kernel can pass is known
# before anyone writes one. It is the model of the SASS report's wavefront rule applied to operand
# bytes, with every choice made in the kernel's favour:
#
# * one mma.sp m16n8k32 consumes an A fragment (16 x 16 kept values, 512 B), its metadata (64 B)
#   and a B fragment (32 x 8 values of x, 512 B); 128 B per wavefront, no bank conflicts;
# * a warp tile of mt x nt MMAs reads A + metadata once per m-tile and B once per n-tile and
#   V-row block it spans (M > 4: different row blocks keep different columns, so their B
#   fragments differ; 2:4 keeps every column, one B serves every row);
# * registers: 4 mt nt accumulators + 4 mt (A) + mt (metadata) + 4 nt (B) <= 255 per thread, and
#   the CTA's warps x 32 threads x those registers <= 64 K per SM; no address, index or
#   double-buffer registers (a real kernel needs them);
# * staged operands (what this project's kernels and CUTLASS's do): every byte read from shared
#   memory was written there once per CTA (cp.async's write is one wavefront per 128 B): A and
#   metadata once per CTA column of BN tokens, B once per CTA row block: per-V-block gathered rows
#   (BM / V copies when BM > V) or, for M > 4, the dense x^T tile (M / 4 times the kept rows)
#   shared by every row block of the CTA, whichever is fewer; two pipeline stages in shared
#   memory at least.
#
# Without staging (fragments loaded from global memory straight into registers, no writes) the
# floor is the reads alone; that is also given, and is a floor nobody has built a kernel near:
# the fragments' elements are scattered 2-4 byte pieces whose L1 sectors the rule undercounts.

MMA_A_WAVEFRONTS = (512 + 64) / 128  # A fragment + metadata
MMA_B_WAVEFRONTS = 512 / 128
REGS_PER_THREAD_MAX = 255


@dataclasses.dataclass(frozen=True)
class Tile:
    mt: int  # m16 tiles per warp
    nt: int  # n8 tiles per warp
    warps_m: int
    warps_n: int

    @property
    def bm(self) -> int:
        return 16 * self.mt * self.warps_m

    @property
    def bn(self) -> int:
        return 8 * self.nt * self.warps_n

    @property
    def registers(self) -> int:
        return 4 * self.mt * self.nt + 5 * self.mt + 4 * self.nt


def _b_tiles(p: Pattern, bm: int) -> float:
    """32-row B tiles a CTA of `bm` rows stages per k-step: one (2:4: every row reads the same x
    rows), else one gathered tile per V-row block or the dense x^T tile (M / 4 blocks' worth of
    rows), whichever is fewer."""
    return 1 if p.M == 4 else min(-(-bm // p.row_block), p.M / 4)


def _n_mma(p: Pattern, R: int, K: int, N: int) -> int:
    g = packed_bytes(p, R, K)
    return g["MT"] * g["KS"] * math.ceil(N / 8)


def operand_wavefronts(p: Pattern, t: Tile, staged: bool = True) -> Dict[str, float]:
    """Shared/L1 wavefronts per MMA that the operands of one warp tile cost at least (see above):
    reads of A (with metadata) and B, and, when staged, the CTA's writes of them."""
    blocks_per_warp = -(-16 * t.mt // p.row_block) if p.M != 4 else 1
    out = {"A read": MMA_A_WAVEFRONTS / t.nt, "B read": MMA_B_WAVEFRONTS * blocks_per_warp / t.mt}
    if staged:
        mmas = (t.bm // 16) * (t.bn // 8)  # per CTA and k-step
        out["A write"] = MMA_A_WAVEFRONTS * (t.bm // 16) / mmas
        out["B write"] = MMA_B_WAVEFRONTS * (t.bn // 8) * _b_tiles(p, t.bm) / mmas
    return out


def _stage_bytes(p: Pattern, t: Tile) -> float:
    return (t.bm // 16) * (512 + 64) + 32 * _b_tiles(p, t.bm) * t.bn * 2


@dataclasses.dataclass(frozen=True)
class Floor:
    pattern: str
    staged: bool
    wavefronts_per_mma: float
    tile: Tile
    parts: Dict[str, float]


def operand_floor(p: Pattern, gpu: GPU, staged: bool = True, stages: int = 2) -> Floor:
    """The fewest shared/L1 wavefronts per MMA over every warp tile and CTA shape that fits the
    register file and (staged) `stages` pipeline stages in shared memory."""
    best: Optional[Floor] = None
    for mt in range(1, 17):
        for nt in range(1, 33):
            regs = Tile(mt, nt, 1, 1).registers
            if regs > REGS_PER_THREAD_MAX:
                continue
            max_warps = REGS_PER_SM // (32 * regs)
            for wm in range(1, max_warps + 1):
                for wn in range(1, max_warps // wm + 1):
                    t = Tile(mt, nt, wm, wn)
                    if staged and stages * _stage_bytes(p, t) > gpu.smem_per_sm:
                        continue
                    parts = operand_wavefronts(p, t, staged)
                    total = sum(parts.values())
                    if best is None or total < best.wavefronts_per_mma - 1e-12:
                        best = Floor(p.text, staged, total, t, parts)
    assert best is not None
    return best


def mma_per_clk_per_sm(gpu: GPU) -> float:
    """Sparse m16n8k32 MMAs one SM completes per clock at the sparse tensor peak."""
    return gpu.sparse_tflops * 1e12 / (gpu.sms * gpu.clock_hz) / (2 * 16 * 8 * 32)


def l1_ceiling(gpu: GPU, p: Pattern, R: int, K: int, N: int, wavefronts_per_mma: float) -> float:
    """Speedup over dense no kernel at `wavefronts_per_mma` can pass: the tensor and shared/L1
    limits only (every other limit left out, in the kernel's favour)."""
    n_mma = _n_mma(p, R, K, N)
    tensor = n_mma * 2 * 16 * 8 * 32 / (gpu.sparse_tflops * 1e12)
    l1 = n_mma * wavefronts_per_mma / (gpu.sms * WAVEFRONTS_PER_CLK_PER_SM * gpu.clock_hz)
    return dense_us(gpu, R, K, N) / (max(tensor, l1) * 1e6)


def floor_l2_ceiling(gpu: GPU, p: Pattern, R: int, K: int, N: int, f: Floor) -> float:
    """The L2 limit of the floor's tile, as `bound` counts it: weights once per column of BN
    tokens and x once per block of BM rows, (BM, BN) the CTA. x per block: the kept rows of x^T
    of each V-row block it spans (M > 4), at most all of x (the dense tile); all of x for 2:4.
    Unstaged, the warps of one SM may share their loads through L1: the best arrangement of the
    warps the register file holds is taken."""
    g = packed_bytes(p, R, K)
    weights = g["values"] + g["meta"] + g["kidx"]

    def ceiling(bm: int, bn: int) -> float:
        x_share = 1.0 if p.M == 4 else _b_tiles(p, bm) * 4 / p.M  # kept rows of x^T, at most all
        l2 = weights * math.ceil(N / bn) + x_share * 2 * N * K * math.ceil(g["Rp"] / bm) + 2 * N * R
        return dense_us(gpu, R, K, N) / (l2 / (gpu.l2_gbs * 1e9) * 1e6)

    t = f.tile
    if f.staged:
        return ceiling(t.bm, t.bn)
    warps = REGS_PER_SM // (32 * t.registers)
    return max(ceiling(16 * t.mt * wm, 8 * t.nt * wn) for wm in range(1, warps + 1)
               for wn in range(1, warps // wm + 1))


FLOOR_PATTERNS = ["2:4", "64:2:8", "64:2:5", "128:2:8", "32:2:8", "16:2:8"]


def floor_table(gpus: Sequence[str], shape: Tuple[int, int] = (4096, 4096), N: int = 2048) -> str:
    """Markdown: the floor per pattern (staged and unstaged), the best tile, and the L1 ceilings
    it allows on each GPU at one large-N shape."""
    head = ["pattern", "floor wf/MMA, staged (A rd + B rd + A wr + B wr)", "best tile: warp mt x nt, CTA BM x BN, regs",
            "floor, unstaged"] + [f"{g} ceiling: L1, L2 of that tile, staged (unstaged)" for g in gpus]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    R, K = shape
    for ptext in FLOOR_PATTERNS:
        p = Pattern.parse(ptext)
        # (staged, unstaged) floors per GPU; the tile columns show the first GPU's
        floors = {g: (operand_floor(p, GPUS[g]), operand_floor(p, GPUS[g], staged=False)) for g in gpus}
        f, u = floors[gpus[0]]
        parts = " + ".join(f"{v:.2f}" for v in f.parts.values())
        t = f.tile
        cells = [ptext, f"{f.wavefronts_per_mma:.2f} ({parts})",
                 f"{16 * t.mt}x{8 * t.nt}, {t.bm}x{t.bn}, {t.registers}", f"{u.wavefronts_per_mma:.2f}"]
        for g, (fs, fu) in floors.items():
            gpu = GPUS[g]

            def ceilings(fl: Floor) -> str:
                return (f"{l1_ceiling(gpu, p, R, K, N, fl.wavefronts_per_mma):.2f}x, "
                        f"L2 {floor_l2_ceiling(gpu, p, R, K, N, fl):.2f}x")
            cells.append(f"{ceilings(fs)} ({ceilings(fu)})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _sass_report_module():
    spec = importlib.util.spec_from_file_location("sass_report", ROOT / "bench" / "sass_report.py")
    sr = importlib.util.module_from_spec(spec)
    sys.modules["sass_report"] = sr
    spec.loader.exec_module(sr)
    return sr


def load_sass_report(path: Optional[Path]) -> List[dict]:
    if path:
        return json.loads(Path(path).read_text())
    sr = _sass_report_module()
    return sr.to_json(sr.run(with_anchor=False, progress=False))


def section(gpus: Sequence[str], argv: Sequence[str]) -> str:
    """The 'Static kernel report' section of bench/RESULTS.md: SASS table with the CUTLASS anchor
    and the roofline bound, stamped with date, commit and the command."""
    import datetime
    import subprocess
    sr = _sass_report_module()
    reports = sr.run(progress=False)
    records = sr.to_json(reports)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True, cwd=ROOT).stdout.strip()
    nvcc = sr._nvcc_version(sr.find_nvcc())
    bounds = all_bounds(records, gpus)
    gate = [f"{k.kernel} [{k.arch}]: {v}" for k in reports if not k.anchor for v in k.violations()]
    out = [
        "## Static kernel report",
        "",
        f"{datetime.date.today().isoformat()}, commit {commit}{' (with uncommitted changes)' if dirty else ''}, "
        f"{nvcc}, no GPU: counted from the compiled code. Command:",
        "",
        "```bash",
        "python bench/roofline.py " + " ".join(argv),
        "```",
        "",
        "### SASS, per kernel instantiation, next to the CUTLASS anchor",
        "",
        "Counting rules: `bench/sass_report.py` docstring (steady-state path of each main loop; one "
        "row per x path chosen at run time inside the loop; wavefronts assume conflict-free, "
        "coalesced accesses). MMA = `HMMA.SP` m16n8k32 per warp per loop iteration.",
        "",
        sr.table(reports),
        "",
        "SASS gate (`python bench/sass_report.py --check`): "
        + ("passes." if not gate else f"{len(gate)} violations:"),
    ]
    out += [f"- {g}" for g in gate]
    out += ["", "### Roofline: an upper bound, not a measurement", "",
            "Limits and every assumption: `bench/roofline.py` docstring. Per-MMA instruction and "
            "wavefront counts come from the SASS report above (fp16 kernels, sm_90 for H100/H200, "
            "sm_80 for A100).", table(bounds)]
    out += ["", floor_section(gpus)]
    return "\n".join(out)


def floor_section(gpus: Sequence[str]) -> str:
    gpus = list(dict.fromkeys(list(gpus) + ["A100"]))
    return "\n".join([
        "### The floor: what any mma.sp kernel could reach (a model, not a kernel)", "",
        "The fewest shared/L1 wavefronts per m16n8k32 MMA that any kernel design can execute "
        "for each pattern (operand bytes under the SASS report's wavefront rule, every choice in "
        "the kernel's favour: no bank conflicts, all 255 registers for accumulators and "
        "fragments, two pipeline stages; `operand_floor` in `bench/roofline.py`), with the best "
        "warp and CTA tile, and the speedup over dense that the tensor and shared/L1 limits alone "
        "then allow at LLaMA-7B 4096x4096, N = 2048, beside the L2 limit of that same tile (as "
        "the roofline counts it: weights once per BN tokens, x once per BM rows; an L2 at the "
        "assumed bandwidth above). 'Staged': operands written to shared memory "
        "once per CTA, as this project's kernels and CUTLASS's do; 'unstaged': fragments loaded "
        "from global memory straight into registers (reads only; no such kernel exists).", "",
        floor_table(gpus)])


def all_bounds(records: List[dict], gpus: Sequence[str]) -> List[Bound]:
    out = []
    for gname in gpus:
        gpu = GPUS[gname]
        for shape, dims in SHAPES.items():
            for R, K in dims:
                for N in TOKENS:
                    for ptext in PATTERNS:
                        p = Pattern.parse(ptext)
                        path, x = pick_kernel(p, N)
                        if path == "decode":
                            kernel, which, bm, bn = decode_kernel(p, N)
                            d = decode_plan(p, R, K, N)
                            c = counts_from_report(records, gpu, kernel, which, d["smem_bytes"])
                            c.load_bytes_in_flight_per_warp /= DECODE_GROUPS_PER_ITERATION
                            out.append(bound(gpu, p, R, K, N, c, bm, bn, shape, f"{path} ({x} x)",
                                             splits=d["splits"]))
                        else:
                            kernel, which, bm, bn = KERNELS[(path, x)]
                            c = counts_from_report(records, gpu, kernel, which)
                            out.append(bound(gpu, p, R, K, N, c, bm, bn, shape, f"{path} ({x} x)",
                                             transposed_x=x == "gathered",
                                             transpose_shared_by=TRANSPOSE_SHARED_BY.get((R, K), 1)))
    return out


def table(bounds: List[Bound]) -> str:
    lines = []
    for gname in dict.fromkeys(b.gpu for b in bounds):
        lines.append(f"\n**{gname}: speedup CEILING vs dense fp16 at peak (an upper bound, not a "
                     f"measurement), binding limit; format alone allows the second figure**\n")
        pats = list(dict.fromkeys(b.pattern for b in bounds))
        lines.append("| shape | R x K | N | " + " | ".join(f"{p} ceiling (bound by) / format" for p in pats) + " |")
        lines.append("|---|---|---|" + "---|" * len(pats))
        rows: Dict[Tuple, Dict[str, Bound]] = {}
        for b in bounds:
            if b.gpu == gname:
                rows.setdefault((b.shape, b.R, b.K, b.N), {})[b.pattern] = b
        for (shape, R, K, N), per in rows.items():
            cells = [f"{per[p].ceiling:.2f}x ({per[p].binding}) / {per[p].format_ceiling:.2f}x" for p in pats]
            lines.append(f"| {shape} | {R}x{K} | {N} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="append", choices=sorted(GPUS), help="repeatable; default all")
    ap.add_argument("--report", type=Path, help="a sass_report.py --json file (default: run it, cached)")
    ap.add_argument("--json", metavar="PATH", help="also write every bound with its limits as JSON")
    ap.add_argument("--section", action="store_true",
                    help="print the 'Static kernel report' section of bench/RESULTS.md (SASS table "
                         "with the CUTLASS anchor, gate, roofline)")
    ap.add_argument("--floor", action="store_true",
                    help="print the floor: the fewest shared/L1 wavefronts per MMA any mma.sp "
                         "kernel design could execute, per pattern, and the ceilings it allows")
    a = ap.parse_args(argv)
    if a.floor:
        print(floor_section(a.gpu or ["H100", "H200", "A100"]))
        return 0
    if a.section:
        print(section(a.gpu or ["H100"], list(argv if argv is not None else sys.argv[1:])))
        return 0
    records = load_sass_report(a.report)
    bounds = all_bounds(records, a.gpu or ["H100", "H200", "A100"])
    print("Roofline BOUND (upper bound on speed; see bench/roofline.py for every assumption)")
    print(table(bounds))
    if a.json:
        Path(a.json).write_text(json.dumps(
            [dict(dataclasses.asdict(b), sparse_us=b.sparse_us, binding=b.binding, ceiling=b.ceiling,
                  note="upper bound, not a measurement") for b in bounds], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
