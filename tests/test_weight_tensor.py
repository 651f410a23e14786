"""The sparse weight as a tensor: ``VNMLinear`` is an ``nn.Linear`` whose ``weight`` is a
``VNMWeight`` that answers what code written for dense layers reads (dtype, shape, device, .to())
and multiplies from the V:N:M storage (docs/sparse_weight.md)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vnm
from vnm import SparsifyConfig, VNMLinear, VNMWeight
from _models import output_tensor, tiny_bert, tiny_gpt2, tiny_llama, tiny_vit


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=64, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
                   decoder_start_token_id=0)
    ids = torch.randint(0, 64, (2, 7))
    return T5ForConditionalGeneration(cfg).eval(), {"input_ids": ids, "decoder_input_ids": ids[:, :5]}


FAMILIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert, "vit": tiny_vit, "t5": tiny_t5}


def masked_dense_copy(dense, sparse):
    """The dense model with each sparsified layer's effective weight written in (the reference)."""
    ref = copy.deepcopy(dense)
    with torch.no_grad():
        for name, m in sparse.named_modules():
            if isinstance(m, VNMLinear):
                vnm.weight_matrix(ref.get_submodule(name)).copy_(m.weight.to_dense())
    return ref


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_sparsified_layer_has_a_weight_that_reads_like_a_dense_one(family):
    dense, inputs = FAMILIES[family]()
    sparse = copy.deepcopy(dense)
    report = vnm.sparsify(sparse, SparsifyConfig(pattern="16:2:8", progress=False))
    assert report.sparse
    for rep in report.sparse:
        layer = sparse.get_submodule(rep.name)
        w = layer.weight
        assert isinstance(layer, nn.Linear) and isinstance(w, VNMWeight) and isinstance(w, nn.Parameter)
        assert w.dtype == torch.float32 and w.device == torch.device("cpu") and w.ndim == 2
        assert tuple(w.shape) == rep.shape == (layer.out_features, layer.in_features)
        assert not w.requires_grad
        x = torch.randn(3, layer.in_features)
        expected = x @ w.to_dense().T + (0 if layer.bias is None else layer.bias)
        # the three ways code multiplies by a linear weight give the layer's output
        for y in (layer(x), F.linear(x, w, layer.bias), x @ w.t() + (0 if layer.bias is None else layer.bias)):
            assert torch.allclose(y, expected, atol=1e-5)
    # the sparse model computes the masked dense model (T5's feed-forward reads wo.weight.dtype)
    ref = masked_dense_copy(dense, sparse)
    with torch.no_grad():
        got, want = output_tensor(sparse(**inputs)), output_tensor(ref(**inputs))
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_t5_forward_and_generate_after_sparsify():
    model, inputs = tiny_t5()
    dense = copy.deepcopy(model)
    vnm.sparsify(model, SparsifyConfig(pattern="64:2:8", progress=False))
    wo = model.encoder.block[0].layer[1].DenseReluDense.wo
    assert isinstance(wo, VNMLinear) and wo.weight.dtype == torch.float32  # what T5LayerFF reads
    ref = masked_dense_copy(dense, model)
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, ref(**inputs).logits, atol=1e-5)
        out = model.generate(input_ids=inputs["input_ids"], max_new_tokens=6, do_sample=False)
        assert torch.equal(out, ref.generate(input_ids=inputs["input_ids"], max_new_tokens=6, do_sample=False))


@pytest.fixture
def permuted_layer(gen):
    lin = nn.Linear(48, 40)
    return VNMLinear.from_linear(lin, pattern="16:2:8", perm=torch.randperm(48, generator=gen),
                                 row_perm=torch.randperm(40, generator=gen)), lin


