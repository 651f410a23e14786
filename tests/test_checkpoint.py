"""Corrupt or mismatched checkpoints raise a clear error and load nothing half-way."""

import copy
import os
import stat
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import vnm
from vnm import SparsifyConfig, VNMLinear
from _models import output_tensor, tiny_llama


@pytest.fixture
def saved(tmp_path):
    dense, inputs = tiny_llama()
    sparse = copy.deepcopy(dense)
    vnm.sparsify(sparse, SparsifyConfig(pattern="16:2:8", progress=False))
    path = vnm.save(sparse, tmp_path / "m.safetensors")
    return path, sparse, inputs


def rewrite(path, tensors=None, description=None):
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = tensors if tensors is not None else load_file(str(path))
    if description is not None:
        meta["vnm"] = description if isinstance(description, str) else json.dumps(description)
    save_file(tensors, str(path), metadata=meta)


def redigest(path, tensors, edit=None):
    """Rewrite ``path`` with ``tensors`` and a checksum that matches them (a deliberate edit)."""
    from vnm.checkpoint import _digest
    d = description(path)
    d["sha256"] = _digest(tensors)
    rewrite(path, tensors=tensors, description=edit(d) if edit else d)


def description(path):
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["vnm"])


def assert_untouched(model):
    assert not any(isinstance(m, VNMLinear) for m in model.modules())


def fresh():
    return tiny_llama()[0]


def test_description_records_layers_and_version(saved):
    path, sparse, _ = saved
    d = description(path)
    assert d["format_version"] == 1 and d["vnm_version"] == vnm.__version__
    layer = d["layers"]["model.layers.0.mlp.down_proj"]
    assert layer == {"pattern": "16:2:8", "shape": [64, 160], "dtype": "float32", "perm": False, "row_perm": False,
                     "bias": False}


def test_truncated_file(saved):
    path, _, _ = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    model = fresh()
    with pytest.raises(ValueError, match="truncated or corrupt"):
        vnm.load(path, model)
    assert_untouched(model)
    path.write_bytes(data[:40])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        vnm.load(path, model)


def test_flipped_byte_is_caught_by_the_checksum(saved):
    path, _, _ = saved
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x10
    path.write_bytes(bytes(data))
    model = fresh()
    with pytest.raises(ValueError, match="SHA-256"):
        vnm.load(path, model)
    assert_untouched(model)


def test_unknown_version(saved):
    path, _, _ = saved
    d = description(path)
    d["format_version"] = 99
    rewrite(path, description=d)
    with pytest.raises(ValueError, match="format version 99 is not supported"):
        vnm.load(path, fresh())


@pytest.mark.parametrize("edit, message", [
    (lambda d: "{not json", "not valid JSON"),
    (lambda d: {**d, "layers": None}, "no 'layers' table"),
    (lambda d: {**d, "layers": {**d["layers"], "model.layers.9.mlp.up_proj": d["layers"]["model.layers.0.mlp.up_proj"]}},
     "does not exist in LlamaForCausalLM"),
    (lambda d: {**d, "layers": {k: {**v, "pattern": "16:2:4"} for k, v in d["layers"].items()}}, "values has shape"),
    (lambda d: {**d, "layers": {k: {**v, "pattern": "16:3:8"} for k, v in d["layers"].items()}}, "need N == 2"),
    (lambda d: {**d, "layers": {k: {**v, "shape": [64, 64]} for k, v in d["layers"].items()}}, "in the checkpoint but"),
    # malformed layer entries
    (lambda d: {**d, "layers": {**d["layers"], "model.layers.0.mlp.up_proj": "16:2:8"}},
     r"the entry of layer 'model.layers.0.mlp.up_proj' is a str, not an object"),
    (lambda d: {**d, "layers": {k: {**v, "shape": [160, 64, 1]} for k, v in d["layers"].items()}},
     r"has shape \[160, 64, 1\] in the checkpoint, not \[out_features, in_features\]"),
    (lambda d: {**d, "layers": {k: {**v, "dtype": "float64"} for k, v in d["layers"].items()}},
     r"has dtype 'float64', not one of float32, float16, bfloat16"),
])
def test_tampered_description(saved, edit, message):
    path, _, _ = saved
    rewrite(path, description=edit(description(path)))
    model = fresh()
    with pytest.raises(ValueError, match=message):
        vnm.load(path, model)
    assert_untouched(model)


