"""CPU timings of the format core on a LLaMA-7B MLP layer (11008 x 4096): select_mask,
VNMTensor.from_dense, to_dense and the reference spmm. Not a test: prints a table.

    python bench/bench_cpu.py [--rows 11008] [--cols 4096] [--tokens 1 16 128] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

_src = Path(__file__).resolve().parents[1] / "python"
if any((_src / "vnm").glob("_C*.so")):
    sys.path.insert(0, str(_src))
import vnm  # noqa: E402
from vnm._native import _C  # noqa: E402


def median_time(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=11008)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--patterns", nargs="+", default=["2:4", "64:2:5", "64:2:8", "128:2:16"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 128])
    ap.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    R, K = args.rows, args.cols
    g = torch.Generator().manual_seed(0)
    w = torch.randn(R, K, generator=g).to(dtype)
    scores = w.float().abs()
    torch.set_num_threads(_C.num_threads())
    print(f"# CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"vnm threads {_C.num_threads()}, torch {torch.__version__} threads {torch.get_num_threads()}")
    print(f"# weight {R} x {K} {args.dtype}; medians of {args.repeat}")
    print(f"{'pattern':>9} {'select_mask s':>13} {'from_dense s':>12} {'to_dense s':>10} {'bytes/dense':>11}"
          + "".join(f" {'spmm N=' + str(n) + ' ms':>14} {'dense N=' + str(n) + ' ms':>15}" for n in args.tokens))
    for pattern in args.patterns:
        mask = vnm.select_mask(scores, pattern)
        t_sel = median_time(lambda: vnm.select_mask(scores, pattern), args.repeat)
        t_comp = median_time(lambda: vnm.VNMTensor.from_dense(w, mask, pattern), args.repeat)
        t = vnm.VNMTensor.from_dense(w, mask, pattern)
        t_dec = median_time(t.to_dense, args.repeat)
        row = f"{pattern:>9} {t_sel:13.3f} {t_comp:12.3f} {t_dec:10.3f} {t.nbytes / t.dense_nbytes:11.3f}"
        wd = t.to_dense()
        for n in args.tokens:
            x = torch.randn(n, K, generator=g).to(dtype)
            vnm.spmm(t, x)
            t_sp = median_time(lambda: vnm.spmm(t, x), args.repeat)
            t_de = median_time(lambda: x @ wd.T, args.repeat)
            row += f" {t_sp * 1e3:14.1f} {t_de * 1e3:15.1f}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
