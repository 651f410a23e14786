"""Each supported model family is sparsified, runs, matches a dense model carrying the same
masked weights, and saves / loads back with identical outputs and less memory."""

import copy
import logging

import pytest
import torch
from torch import nn

import vnm
from vnm import SparsifyConfig, VNMLinear
from vnm.cli import module_bytes
from _models import output_tensor, tiny_bert, tiny_gpt2, tiny_llama, tiny_vit

FAMILIES = {
    "llama": (tiny_llama, "16:2:8"),
    "gpt2": (tiny_gpt2, "16:2:8"),
    "vit": (lambda: tiny_vit("vit"), "16:2:5"),
    "deit": (lambda: tiny_vit("deit"), "64:2:8"),
    "bert": (tiny_bert, "2:4"),
}


def masked_dense_copy(dense, sparse):
    """The dense model with each sparsified layer's weight replaced by that layer's W * mask."""
    ref = copy.deepcopy(dense)
    for name, m in sparse.named_modules():
        if isinstance(m, VNMLinear):
            target = ref.get_submodule(name)
            w = m.dense_weight()
            with torch.no_grad():
                if isinstance(target, nn.Linear):
                    target.weight.copy_(w)
                else:  # Conv1D stores the transpose
                    target.weight.copy_(w.T)
    return ref


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_sparsify_forward_save_load(family, tmp_path):
    build, pattern = FAMILIES[family]
    dense, inputs = build()
    sparse = copy.deepcopy(dense)
    report = vnm.sparsify(sparse, SparsifyConfig(pattern=pattern, progress=False))
    assert report.sparse, "no layer was sparsified"
    heads = {r.name for r in report.skipped}
    assert not any(isinstance(sparse.get_submodule(n), VNMLinear) for n in heads)
    for name in ("lm_head", "classifier"):
        if hasattr(dense, name):
            assert name in heads
    with torch.no_grad():
        y_sparse = output_tensor(sparse(**inputs))
        y_ref = output_tensor(masked_dense_copy(dense, sparse)(**inputs))
    assert torch.allclose(y_sparse, y_ref, rtol=1e-4, atol=1e-4), (y_sparse - y_ref).abs().max()

    path = vnm.save(sparse, tmp_path / "m.safetensors")
    fresh, _ = build()
    torch.manual_seed(123)
    for p in fresh.parameters():  # different weights, so a load that skips anything shows
        nn.init.normal_(p)
    loaded = vnm.load(path, fresh)
    with torch.no_grad():
        assert torch.equal(output_tensor(loaded(**inputs)), y_sparse)
    assert module_bytes(loaded) < module_bytes(dense)


@pytest.mark.slow
def test_minilm_sparsified_matches_masked_dense_and_saves_less(tmp_path):
    from vnm.models import load_minilm

    dense, tok = load_minilm()
    sparse = copy.deepcopy(dense)
    report = vnm.sparsify(sparse, SparsifyConfig(pattern="64:2:8", progress=False))
    assert len(report.sparse) == 36 and [r.name for r in report.skipped] == ["pooler.dense"]
    batch = tok(["A sentence to embed.", "Another, somewhat longer sentence to embed here."],
                padding=True, return_tensors="pt")
    with torch.no_grad():
        y = sparse(**batch).last_hidden_state
        y_ref = masked_dense_copy(dense, sparse)(**batch).last_hidden_state
    assert torch.allclose(y, y_ref, atol=1e-4)
    path = vnm.save(sparse, tmp_path / "minilm.safetensors")
    loaded = vnm.load(path, dense.config)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).last_hidden_state, y)
    # memory: the linear layers shrink by the storage ratio; the rest (embeddings) is unchanged
    dense_linear = sum(m.weight.numel() * 4 for n, m in dense.named_modules()
                       if isinstance(m, nn.Linear) and n != "pooler.dense")
    sparse_linear = sum(m.nbytes for m in loaded.modules() if isinstance(m, VNMLinear))
    assert sparse_linear / dense_linear < 0.30
    saved = module_bytes(dense) - module_bytes(loaded)
    sparse_bias = sum(m.bias.numel() * 4 for m in loaded.modules() if isinstance(m, VNMLinear))
    dense_bias = sparse_bias  # biases are kept dense
    assert saved == dense_linear - sparse_linear + dense_bias - sparse_bias


def test_per_layer_patterns_and_filter():
    dense, inputs = tiny_llama()
    model = copy.deepcopy(dense)
    cfg = SparsifyConfig(pattern={"*.mlp.*": "16:2:8", "*.self_attn.[qk]_proj": "2:4"}, progress=False)
    report = vnm.sparsify(model, cfg, filter_fn=lambda m, name: "layers.1." not in name)
    by_name = {r.name: r for r in report.layers}
    assert by_name["model.layers.0.mlp.down_proj"].pattern == "16:2:8"
    assert by_name["model.layers.0.self_attn.q_proj"].pattern == "2:4"
    assert by_name["model.layers.0.self_attn.v_proj"].skipped.startswith("no pattern")
    assert by_name["model.layers.1.mlp.up_proj"].skipped == "excluded by filter_fn"
    assert isinstance(model.model.layers[0].mlp.down_proj, VNMLinear)
    assert isinstance(model.model.layers[1].mlp.down_proj, nn.Linear)