def test_tampered_storage_with_a_matching_checksum(saved):
    # Someone edits the metadata of a layer and recomputes the checksum: well-formedness still holds.
    path, _, _ = saved
    tensors = load_file(str(path))
    tensors["model.layers.0.mlp.up_proj.columns"][0, 0] = torch.tensor([3, 2, 1, 0], dtype=torch.uint8)
    redigest(path, tensors)
    model = fresh()
    with pytest.raises(ValueError, match=r"up_proj.*must be 4 ascending offsets"):
        vnm.load(path, model)
    assert_untouched(model)


def test_row_permutation_round_trips_and_a_tampered_one_is_refused(tmp_path):
    dense, inputs = tiny_llama()
    sparse = copy.deepcopy(dense)
    report = vnm.sparsify(sparse, SparsifyConfig(pattern="16:2:8", permute="free", permute_time_budget=None,
                                                 permute_max_rounds=2, progress=False))
    scattered = [r.name for r in report.sparse if r.row_scattered]
    assert scattered
    path = vnm.save(sparse, tmp_path / "rows.safetensors")
    assert description(path)["layers"][scattered[0]]["row_perm"] is True
    loaded = vnm.load(path, fresh())
    with torch.no_grad():
        assert torch.equal(output_tensor(loaded(**inputs)), output_tensor(sparse(**inputs)))
    # a row_perm that repeats a row, with the checksum recomputed: refused, nothing loaded
    tensors = load_file(str(path))
    key = f"{scattered[0]}.row_perm"
    tensors[key][1] = tensors[key][0]
    redigest(path, tensors)
    model = fresh()
    with pytest.raises(ValueError, match=r"row_perm is not a permutation"):
        vnm.load(path, model)
    assert_untouched(model)


def test_wrong_architecture(saved):
    path, _, _ = saved
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=160, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=101))
    with pytest.raises(ValueError, match="in the checkpoint but"):
        vnm.load(path, other)
    assert_untouched(other)
    with pytest.raises(ValueError, match="does not exist"):
        vnm.load(path, nn.Sequential(nn.Linear(4, 4)))


def test_dense_tensor_mismatch_loads_nothing(saved):
    path, _, _ = saved
    tensors = load_file(str(path))
    del tensors["model.norm.weight"]
    redigest(path, tensors)
    model = fresh()
    with pytest.raises(ValueError, match=r"missing \['model.norm.weight'\]"):
        vnm.load(path, model)
    assert_untouched(model)


def test_not_a_vnm_file(tmp_path):
    p = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, str(p))
    with pytest.raises(ValueError, match="not written by vnm.save"):
        vnm.load(p, fresh())
    with pytest.raises(ValueError, match="no VNMLinear layer"):
        vnm.save(nn.Linear(2, 2), tmp_path / "x.safetensors")


