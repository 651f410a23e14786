"""GPU timings of ``vnm.spmm`` against ``torch.matmul`` (cuBLAS dense) and
``torch.sparse.to_sparse_semi_structured`` (2:4, cuSPARSELt / CUTLASS) in the same run.

    python bench/bench_spmm.py [--shapes default|llama7b|all|RxK,...] [--tokens 1 16 128 2048 8192]
                               [--patterns 2:4 64:2:5 ...] [--dtype float16] [--out bench_spmm.csv]
                               [--plot bench_spmm.png] [--reps 15] [--batch-ms 2] [--warmup 10]

Per shape, correctness first: for every pattern and every N, the kernel that is timed (automatic
path choice, no bias, on the timed input) writes into a NaN-poisoned output; every element must be
written, and a random sample of ``--check-tokens`` tokens is compared with a float64 CPU reference
``x @ (W * mask).T`` (relative error under 1e-2). A pattern that fails is not timed and the script
exits with 1 after the run.

Timings (per shape, N): the dense yardstick uses a random dense weight (no zeros), torch's 2:4 the
same weight 2:4-pruned and compressed, vnm random V:N:M weights. So that no weight is timed out of
L2, each of the three weight operands gets its own number of copies, sized from its own bytes (the
packed vnm arrays, torch's compressed 2:4 tensors, the dense matrix): the fewest whose rotation set
exceeds twice the L2 size the device reports, within ``--max-copies`` and ``--rotate-cap-gb`` per
operand (the CSV's ``rot_mb_*`` and ``l2_mb`` columns show what each got; a set under 2x L2 is
flagged in the table). The inputs x have 2 to 8 copies, shared by the three methods. Each method
is captured as a CUDA graph of ``calls`` calls cycling through all its copies; ``--reps`` batches
of back-to-back replays, each about ``--batch-ms`` long, are timed with CUDA events; the time is
the median per call (no Python or launch overhead). Where graph capture fails, a batch is the
same calls made eagerly on the stream between one pair of events (``timing`` column: ``graph`` or
``stream`` per method, in the order vnm/dense/2:4).

Writes a CSV, row by row (a cut-short run keeps its rows). Columns: gpu, dtype, pattern, R, K, N,
ms_vnm, ms_dense, ms_24, speedup_dense (ms_dense / ms_vnm), speedup_24 (ms_24 / ms_vnm), tflops
(dense-equivalent, 2 N R K / t), tflops_actual (2 N R K * density / t), gbps (vnm: packed weight +
x + y bytes / t), gbps_dense, gbps_24, kernel, shape, timing, rel_err, l2_mb, rot_mb_vnm,
rot_mb_dense, rot_mb_24, rot_mb_x. ``vnm.choose.SpeedupTable`` reads pattern, R, K, N and
speedup_dense. Also a plot of the speedup over dense against N, one line per pattern (geometric
mean over shapes).
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
SHAPE_SETS = {
    "llama7b": ["llama7b.attn", "llama7b.qkv", "llama7b.up", "llama7b.down"],
    "default": ["llama7b.attn", "llama7b.qkv", "llama7b.up", "llama7b.down", "bert.up", "bert.down"],
    "all": list(SHAPES),
}
PATTERNS = ["2:4", "64:2:5", "64:2:8", "128:2:8", "64:2:16", "128:2:16"]
MAX_ERR = 1e-2
CSV_COLUMNS = ["gpu", "dtype", "pattern", "R", "K", "N", "ms_vnm", "ms_dense", "ms_24", "speedup_dense",
               "speedup_24", "tflops", "tflops_actual", "gbps", "gbps_dense", "gbps_24", "kernel", "shape",
               "timing", "rel_err", "l2_mb", "rot_mb_vnm", "rot_mb_dense", "rot_mb_24", "rot_mb_x",
               "ms_transpose_x"]


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


def rotation_copies(one_copy_bytes: int, l2_bytes: int, max_copies: int, cap_bytes: int,
                    minimum: int = 1) -> int:
    """Copies of one operand: the fewest whose total exceeds 2x L2 (so cycling through them
    reads memory, not L2), at least `minimum`, at most `max_copies` and `cap_bytes` in all."""
    want = max(minimum, 2 * l2_bytes // max(1, one_copy_bytes) + 1)
    fit = max(1, cap_bytes // max(1, one_copy_bytes))
    return int(max(1, min(want, max_copies, fit)))


def semi_structured_bytes(w: torch.Tensor) -> int:
    """Bytes of torch's compressed 2:4 tensor (values and metadata, whichever backend)."""
    names, _ = w.__tensor_flatten__()
    return sum(getattr(w, n).numel() * getattr(w, n).element_size() for n in names)


