"""Recovery training (vnm.train): three-stage LoRA and SR-STE on tiny layers and models."""

import copy
import csv
import math
import random
import types
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

import vnm
import vnm.train as vt
from _models import output_tensor, tiny_gpt2
from _util import needs_cuda


def tiny_mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 5)).to(dtype)


def regression_batches(gen, n=8, dtype=torch.float32):
    """(x, target) batches for a fixed random teacher function (a task the MLP can fit)."""
    proj = torch.randn(24, 5, generator=gen, dtype=dtype)
    out = []
    for _ in range(n):
        x = torch.randn(16, 24, generator=gen, dtype=dtype)
        out.append((x, torch.tanh(x @ proj)))
    return out


def mse_on_target(outputs, batch):
    return (outputs - batch[1]).pow(2).mean()


def forward_x(model, batch):
    return model(batch[0])


def lora_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, vt.LoRASparseLinear)]


# ---- three-stage LoRA --------------------------------------------------------------------------

@pytest.mark.parametrize("sparse", [False, True])
def test_lora_factor_gradients_match_finite_differences(gen, sparse):
    lin = nn.Linear(24, 32).double()
    layer = vt.LoRASparseLinear.from_linear(lin, "16:2:8", rank=3, alpha=6.0)
    with torch.no_grad():
        layer.lora_B.normal_(generator=gen)  # B starts at zero; make both factors matter
    if sparse:
        layer.update_mask()
        assert layer.is_sparse and not bool(layer.mask.all())
    x = torch.randn(5, 24, generator=gen, dtype=torch.float64)

    def out(A, B):
        return functional_call(layer, {"lora_A": A, "lora_B": B}, (x,))

    def penalty(A, B):  # ||(1 - mask) * (W + scale B A)||^2, written out
        pruned = (~layer.mask).double()
        return (pruned * (layer.weight + layer.scaling * B @ A)).pow(2).sum()

    A, B = layer.lora_A.detach().clone().requires_grad_(), layer.lora_B.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(out, (A, B), eps=1e-6, atol=1e-7, rtol=1e-5)
    # the layer's own regulariser has the gradient of its formula
    layer.zero_grad()
    layer.flip_penalty().backward()
    ref_A, ref_B = torch.autograd.grad(penalty(A, B), (A, B))
    assert torch.allclose(layer.lora_A.grad, ref_A, rtol=1e-10, atol=1e-12)
    assert torch.allclose(layer.lora_B.grad, ref_B, rtol=1e-10, atol=1e-12)


def test_lora_forward_and_merge_use_scale_alpha_over_rank(gen):
    # alpha = 6, rank = 3: LoRA's scale alpha / rank is 2.0, written out here rather than taken
    # from the layer, so a wrong scale (alpha, alpha / sqrt(rank), 1) fails.
    lin = nn.Linear(24, 32)
    layer = vt.LoRASparseLinear.from_linear(lin, "16:2:8", rank=3, alpha=6.0)
    with torch.no_grad():
        layer.lora_B.normal_(generator=gen)
    W, b = lin.weight.detach(), lin.bias.detach()
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    x = torch.randn(5, 24, generator=gen)
    zero = torch.zeros(())
    tol = dict(rtol=1e-5, atol=1e-5)
    assert torch.allclose(layer(x), x @ (W + 2.0 * B @ A).T + b, **tol)  # dense stage
    layer.update_mask()
    mask = layer.mask.clone()
    assert not bool(mask.all())
    expected = torch.where(mask, W + 2.0 * B @ A, zero)
    assert torch.allclose(layer(x), x @ expected.T + b, **tol)  # sparse stages
    model = nn.Sequential(layer)
    vt.merge(model)
    assert isinstance(model[0], vnm.VNMLinear)
    assert torch.equal(model[0].weight_vnm.mask(), mask)
    assert torch.allclose(model[0].dense_weight(), expected, rtol=0, atol=1e-6)
    assert torch.allclose(model(x), x @ expected.T + b, **tol)


