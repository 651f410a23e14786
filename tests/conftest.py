import os
import sys
from pathlib import Path

import pytest
import torch

# Run against an in-place build (scripts/dev_build.sh) when one exists in this checkout.
_src = Path(__file__).resolve().parents[1] / "python"
if any((_src / "vnm").glob("_C*.so")):
    sys.path.insert(0, str(_src))
sys.path.insert(0, str(Path(__file__).resolve().parent))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def gen():
    """A seeded torch generator: every test draws fresh random data, reproducibly."""
    return torch.Generator().manual_seed(1234)