def _events_ms(run) -> float:
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def time_per_call(fn, copies: int, warmup: int, reps: int, batch_ms: float, use_graph: bool):
    """(median ms per call, method). `fn(i)` runs call i on copy i % (its copy count).

    Every copy is touched in the warm-up (first-touch, library plan selection). One eager batch
    over all copies estimates a call's time (an overestimate where Python is slower than the
    GPU); `calls` (a multiple of `copies`) makes a batch last about `batch_ms` by that estimate.
    A CUDA graph of `calls` calls is captured; each timed batch is as many back-to-back replays
    as make it last about `batch_ms` (so the gap before the first kernel does not count), between
    one pair of events. Where capture fails, a timed batch is `calls` eager calls instead."""
    for i in range(max(warmup, copies)):
        fn(i)
    torch.cuda.synchronize()
    est = _events_ms(lambda: [fn(i) for i in range(copies)]) / copies
    calls = copies * max(1, math.ceil(batch_ms / max(est, 1e-4) / copies))
    calls = min(calls, max(copies, 4096))

    def batch():
        for i in range(calls):
            fn(i)

    if use_graph:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn(0)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # Outputs are dropped right after each call, so the graph's pool reuses one block.
            with torch.cuda.graph(graph, stream=side):
                batch()
            graph.replay()  # the first replay uploads the graph
            replays = max(1, math.ceil(batch_ms / max(_events_ms(graph.replay), 1e-3)))

            def replay_batch():
                for _ in range(replays):
                    graph.replay()

            times = [_events_ms(replay_batch) / (replays * calls) for _ in range(reps)]
            del graph
            return statistics.median(times), "graph"
        except Exception as exc:  # noqa: BLE001 - a library call that cannot be captured
            torch.cuda.synchronize()
            print(f"# graph capture failed ({str(exc).splitlines()[0][:120]}): timing eager batches")
    batch()
    times = [_events_ms(batch) / calls for _ in range(reps)]
    return statistics.median(times), "stream"


def check_pattern(pw, x_sets, tokens, check_tokens, gen):
    """Correctness of the timed call on the timed inputs (see the module doc). Returns the worst
    relative error over the N values (NaN if any output element was left unwritten)."""
    R, K = pw["R"], pw["K"]
    wd = (pw["w"].double() * pw["mask"]).T.contiguous()  # K x R, float64 on the CPU
    p = pw["packed"][0]
    worst = 0.0
    for N in tokens:
        x = x_sets[0][:N]
        y = torch.full((N, R), float("nan"), dtype=x.dtype, device=x.device)
        cuda_ops._spmm_packed_into(x, p.values, p.meta, p.kidx, None, p.pattern_text, R, K, False, y)
        torch.cuda.synchronize()
        if not bool(torch.isfinite(y).all()):
            return float("nan")
        idx = torch.randperm(N, generator=gen)[:check_tokens].sort().values
        ref = x[idx.to(x.device)].cpu().double() @ wd
        err = float((y[idx.to(y.device)].cpu().double() - ref).norm() / ref.norm())
        worst = max(worst, err) if math.isfinite(err) else float("nan")
        if not math.isfinite(worst):
            return worst
    return worst