def test_no_prunable_layer_is_a_clear_error():
    with pytest.raises(ValueError, match="no prunable layer in Sequential: the model has no nn.Linear"):
        vnm.sparsify(nn.Sequential(nn.ReLU()), SparsifyConfig(progress=False))
    with pytest.raises(ValueError, match=r"0: output head|excluded by filter_fn"):
        vnm.sparsify(nn.Sequential(nn.Linear(64, 64)), SparsifyConfig(progress=False), filter_fn=lambda m, n: False)


def test_unservable_shape_is_skipped_with_the_reason():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 20))
    report = vnm.sparsify(model, SparsifyConfig(pattern="64:2:8", progress=False))
    assert report.layers[1].skipped.startswith("shape 20x64 pads to 64x64 under 64:2:8")
    assert isinstance(model[0], VNMLinear) and isinstance(model[1], nn.Linear)


def test_masked_lm_head_stays_dense():
    from _models import tiny_bert_mlm

    dense, inputs = tiny_bert_mlm()
    assert dense.cls.predictions.decoder.weight is dense.bert.embeddings.word_embeddings.weight  # tied
    model = copy.deepcopy(dense)
    report = vnm.sparsify(model, SparsifyConfig(pattern="16:2:8", progress=False))
    skipped = {r.name: r.skipped for r in report.skipped}
    assert skipped == {"cls.predictions.transform.dense": "output head (default skip pattern 'cls.*')",
                       "cls.predictions.decoder": "output head (default skip pattern 'cls.*')"}
    assert isinstance(model.cls.predictions.decoder, nn.Linear)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight  # still tied
    assert len(report.sparse) == 12  # 6 linear layers in each of the 2 encoder layers
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, masked_dense_copy(dense, model)(**inputs).logits, atol=1e-4)


@pytest.mark.parametrize("name", ["lm_head", "model.lm_head", "qa_outputs", "embed_out", "cls.seq_relationship"])
def test_default_skip_names_common_heads(name):
    from vnm.sparsify import DEFAULT_SKIP, find_layers

    parent = nn.Module()
    child = parent
    for part in name.split(".")[:-1]:
        child.add_module(part, nn.Module())
        child = getattr(child, part)
    child.add_module(name.split(".")[-1], nn.Linear(64, 64))
    (rep,) = find_layers(parent, SparsifyConfig(pattern="2:4"))
    assert rep.name == name and rep.skipped.startswith("output head (default skip pattern"), rep.skipped
    assert rep.skipped.endswith("')") and any(f"'{g}'" in rep.skipped for g in DEFAULT_SKIP)


def test_user_skip_pattern_is_named_and_logged(caplog):
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 20))
    with caplog.at_level(logging.INFO, logger="vnm"):
        report = vnm.sparsify(model, SparsifyConfig(pattern="64:2:8", skip=["1"], progress=False))
    assert report["1"].skipped == "matches config.skip pattern '1'"
    assert [r.name for r in report.sparse] == ["0"]
    by_layer = {r.getMessage().split()[0]: r for r in caplog.records if r.name == "vnm"}
    assert by_layer["1"].levelno == logging.INFO and "matches config.skip pattern '1'" in by_layer["1"].getMessage()
    # a layer that was meant to be sparse but whose shape cannot be served is a warning
    assert by_layer["2"].levelno == logging.WARNING and "20x64 pads to 64x64" in by_layer["2"].getMessage()
    assert "0" not in by_layer


def test_sparsifying_a_sparsified_model_says_so():
    dense, _ = tiny_llama()
    vnm.sparsify(dense, SparsifyConfig(pattern="16:2:8", progress=False))
    with pytest.raises(ValueError, match=r"LlamaForCausalLM is already sparsified \(14 VNMLinear layers\)"):
        vnm.sparsify(dense, SparsifyConfig(pattern="16:2:8", progress=False))


def test_a_dtype_other_than_the_models_is_refused_before_any_change():
    dense, inputs = tiny_llama()
    with pytest.raises(ValueError, match=r"dtype=torch.float16\) but model.layers.0.self_attn.q_proj is "
                                         r"torch.float32.*model.to\(torch.float16\)"):
        vnm.sparsify(dense, SparsifyConfig(pattern="16:2:8", dtype=torch.float16, progress=False))
    assert not any(isinstance(m, VNMLinear) for m in dense.modules())
    half, _ = tiny_llama(torch.float16)  # the dtype the model has is accepted
    vnm.sparsify(half, SparsifyConfig(pattern="16:2:8", dtype=torch.float16, progress=False))
    assert half.model.layers[0].mlp.up_proj.values.dtype == torch.float16
    assert half(**inputs).logits.dtype == torch.float16
