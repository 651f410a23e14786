"""GPU timings of ``vnm.spmm`` against ``torch.matmul`` (cuBLAS dense) and
``torch.sparse.to_sparse_semi_structured`` (2:4, cuSPARSELt / CUTLASS) in the same run.

    python bench/bench_spmm.py [--shapes default|all|RxK,...] [--tokens 1 16 128 2048 8192]
                               [--patterns 2:4 64:2:5 ...] [--dtype float16] [--out bench_spmm.csv]
                               [--plot bench_spmm.png] [--reps 50] [--warmup 10]

First a correctness pass (random data, NaN-poisoned outputs, compared with the C++ reference on
the CPU), then timings: CUDA-graph replays of 20 calls cycling through copies of the weights and
inputs that together exceed twice the L2 cache, timed with CUDA events, median over replays after
warm-up (``--eager``: events around single calls instead; the CSV's ``timing`` column says which
method each of vnm / dense / 2:4 got). Writes a CSV (columns gpu,dtype,pattern,R,K,N,ms_vnm,ms_dense,ms_24,speedup_dense,
speedup_24,tflops,gbps,kernel,shape,timing; the speedup table vnm.choose_pattern reads) and a plot of the
speedup over dense against N, one line per pattern (geometric mean over shapes).
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from pathlib import Path

import torch

_src = Path(__file__).resolve().parents[1] / "python"
if any((_src / "vnm").glob("_C*.so")):
    sys.path.insert(0, str(_src))
import vnm  # noqa: E402
from vnm import VNMTensor, cuda_ops  # noqa: E402
from vnm._native import _C  # noqa: E402

SHAPES = {
    "llama7b.attn": (4096, 4096), "llama7b.qkv": (12288, 4096), "llama7b.up": (11008, 4096),
    "llama7b.down": (4096, 11008), "llama13b.attn": (5120, 5120), "llama13b.up": (13824, 5120),
    "llama13b.down": (5120, 13824), "bert.attn": (768, 768), "bert.up": (3072, 768),
    "bert.down": (768, 3072), "deit_s.attn": (384, 384), "deit_s.up": (1536, 384),
    "deit_s.down": (384, 1536),
}
DEFAULT_SHAPES = ["llama7b.attn", "llama7b.qkv", "llama7b.up", "llama7b.down", "bert.up", "bert.down"]
PATTERNS = ["2:4", "64:2:5", "64:2:8", "128:2:8", "64:2:16", "128:2:16"]


def random_mask(R: int, K: int, pattern: str, gen: torch.Generator) -> torch.Tensor:
    """A random valid mask (4 random columns per V x M block, 2 of them per row), built with
    tensor ops: exact mask selection on the CPU is too slow for LLaMA-sized layers."""
    p = vnm.Pattern.parse(pattern)
    V, M = p.row_block, p.M
    Rp, G = -(-R // V) * V, -(-K // M)
    cols = torch.rand(Rp // V, G, M, generator=gen).argsort(-1)[..., :4]          # block columns
    pick = torch.rand(Rp, G, 4, generator=gen).argsort(-1)[..., :2]               # 2 of the 4 per row
    chosen = cols.repeat_interleave(V, 0).gather(-1, pick)                         # (Rp, G, 2)
    mask = torch.zeros(Rp, G, M, dtype=torch.bool)
    mask.scatter_(-1, chosen, True)
    return mask.view(Rp, G * M)[:R, :K].contiguous()


def eager_ms(fn, sets: int, warmup: int, reps: int) -> float:
    """Median of CUDA-event timings around single calls (includes any host-side gap)."""
    for i in range(warmup):
        fn(i % sets)
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    times = []
    for i in range(reps):
        start.record()
        fn(i % sets)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_ms(fn, sets: int, warmup: int, reps: int, calls: int = 20) -> float:
    """Per-call time from replays of a CUDA graph of `calls` calls cycling through the buffer
    sets: no Python or launch overhead, which would otherwise dominate small layers."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(max(warmup, sets)):
            fn(i % sets)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        for i in range(calls):
            fn(i % sets)
    for _ in range(3):
        graph.replay()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(max(5, reps // 4)):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def median_ms(fn, sets: int, warmup: int, reps: int, use_graph: bool = True, out_bytes: int = 0):
    """(ms, method): graph replay timing, or eager events where capture is not possible. Each
    captured call keeps its output in the graph's pool: fewer calls for large outputs."""
    if use_graph:
        try:
            calls = 20 if out_bytes < 64 * 2**20 else max(4, sets)
            return graph_ms(fn, sets, warmup, reps, calls), "graph"
        except Exception:  # noqa: BLE001 - e.g. a library that cannot be captured
            torch.cuda.synchronize()
    return eager_ms(fn, sets, warmup, reps), "eager"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="default")
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 128, 2048, 8192])
    ap.add_argument("--patterns", nargs="+", default=PATTERNS)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--out", default="bench_spmm.csv")
    ap.add_argument("--plot", default="bench_spmm.png")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--check-tokens", type=int, default=16, help="N of the correctness pass")
    ap.add_argument("--eager", action="store_true", help="time single eager calls instead of CUDA-graph replays")
    args = ap.parse_args()
    if not (torch.cuda.is_available() and vnm.CUDA_BUILT):
        print("needs a CUDA GPU and vnm built with CUDA", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    if args.shapes == "default":
        shapes = [(n, *SHAPES[n]) for n in DEFAULT_SHAPES]
    elif args.shapes == "all":
        shapes = [(n, *rk) for n, rk in SHAPES.items()]
    else:
        shapes = [("custom", *map(int, s.split("x"))) for s in args.shapes.split(",")]
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    gpu = props.name
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    gen = torch.Generator().manual_seed(0)
    print(f"# {gpu}, torch {torch.__version__}, {args.dtype}, median of {args.reps} after {args.warmup}")

    # ---- correctness first ---------------------------------------------------------------
    failures = 0
    weights = {}  # (shape, pattern) -> VNMTensor on the CPU, reused for the timings
    for name, R, K in shapes:
        for pattern in args.patterns:
            w = torch.randn(R, K, generator=gen).to(dtype)
            mask = random_mask(R, K, pattern, gen)
            t = VNMTensor.from_dense(w, mask, pattern)
            weights[(name, pattern)] = t
            x = torch.randn(args.check_tokens, K, generator=gen).to(dtype)
            bias = torch.randn(R, generator=gen).to(dtype)
            ref = vnm.spmm(t, x, bias).double()  # C++ reference on the CPU
            td = t.to(dev)
            p = cuda_ops.packed_for(td)
            y = torch.full((args.check_tokens, R), float("nan"), dtype=dtype, device=dev)
            cuda_ops._spmm_packed_into(x.to(dev), p.values, p.meta, p.kidx, bias.to(dev), pattern, R, K, False, y)
            err = float((y.cpu().double() - ref).norm() / ref.norm())
            ok = math.isfinite(err) and err < 1e-2
            failures += not ok
            print(f"check {name:14s} {pattern:9s} N={args.check_tokens}: rel_err {err:.2e} {'ok' if ok else 'FAIL'}")
    if failures:
        print(f"{failures} correctness failures: not timing", file=sys.stderr)
        return 1

    # ---- timings ---------------------------------------------------------------------------
    rows = []
    cols = ["gpu", "dtype", "pattern", "R", "K", "N", "ms_vnm", "ms_dense", "ms_24", "speedup_dense",
            "speedup_24", "tflops", "gbps", "kernel", "shape", "timing"]
    out = open(args.out, "w", newline="")  # written row by row: a cut-short run keeps its rows
    writer = csv.DictWriter(out, fieldnames=cols)
    writer.writeheader()
    hdr = (f"{'shape':14s} {'R':>6s} {'K':>6s} {'N':>5s} {'pattern':9s} {'kern':5s} {'ms_vnm':>9s} "
           f"{'ms_dense':>9s} {'ms_24':>9s} {'x_dense':>8s} {'x_24':>6s} {'TFLOP/s':>8s} {'GB/s':>7s}")
    print(hdr)
    for name, R, K in shapes:
        dense_bytes = R * K * 2
        wsets = int(min(8, max(1, math.ceil(2 * l2 / dense_bytes))))
        max_n = max(args.tokens)
        xsets = int(min(8, max(2, math.ceil(2 * l2 / (max_n * (K + R) * 2)))))
        xs = [torch.randn(max_n, K, generator=gen).to(dtype).to(dev) for _ in range(xsets)]
        # Dense and 2:4 yardsticks: one weight per shape (2:4-pruned for the semi-structured run).
        wd = torch.randn(R, K, generator=gen).to(dtype)
        m24 = random_mask(R, K, "2:4", gen)
        dense_w = [(wd * m24).to(dev) for _ in range(wsets)]
        try:
            w24 = [torch.sparse.to_sparse_semi_structured(d) for d in dense_w]
        except Exception as exc:  # noqa: BLE001 - unsupported shape / GPU: recorded as NaN
            print(f"# to_sparse_semi_structured unavailable for {R}x{K}: {exc}".splitlines()[0])
            w24 = None
        packs = {}
        for pattern in args.patterns:
            p0 = cuda_ops.pack(weights[(name, pattern)].to(dev))
            packs[pattern] = [p0] + [cuda_ops.PackedVNM(p0.values.clone(), p0.meta.clone(), p0.kidx.clone(),
                                                          pattern, (R, K), validate=False) for _ in range(wsets - 1)]
        for N in args.tokens:
            xn = [x[:N] for x in xs]
            sets = max(wsets, xsets)
            g = not args.eager
            ms_dense, how_dense = median_ms(lambda i: torch.matmul(xn[i % xsets], dense_w[i % wsets].T),
                                            sets, args.warmup, args.reps, g, N * R * 2)
            ms_24, how_24 = float("nan"), "-"
            if w24 is not None:
                try:
                    ms_24, how_24 = median_ms(lambda i: torch.nn.functional.linear(xn[i % xsets], w24[i % wsets]),
                                              sets, args.warmup, args.reps, g, N * R * 2)
                except Exception as exc:  # noqa: BLE001
                    print(f"# 2:4 linear failed at N={N}: {exc}".splitlines()[0])
            for pattern in args.patterns:
                ps = packs[pattern]
                ms, how = median_ms(lambda i: cuda_ops.spmm_packed(ps[i % wsets], xn[i % xsets]),
                                    sets, args.warmup, args.reps, g, N * R * 2)
                path, bm, contig = _C.cuda_plan(vnm.Pattern.parse(pattern), R, K, N, False)
                kern = f"{'d' if path == 1 else 't'}{bm}{'c' if contig else 'g'}"
                flops = 2.0 * N * R * K
                nbytes = ps[0].nbytes + N * (K + R) * 2
                row = {
                    "gpu": gpu, "dtype": args.dtype, "pattern": pattern, "R": R, "K": K, "N": N,
                    "ms_vnm": ms, "ms_dense": ms_dense, "ms_24": ms_24,
                    "speedup_dense": ms_dense / ms, "speedup_24": ms_24 / ms,
                    "tflops": flops / (ms * 1e9), "gbps": nbytes / (ms * 1e6), "kernel": kern, "shape": name,
                    "timing": f"{how}/{how_dense}/{how_24}",
                }
                rows.append(row)
                writer.writerow(row)
                out.flush()
                print(f"{name:14s} {R:6d} {K:6d} {N:5d} {pattern:9s} {kern:5s} {ms:9.4f} {ms_dense:9.4f} "
                      f"{ms_24:9.4f} {row['speedup_dense']:8.2f} {row['speedup_24']:6.2f} "
                      f"{row['tflops']:8.1f} {row['gbps']:7.0f}", flush=True)
        del xs, dense_w, w24, packs
        torch.cuda.empty_cache()

    out.close()
    print(f"wrote {args.out} ({len(rows)} rows)")
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for pattern in args.patterns:
            xs_n, ys_s = [], []
            for N in args.tokens:
                sp = [r["speedup_dense"] for r in rows if r["pattern"] == pattern and r["N"] == N]
                if sp:
                    xs_n.append(N)
                    ys_s.append(math.exp(sum(math.log(s) for s in sp) / len(sp)))
            ax.plot(xs_n, ys_s, marker="o", label=pattern)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens N")
        ax.set_ylabel("speedup over torch.matmul (geo-mean over shapes)")
        ax.set_title(f"vnm.spmm on {gpu}, {args.dtype}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")
    except ImportError:
        print("matplotlib missing: no plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
