"""Each pruning score against a hand-computed example, plus the errors users hit."""

import math

import pytest
import torch

import vnm
from vnm import scores
from vnm.calibration import ChannelStats

# W (2 x 3) and input statistics of its 3 input channels, used by every example below.
W = torch.tensor([[1.0, -2.0, 0.0],
                  [-3.0, 1.0, 4.0]])


def stats(sumsq=(4.0, 1.0, 9.0), count=4, histogram=((2, 2), (4, 0), (1, 3)), name="layer.q"):
    """||X_j||_2 = (2, 1, 3); rms = (1, 0.5, 1.5); entropies ln 2, 0, H(1/4, 3/4)."""
    k = len(sumsq)
    return ChannelStats(
        name=name, count=count, sum=torch.zeros(k, dtype=torch.float64),
        sumsq=torch.tensor(sumsq, dtype=torch.float64), minimum=torch.zeros(k), maximum=torch.ones(k),
        histogram=None if histogram is None else torch.tensor(histogram, dtype=torch.int64),
    )


def test_magnitude_is_abs_weight():
    expected = torch.tensor([[1.0, 2.0, 0.0], [3.0, 1.0, 4.0]])
    assert torch.equal(scores.magnitude(W), expected)
    assert torch.equal(scores.magnitude(W, stats()), expected)  # stats are ignored


def test_wanda_by_hand():
    # |W_ij| * ||X_j||_2 with norms (2, 1, 3)
    expected = torch.tensor([[2.0, 2.0, 0.0], [6.0, 1.0, 12.0]])
    assert torch.allclose(scores.wanda(W, stats()), expected, rtol=0, atol=1e-6)


def test_ria_by_hand():
    # column sums of |W| (over outputs): 4, 3, 4; row sums (over inputs): 3, 8; ||X||^0.5 = sqrt(2), 1, sqrt(3)
    r2, r3 = math.sqrt(2), math.sqrt(3)
    expected = torch.tensor([
        [(1 / 4 + 1 / 3) * r2, (2 / 3 + 2 / 3) * 1, 0.0],
        [(3 / 4 + 3 / 8) * r2, (1 / 3 + 1 / 8) * 1, (4 / 4 + 4 / 8) * r3],
    ])
    assert torch.allclose(scores.ria(W, stats()), expected, rtol=1e-6, atol=0)
    # a = 1: the activation factor is the norm itself
    expected_a1 = expected / torch.tensor([r2, 1.0, r3]) * torch.tensor([2.0, 1.0, 3.0])
    assert torch.allclose(scores.ria(W, stats(), a=1.0), expected_a1, rtol=1e-6, atol=0)


def test_ria_zero_rows_and_columns_score_zero():
    w = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    s = scores.ria(w, stats(sumsq=(1.0, 1.0), histogram=None))
    assert torch.equal(s, torch.tensor([[0.0, 0.0], [0.0, 2.0]]))  # 2/2 + 2/2, no 0/0


def test_entropy_by_hand():
    h = torch.tensor([math.log(2), 0.0, -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))])
    rms = torch.tensor([1.0, 0.5, 1.5])
    st = stats()
    assert torch.allclose(st.entropy, h, atol=1e-6)
    expected = W.abs() * (h + rms)
    assert torch.allclose(scores.entropy(W, st), expected, rtol=1e-6, atol=1e-7)
    expected_a3 = W.abs() * (h + 3.0 * rms)
    assert torch.allclose(scores.entropy(W, st, alpha=3.0), expected_a3, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["magnitude", "wanda", "ria", "entropy"])
def test_scores_are_float32_nonnegative_and_selectable(name, gen):
    w = torch.randn(32, 24, generator=gen, dtype=torch.float64).to(torch.float16)
    st = stats(sumsq=tuple(float(x) for x in torch.rand(24, generator=gen) * 10), histogram=[[1, 2, 3]] * 24)
    s = scores.get(name)(w, st)
    assert s.dtype == torch.float32 and s.shape == (32, 24)
    assert bool((s >= 0).all()) and bool(torch.isfinite(s).all())
    vnm.check_mask(vnm.select_mask(s, "16:2:8"), "16:2:8")


def test_registry():
    assert scores.names() == ["magnitude", "wanda", "ria", "entropy", "obs"]
    assert scores.get("Wanda") is scores.wanda
    assert scores.get(scores.ria) is scores.ria
    with pytest.raises(ValueError, match="unknown score 'sparsegpt'; available: magnitude, wanda, ria, entropy, obs"):
        scores.get("sparsegpt")


@pytest.mark.parametrize("name", ["wanda", "ria", "entropy"])
def test_missing_stats_name_the_layer_and_the_fix(name):
    with pytest.raises(ValueError, match=rf"score '{name}' needs the input statistics of layer 'enc.0.fc1'.*vnm.calibrate"):
        scores.get(name)(W, None, layer="enc.0.fc1")


@pytest.mark.parametrize("name", ["wanda", "ria", "entropy"])
def test_nan_statistics_are_rejected(name):
    st = stats(sumsq=(4.0, float("nan"), 9.0))
    with pytest.raises(ValueError, match=r"layer 'layer.q' hold NaN/Inf \(.* of channel 1 .*recalibrate"):
        scores.get(name)(W, st)


def test_nan_entropy_histogram_is_rejected():
    st = stats()
    st.histogram = torch.tensor([[2, 2], [4, 0], [1, 3]], dtype=torch.int64)
    st.sumsq = torch.tensor([4.0, 1.0, float("inf")], dtype=torch.float64)
    with pytest.raises(ValueError, match="NaN/Inf"):
        scores.entropy(W, st)


def test_shape_mismatch_names_both_sizes():
    with pytest.raises(ValueError, match=r"have 3 channels but the weight has K=2 .*weight_matrix"):
        scores.wanda(W[:, :2], stats())
    with pytest.raises(ValueError, match=r"have 3 channels but the weight has K=2"):
        scores.wanda(W.T, stats())  # a transposed (Conv1D-style) weight is caught, not mis-scored


def test_entropy_needs_a_histogram():
    with pytest.raises(ValueError, match="no activation histogram.*entropy_bins"):
        scores.entropy(W, stats(histogram=None))


def test_stats_of_a_layer_that_never_ran():
    with pytest.raises(ValueError, match="saw no tokens"):
        scores.wanda(W, stats(count=0))


def test_bad_weights_and_options():
    with pytest.raises(ValueError, match="NaN/Inf"):
        scores.magnitude(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="2-D"):
        scores.magnitude(torch.ones(3))
    with pytest.raises(TypeError, match="floating point"):
        scores.magnitude(torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="non-negative"):
        scores.ria(W, stats(), a=-1)
    with pytest.raises(TypeError, match="ChannelStats"):
        scores.wanda(W, {"l2": torch.ones(3)})