def test_permutations_live_in_the_weight(permuted_layer, gen):
    layer, lin = permuted_layer
    w = layer.weight
    assert w.perm is not None and w.row_perm is not None
    assert torch.equal(w.to_dense(), layer.weight_vnm.effective_dense())
    assert torch.equal(w.t().to_dense(), w.to_dense().T) and tuple(w.T.shape) == (48, 40)
    assert tuple(w.t().t().shape) == (40, 48) and not w.t().t().transposed
    x = torch.randn(2, 6, 48, generator=gen)
    ref = x @ w.to_dense().T + layer.bias
    assert torch.allclose(layer(x), ref, atol=1e-5)
    assert torch.allclose(torch.addmm(layer.bias, x.reshape(-1, 48), w.T), ref.reshape(-1, 40), atol=1e-5)
    assert torch.allclose(torch.mm(w, x.reshape(-1, 48).T), ref.reshape(-1, 40).T - layer.bias[:, None], atol=1e-5)
    # the pruned weights are where the dense layer's were, in the layer's own order
    mask = w.to_dense() != 0
    assert torch.equal(w.to_dense(), torch.where(mask, lin.weight.detach(), torch.zeros(())))


def test_an_ordinary_linear_with_a_vnm_weight_runs_the_sparse_product(permuted_layer, gen):
    layer, _ = permuted_layer
    plain = nn.Linear(48, 40)  # torchao's convention: the module stays nn.Linear, its weight multiplies
    plain.weight, plain.bias = layer.weight, layer.bias
    x = torch.randn(5, 48, generator=gen)
    assert torch.equal(plain(x), layer(x))


def test_gradients_through_the_weight_match_dense(permuted_layer, gen):
    layer, _ = permuted_layer
    dense = layer.to_linear()
    go = torch.randn(4, 40, generator=gen)
    for product in (lambda x: layer(x), lambda x: x @ layer.weight.t() + layer.bias):  # op and aten paths
        x = torch.randn(4, 48, generator=gen, requires_grad=True)
        x2 = x.detach().clone().requires_grad_()
        (product(x) * go).sum().backward()
        (dense(x2) * go).sum().backward()
        assert torch.allclose(x.grad, x2.grad, atol=1e-5)
        assert layer.weight.grad is None


def test_dtype_and_device_moves_convert_the_storage(permuted_layer, gen):
    layer, _ = permuted_layer
    x = torch.randn(3, 48, generator=gen)
    half = copy.deepcopy(layer).to(torch.bfloat16)
    assert half.weight.dtype == half.values.dtype == torch.bfloat16 and half.meta.dtype == torch.uint8
    assert half.weight.perm.dtype == torch.int32 and isinstance(half.weight, VNMWeight)
    assert torch.equal(half.weight.to_dense(), layer.weight.to_dense().bfloat16())
    assert half(x.bfloat16()).dtype == torch.bfloat16
    assert copy.deepcopy(layer).half().weight.dtype == torch.float16
    assert layer.weight.to("cpu", torch.float16).dtype == torch.float16
    with pytest.raises(TypeError, match="float32, float16 or bfloat16 values, not torch.float64"):
        copy.deepcopy(layer).double()
    with pytest.raises(TypeError, match=r"x is torch.float16 but the weight is torch.float32; cast x"):
        layer(x.half())


def test_copies_share_nothing_and_compute_the_same(permuted_layer, gen):
    layer, _ = permuted_layer
    x = torch.randn(3, 48, generator=gen)
    for other in (copy.deepcopy(layer), ):
        assert torch.equal(other(x), layer(x))
        assert other.weight.values.data_ptr() != layer.weight.values.data_ptr()
    c = layer.weight.clone()
    assert isinstance(c, VNMWeight) and c.values.data_ptr() != layer.weight.values.data_ptr()
    d = layer.weight.detach()
    assert isinstance(d, VNMWeight) and d.values.data_ptr() == layer.weight.values.data_ptr()


def test_anything_else_is_refused_with_a_pointer_to_to_dense(permuted_layer):
    w = permuted_layer[0].weight
    for op in (lambda: w + 1, lambda: w.sum(), lambda: w[0], lambda: w * w):
        with pytest.raises(NotImplementedError, match=r"weight.to_dense\(\)"):
            op()
    for op in (lambda: w.add_(1), lambda: w.copy_(torch.zeros(40, 48)), lambda: w.data.normal_()):
        with pytest.raises(NotImplementedError, match="cannot be changed in place.*vnm.train"):
            op()
    with pytest.raises(NotImplementedError, match="re-initialising"):
        permuted_layer[0].reset_parameters()
    assert "VNMWeight(shape=(40, 48), pattern='16:2:8'" in repr(w)  # printing never densifies


