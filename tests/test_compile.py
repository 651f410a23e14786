"""torch.compile(fullgraph=True) over sparsified transformer blocks on the CPU: no graph break
(fullgraph fails on one) and the eager result (float32, 1e-5). See docs/sparse_weight.md."""

import pytest
import torch
import torch.nn.functional as F

import vnm
from vnm import SparsifyConfig, VNMWeight
from _models import tiny_llama, tiny_vit

TOL = 1e-5  # float32: the compiled graph calls the same vnm::spmm op; only element-wise work is fused


def first(out):
    return out[0] if isinstance(out, tuple) else out


def compiled_matches_eager(block, *args, **kwargs):
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(block)(*args, **kwargs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(block, fullgraph=True)
    with torch.no_grad():
        eager, got = first(block(*args, **kwargs)), first(compiled(*args, **kwargs))
    assert (got - eager).abs().max().item() <= TOL
    return compiled


@pytest.mark.slow
def test_llama_block_with_permutations_compiles_fullgraph():
    model, _ = tiny_llama()
    report = vnm.sparsify(model, SparsifyConfig(pattern="16:2:8", permute="all", permute_time_budget=None,
                                                permute_max_rounds=2, progress=False))
    block = model.model.layers[0]
    names = [r for r in report.sparse if r.name.startswith("model.layers.0.")]
    # all seven linears (at V = 64 the 32 x 64 k and v of GQA would stay dense), rows scattered
    # and columns gathered among them
    assert len(names) == 7 and any(r.row_scattered for r in names) and any(r.col_gathered for r in names)
    h = torch.randn(2, 11, 64)
    pos = torch.arange(11).unsqueeze(0).expand(2, -1)
    cos_sin = model.model.rotary_emb(h, pos)
    compiled_matches_eager(block, h, position_embeddings=cos_sin, attention_mask=None)


@pytest.mark.slow
def test_vit_block_compiles_fullgraph_forward_and_backward():
    model, _ = tiny_vit()
    vnm.sparsify(model, SparsifyConfig(pattern="2:4", progress=False))
    block = model.vit.layers[0]
    x = torch.randn(2, 17, 64)
    compiled = compiled_matches_eager(block, x)
    # gradients with respect to the input (the sparse weights are frozen) through the compiled graph
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    first(compiled(xa)).square().sum().backward()
    first(block(xb)).square().sum().backward()
    assert torch.allclose(xa.grad, xb.grad, atol=TOL)


@pytest.mark.slow
def test_the_weight_alone_compiles_through_f_linear_matmul_and_addmm(gen):
    layer = vnm.VNMLinear.from_linear(torch.nn.Linear(48, 40), pattern="16:2:8",
                                      perm=torch.randperm(48, generator=gen), row_perm=torch.randperm(40, generator=gen))
    w, b = layer.weight, layer.bias
    x = torch.randn(3, 5, 48, generator=gen)
    for fn in (lambda x: F.linear(x, w, b) * 2,                     # __torch_function__
               lambda x: torch.relu(x @ w.t() + 1),                  # aten.t + aten.mm
               lambda x: torch.addmm(b, x.reshape(-1, 48), w.T)):    # aten.addmm
        torch._dynamo.reset()
        assert (torch.compile(fn, fullgraph=True)(x) - fn(x)).abs().max().item() <= TOL


def test_opcheck_to_dense_op(gen):
    w = torch.randn(40, 24, generator=gen)
    t = vnm.VNMTensor.from_dense(w, vnm.select_mask(w.abs(), "16:2:8"), "16:2:8")
    torch.library.opcheck(torch.ops.vnm.to_dense.default, (t.values, t.meta, t.columns, "16:2:8", 40, 24))


def test_flatten_round_trip_is_the_same_weight(gen):
    layer = vnm.VNMLinear.from_linear(torch.nn.Linear(48, 40), pattern="16:2:8",
                                      row_perm=torch.randperm(40, generator=gen))
    w = layer.weight
    names, ctx = w.__tensor_flatten__()
    assert names == ["values", "meta", "columns", "row_perm"]  # no perm, no packed arrays on the CPU
    back = VNMWeight.__tensor_unflatten__({n: getattr(w, n) for n in names}, ctx, w.shape, w.stride())
    assert torch.equal(back.to_dense(), w.to_dense()) and back.shape == w.shape and back.dtype == w.dtype
