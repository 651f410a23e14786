import itertools
import math
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


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(
    R=st.integers(1, 70),
    K=st.integers(1, 40),
    pattern=st.sampled_from(VNM_PATTERNS),
    seed=st.integers(0, 2**31 - 1),
)
@pytest.mark.slow
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


@pytest.mark.slow
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


# ---- exact selection and the tie rule, against brute force on integer scores --------------------
# Small integer scores are summed exactly in float32 (and float64), so kept totals compare with ==
# and exact ties are common: a selection that is off by one column set fails, and so does one that
# breaks a tie differently from the documented rule.


def reference_vnm(scores, V, M):
    """(mask, per-block best kept score) by brute force, as select_mask documents it: each block
    padded with zero scores to V x M; every 4-column set in lexicographic order of its offsets,
    scored in float64; the first set of the highest score; each row keeps the two highest of the
    four, equal scores to the lower offset."""
    R, K = scores.shape
    RB, G = math.ceil(R / V), math.ceil(K / M)
    s = torch.zeros(RB * V, G * M, dtype=torch.float64)
    s[:R, :K] = scores.double()
    mask = torch.zeros(RB * V, G * M, dtype=torch.bool)
    sets = torch.tensor(list(itertools.combinations(range(M), 4)))  # lexicographic
    best = torch.zeros(RB, G, dtype=torch.float64)
    for rb in range(RB):
        for g in range(G):
            blk = s[rb * V : (rb + 1) * V, g * M : (g + 1) * M]
            per_row = blk[:, sets].sort(dim=2, descending=True).values  # (V, sets, 4)
            kept = (per_row[..., 0] + per_row[..., 1]).sum(0)  # (sets,)
            first_best = int((kept == kept.max()).nonzero()[0])
            best[rb, g] = kept[first_best]
            chosen = sets[first_best].tolist()
            for r in range(V):
                row = blk[r].tolist()
                for c in sorted(chosen, key=lambda c: (-row[c], c))[:2]:
                    mask[rb * V + r, g * M + c] = True
    return mask[:R, :K], best


def reference_nm(scores, N, M):
    """The mask by brute force: per row and group of M the N highest, equal scores to the lower
    column (a short last group keeps min(N, width))."""
    R, K = scores.shape
    mask = torch.zeros(R, K, dtype=torch.bool)
    for r in range(R):
        row = scores[r].tolist()
        for c0 in range(0, K, M):
            group = range(c0, min(K, c0 + M))
            for c in sorted(group, key=lambda c: (-row[c], c))[:N]:
                mask[r, c] = True
    return mask


def kept_per_block(scores, mask, V, M):
    R, K = scores.shape
    RB, G = math.ceil(R / V), math.ceil(K / M)
    s = torch.zeros(RB * V, G * M, dtype=torch.float64)
    s[:R, :K] = (scores.double() * mask)
    return s.view(RB, V, G, M).sum(dim=(1, 3))


def tied_scores(R, K, seed, high=2):
    return torch.randint(0, high + 1, (R, K), generator=torch.Generator().manual_seed(seed)).float()


@pytest.mark.slow
@settings(max_examples=120, deadline=None)
@given(V=st.sampled_from([16, 32]), M=st.integers(4, 16), data=st.data(),
       backend=st.sampled_from(["native", "torch"]), high=st.sampled_from([1, 2]),
       seed=st.integers(0, 2**31 - 1))
@pytest.mark.slow
def test_vnm_select_equals_brute_force_per_block_on_tied_integers(V, M, data, backend, high, seed):
    # R and K range over multiples and non-multiples of V and M, below them included.
    R = data.draw(st.integers(1, 2 * V + 5), label="R")
    K = data.draw(st.integers(1, 3 * M + 2), label="K")
    scores = tied_scores(R, K, seed, high)
    mask = vnm.select_mask(scores, f"{V}:2:{M}", backend=backend)
    ref_mask, ref_best = reference_vnm(scores, V, M)
    vnm.check_mask(mask, f"{V}:2:{M}")
    assert torch.equal(kept_per_block(scores, mask, V, M), ref_best)  # optimal in every block
    assert torch.equal(mask, ref_mask)  # and the documented tie rule


@pytest.mark.slow
@settings(max_examples=25, deadline=None)
@given(M=st.sampled_from([20, 24, 32]), R=st.integers(1, 40), K=st.integers(1, 70),
       high=st.sampled_from([1, 2, 5]), seed=st.integers(0, 2**31 - 1))
@pytest.mark.slow
def test_vnm_select_large_m_equals_brute_force_on_tied_integers(M, R, K, high, seed):
    # The branch and bound's pruning (per-row and marginal-gain bounds) with many exact ties.
    scores = tied_scores(R, K, seed, high)
    mask = vnm.select_mask(scores, f"16:2:{M}")
    ref_mask, ref_best = reference_vnm(scores, 16, M)
    assert torch.equal(kept_per_block(scores, mask, 16, M), ref_best)
    assert torch.equal(mask, ref_mask)


@settings(max_examples=80, deadline=None)
@given(M=st.integers(2, 9), data=st.data(), backend=st.sampled_from(["native", "torch"]),
       seed=st.integers(0, 2**31 - 1))
def test_nm_select_equals_brute_force_on_tied_integers(M, data, backend, seed):
    N = data.draw(st.integers(1, M - 1), label="N")
    R = data.draw(st.integers(1, 12), label="R")
    K = data.draw(st.integers(1, 3 * M + 2), label="K")
    scores = tied_scores(R, K, seed)
    mask = vnm.select_mask(scores, f"{N}:{M}", backend=backend)
    assert torch.equal(mask, reference_nm(scores, N, M))


@pytest.mark.slow
def test_exact_on_close_column_sets_at_large_m(gen):
    # Continuous scores with near ties: the C++ search (with its float-slack gain bound) must find
    # the same float32 maximum as scoring every one of the C(32, 4) sets with the same sums (the
    # torch enumeration, called past its M <= 16 limit).
    from vnm.mask import _select_vnm_torch

    base = torch.randint(0, 3, (64, 96), generator=gen).float()
    scores = base + torch.rand(64, 96, generator=gen) * 1e-3
    assert torch.equal(vnm.select_mask(scores, "16:2:32"), _select_vnm_torch(scores, 16, 32))
    wide = torch.rand(32, 64, generator=gen) ** 6 * 1e3
    assert torch.equal(vnm.select_mask(wide, "32:2:32"), _select_vnm_torch(wide, 32, 32))


def test_column_set_ties_go_to_the_lexicographically_first_set():
    # (0, 2, 3, 4) and (1, 2, 3, 4) both keep 12; the set of lower offsets wins, and row 3 (all 2s
    # in the selected columns 0, 2, 3) keeps its two lowest offsets.
    s = torch.tensor([[1, 1, 0, 2, 2], [0, 0, 1, 2, 0], [0, 2, 0, 2, 2], [2, 2, 2, 2, 1]]).float()
    expected = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1], [1, 0, 1, 0, 0]]).bool()
    for backend in ("native", "torch"):
        assert torch.equal(vnm.select_mask(s, "16:2:5", backend=backend), expected)


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


@pytest.mark.slow
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
