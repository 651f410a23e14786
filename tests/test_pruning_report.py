"""Model-level scores and masks, and the kept-importance report."""

import pytest
import torch
from torch import nn

import vnm
from vnm.calibration import calibrate

transformers = pytest.importorskip("transformers")


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 48)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def inputs(gen, n=3):
    return [torch.randn(20, 32, generator=gen) for _ in range(n)]


def test_masks_are_exact_per_layer_and_applied_in_place(gen):
    model = TwoLayer()
    stats = calibrate(model, inputs(gen), entropy_bins=None, progress=False)
    before = {n: vnm.weight_matrix(m).detach().clone() for n, m in vnm.prunable_layers(model).items()}
    masks = vnm.compute_masks(model, "16:2:8", "wanda", stats, progress=False)
    for name, mask in masks.items():
        expected = vnm.select_mask(vnm.scores.wanda(before[name], stats[name]), "16:2:8")
        assert torch.equal(mask, expected)
    vnm.apply_masks_(model, masks)
    for name, m in vnm.prunable_layers(model).items():
        assert torch.equal(vnm.weight_matrix(m), before[name] * masks[name])


def test_conv1d_masks_are_r_by_k_and_applied_through_the_transpose(gen):
    torch.manual_seed(0)
    model = transformers.GPT2Model(transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2,
                                                           n_positions=16)).eval()
    batch = [{"input_ids": torch.randint(0, 50, (2, 8), generator=gen)}]
    stats = calibrate(model, batch, entropy_bins=8, progress=False)
    conv = dict(model.named_modules())["h.0.mlp.c_fc"]  # weight stored 32 x 128 (K x R)
    w = conv.weight.detach().clone()
    masks = vnm.compute_masks(model, "2:4", "entropy", stats, layers=["h.0.mlp.c_fc"], progress=False)
    assert masks["h.0.mlp.c_fc"].shape == (128, 32)
    vnm.apply_masks_(model, masks)
    assert torch.equal(conv.weight, w * masks["h.0.mlp.c_fc"].T)
    vnm.check_mask(conv.weight.T != 0, "2:4")


def test_layer_scores_name_the_layer_without_statistics(gen):
    model = TwoLayer()
    partial = calibrate(model, inputs(gen), layers=["fc1"], entropy_bins=None, progress=False)
    with pytest.raises(ValueError, match=r"layer 'fc2' has no input statistics, which score 'ria' needs.*vnm.calibrate"):
        vnm.layer_scores(model, "ria", partial)
    with pytest.raises(ValueError, match=r"score 'wanda' needs input statistics.*vnm.calibrate"):
        vnm.layer_scores(model, "wanda")
    assert set(vnm.layer_scores(model, "magnitude")) == {"fc1", "fc2"}  # needs none
    assert set(vnm.layer_scores(model, "wanda", partial, layers=["fc1"])) == {"fc1"}


def test_nan_statistics_stop_model_scoring(gen):
    model = TwoLayer()
    stats = calibrate(model, inputs(gen), entropy_bins=None, progress=False)
    stats["fc2"].sumsq[5] = float("nan")
    with pytest.raises(ValueError, match=r"layer 'fc2' hold NaN/Inf"):
        vnm.compute_masks(model, "2:4", "wanda", stats, progress=False)


def test_kept_fraction():
    s = torch.tensor([[1.0, 3.0], [0.0, 4.0]])
    assert vnm.kept_fraction(s, torch.tensor([[False, True], [True, True]])) == pytest.approx(7 / 8)
    assert vnm.kept_fraction(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.bool)) == 1.0


@pytest.mark.slow
def test_report_numbers_table_and_plot(gen, tmp_path):
    model = TwoLayer()
    stats = calibrate(model, inputs(gen), entropy_bins=None, progress=False)
    printed = []
    rep = vnm.report(model, ["2:4", "16:2:8"], score="wanda", stats=stats, plot=tmp_path / "kept.png",
                     print_fn=printed.append, progress=False)
    sc = vnm.layer_scores(model, "wanda", stats)
    for p in ("2:4", "16:2:8"):
        for name, s in sc.items():
            assert rep.kept[p][name] == pytest.approx(vnm.kept_fraction(s, vnm.select_mask(s, p)))
        expected = (64 * 32 * rep.kept[p]["fc1"] + 48 * 64 * rep.kept[p]["fc2"]) / (64 * 32 + 48 * 64)
        assert rep.overall[p] == pytest.approx(expected)
    assert rep.overall["2:4"] > rep.overall["16:2:8"]  # 50% vs 75% sparse
    assert "fc2" in printed[0] and "16:2:8" in printed[0]
    assert rep.plot.is_file() and rep.plot.read_bytes()[:4] == b"\x89PNG"
    assert {"2:4", "4:8", "64:2:8", "128:2:16"} <= set(rep.curve)
    assert rep.curve["2:4"] == pytest.approx(rep.overall["2:4"])
    # a plain score mapping works the same way
    again = vnm.report(sc, "16:2:8", print_fn=None)
    assert again.overall["16:2:8"] == pytest.approx(rep.overall["16:2:8"])


def test_report_takes_the_per_layer_patterns_of_a_choice(gen, tmp_path):
    model = TwoLayer()
    stats = calibrate(model, inputs(gen), entropy_bins=None, progress=False)
    sc = vnm.layer_scores(model, "wanda", stats)
    table = tmp_path / "t.csv"
    table.write_text("pattern,R,K,N,speedup_dense\n2:4,64,32,2048,1.6\n16:2:8,64,32,2048,2.5\n"
                     "2:4,48,64,2048,1.2\n16:2:8,48,64,2048,2.5\n")
    choice = vnm.choose_pattern(sc, 1.5, ["2:4", "16:2:8"], table, per_layer=True, progress=False)
    assert choice.pattern is None and choice.patterns == {"fc1": "2:4", "fc2": "16:2:8"}
    printed = []
    rep = vnm.report(sc, choice.patterns, print_fn=printed.append, progress=False)
    assert rep.layer_patterns == choice.patterns
    assert rep.kept["per layer"]["fc1"] == pytest.approx(vnm.kept_fraction(sc["fc1"], vnm.select_mask(sc["fc1"], "2:4")))
    assert rep.kept["per layer"]["fc2"] == pytest.approx(
        vnm.kept_fraction(sc["fc2"], vnm.select_mask(sc["fc2"], "16:2:8")))
    assert rep.overall["per layer"] == pytest.approx(choice.kept)
    assert "16:2:8" in printed[0].splitlines()[2] and "2:4" in printed[0].splitlines()[1]
    with pytest.raises(ValueError, match=r"1 scored layer\(s\) have no pattern \['fc2'\].*layers=list\(choice.patterns\)"):
        vnm.report(sc, {"fc1": "2:4"}, print_fn=None, progress=False)
