"""LoRA from the ``peft`` package on a sparsified model: it attaches (a VNMLinear is an nn.Linear),
forwards, trains its adapters with the sparse weights frozen, saves and reloads them; merging is
refused with a message pointing to vnm.train (docs/sparse_weight.md)."""

import copy

import pytest
import torch

import vnm
from vnm import SparsifyConfig, VNMLinear, VNMWeight
from _models import tiny_llama

peft = pytest.importorskip("peft")  # in the [test] extra: CI has it


@pytest.fixture
def lora_model():
    model, inputs = tiny_llama()
    vnm.sparsify(model, SparsifyConfig(pattern="16:2:8", permute="free", permute_time_budget=None,
                                       permute_max_rounds=2, progress=False))
    with torch.no_grad():
        before = model(**inputs).logits
    storage = {n: m.values.clone() for n, m in model.named_modules() if isinstance(m, VNMLinear)}
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                             target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    return peft.get_peft_model(model, config), inputs, before, storage


def test_lora_attaches_to_sparse_layers_and_starts_from_the_sparse_model(lora_model):
    pm, inputs, before, _ = lora_model
    wrapped = [m for m in pm.modules() if isinstance(m, peft.tuners.lora.Linear)]
    assert len(wrapped) == 8  # 4 targets x 2 layers
    for m in wrapped:
        assert isinstance(m.base_layer, VNMLinear) and isinstance(m.base_layer.weight, VNMWeight)
        assert m.lora_A["default"].weight.dtype == m.base_layer.weight.dtype  # peft read the weight's dtype
    with torch.no_grad():
        assert torch.equal(pm(**inputs).logits, before)  # lora_B starts at zero


def test_lora_trains_with_the_sparse_weights_frozen(lora_model, tmp_path):
    pm, inputs, before, storage = lora_model
    trainable = [p for p in pm.parameters() if p.requires_grad]
    assert trainable and all(not isinstance(p, VNMWeight) for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(6):
        loss = pm(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, values in storage.items():  # the compressed storage did not move
        layer = pm.base_model.model.get_submodule(name)
        assert torch.equal(getattr(layer, "base_layer", layer).values, values)  # wrapped or not
    with torch.no_grad():
        trained = pm(**inputs).logits
    assert not torch.equal(trained, before)
    # the adapter saves and reloads onto a freshly sparsified model
    pm.save_pretrained(tmp_path / "adapter")
    base, _ = tiny_llama()
    vnm.sparsify(base, SparsifyConfig(pattern="16:2:8", permute="free", permute_time_budget=None,
                                      permute_max_rounds=2, progress=False))
    again = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(again(**inputs).logits, trained, atol=1e-5)


def test_merging_into_the_sparse_weight_is_refused_and_points_to_vnm_train(lora_model):
    pm, inputs, _, _ = lora_model
    with pytest.raises(NotImplementedError, match=r"not V:N:M sparse.*vnm.train"):
        copy.deepcopy(pm).merge_and_unload()