def test_lora_starts_as_the_wrapped_layer_and_only_factors_train(gen):
    model = tiny_mlp()
    x = torch.randn(4, 24, generator=gen)
    before = model(x)
    names = vt.prepare_lora(model, "16:2:8", rank=4)
    assert names == ["0", "2"]  # the 5-output head is skipped (shape pads far beyond 25%)
    assert torch.allclose(model(x), before, atol=1e-6)  # B = 0: dense stage equals the dense model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"}


def test_fixed_stage_masks_never_change_and_dynamic_masks_do(gen):
    model = tiny_mlp()
    vt.prepare_lora(model, "16:2:8", rank=4)
    batches = regression_batches(gen)
    snapshots = []

    def forward(m, batch):  # called once per step, after the schedule's begin_step
        snapshots.append([layer.mask.clone() for _, layer in lora_layers(m)])
        return m(batch[0])

    config = vt.ThreeStageConfig(dense_steps=4, dynamic_steps=12, fixed_steps=20, mask_interval=2, lr=3e-2,
                                 mask_lambda=0.0, progress=False)
    with pytest.warns(UserWarning, match="10%"):
        log = vt.train_three_stage(model, batches, config, mse_on_target, forward)
    assert [r["stage"] for r in log] == ["dense"] * 4 + ["dynamic"] * 12 + ["fixed"] * 20
    # during the dynamic stage the masks moved (so this test could see a change)...
    assert sum(r["mask_flips"] for r in log if r.get("mask_flips") not in (None, "")) > 0
    # ...and during the fixed stage they did not, while the factors kept training.
    fixed = snapshots[16:]
    for masks in fixed[1:]:
        for m0, m in zip(fixed[0], masks):
            assert torch.equal(m0, m)
    assert log[-1]["loss"] < log[16]["loss"]


