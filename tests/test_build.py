"""The build used CUDA wherever it could.

With nvcc on the machine that runs the tests (on PATH, or named by CUDACXX), an extension that
was built asking for CUDA (the default, ``VNM_ENABLE_CUDA=ON``) must hold the CUDA kernels
(``vnm.CUDA_BUILT``). Otherwise a build that quietly fell back to the CPU-only core (nvcc not on
PATH when CMake ran, a stale CMake cache holding NOTFOUND) would pass CI with every GPU test
skipped. ``vnm._C.build_info`` records what the build asked for and which CUDA compiler it found.
"""

from __future__ import annotations

import os
import shutil
from typing import Optional

import pytest

import vnm
from vnm._native import _C


def _cuda_compiler_here() -> Optional[str]:
    """What CMake would use: CUDACXX if set (and executable), else nvcc on PATH."""
    named = os.environ.get("CUDACXX")
    if named:
        return named if os.access(named, os.X_OK) else None
    return shutil.which("nvcc")


def test_build_info_is_consistent():
    info = _C.build_info
    assert set(info) == {"cuda_requested", "cuda_compiler", "cuda_archs", "cuda_sass", "cuda_ptx",
                         "cuda_sources", "cuda_version", "cudart"}
    assert vnm.CUDA_BUILT == bool(info["cuda_compiler"])  # a CUDA build names its compiler
    if vnm.CUDA_BUILT:  # and says what device code it carries (the wheel check reads these)
        assert info["cuda_requested"] and info["cudart"] == "static" and info["cuda_version"]
        assert info["cuda_sass"] and all(a.startswith("sm_") for a in info["cuda_sass"])
        assert any(src.endswith(".cu") for src in info["cuda_sources"])
    else:
        assert not (info["cuda_archs"] or info["cuda_sass"] or info["cuda_ptx"] or info["cuda_sources"])


def test_extension_has_cuda_when_nvcc_is_here():
    compiler = _cuda_compiler_here()
    if compiler is None:
        pytest.skip("no nvcc on PATH and no CUDACXX: a CPU-only build is what this machine can make")
    if not _C.build_info["cuda_requested"]:
        pytest.skip("the extension was configured with -DVNM_ENABLE_CUDA=OFF: CPU-only on purpose")
    assert vnm.CUDA_BUILT, (
        f"nvcc is at {compiler}, but the extension the tests load ({_C.__file__}) was built without "
        f"CUDA: CMake found no CUDA compiler when it was configured. Put nvcc on PATH or set CUDACXX, "
        f"delete the build directory (a cached NOTFOUND is never looked up again) and rebuild; or "
        f"configure with -DVNM_ENABLE_CUDA=OFF if a CPU-only build is meant."
    )