def test_state_dict_keeps_the_canonical_keys_and_round_trips(permuted_layer, gen):
    layer, _ = permuted_layer
    state = layer.state_dict()
    assert sorted(state) == ["bias", "columns", "meta", "perm", "row_perm", "values"]
    assert all(type(t) is torch.Tensor for t in state.values())
    fresh = VNMLinear(48, 40, "16:2:8", has_perm=True, has_row_perm=True)
    fresh.load_state_dict(state)
    x = torch.randn(3, 48, generator=gen)
    assert torch.equal(fresh(x), layer(x)) and isinstance(fresh.weight, VNMWeight)
    # strict loading names what is missing or extra; a corrupt array is refused with the layer's message
    plain = VNMLinear(48, 40, "16:2:8")
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"perm\", \"row_perm\""):
        plain.load_state_dict(state)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"meta\""):
        fresh.load_state_dict({k: v for k, v in state.items() if k != "meta"})
    bad = dict(state, columns=state["columns"].flip(-1).contiguous())
    with pytest.raises(RuntimeError, match="must be 4 ascending offsets"):
        fresh.load_state_dict(bad)
    # non-strict loading of nothing changes nothing
    before = fresh(x)
    fresh.load_state_dict({}, strict=False)
    assert torch.equal(fresh(x), before)


def test_save_load_keeps_the_file_format_and_gives_vnm_weights(tmp_path):
    from safetensors import safe_open

    dense, inputs = tiny_llama()
    vnm.sparsify(dense, SparsifyConfig(pattern="16:2:8", permute="all", permute_time_budget=None,
                                       permute_max_rounds=2, progress=False))
    path = vnm.save(dense, tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    name = "model.layers.0.mlp.down_proj"
    assert {f"{name}.values", f"{name}.meta", f"{name}.columns"} <= keys and f"{name}.weight" not in keys
    loaded = vnm.load(path, tiny_llama()[0])
    assert isinstance(loaded.get_submodule(name).weight, VNMWeight)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, dense(**inputs).logits)


def test_a_sparse_layer_is_not_pruned_again():
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    vnm.sparsify(model, SparsifyConfig(pattern="16:2:8", progress=False))
    assert not vnm.layers.is_prunable(model[0]) and vnm.layers.is_sparse(model[0])
    with pytest.raises(ValueError, match="already sparsified"):
        vnm.sparsify(model, SparsifyConfig(pattern="16:2:8", progress=False))
    with pytest.raises(TypeError, match=r"already sparse .*weight.to_dense\(\)"):
        vnm.weight_matrix(model[0])


def test_training_merge_produces_vnm_weights(gen):
    import vnm.train as vt

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    vt.prepare_srste(model, "16:2:8")
    vt.merge(model)
    for m in (model[0], model[2]):
        assert isinstance(m, VNMLinear) and isinstance(m.weight, VNMWeight)
    x = torch.randn(4, 32, generator=gen)
    assert model(x).shape == (4, 32)


def test_accelerate_can_rebuild_the_parameter(permuted_layer, gen):
    """accelerate moves a parameter by rebuilding it through its class (set_module_tensor_to_device)."""
    from accelerate.utils import set_module_tensor_to_device

    layer, _ = permuted_layer
    x = torch.randn(3, 48, generator=gen)
    before = layer(x)
    set_module_tensor_to_device(layer, "weight", "cpu", value=layer.weight.clone())
    assert isinstance(layer.weight, VNMWeight) and isinstance(layer.weight, nn.Parameter)
    assert torch.equal(layer(x), before)
    with pytest.raises(TypeError, match="not from a dense Tensor"):
        VNMWeight(torch.zeros(40, 48))
    with pytest.raises(ValueError, match="frozen"):
        VNMWeight(layer.weight, requires_grad=True)