def test_mask_regulariser_is_added_in_the_dynamic_stage_only(gen):
    model = tiny_mlp()
    teacher = copy.deepcopy(model)
    vt.prepare_lora(model, "16:2:8", rank=4)
    batches = [x for x, _ in regression_batches(gen)]
    config = vt.ThreeStageConfig(dense_steps=2, dynamic_steps=6, fixed_steps=6, mask_interval=2, lr=1e-2,
                                 mask_lambda=1e-3, teacher=teacher, distill="mse", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # over the paper's 10%; a dense stage with nothing to train
        log = vt.train_three_stage(model, batches, config)
    assert [r["stage"] for r in log] == ["dense"] * 2 + ["dynamic"] * 6 + ["fixed"] * 6
    assert ["reg" in r for r in log] == [r["stage"] == "dynamic" for r in log]
    for r in log:
        if r["stage"] == "dynamic":
            assert r["reg"] > 0
            assert r["loss"] == pytest.approx(r["distill"] + r["reg"], rel=1e-6)
        else:
            assert r["loss"] == pytest.approx(r["distill"], rel=1e-6)


@pytest.mark.slow
def test_dense_stage_warns_when_distillation_alone_has_nothing_to_train(gen):
    batches = regression_batches(gen)

    def run(loss_fn=None, dense_steps=3):
        model = tiny_mlp()
        teacher = copy.deepcopy(model)
        vt.prepare_lora(model, "16:2:8", rank=4)
        config = vt.ThreeStageConfig(dense_steps=dense_steps, dynamic_steps=3, fixed_steps=54, lr=1e-2,
                                     teacher=teacher, distill="mse", progress=False)
        b_is_zero = []  # at each step's forward of the student, before its optimiser step

        def forward(m, batch):
            if m is model:  # not the teacher's forward
                b_is_zero.append(all(not bool(layer.lora_B.any()) for _, layer in lora_layers(m)))
            return m(batch[0])

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            log = vt.train_three_stage(model, batches, config, loss_fn, forward)
        return log, b_is_zero, [str(w.message) for w in caught if "trained nothing" in str(w.message)]

    log, b_is_zero, caught = run()
    assert len(caught) == 1 and "dense_steps=0" in caught[0] and "task loss" in caught[0]
    assert [r["loss"] for r in log[:3]] == [0.0] * 3
    # What the warning says is true: stage 2 starts (step 3) with B still zero; then B trains.
    assert b_is_zero[:4] == [True] * 4 and not b_is_zero[4]
    _, _, caught_skipped = run(dense_steps=0)
    assert not caught_skipped
    # With a task loss the dense stage trains, and nothing is said.
    log_task, b_is_zero, caught_task = run(loss_fn=mse_on_target)
    assert not caught_task and all(r["loss"] > 0 for r in log_task[:3]) and not b_is_zero[1]


def test_merge_of_a_layer_still_dense_uses_the_training_mask_score(gen):
    model = tiny_mlp()
    vt.prepare_lora(model, "16:2:8", rank=4)
    # A score that disagrees with magnitude: |w| times a fixed random weight per input column.
    column_weight = {n: torch.rand(m.in_features, generator=gen) for n, m in lora_layers(model)}
    names_seen = []

    def score(w, name):
        names_seen.append(name)
        return w.float().abs() * column_weight[name]

    config = vt.ThreeStageConfig(dense_steps=3, dynamic_steps=0, fixed_steps=0, lr=1e-2, mask_score=score,
                                 progress=False)
    with pytest.warns(UserWarning, match="10%"):
        vt.train_three_stage(model, regression_batches(gen), config, mse_on_target, forward_x)
    layers = dict(lora_layers(model))
    assert not any(m.is_sparse for m in layers.values())  # training ended in the dense stage
    merged = {n: m.merged_weight().detach() for n, m in layers.items()}
    expected = {n: vnm.select_mask(score(w, n), "16:2:8") for n, w in merged.items()}
    assert any(not torch.equal(expected[n], vnm.select_mask(w.abs(), "16:2:8")) for n, w in merged.items())
    names_seen.clear()
    vt.merge(model)
    assert sorted(names_seen) == sorted(layers)
    for n in layers:
        assert torch.equal(model.get_submodule(n).weight_vnm.mask(), expected[n]), n


@pytest.mark.parametrize("pattern", ["2:4", "16:2:5", "16:2:8", "32:2:6", "4:8"])
def test_dynamic_stage_selects_the_best_valid_mask_of_the_merged_weight(gen, pattern):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 96))  # K = 40, 64: padded groups for M = 6
    vt.prepare_lora(model, pattern, rank=4, skip=())
    batches = [(torch.randn(16, 40, generator=gen), torch.randn(16, 96, generator=gen)) for _ in range(4)]
    schedule_checks = []

    class Checking(vt.ThreeStageLoRA):
        def update_masks(self):
            flips = super().update_masks()
            for name, layer in self.layers:
                merged = layer.merged_weight().detach()
                schedule_checks.append(name)
                assert vnm.is_valid_mask(layer.mask, pattern)
                assert torch.equal(layer.mask, vnm.select_mask(merged.abs(), pattern))
                # full: every row keeps N of every M (V:N:M: 2 per group) within the logical shape
                p = vnm.as_pattern(pattern)
                groups = -(-merged.shape[1] // p.M)
                assert int(layer.mask.sum()) <= merged.shape[0] * groups * p.N
                assert int(layer.mask.sum()) >= merged.shape[0] * (merged.shape[1] // p.M) * p.N
            return flips

    config = vt.ThreeStageConfig(dense_steps=2, dynamic_steps=6, fixed_steps=2, mask_interval=2, lr=1e-2,
                                 progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config.validate()
        schedule = Checking(model, config)
        vt.train_loop(model, batches, schedule.total, config, schedule, mse_on_target, forward_x)
    assert len(schedule_checks) == 3 * 2  # 3 selections (steps 2, 4, 6) x 2 layers


@pytest.mark.slow
def test_merged_lora_model_equals_trained_model_and_round_trips(gen, tmp_path):
    model = tiny_mlp()
    teacher = copy.deepcopy(model)
    vt.prepare_lora(model, "16:2:8", rank=4, alpha=8.0)
    batches = [x for x, _ in regression_batches(gen)]
    config = vt.ThreeStageConfig(total_steps=60, lr=1e-2, teacher=teacher, distill="mse", progress=False)
    with pytest.warns(UserWarning, match="dense stage trained nothing"):
        log = vt.train_three_stage(model, batches, config)
    model.eval()
    x = torch.randn(32, 24, generator=gen)
    trained = model(x).detach()
    vt.merge(model)
    assert not lora_layers(model)
    assert sum(isinstance(m, vnm.VNMLinear) for m in model.modules()) == 2
    merged = model(x)
    assert torch.allclose(merged, trained, rtol=1e-5, atol=1e-5 * trained.abs().max())
    # the distillation did something: the sparse student moved toward the teacher
    assert log[-1]["distill"] < 0.5 * log[config.stage_lengths()[0] + 1]["distill"]
    path = vnm.save(model, tmp_path / "m.vnm.safetensors")
    loaded = vnm.load(path, tiny_mlp(seed=7))
    assert torch.equal(loaded(x), merged)


def test_merge_works_for_gpt2_conv1d_layers():
    model, batch = tiny_gpt2()
    vt.prepare_lora(model, "16:2:8", rank=2)
    for _, layer in lora_layers(model):
        with torch.no_grad():
            layer.lora_B.normal_(std=0.05)
        layer.update_mask()
    trained = output_tensor(model(**batch)).detach()
    vt.merge(model)
    assert torch.allclose(output_tensor(model(**batch)), trained, rtol=1e-4, atol=1e-4)


# ---- SR-STE -----------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern,decay", [("2:4", 2e-4), ("16:2:8", 0.3), ("4:8", 0.05)])
def test_srste_sgd_step_matches_the_hand_computed_update(gen, pattern, decay):
    lin = nn.Linear(24, 32).double()
    layer = vt.SRSTELinear.from_linear(lin, pattern, decay=decay)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    x = torch.randn(7, 24, generator=gen, dtype=torch.float64)
    c = torch.randn(7, 32, generator=gen, dtype=torch.float64)
    lr = 0.1
    opt = torch.optim.SGD(layer.parameters(), lr=lr)
    (layer(x) * c).sum().backward()
    opt.step()

    mask = vnm.select_mask(w0.abs(), pattern)
    g = c.T @ x  # d/dW~ of sum((x @ W~.T + b) * c), passed straight through to every entry of W
    pruned = w0 * ~mask  # (1 - mask) * W in float64 (decay * ~mask would round decay to float32)
    expected = w0 - lr * (g + decay * pruned)
    assert torch.allclose(layer.weight.detach(), expected, rtol=0, atol=1e-12)
    assert torch.allclose(layer.bias.detach(), b0 - lr * c.sum(0), rtol=0, atol=1e-12)
    # the next forward uses the mask of the updated weight
    assert torch.equal(layer.current_mask(), vnm.select_mask(expected.abs(), pattern))
    y = layer(x)
    assert torch.allclose(y, x @ (expected * layer.current_mask()).T + layer.bias, atol=1e-12)


def test_srste_mask_follows_weight_changes_that_do_not_bump_the_version(gen):
    layer = vt.SRSTELinear.from_linear(nn.Linear(24, 32), "16:2:8")
    x = torch.randn(5, 24, generator=gen)

    def check_forward_uses_the_mask_of_the_current_weight():
        w = layer.weight.detach().clone()
        mask = vnm.select_mask(w.abs(), "16:2:8")
        y = layer(x)
        assert torch.equal(layer.mask, mask)
        assert torch.allclose(y, x @ torch.where(mask, w, torch.zeros(())).T + layer.bias, rtol=1e-5, atol=1e-5)
        return mask

    before = check_forward_uses_the_mask_of_the_current_weight()
    # A write through .data keeps the version counter.
    version = layer.weight._version
    layer.weight.data.copy_(torch.randn(32, 24, generator=gen))
    assert layer.weight._version == version
    assert not torch.equal(check_forward_uses_the_mask_of_the_current_weight(), before)
    # So does a fused AdamW step (where this torch build has one for the CPU).
    try:
        opt = torch.optim.AdamW(layer.parameters(), lr=0.5, fused=True)
    except (RuntimeError, ValueError):
        opt = None
    if opt is not None:
        before = check_forward_uses_the_mask_of_the_current_weight()
        layer(x).pow(2).sum().backward()
        version = layer.weight._version
        opt.step()
        assert layer.weight._version == version
        assert not torch.equal(check_forward_uses_the_mask_of_the_current_weight(), before)
    # Evaluation forwards may reuse the mask, but never across a mode switch.
    layer.eval()
    with torch.no_grad():
        before = check_forward_uses_the_mask_of_the_current_weight()
        layer.train()
        layer.weight.data.copy_(torch.randn(32, 24, generator=gen))
        layer.eval()
        assert not torch.equal(check_forward_uses_the_mask_of_the_current_weight(), before)


def test_srste_logs_unknown_mask_flips_where_the_previous_mask_is_unknown(gen, tmp_path):
    batches = [x for x, _ in regression_batches(gen, n=3)]

    def run(**kw):
        model = tiny_mlp()
        teacher = copy.deepcopy(model)
        vt.prepare_srste(model, "16:2:8")
        cfg = vt.SRSTEConfig(steps=8, lr=5e-2, optimizer="sgd", teacher=teacher, distill="mse", progress=False, **kw)
        return vt.train_srste(model, batches, cfg)

    straight = run(checkpoint_dir=tmp_path, checkpoint_every=4)
    flips = [r["mask_flips"] for r in straight]
    assert flips[0] == "" and all(isinstance(f, int) for f in flips[1:]) and sum(flips[1:]) > 0
    resumed = run(resume=tmp_path / "step_000004.pt")
    # Rows 0-3 come from the checkpoint's log; step 4 has no previous mask in this run (masks are
    # derived from the weights, not saved), so its count is unknown, not 0; later steps agree.
    assert [r["mask_flips"] for r in resumed] == flips[:4] + [""] + flips[5:]


def test_srste_training_and_merge(gen, tmp_path):
    model = tiny_mlp()
    teacher = copy.deepcopy(model)
    names = vt.prepare_srste(model, "16:2:8")
    assert names == ["0", "2"]
    batches = [x for x, _ in regression_batches(gen)]
    log_path = tmp_path / "log.csv"
    config = vt.SRSTEConfig(steps=40, lr=5e-2, optimizer="sgd", teacher=teacher, distill="mse", log_path=log_path, progress=False)
    log = vt.train_srste(model, batches, config)
    assert log[-1]["distill"] < log[0]["distill"]
    rows = list(csv.DictReader(open(log_path)))
    assert len(rows) == 40 and {"step", "stage", "loss", "distill", "mask_flips"} <= set(rows[0])
    model.eval()
    x = torch.randn(16, 24, generator=gen)
    trained = model(x).detach()
    vt.merge(model)
    assert torch.allclose(model(x), trained, rtol=1e-5, atol=1e-5 * trained.abs().max())


# ---- loop: distillation, checkpoints, errors ----------------------------------------------------

def test_distillation_losses():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(4, 6, 10, generator=g), torch.randn(4, 6, 10, generator=g)
    T = 2.0
    ref = torch.nn.functional.kl_div(torch.log_softmax(s / T, -1).reshape(-1, 10),
                                     torch.log_softmax(t / T, -1).reshape(-1, 10),
                                     log_target=True, reduction="batchmean") * T * T
    assert torch.allclose(vt.distillation_loss(s, t, "kl", T), ref, rtol=1e-5)
    assert float(vt.distillation_loss(t, t, "kl", T)) == pytest.approx(0.0, abs=1e-6)
    am = torch.ones(4, 6, dtype=torch.long)
    am[:, 4:] = 0  # padding
    t2 = t.clone()
    t2[:, 4:] += 100.0  # padded positions must not count
    a, b = vt.distillation_loss(s, t, "mse", attention_mask=am), vt.distillation_loss(s, t2, "mse", attention_mask=am)
    assert torch.equal(a, b)
    assert torch.allclose(a, (s - t)[:, :4].pow(2).mean())


def test_resuming_from_a_checkpoint_reproduces_an_uninterrupted_run(gen, tmp_path):
    batches = regression_batches(gen)

    def run(**kw):
        model = tiny_mlp()
        vt.prepare_lora(model, "16:2:8", rank=4)
        torch.manual_seed(5)
        for _, layer in lora_layers(model):
            nn.init.normal_(layer.lora_A)
        cfg = vt.ThreeStageConfig(dense_steps=1, dynamic_steps=2, fixed_steps=27, lr=1e-2, progress=False, **kw)
        return model, vt.train_three_stage(model, batches, cfg, mse_on_target, forward_x)

    straight, log = run()
    # interrupt: a run with checkpoints every 10 steps, then resume a fresh model from step 10
    run(checkpoint_dir=tmp_path, checkpoint_every=10)
    assert (tmp_path / "step_000010.pt").is_file() and (tmp_path / "last.pt").is_file()
    resumed, log2 = run(resume=tmp_path / "step_000010.pt")
    for (n, p), (_, q) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(p, q) if isinstance(p, torch.Tensor) else p == q, n
    assert [r["loss"] for r in log2] == [r["loss"] for r in log]


def test_resuming_mid_dynamic_stage_with_dropout_reproduces_an_uninterrupted_run(gen, tmp_path):
    batches = regression_batches(gen)

    def forward(model, batch):  # draws from Python's and numpy's generators as well as torch's (dropout)
        noise = 1.0 + 0.1 * random.random() + 0.1 * float(np.random.rand())
        return model(batch[0] * noise)

    def run(**kw):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(24, 32), nn.Dropout(0.3), nn.GELU(), nn.Linear(32, 32), nn.Dropout(0.3),
                              nn.GELU(), nn.Linear(32, 5))
        vt.prepare_lora(model, "16:2:8", rank=4)
        cfg = vt.ThreeStageConfig(dense_steps=2, dynamic_steps=8, fixed_steps=6, mask_interval=2, lr=1e-2,
                                  progress=False, **kw)
        # Every run starts its generators the same way; a resumed run must then take over the
        # checkpoint's state, not continue from this one.
        torch.manual_seed(5), random.seed(5), np.random.seed(5)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*the paper recommends")
            return model, vt.train_three_stage(model, batches, cfg, mse_on_target, forward)

    straight, log = run()
    run(checkpoint_dir=tmp_path, checkpoint_every=5)
    resumed, log2 = run(resume=tmp_path / "step_000005.pt")
    assert log2[5]["stage"] == "dynamic" and log2[4]["stage"] == "dynamic"  # resumed mid stage 2
    assert [r["loss"] for r in log2] == [r["loss"] for r in log]
    for (n, p), (_, q) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(p, q) if isinstance(p, torch.Tensor) else p == q, n
    # A checkpoint without generator state (older vnm) still resumes, with a warning.
    state = torch.load(tmp_path / "step_000005.pt", weights_only=False)
    del state["rng"]
    torch.save(state, tmp_path / "old.pt")
    with pytest.warns(UserWarning, match="no random number generator state"):
        run(resume=tmp_path / "old.pt")


def test_kl_distillation_on_logits_trains_the_student(gen):
    class Classifier(nn.Module):  # outputs with .logits, as Hugging Face classifiers return
        def __init__(self):
            super().__init__()
            self.net = tiny_mlp()

        def forward(self, x):
            return types.SimpleNamespace(logits=10.0 * self.net(x))  # confident enough to have a KL to fit

    model = Classifier()
    teacher = copy.deepcopy(model)
    vt.prepare_srste(model, "16:2:8")
    batches = [x for x, _ in regression_batches(gen)]
    T = 2.0
    student0, teacher0 = model(batches[0]).logits.detach(), teacher(batches[0]).logits.detach()
    expected0 = torch.nn.functional.kl_div(torch.log_softmax(student0 / T, -1), torch.log_softmax(teacher0 / T, -1),
                                           log_target=True, reduction="batchmean") * T * T
    config = vt.SRSTEConfig(steps=40, lr=5e-2, optimizer="sgd", teacher=teacher, distill="kl", temperature=T,
                            distill_on="logits", progress=False)
    log = vt.train_srste(model, batches, config)
    assert float(expected0) > 0 and log[0]["distill"] == pytest.approx(float(expected0), rel=1e-5)
    # the last pass over the 8 batches against the first: the student moved toward the teacher
    first, last = sum(r["distill"] for r in log[:8]), sum(r["distill"] for r in log[-8:])
    assert last < 0.6 * first


def test_cached_teacher_outputs_give_the_same_training(gen):
    batches = [x for x, _ in regression_batches(gen, n=3)]
    results = []
    for cache in (False, True):
        model = tiny_mlp()
        teacher = copy.deepcopy(model)
        vt.prepare_srste(model, "2:4")
        cfg = vt.SRSTEConfig(steps=9, teacher=teacher, distill="mse", cache_teacher=cache, progress=False)
        results.append([r["loss"] for r in vt.train_srste(model, batches, cfg)])
    assert results[0] == results[1]


def test_bad_input_raises_errors_that_name_the_fix(gen):
    model = tiny_mlp()
    teacher = copy.deepcopy(model)
    with pytest.raises(ValueError, match="no layer"):
        vt.prepare_lora(nn.Sequential(nn.ReLU()), "2:4")
    with pytest.raises(ValueError, match="V must be"):
        vt.prepare_lora(copy.deepcopy(model), "8:2:8")
    with pytest.raises(ValueError, match="rank"):
        vt.prepare_lora(copy.deepcopy(model), "2:4", rank=100)
    with pytest.raises(ValueError, match="do not add up"):
        vt.ThreeStageConfig(total_steps=100, dense_steps=5, dynamic_steps=5, fixed_steps=80).stage_lengths()
    with pytest.raises(ValueError, match="do not add up"):
        vt.ThreeStageConfig(total_steps=10, dense_steps=8, dynamic_steps=5).stage_lengths()
    with pytest.raises(ValueError, match="total_steps"):
        vt.ThreeStageConfig(dense_steps=5).stage_lengths()
    with pytest.raises(ValueError, match="needs a teacher"):
        vt.ThreeStageConfig(total_steps=10, distill="mse").validate()
    with pytest.raises(ValueError, match="distill="):
        vt.SRSTEConfig(steps=10, teacher=teacher).validate()
    with pytest.raises(ValueError, match="steps >= 1"):
        vt.SRSTEConfig().validate()
    with pytest.raises(ValueError, match="prepare_lora"):
        vt.train_three_stage(copy.deepcopy(model), [torch.zeros(1, 24)], vt.ThreeStageConfig(total_steps=3))
    with pytest.raises(ValueError, match="prepare_lora or vnm.train.prepare_srste"):
        vt.merge(copy.deepcopy(model))
    prepared = copy.deepcopy(model)
    vt.prepare_srste(prepared, "2:4")
    with pytest.raises(TypeError, match="one-shot iterator"):
        vt.train_srste(prepared, (x for x in [torch.zeros(2, 24)]), vt.SRSTEConfig(steps=2, progress=False),
                       loss_fn=lambda out, b: out.sum())
    with pytest.raises(ValueError, match="nothing to train on"):
        vt.train_srste(prepared, [torch.zeros(2, 24)], vt.SRSTEConfig(steps=2, progress=False))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_learning_rate_schedule_is_what_the_config_says(gen, schedule):
    # TrainConfig's docstring: warm-up step s uses lr (s + 1) / (warmup + 1); the decay reaches
    # zero one step after the last, so the last step uses lr / (steps - warmup) (linear) or
    # lr (1 + cos(pi (steps - 1 - warmup) / (steps - warmup))) / 2 (cosine).
    model = tiny_mlp()
    vt.prepare_srste(model, "2:4")
    lr, steps, warm = 1e-3, 12, 3
    config = vt.SRSTEConfig(steps=steps, lr=lr, warmup_steps=warm, lr_schedule=schedule, progress=False)
    log = vt.train_srste(model, regression_batches(gen, n=2), config, mse_on_target, forward_x)
    lrs = [r["lr"] for r in log]
    assert lrs[:warm + 1] == pytest.approx([lr * (s + 1) / (warm + 1) for s in range(warm)] + [lr])
    last = 1 / (steps - warm) if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * (steps - 1 - warm) / (steps - warm)))
    assert lrs[-1] == pytest.approx(lr * last) and lrs[-1] > 0


