import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vnm
from _util import best_nm_kept, best_vnm_kept

VNM_PATTERNS = ["16:2:4", "16:2:5", "16:2:6", "32:2:8", "16:2:9", "16:2:12", "64:2:8"]
NM_PATTERNS = ["2:4", "1:4", "2:8", "4:8", "3:5"]


def kept(scores, mask):
    return float((scores.double() * mask).sum())


def literal_best(scores, pattern):
    """Maximum kept score over every valid mask of a tiny matrix, by listing all 2^(R*K) masks
    and keeping those check_mask accepts: no structure of the problem is assumed."""
    R, K = scores.shape
    best = 0.0
    for code in range(1 << (R * K)):
        m = torch.tensor([(code >> i) & 1 for i in range(R * K)], dtype=torch.bool).view(R, K)
        if vnm.is_valid_mask(m, pattern):
            best = max(best, kept(scores, m))
    return best


@pytest.mark.parametrize("R, K, pattern", [(2, 5, "16:2:5"), (2, 6, "16:2:6"), (3, 5, "16:2:5"),
                                           (2, 7, "16:2:8"), (3, 4, "2:4"), (2, 6, "3:5")])
def test_select_equals_literal_enumeration_on_tiny_matrices(R, K, pattern, gen):
    scores = torch.rand(R, K, generator=gen)
    mask = vnm.select_mask(scores, pattern)
    assert vnm.is_valid_mask(mask, pattern)
    assert kept(scores, mask) == pytest.approx(literal_best(scores, pattern), rel=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    R=st.integers(1, 70),
    K=st.integers(1, 40),
    pattern=st.sampled_from(VNM_PATTERNS),
    seed=st.integers(0, 2**31 - 1),
)
def test_vnm_select_is_valid_and_optimal(R, K, pattern, seed):
    p = vnm.Pattern.parse(pattern)
    scores = torch.rand(R, K, generator=torch.Generator().manual_seed(seed))
    mask = vnm.select_mask(scores, p)
    assert mask.dtype == torch.bool and mask.shape == (R, K)
    vnm.check_mask(mask, p)
    assert kept(scores, mask) == pytest.approx(best_vnm_kept(scores, p.V, p.M), rel=1e-5)


@settings(max_examples=40, deadline=None)
@given(R=st.integers(1, 20), K=st.integers(1, 30), pattern=st.sampled_from(NM_PATTERNS),
       seed=st.integers(0, 2**31 - 1))
def test_nm_select_keeps_top_n_per_group(R, K, pattern, seed):
    p = vnm.Pattern.parse(pattern)
    scores = torch.rand(R, K, generator=torch.Generator().manual_seed(seed))
    mask = vnm.select_mask(scores, p)
    vnm.check_mask(mask, p)
    assert kept(scores, mask) == pytest.approx(best_nm_kept(scores, p.N, p.M), rel=1e-6)
    # exactly min(N, group width) kept per row and group
    for c0 in range(0, K, p.M):
        width = min(p.M, K - c0)
        assert torch.all(mask[:, c0 : c0 + p.M].sum(1) == min(p.N, width))


def test_large_m_uses_exact_search(gen):
    # M = 32: 35960 column sets per block; branch and bound must still find the optimum.
    scores = torch.rand(16, 64, generator=gen) ** 3
    mask = vnm.select_mask(scores, "16:2:32")
    vnm.check_mask(mask, "16:2:32")
    assert kept(scores, mask) == pytest.approx(best_vnm_kept(scores, 16, 32), rel=1e-5)


def test_planted_structure_is_recovered(gen):
    # A matrix that is exactly 64:2:8 sparse (plus tiny noise elsewhere) is selected back exactly.
    truth = vnm.select_mask(torch.rand(128, 64, generator=gen), "64:2:8")
    scores = truth.float() * (1 + torch.rand(128, 64, generator=gen)) + 1e-3 * torch.rand(128, 64, generator=gen)
    assert torch.equal(vnm.select_mask(scores, "64:2:8"), truth)


def test_ties_go_to_lower_columns():
    mask = vnm.select_mask(torch.ones(16, 8), "16:2:8")
    expected = torch.zeros(16, 8, dtype=torch.bool)
    expected[:, :2] = True
    assert torch.equal(mask, expected)
    assert torch.equal(vnm.select_mask(torch.ones(2, 4), "2:4")[0], torch.tensor([True, True, False, False]))


def test_select_accepts_half_scores_and_keeps_device(gen):
    s = torch.rand(32, 16, generator=gen)
    assert torch.equal(vnm.select_mask(s.half(), "16:2:8"), vnm.select_mask(s.half().float(), "16:2:8"))


