"""The installed package says what it carries (``vnm._C.build_info``), and a wheel built by
scripts/build_wheel.sh works where no compiler exists (docs/wheels.md).

The first tests run everywhere. The ``installed_wheel`` ones run in the wheel leg of ``.ci/run``,
which installs the wheel into a fresh virtualenv, copies tests/ out of the checkout and runs them
with only that virtualenv on PATH; it says what the wheel must hold through ``VNM_WHEEL_FILE`` and
``VNM_WHEEL_EXPECT_SASS``. Elsewhere they are skipped, and say so.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import vnm
from vnm._native import _C

ROOT = Path(__file__).resolve().parents[1]
IN_WHEEL_LEG = "VNM_WHEEL_FILE" in os.environ
installed_wheel = pytest.mark.skipif(not IN_WHEEL_LEG, reason="runs in the wheel leg of .ci/run (VNM_WHEEL_FILE)")


def test_build_info_says_which_kernels_and_archs_are_present():
    info = _C.build_info
    for key in ("cuda_requested", "cuda_compiler", "cuda_archs", "cuda_sass", "cuda_ptx", "cuda_sources",
                "cuda_version", "cudart"):
        assert key in info, key
    if not vnm.CUDA_BUILT:
        assert info["cuda_archs"] == info["cuda_sass"] == info["cuda_ptx"] == info["cuda_sources"] == []
        return
    assert info["cuda_archs"] and info["cuda_sources"] and info["cudart"] == "static"
    assert all(s.endswith(".cu") for s in info["cuda_sources"])
    for sm in info["cuda_sass"]:
        assert re.fullmatch(r"sm_\d+a?", sm) and int(re.sub(r"\D", "", sm)) >= 80, sm
    assert info["cuda_sass"] or info["cuda_ptx"]


def find_cuobjdump():
    """cuobjdump on PATH, or the one the nvidia-cuda-cuobjdump wheel installs (not on PATH)."""
    found = shutil.which("cuobjdump")
    if found is None:
        try:
            import nvidia  # noqa: PLC0415 (namespace package of NVIDIA's tool wheels)
        except ImportError:
            return None
        found = next((str(p) for d in nvidia.__path__ for p in sorted(Path(d).glob("*/bin/cuobjdump"))), None)
    return found


@pytest.mark.skipif(not vnm.CUDA_BUILT, reason="a CPU-only build carries no device code to list")
def test_device_code_in_the_binary_is_what_build_info_says():
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump is not installed (pip install nvidia-cuda-cuobjdump)")
    so = _C.__file__
    elf = subprocess.run([cuobjdump, "--list-elf", so], capture_output=True, text=True, check=True).stdout
    ptx = subprocess.run([cuobjdump, "--list-ptx", so], capture_output=True, text=True, check=True).stdout
    assert set(re.findall(r"\.(sm_\d+a?)\.cubin", elf)) == set(_C.build_info["cuda_sass"])
    assert {s.replace("sm_", "compute_") for s in re.findall(r"\.(sm_\d+a?)\.ptx", ptx)} == \
        set(_C.build_info["cuda_ptx"])


def test_pip_builds_outside_the_checkout():
    """No scikit-build ``build-dir`` (it defaults to a temporary directory): two installs from one
    checkout cannot collide and a read-only checkout installs."""
    text = (ROOT / "pyproject.toml").read_text() if (ROOT / "pyproject.toml").exists() else None
    if text is None:
        pytest.skip("tests/ was copied out of the checkout (the wheel leg)")
    section = text.split("[tool.scikit-build]", 1)[1].split("\n[", 1)[0]
    assert not re.search(r"^\s*build-dir\s*=", section, re.M), section


@installed_wheel
def test_the_wheel_is_installed_and_no_compiler_is_on_path():
    package = Path(vnm.__file__).resolve().parent
    assert package.parent.name == "site-packages", package  # installed, not a source checkout on sys.path
    assert not (package.parents[1] / "csrc").exists()
    for tool in ("cc", "gcc", "g++", "c++", "clang", "clang++", "nvcc", "cmake", "ninja"):
        assert shutil.which(tool) is None, f"{tool} is on PATH: the wheel leg must run without a compiler"
    name = Path(os.environ["VNM_WHEEL_FILE"]).name
    assert re.search(r"-manylinux_\d+_\d+_x86_64\.whl$", name) or "manylinux" in name, name


@installed_wheel
def test_the_wheel_carries_the_expected_kernels():
    expected = [s for s in os.environ.get("VNM_WHEEL_EXPECT_SASS", "").split(",") if s]
    info = _C.build_info
    assert info["cuda_sass"] == expected, (info, expected)
    assert bool(info["cuda_sources"]) == bool(expected) == vnm.CUDA_BUILT


@installed_wheel
def test_the_installed_wheel_multiplies():
    import torch

    w = torch.randn(70, 48)
    t = vnm.VNMTensor.from_dense(w, vnm.select_mask(w.abs(), "64:2:8"), "64:2:8")
    x = torch.randn(5, 48)
    assert torch.allclose(vnm.spmm(t, x), x @ t.to_dense().T, atol=1e-5)
