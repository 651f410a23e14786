"""Timings of exact mask selection (vnm.select_mask) on one layer: the C++ branch and bound
("native", CPU) and the vectorised torch enumeration ("torch", on --device). Not a test.

    python bench/bench_select.py [--rows 11008] [--cols 4096] [--patterns 2:4 64:2:8] [--repeat 5]
        [--backends native torch] [--device cpu|cuda]
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


def timed(fn, repeat, sync):
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=11008)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--patterns", nargs="+", default=["2:4", "64:2:5", "64:2:8", "128:2:16"])
    ap.add_argument("--backends", nargs="+", default=["native"], choices=["native", "torch"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.set_num_threads(_C.num_threads())
    scores = torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(0)).abs()
    print(f"# {platform.machine()}, {os.cpu_count()} cores, vnm threads {_C.num_threads()}, torch {torch.__version__} "
          f"threads {torch.get_num_threads()}, scores {args.rows} x {args.cols} |N(0,1)| float32; "
          f"median (min) of {args.repeat}")
    print(f"{'pattern':>9} " + " ".join(f"{b + ' ' + ('cpu' if b == 'native' else args.device) + ' s':>22}"
                                        for b in args.backends))
    for pattern in args.patterns:
        row = f"{pattern:>9} "
        for backend in args.backends:
            s = scores.to(dev) if backend == "torch" else scores
            if backend == "torch" and not vnm.mask.torch_supports(pattern):
                row += f"{'(M > 16: not supported)':>22} "
                continue
            vnm.select_mask(s, pattern, backend=backend)  # warm-up
            med, low = timed(lambda: vnm.select_mask(s, pattern, backend=backend), args.repeat, sync)
            row += f"{f'{med:.3f} ({low:.3f})':>22} "
        print(row, flush=True)


if __name__ == "__main__":
    main()