def test_the_paper_budget_is_the_default_split():
    s = vt.ThreeStageConfig(total_steps=1000).stage_lengths()
    assert s == (50, 50, 900) and (s[0] + s[1]) / sum(s) <= 0.10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vt.ThreeStageConfig(total_steps=1000).validate()  # within the paper's 10%: no warning


@needs_cuda
def test_both_methods_train_and_merge_on_cuda(gen):
    x = torch.randn(16, 24, generator=gen).cuda()
    for prepare, config in ((vt.prepare_lora, vt.ThreeStageConfig(total_steps=20, lr=1e-2)),
                            (vt.prepare_srste, vt.SRSTEConfig(steps=10))):
        model = tiny_mlp().cuda()
        config.teacher, config.distill, config.progress = copy.deepcopy(model), "mse", False
        prepare(model, "16:2:8")
        (vt.train_three_stage if prepare is vt.prepare_lora else vt.train_srste)(model, [x], config)
        model.eval()
        trained = model(x).detach()
        vt.merge(model)
        assert torch.allclose(model(x), trained, rtol=1e-3, atol=1e-3)


def test_lora_on_bfloat16_weights_trains_float32_factors_and_merges(gen):
    model = tiny_mlp(dtype=torch.bfloat16)
    vt.prepare_lora(model, "16:2:8", rank=4)
    assert all(layer.lora_A.dtype == torch.float32 and layer.weight.dtype == torch.bfloat16
               for _, layer in lora_layers(model))
    batches = [(x.bfloat16(), t.bfloat16()) for x, t in regression_batches(gen)]
    config = vt.ThreeStageConfig(total_steps=20, lr=1e-2, progress=False)
    vt.train_three_stage(model, batches, config, lambda out, b: (out.float() - b[1].float()).pow(2).mean(), forward_x)
    assert all(float(layer.lora_B.detach().abs().max()) > 0 for _, layer in lora_layers(model))
    x = batches[0][0]
    trained = model(x).detach()
    assert trained.dtype == torch.bfloat16
    vt.merge(model)
    merged = model(x)
    assert merged.dtype == torch.bfloat16
    # same bf16 weights; only the accumulation order differs (C++ reference vs torch)
    assert torch.allclose(merged.float(), trained.float(), rtol=2e-2, atol=2e-2)
