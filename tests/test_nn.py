import pytest
import torch
from torch import nn

import vnm
from vnm import VNMLinear


def test_from_linear_matches_masked_dense(gen):
    lin = nn.Linear(96, 80)
    mask = vnm.select_mask(torch.rand(80, 96, generator=gen), "16:2:8")
    layer = VNMLinear.from_linear(lin, mask, "16:2:8")
    x = torch.randn(4, 7, 96, generator=gen)
    expected = x @ (lin.weight * mask).T + lin.bias
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert torch.equal(layer.dense_weight(), torch.where(mask, lin.weight.detach(), torch.zeros(())))
    # only compressed storage is held: the weight parameter is a VNMWeight (its numel is the logical
    # 80 x 96) whose inner tensors, like every state dict entry, are all smaller than the dense weight
    assert isinstance(layer.weight, vnm.VNMWeight) and isinstance(layer, nn.Linear)
    inner = [getattr(layer.weight, n) for n in layer.weight.__tensor_flatten__()[0]]
    assert all(type(t) is torch.Tensor for t in inner)
    assert not any(t.numel() >= 80 * 96 for t in inner + list(layer.state_dict().values()) + list(layer.buffers()))


def test_from_linear_with_perm_computes_the_same_function(gen):
    lin = nn.Linear(64, 32, bias=False)
    perm = torch.randperm(64, generator=gen)
    mask_p = vnm.select_mask(lin.weight.detach()[:, perm].abs(), "16:2:8")  # mask of W[:, perm]
    layer = VNMLinear.from_linear(lin, mask_p, "16:2:8", perm=perm)
    mask = torch.zeros_like(mask_p)
    mask[:, perm] = mask_p  # the same mask in the original column order
    x = torch.randn(5, 64, generator=gen)
    assert torch.allclose(layer(x), x @ (lin.weight * mask).T, atol=1e-5)
    back = layer.to_linear()
    assert torch.allclose(back(x), layer(x), atol=1e-5)


def test_from_linear_with_row_perm_computes_the_same_function_and_round_trips(gen):
    lin = nn.Linear(64, 48)
    rows = torch.randperm(48, generator=gen)
    perm = torch.randperm(64, generator=gen)
    stored = lin.weight.detach()[rows][:, perm]
    mask_s = vnm.select_mask(stored.abs(), "16:2:8")  # a mask of the stored matrix
    layer = VNMLinear.from_linear(lin, mask_s, "16:2:8", perm=perm, row_perm=rows)
    mask = torch.zeros_like(mask_s)
    mask[rows.view(-1, 1), perm.view(1, -1)] = mask_s  # the same mask in the layer's order
    x = torch.randn(5, 64, generator=gen)
    assert torch.allclose(layer(x), x @ (lin.weight * mask).T + lin.bias, atol=1e-5)
    assert torch.allclose(layer.to_linear()(x), layer(x), atol=1e-5)
    assert "row_perm=True" in repr(layer)
    fresh = VNMLinear(64, 48, "16:2:8", has_perm=True, has_row_perm=True)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), layer(x))


def test_default_mask_keeps_most_magnitude():
    lin = nn.Linear(32, 16)
    layer = VNMLinear.from_linear(lin, pattern="2:4")
    expected = vnm.select_mask(lin.weight.detach().abs(), "2:4")
    assert torch.equal(layer.weight_vnm.mask(), expected)


def test_conv1d_is_transposed_correctly(gen):
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(48, 32)  # nf=48 outputs, nx=32 inputs, weight (32, 48)
    nn.init.normal_(conv.weight)
    layer = VNMLinear.from_linear(conv, pattern="16:2:4")
    x = torch.randn(3, 32, generator=gen)
    assert torch.allclose(layer(x), x @ layer.dense_weight().T + conv.bias, atol=1e-5)


def test_state_dict_round_trip_and_dtype_moves(gen):
    lin = nn.Linear(40, 48)
    layer = VNMLinear.from_linear(lin, pattern="16:2:5")
    fresh = VNMLinear(40, 48, "16:2:5")
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(2, 40, generator=gen)
    assert torch.equal(fresh(x), layer(x))
    half = layer.to(torch.bfloat16)
    assert half.values.dtype == torch.bfloat16 and half.meta.dtype == torch.uint8
    assert half(x.bfloat16()).dtype == torch.bfloat16


def test_extra_repr_shows_pattern_and_sparsity():
    text = repr(VNMLinear.from_linear(nn.Linear(64, 64), pattern="64:2:8"))
    assert "pattern=64:2:8" in text and "sparsity=0.750" in text


def test_wrong_input_gets_a_clear_error():
    layer = VNMLinear.from_linear(nn.Linear(32, 16), pattern="16:2:8")
    with pytest.raises(ValueError, match="last dimension must be K=32"):
        layer(torch.randn(2, 31))
    with pytest.raises(TypeError, match="cast x"):
        layer(torch.randn(2, 32).half())
    with pytest.raises(TypeError, match="nn.Linear or transformers Conv1D"):
        VNMLinear.from_linear(nn.Conv2d(3, 3, 1), pattern="2:4")


@pytest.mark.slow
def test_compiles_fullgraph(gen):
    model = nn.Sequential(VNMLinear.from_linear(nn.Linear(64, 128), pattern="64:2:8"), nn.GELU(),
                          VNMLinear.from_linear(nn.Linear(128, 64), pattern="16:2:5"))
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(3, 5, 64, generator=gen)
    assert torch.allclose(compiled(x), model(x), atol=1e-6)