def test_load_from_config_and_tied_weights(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=50, n_positions=16)).eval()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied
    vnm.sparsify(model, SparsifyConfig(pattern="16:2:4", progress=False))
    path = vnm.save(model, tmp_path / "g.safetensors")
    loaded = vnm.load(path, model.config)
    ids = torch.randint(0, 50, (1, 7))
    with torch.no_grad():
        assert torch.equal(output_tensor(loaded(input_ids=ids)), output_tensor(model(input_ids=ids)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoint_loads_from_its_config_in_its_dtype(tmp_path, dtype):
    dense, inputs = tiny_llama(dtype)
    vnm.sparsify(dense, SparsifyConfig(pattern="16:2:8", progress=False))
    path = vnm.save(dense, tmp_path / "half.safetensors")
    loaded = vnm.load(path, dense.config)
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    assert loaded.model.layers[0].mlp.up_proj.values.dtype == dtype
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, dense(**inputs).logits)


def test_a_model_in_another_dtype_is_refused_and_untouched(tmp_path):
    half, _ = tiny_llama(torch.float16)
    vnm.sparsify(half, SparsifyConfig(pattern="16:2:8", progress=False))
    path = vnm.save(half, tmp_path / "half.safetensors")
    model = fresh()  # float32
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj' is float16 in the checkpoint but "
                                         r"float32 in the model: build the model in float16"):
        vnm.load(path, model)
    assert_untouched(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_dense_tensor_in_another_dtype_is_refused(saved):
    path, _, _ = saved
    tensors = load_file(str(path))
    tensors["model.norm.weight"] = tensors["model.norm.weight"].half()
    redigest(path, tensors)
    model = fresh()
    with pytest.raises(ValueError, match="model.norm.weight is float16 in the checkpoint but float32 in the model"):
        vnm.load(path, model)
    assert_untouched(model)


def test_wrong_bias_names_the_file_and_layer(tmp_path):
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU())

    model = build()
    vnm.sparsify(model, SparsifyConfig(pattern="16:2:8", progress=False))
    path = vnm.save(model, tmp_path / "b.safetensors")
    tensors = load_file(str(path))
    tensors["0.bias"] = tensors["0.bias"][:60].clone()
    redigest(path, tensors)
    target = build()
    with pytest.raises(ValueError, match=r"b.safetensors: layer '0': bias must have shape \(64,\), got \(60,\)"):
        vnm.load(path, target)
    assert_untouched(target)


# ---- file handling: a folder is refused, a failed save leaves nothing, the file gets a normal mode ----

def _sparse_linear():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    vnm.sparsify(model, SparsifyConfig(pattern="16:2:8", progress=False))
    return model


def test_save_into_a_folder_is_refused_and_writes_nothing(tmp_path):
    with pytest.raises(IsADirectoryError, match=r"is a folder: vnm.save writes a checkpoint file, such as .*"
                                                r"model.vnm.safetensors"):
        vnm.save(_sparse_linear(), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_load_from_a_folder_names_the_file_to_pass(tmp_path):
    path = vnm.save(_sparse_linear(), tmp_path / "m.safetensors")
    with pytest.raises(IsADirectoryError, match=r"is a folder: vnm.load reads a checkpoint file, such as .*m.safetensors"):
        vnm.load(tmp_path, _sparse_linear())
    with pytest.raises(FileNotFoundError):
        vnm.load(tmp_path / "missing.safetensors", _sparse_linear())
    assert path.is_file()


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError])
def test_a_failed_save_leaves_the_old_file_and_no_stray_file(tmp_path, monkeypatch, failure):
    import safetensors.torch

    model = _sparse_linear()
    path = vnm.save(model, tmp_path / "m.safetensors")
    before = path.read_bytes()
    real = safetensors.torch.save_file

    def write_then_fail(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)  # a complete file under the temporary name...
        raise failure("interrupted")  # ...then Ctrl-C or a full disk before the rename

    monkeypatch.setattr(safetensors.torch, "save_file", write_then_fail)
    with pytest.raises(failure):
        vnm.save(model, path)
    with pytest.raises(failure):
        vnm.save(model, tmp_path / "new.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    assert path.read_bytes() == before


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_checkpoint_gets_the_mode_of_a_new_file(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = vnm.save(_sparse_linear(), tmp_path / "m.safetensors")
        (tmp_path / "plain").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o666 & ~umask


def test_a_config_of_another_model_than_the_recorded_class_is_refused(saved):
    from transformers import GPT2Config

    path, _, _ = saved
    with pytest.raises(ValueError, match=r"model class LlamaForCausalLM takes a LlamaConfig, but the config is a "
                                         r"GPT2Config"):
        vnm.load(path, GPT2Config(n_embd=64, n_layer=1, n_head=4))