def bench_shape(name, R, K, args, dtype, l2, gen, failures):
    """Checks, then times, every pattern and N at one shape: yields the CSV rows as they come.
    Appends "<shape> <pattern>" to `failures` for a pattern that fails its check (not timed)."""
    dev = torch.device("cuda")
    gpu = torch.cuda.get_device_name(dev)
    cap = int(args.rotate_cap_gb * 1e9)
    hdr = (f"{'shape':14s} {'R':>6s} {'K':>6s} {'N':>5s} {'pattern':9s} {'kern':5s} {'ms_vnm':>9s} "
           f"{'ms_dense':>9s} {'ms_24':>9s} {'x_dense':>7s} {'x_24':>6s} {'TF_deq':>7s} {'TF_act':>7s} "
           f"{'GB/s':>6s} {'rel_err':>8s} cold")
    max_n = max(args.tokens)
    # Inputs (shared by the three methods): 2 to 8 copies of the largest x.
    x_bytes = max_n * K * 2
    xsets = rotation_copies(x_bytes + max_n * R * 2, l2, 8, cap, minimum=2)
    xs = [torch.randn(max_n, K, generator=gen).to(dtype).to(dev) for _ in range(xsets)]

    # vnm weights: random values and masks per pattern, packed, copied past 2x L2.
    vnm_w = {}
    for pattern in args.patterns:
        w = torch.randn(R, K, generator=gen).to(dtype)
        mask = random_mask(R, K, pattern, gen)
        p0 = cuda_ops.pack(VNMTensor.from_dense(w, mask, pattern).to(dev))
        n = rotation_copies(p0.nbytes, l2, args.max_copies, cap)
        copies = [p0] + [cuda_ops.PackedVNM(p0.values.clone(), p0.meta.clone(), p0.kidx.clone(),
                                            pattern, (R, K), validate=False) for _ in range(n - 1)]
        vnm_w[pattern] = {"R": R, "K": K, "w": w, "mask": mask, "packed": copies}

    # ---- correctness first -------------------------------------------------------------------
    for pattern in args.patterns:
        err = check_pattern(vnm_w[pattern], xs, args.tokens, args.check_tokens, gen)
        ok = math.isfinite(err) and err < MAX_ERR
        vnm_w[pattern]["err"] = err
        del vnm_w[pattern]["w"], vnm_w[pattern]["mask"]
        print(f"check {name:14s} {pattern:9s} N={','.join(map(str, args.tokens))}: worst rel_err "
              f"{err:.2e} {'ok' if ok else 'FAIL (not timed)'}", flush=True)
        if not ok:
            failures.append(f"{name} {pattern}")
            del vnm_w[pattern]

    # ---- yardsticks: dense (no zeros) and torch 2:4, each with its own copy count ----------------
    wd = torch.randn(R, K, generator=gen).to(dtype)
    dense_one = R * K * 2
    dense_w = [wd.to(dev) for _ in range(rotation_copies(dense_one, l2, args.max_copies, cap))]
    w24 = None
    try:
        pruned = (wd * random_mask(R, K, "2:4", gen)).to(dev)
        first = torch.sparse.to_sparse_semi_structured(pruned)
        n24 = rotation_copies(semi_structured_bytes(first), l2, args.max_copies, cap)
        w24 = [first] + [torch.sparse.to_sparse_semi_structured(pruned) for _ in range(n24 - 1)]
        del pruned
    except Exception as exc:  # noqa: BLE001 - unsupported shape / GPU: recorded as NaN
        print(f"# to_sparse_semi_structured unavailable for {R}x{K}: {exc}".splitlines()[0])
    rot_mb = {
        "dense": len(dense_w) * dense_one / 1e6,
        "24": len(w24) * semi_structured_bytes(w24[0]) / 1e6 if w24 else float("nan"),
        "x": xsets * x_bytes / 1e6,
    }
    print(f"# {name} {R}x{K}: L2 {l2 / 1e6:.0f} MB; weight rotation sets: dense {len(dense_w)} x "
          f"{dense_one / 1e6:.1f} MB, 2:4 {len(w24) if w24 else 0} copies ({rot_mb['24']:.0f} MB), vnm "
          + ", ".join(f"{p} {len(v['packed'])} x {v['packed'][0].nbytes / 1e6:.2f} MB" for p, v in vnm_w.items())
          + f"; x {xsets} copies", flush=True)
    print(hdr, flush=True)

    g = not args.eager
    for N in args.tokens:
        xn = [x[:N] for x in xs]
        io = N * (K + R) * 2
        flops = 2.0 * N * R * K
        nd = len(dense_w)
        ms_dense, how_dense = time_per_call(lambda i: torch.matmul(xn[i % xsets], dense_w[i % nd].T),
                                            max(nd, xsets), args.warmup, args.reps, args.batch_ms, g)
        ms_24, how_24 = float("nan"), "-"
        if w24 is not None:
            n24 = len(w24)
            try:
                ms_24, how_24 = time_per_call(
                    lambda i: torch.nn.functional.linear(xn[i % xsets], w24[i % n24]),
                    max(n24, xsets), args.warmup, args.reps, args.batch_ms, g)
            except Exception as exc:  # noqa: BLE001
                torch.cuda.synchronize()
                print(f"# 2:4 linear failed at N={N}: {exc}".splitlines()[0])
        for pattern, pw in vnm_w.items():
            ps = pw["packed"]
            nv = len(ps)
            ms, how = time_per_call(lambda i: cuda_ops.spmm_packed(ps[i % nv], xn[i % xsets]),
                                    max(nv, xsets), args.warmup, args.reps, args.batch_ms, g)
            path, bm, contig, needs_xt = _C.cuda_plan(vnm.Pattern.parse(pattern), R, K, N, False)
            kern = f"{'d' if path == 1 else 't'}{bm}{'c' if contig else 'g'}"
            # The tiled gathered path reads x transposed; ms_vnm includes making it (spmm_packed
            # transposes on every call). Its share, timed alone (layers sharing x pay it once):
            ms_xt = float("nan")
            if needs_xt:
                ms_xt, _ = time_per_call(lambda i: cuda_ops.transpose_x(xn[i % xsets]), xsets,
                                         args.warmup, args.reps, args.batch_ms, g)
            density = vnm.Pattern.parse(pattern).density
            mb_vnm = nv * ps[0].nbytes / 1e6
            row = {
                "gpu": gpu, "dtype": args.dtype, "pattern": pattern, "R": R, "K": K, "N": N,
                "ms_vnm": ms, "ms_dense": ms_dense, "ms_24": ms_24,
                "speedup_dense": ms_dense / ms, "speedup_24": ms_24 / ms,
                "tflops": flops / (ms * 1e9), "tflops_actual": flops * density / (ms * 1e9),
                "gbps": (ps[0].nbytes + io) / (ms * 1e6),
                "gbps_dense": (dense_one + io) / (ms_dense * 1e6),
                "gbps_24": ((semi_structured_bytes(w24[0]) if w24 else float("nan")) + io) / (ms_24 * 1e6),
                "kernel": kern, "shape": name, "timing": f"{how}/{how_dense}/{how_24}",
                "rel_err": pw["err"], "l2_mb": l2 / 1e6, "rot_mb_vnm": mb_vnm,
                "rot_mb_dense": rot_mb["dense"], "rot_mb_24": rot_mb["24"], "rot_mb_x": rot_mb["x"],
                "ms_transpose_x": ms_xt,
            }
            cold = all(v > 2 * l2 / 1e6 for v in (mb_vnm, rot_mb["dense"], rot_mb["24"]) if math.isfinite(v))
            print(f"{name:14s} {R:6d} {K:6d} {N:5d} {pattern:9s} {kern:5s} {ms:9.4f} {ms_dense:9.4f} "
                  f"{ms_24:9.4f} {row['speedup_dense']:7.2f} {row['speedup_24']:6.2f} {row['tflops']:7.1f} "
                  f"{row['tflops_actual']:7.1f} {row['gbps']:6.0f} {pw['err']:8.1e} "
                  f"{'yes' if cold else 'NO (a weight set fits in 2x L2)'}", flush=True)
            yield row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="default", help="default | llama7b | all | RxK,RxK,...")
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 128, 2048, 8192])
    ap.add_argument("--patterns", nargs="+", default=PATTERNS)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--out", default="bench_spmm.csv")
    ap.add_argument("--plot", default="bench_spmm.png")
    ap.add_argument("--reps", type=int, default=15, help="timed batches (median over them)")
    ap.add_argument("--batch-ms", type=float, default=2.0, help="about how long one timed batch runs")
    ap.add_argument("--warmup", type=int, default=10, help="eager warm-up calls (at least one per copy)")
    ap.add_argument("--check-tokens", type=int, default=16,
                    help="tokens per N compared with the float64 CPU reference")
    ap.add_argument("--max-copies", type=int, default=2048, help="most weight copies per operand")
    ap.add_argument("--rotate-cap-gb", type=float, default=16.0, help="most GB of copies per operand")
    ap.add_argument("--eager", action="store_true", help="time eager batches instead of CUDA-graph replays")
    args = ap.parse_args()
    if not (torch.cuda.is_available() and vnm.CUDA_BUILT):
        print(f"needs a CUDA GPU and vnm built with CUDA (torch.cuda.is_available()="
              f"{torch.cuda.is_available()}, vnm.CUDA_BUILT={vnm.CUDA_BUILT})", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    if args.shapes in SHAPE_SETS:
        shapes = [(n, *SHAPES[n]) for n in SHAPE_SETS[args.shapes]]
    else:
        try:
            shapes = [("custom", *map(int, s.split("x"))) for s in args.shapes.split(",")]
        except ValueError:
            ap.error(f"--shapes {args.shapes!r}: want one of {sorted(SHAPE_SETS)} or RxK,RxK,...")
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    gpu = props.name
    l2 = int(props.L2_cache_size)
    gen = torch.Generator().manual_seed(0)
    print(f"# {gpu}, L2 {l2 / 1e6:.0f} MB, torch {torch.__version__}, {args.dtype}; per call: median over "
          f"{args.reps} batches of about {args.batch_ms} ms; weight copies per operand past 2x L2 "
          f"(at most {args.max_copies} copies, {args.rotate_cap_gb} GB)", flush=True)

    rows, failures = [], []
    with open(args.out, "w", newline="") as out:  # written row by row: a cut-short run keeps its rows
        writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for name, R, K in shapes:
            for row in bench_shape(name, R, K, args, dtype, l2, gen, failures):
                rows.append(row)
                writer.writerow(row)
                out.flush()
            torch.cuda.empty_cache()  # the shape's copies are gone with bench_shape's frame
    print(f"wrote {args.out} ({len(rows)} rows)")
    if rows:
        plot(rows, args, gpu)
    if failures:
        print(f"{len(failures)} correctness failure(s), not timed: {'; '.join(failures)}", file=sys.stderr)
        return 1
    return 0


def plot(rows, args, gpu) -> None:
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for pattern in args.patterns:
        xs_n, ys_s = [], []
        for N in args.tokens:
            sp = [r["speedup_dense"] for r in rows if r["pattern"] == pattern and r["N"] == N]
            if sp:
                xs_n.append(N)
                ys_s.append(math.exp(sum(math.log(s) for s in sp) / len(sp)))
        if xs_n:
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


if __name__ == "__main__":
    sys.exit(main())