def test_float64_scores_are_selected_as_float32(gen):
    s = torch.rand(32, 16, generator=gen, dtype=torch.float64)
    for backend in ("native", "torch"):
        assert torch.equal(vnm.select_mask(s, "16:2:8", backend=backend),
                           vnm.select_mask(s.float(), "16:2:8", backend=backend))
        big = s.clone()
        big[3, 5] = 1e300
        with pytest.raises(ValueError, match=r"converted to float32.*1e\+300 at \(3, 5\) overflows.*rescale"):
            vnm.select_mask(big, "16:2:8", backend=backend)


def test_nm_with_huge_m_does_not_allocate_by_m():
    # N:M allows any M; a 4 x 4 matrix at 1:100000000 is one group of 4 per row. Sizing anything
    # by M would take hundreds of MB (per thread); run in a fresh process to see its peak memory.
    code = (
        "import resource, torch, vnm\n"
        "s = torch.rand(4, 4)\n"
        "expected = torch.zeros(4, 4, dtype=torch.bool).scatter_(1, s.argmax(1, keepdim=True), True)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "for backend in ('native', 'torch'):\n"
        "    assert torch.equal(vnm.select_mask(s, '1:100000000', backend=backend), expected)\n"
        "    vnm.check_mask(expected, '1:100000000')\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    package_dir = str(Path(vnm.__file__).resolve().parents[1])  # the vnm this session imported
    pre = f"import sys; sys.path.insert(0, {package_dir!r})\n"
    out = subprocess.run([sys.executable, "-c", pre + code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    grown_kib = int(out.stdout.split()[-1])
    assert grown_kib < 50 * 1024, f"peak memory grew by {grown_kib} KiB"


@pytest.mark.parametrize(
    "scores, error, message",
    [
        (torch.tensor([[1.0, float("nan"), 0, 0]]), ValueError, r"finite and non-negative.*\(0, 1\)"),
        (torch.tensor([[1.0, 0, 0, -2.0]]), ValueError, r"got -2 at \(0, 3\)"),
        (torch.tensor([[1.0, 0, float("inf"), 0]]), ValueError, "finite and non-negative"),
        (torch.ones(4), ValueError, "must be 2-D"),
        (torch.ones(4, 0), ValueError, "must not be empty"),
        (torch.ones(4, 4, dtype=torch.int32), TypeError, "floating-point"),
    ],
)
def test_select_rejects_bad_scores(scores, error, message):
    with pytest.raises(error, match=message):
        vnm.select_mask(scores, "16:2:4")


def test_check_mask_names_the_offending_block():
    mask = torch.zeros(40, 24, dtype=torch.bool)
    mask[20, 8:10] = True  # fine
    for c in (16, 17, 18, 19, 21):  # row block 1 (rows 16..31), group 2: 5 distinct columns
        mask[16 + c - 16, c] = True
    with pytest.raises(ValueError, match=r"row block 1: rows 16\.\.31, column group 2: columns 16\.\.23\) "
                                         r"keeps values in 5 distinct columns \[16, 17, 18, 19, 21\]"):
        vnm.check_mask(mask, "16:2:8")
    assert not vnm.is_valid_mask(mask, "16:2:8")


def test_check_mask_names_a_row_with_too_many_values():
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[3, 8:11] = True
    with pytest.raises(ValueError, match=r"row 3 keeps 3 values in column group 1 \(columns 8\.\.15\); at most 2"):
        vnm.check_mask(mask, "16:2:8")
    with pytest.raises(ValueError, match=r"row 3 keeps 3 values in column group 2 \(columns 8\.\.11\)"):
        vnm.check_mask(mask, "2:4")
    assert vnm.is_valid_mask(mask, "4:8")


def test_check_mask_input_errors():
    with pytest.raises(TypeError, match="torch.bool"):
        vnm.check_mask(torch.ones(4, 4), "2:4")
    with pytest.raises(ValueError, match="2-D"):
        vnm.check_mask(torch.ones(4, dtype=torch.bool), "2:4")
    with pytest.raises(ValueError, match="cannot parse"):
        vnm.check_mask(torch.ones(4, 4, dtype=torch.bool), "two:four")


def test_fewer_kept_values_are_valid():
    mask = torch.zeros(16, 8, dtype=torch.bool)
    mask[0, 5] = True
    assert vnm.is_valid_mask(mask, "16:2:8")
    assert vnm.is_valid_mask(torch.zeros(3, 3, dtype=torch.bool), "2:4")
