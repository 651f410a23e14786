"""The vectorised torch selection (used for CUDA scores) against brute force and the C++ core."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vnm
from _util import best_nm_kept, best_vnm_kept, needs_cuda

VNM_PATTERNS = ["16:2:4", "16:2:5", "16:2:6", "32:2:8", "16:2:9", "16:2:12", "16:2:16", "64:2:8"]
NM_PATTERNS = ["2:4", "1:4", "2:8", "4:8", "3:5"]


def kept(scores, mask):
    return float((scores.double() * mask).sum())


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(R=st.integers(1, 70), K=st.integers(1, 40), pattern=st.sampled_from(VNM_PATTERNS),
       seed=st.integers(0, 2**31 - 1))
def test_torch_vnm_is_valid_and_optimal(R, K, pattern, seed):
    p = vnm.Pattern.parse(pattern)
    scores = torch.rand(R, K, generator=torch.Generator().manual_seed(seed))
    mask = vnm.select_mask(scores, p, backend="torch")
    assert mask.dtype == torch.bool and mask.shape == (R, K)
    vnm.check_mask(mask, p)
    assert kept(scores, mask) == pytest.approx(best_vnm_kept(scores, p.V, p.M), rel=1e-5)


@settings(max_examples=40, deadline=None)
@given(R=st.integers(1, 20), K=st.integers(1, 30), pattern=st.sampled_from(NM_PATTERNS),
       seed=st.integers(0, 2**31 - 1))
def test_torch_nm_keeps_top_n_per_group(R, K, pattern, seed):
    p = vnm.Pattern.parse(pattern)
    scores = torch.rand(R, K, generator=torch.Generator().manual_seed(seed))
    mask = vnm.select_mask(scores, p, backend="torch")
    vnm.check_mask(mask, p)
    assert kept(scores, mask) == pytest.approx(best_nm_kept(scores, p.N, p.M), rel=1e-6)
    for c0 in range(0, K, p.M):
        assert torch.all(mask[:, c0 : c0 + p.M].sum(1) == min(p.N, min(p.M, K - c0)))


@pytest.mark.parametrize("pattern", VNM_PATTERNS + NM_PATTERNS + ["128:2:8", "64:2:5"])
def test_torch_and_native_agree(pattern, gen):
    scores = torch.rand(300, 130, generator=gen) ** 2
    native = vnm.select_mask(scores, pattern, backend="native")
    fast = vnm.select_mask(scores, pattern, backend="torch")
    assert torch.equal(native, fast)


@settings(max_examples=60, deadline=None)
@given(pattern=st.sampled_from(VNM_PATTERNS + NM_PATTERNS + ["32:2:5", "16:2:7"]),
       R=st.integers(1, 80), K=st.integers(1, 60), high=st.sampled_from([1, 2]),
       seed=st.integers(0, 2**31 - 1))
def test_backends_return_the_same_mask_on_tied_integers(pattern, R, K, high, seed):
    # Small integer scores: many column sets (and per-row pairs) tie exactly; the documented tie
    # rule makes the choice, so CPU (C++) and CUDA (torch) masks are the same.
    scores = torch.randint(0, high + 1, (R, K), generator=torch.Generator().manual_seed(seed)).float()
    assert torch.equal(vnm.select_mask(scores, pattern, backend="native"),
                       vnm.select_mask(scores, pattern, backend="torch"))


@pytest.mark.parametrize("pattern", ["16:2:8", "64:2:8", "32:2:16", "128:2:5"])
def test_backends_sum_blocks_identically_on_near_ties(pattern, gen):
    # Integer scores plus fractions far below the ulp of a block's sum: the real sums of many
    # column sets tie or nearly tie and the float32 winner depends on the order of the additions,
    # so this passes only if both backends add in the same order (a plain torch .sum differs in
    # over a thousand entries here).
    scores = torch.randint(0, 3, (512, 256), generator=gen).float()
    scores += torch.randint(0, 8, (512, 256), generator=gen) * 2.0**-20
    assert torch.equal(vnm.select_mask(scores, pattern, backend="native"),
                       vnm.select_mask(scores, pattern, backend="torch"))


def test_torch_path_chunks_many_blocks(gen, monkeypatch):
    # Force tiny chunks so the loop over block chunks (and its last partial chunk) is exercised.
    import vnm.mask as mask_mod

    monkeypatch.setattr(mask_mod, "_CHUNK_ELEMENTS", 16 * 70 * 3)
    scores = torch.rand(48, 88, generator=gen)
    assert torch.equal(vnm.select_mask(scores, "16:2:8", backend="torch"),
                       vnm.select_mask(scores, "16:2:8", backend="native"))


def test_torch_ties_go_to_lower_columns():
    mask = vnm.select_mask(torch.ones(16, 8), "16:2:8", backend="torch")
    expected = torch.zeros(16, 8, dtype=torch.bool)
    expected[:, :2] = True
    assert torch.equal(mask, expected)
    assert torch.equal(vnm.select_mask(torch.ones(2, 4), "2:4", backend="torch")[0],
                       torch.tensor([True, True, False, False]))


def test_torch_path_keeps_dtype_rules_and_errors():
    s = torch.rand(32, 16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(vnm.select_mask(s.half(), "16:2:8", backend="torch"),
                       vnm.select_mask(s.half().float(), "16:2:8", backend="native"))
    with pytest.raises(ValueError, match=r"finite and non-negative.*got nan at \(0, 1\)"):
        vnm.select_mask(torch.tensor([[1.0, float("nan"), 0, 0]]), "16:2:4", backend="torch")
    with pytest.raises(ValueError, match=r"got -2 at \(0, 3\)"):
        vnm.select_mask(torch.tensor([[1.0, 0, 0, -2.0]]), "2:4", backend="torch")
    with pytest.raises(ValueError, match=r"got inf at \(1, 0\)"):
        vnm.select_mask(torch.tensor([[1.0, 0, 0, 0], [float("inf"), 0, 0, 0]]), "2:4", backend="torch")
    with pytest.raises(ValueError, match="M <= 16.*backend='native'"):
        vnm.select_mask(s, "16:2:32", backend="torch")
    with pytest.raises(ValueError, match="backend must be one of"):
        vnm.select_mask(s, "2:4", backend="gpu")


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("pattern", ["64:2:8", "128:2:16", "2:4", "4:8", "64:2:32"])
def test_cuda_scores_are_selected_on_the_gpu(pattern, gen):
    s = torch.rand(1100, 700, generator=gen)
    mask = vnm.select_mask(s.cuda(), pattern)
    assert mask.device.type == "cuda"
    native = vnm.select_mask(s, pattern, backend="native")
    vnm.check_mask(mask.cpu(), pattern)
    # The same float32 additions in the same order and the same tie rule: the same mask.
    assert torch.equal(mask.cpu(), native)
    tied = torch.randint(0, 3, (1100, 700), generator=gen).float()
    assert torch.equal(vnm.select_mask(tied.cuda(), pattern).cpu(),
                       vnm.select_mask(tied, pattern, backend="native"))
