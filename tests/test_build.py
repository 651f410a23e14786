"""The build used CUDA wherever it could.

With nvcc on the machine that builds and tests (on PATH, or named by CUDACXX), the extension the
tests load must hold the CUDA kernels (``vnm.CUDA_BUILT``). Otherwise a build that quietly fell
back to the CPU-only core (nvcc not found by CMake, a stale CMake cache) would pass CI with every
GPU test skipped.

The test first finds the CMake build that produced the loaded extension: the build directory
under ``build/`` whose ``_C*.so`` has the same GNU build-id (``strip`` keeps it, so an installed
wheel matches the scikit-build-core directory it came from; an in-place build is a plain copy),
the newest if several do.
That directory's CMakeCache.txt says whether CUDA was asked for (``VNM_ENABLE_CUDA``) and which
CUDA compiler CMake found. A build with ``-DVNM_ENABLE_CUDA=OFF`` is CPU-only on purpose, and an
extension built elsewhere cannot be judged here: both skip, with the reason.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import struct
from pathlib import Path
from typing import Dict, Optional

import pytest

import vnm
from vnm._native import _C

REPO = Path(__file__).resolve().parents[1]
_OFF = {"OFF", "0", "FALSE", "NO", "N"}


def _gnu_build_id(path: Path) -> Optional[bytes]:
    """The NT_GNU_BUILD_ID note of an ELF file, or None (not ELF, or no such note)."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] not in (1, 2) or data[5] not in (1, 2):
        return None
    end = "<" if data[5] == 1 else ">"
    if data[4] == 2:  # ELF64: e_shoff at 0x28, e_shentsize/e_shnum at 0x3A/0x3C; sh_offset/size at 0x18/0x20
        shoff, = struct.unpack_from(end + "Q", data, 0x28)
        shentsize, shnum = struct.unpack_from(end + "HH", data, 0x3A)
        sh_fmt, sh_at = end + "QQ", 0x18
    else:  # ELF32: e_shoff at 0x20, e_shentsize/e_shnum at 0x2E/0x30; sh_offset/size at 0x10/0x14
        shoff, = struct.unpack_from(end + "I", data, 0x20)
        shentsize, shnum = struct.unpack_from(end + "HH", data, 0x2E)
        sh_fmt, sh_at = end + "II", 0x10
    for i in range(shnum):
        sh = shoff + i * shentsize
        sh_type, = struct.unpack_from(end + "I", data, sh + 4)
        if sh_type != 7:  # SHT_NOTE
            continue
        off, size = struct.unpack_from(sh_fmt, data, sh + sh_at)
        pos = off
        while pos + 12 <= off + size:
            namesz, descsz, ntype = struct.unpack_from(end + "III", data, pos)
            name_at = pos + 12
            desc_at = name_at + (namesz + 3) // 4 * 4
            if ntype == 3 and data[name_at:name_at + namesz] == b"GNU\x00":
                return data[desc_at:desc_at + descsz]
            pos = desc_at + (descsz + 3) // 4 * 4
    return None


def _same_build(a: Path, b: Path) -> bool:
    id_a = _gnu_build_id(a)
    if id_a is not None:
        return id_a == _gnu_build_id(b)
    return filecmp.cmp(a, b, shallow=False)


def _build_dir_of(ext: Path) -> Optional[Path]:
    """The CMake build directory under build/ that produced `ext`, or None. Identical sources and
    flags give identical binaries (and build-ids) in two directories: the newest build wins."""
    caches = list((REPO / "build").glob("*/CMakeCache.txt")) + list((REPO / "build").glob("*/*/CMakeCache.txt"))
    matches = [(built.stat().st_mtime, cache.parent) for cache in caches
               for built in cache.parent.glob("_C*.so") if _same_build(ext, built)]
    return max(matches)[1] if matches else None


def _cmake_cache(build_dir: Path) -> Dict[str, str]:
    entries = {}
    for line in (build_dir / "CMakeCache.txt").read_text(errors="replace").splitlines():
        if line and not line.startswith(("#", "//")) and "=" in line:
            key, value = line.split("=", 1)
            entries[key.split(":", 1)[0]] = value
    return entries


def _cuda_compiler_here() -> Optional[str]:
    """What CMake would use: CUDACXX if set (and executable), else nvcc on PATH."""
    named = os.environ.get("CUDACXX")
    if named:
        return named if os.access(named, os.X_OK) else None
    return shutil.which("nvcc")


def test_extension_has_cuda_when_nvcc_is_here():
    compiler = _cuda_compiler_here()
    if compiler is None:
        pytest.skip("no nvcc on PATH and no CUDACXX: a CPU-only build is what this machine can make")
    ext = Path(_C.__file__).resolve()
    build_dir = _build_dir_of(ext)
    if build_dir is None:
        pytest.skip(f"cannot tell which build produced {ext}: no CMake build directory under "
                    f"{REPO / 'build'} holds an extension with its GNU build-id (built elsewhere?)")
    cache = _cmake_cache(build_dir)
    if cache.get("VNM_ENABLE_CUDA", "ON").upper() in _OFF:
        pytest.skip(f"{build_dir} was configured with -DVNM_ENABLE_CUDA=OFF: CPU-only on purpose")
    found = cache.get("CMAKE_CUDA_COMPILER", "")
    assert vnm.CUDA_BUILT, (
        f"nvcc is at {compiler}, but the extension the tests load ({ext}, built in {build_dir}) has no "
        f"CUDA kernels: CMake's CUDA compiler was {found or 'not recorded'!r}. Put nvcc on PATH or set "
        f"CUDACXX, delete {build_dir} (a cached NOTFOUND is never looked up again), and rebuild; or "
        f"configure with -DVNM_ENABLE_CUDA=OFF if a CPU-only build is meant."
    )
