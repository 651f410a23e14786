"""A few SpMM launches for compute-sanitizer (memcheck / racecheck): both kernels, both B paths,
odd shapes, perm and bias, fp16 and bf16; each result is checked against the CPU reference.

    compute-sanitizer --tool memcheck --error-exitcode 1 python bench/sanitize_cases.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python bench/sanitize_cases.py --quick
    compute-sanitizer --tool memcheck --error-exitcode 1 python bench/sanitize_cases.py --cases 2,3,4

``--quick`` runs the first three cases (all 2:4), ``--cases`` the listed ones (indices into CASES).
Exits 1 if a result is wrong, 2 without a GPU and a CUDA build.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

_src = Path(__file__).resolve().parents[1] / "python"
if any((_src / "vnm").glob("_C*.so")):
    sys.path.insert(0, str(_src))
import vnm  # noqa: E402
from vnm import VNMTensor, cuda_ops  # noqa: E402

CASES = [  # pattern, R, K, N, dtype, perm, bias, path (0 auto, 1 decode, 2 tiled), force_gather
    ("2:4", 203, 264, 5, torch.float16, False, True, 0, False),
    ("2:4", 203, 264, 150, torch.float16, False, False, 2, False),
    ("2:4", 203, 264, 150, torch.bfloat16, True, True, 2, True),
    ("64:2:8", 130, 333, 1, torch.bfloat16, True, True, 0, False),
    ("64:2:8", 130, 333, 129, torch.float16, False, True, 0, False),
    ("32:2:5", 77, 101, 40, torch.float16, True, False, 2, False),
    ("16:2:32", 50, 300, 33, torch.bfloat16, False, True, 1, False),
    ("48:2:7", 100, 90, 260, torch.float16, True, True, 2, False),
]


def selected_cases(argv):
    if "--cases" in argv:
        i = argv.index("--cases")
        try:
            picks = [int(s) for s in argv[i + 1].split(",")]
            return [CASES[k] for k in picks]
        except (IndexError, ValueError):
            raise SystemExit(f"--cases wants comma-separated indices 0..{len(CASES) - 1}, e.g. --cases 2,3,4") from None
    return CASES[:3] if "--quick" in argv else CASES


def main() -> int:
    cases = selected_cases(sys.argv[1:])
    if not (torch.cuda.is_available() and vnm.CUDA_BUILT):
        print(f"needs a CUDA GPU and vnm built with CUDA (torch.cuda.is_available()="
              f"{torch.cuda.is_available()}, vnm.CUDA_BUILT={vnm.CUDA_BUILT})", file=sys.stderr)
        return 2
    g = torch.Generator().manual_seed(0)
    bad = 0
    for pattern, R, K, N, dtype, use_perm, use_bias, path, gather in cases:
        w = torch.randn(R, K, generator=g).to(dtype)
        mask = vnm.select_mask(torch.rand(R, K, generator=g), pattern)
        perm = torch.randperm(K, generator=g) if use_perm else None
        t = VNMTensor.from_dense(w, mask, pattern, perm=perm)
        x = torch.randn(N, K, generator=g).to(dtype)
        bias = torch.randn(R, generator=g).to(dtype) if use_bias else None
        ref = vnm.spmm(t, x, bias).double()
        p = cuda_ops.pack(t.to("cuda"))
        y = torch.full((N, R), float("nan"), dtype=dtype, device="cuda")
        cuda_ops._spmm_packed_into(x.cuda(), p.values, p.meta, p.kidx, None if bias is None else bias.cuda(),
                                   t.pattern_text, R, K, p.has_perm, y, path=path, force_gather=gather)
        back = cuda_ops.unpack(p)  # the unpack kernel too
        err = float((y.cpu().double() - ref).norm() / ref.norm())
        ok = err < 1e-2 and torch.equal(back.values.cpu().view(torch.int16), t.values.view(torch.int16))
        bad += not ok
        print(f"{pattern:8s} R={R} K={K} N={N} {dtype} perm={use_perm} bias={use_bias} path={path} "
              f"gather={gather}: rel_err {err:.2e} {'ok' if ok else 'FAIL'}", flush=True)
    torch.cuda.synchronize()
    print(f"{len(cases) - bad} passed, {bad} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
