"""Permutations inside vnm.sparsify: free ones (absorbed by the neighbouring layer, or rows
scattered back where the output is written) and gathered ones change nothing but which weights
the mask keeps."""

import copy

import pytest
import torch
from torch import nn

import vnm
from vnm import SparsifyConfig, VNMLinear
from vnm.graph import HeadsEdge, find_edges
from vnm.layers import weight_matrix
from vnm.sparsify import original_order_weight
from _models import output_tensor, tiny_bert, tiny_gpt2, tiny_llama, tiny_vit

FAMILIES = {
    "llama": (tiny_llama, "16:2:8"),  # grouped-query attention: 2 value heads for 4 query heads
    "gpt2": (tiny_gpt2, "16:2:8"),  # fused c_attn (Conv1D): the values are its last third
    "bert": (tiny_bert, "16:2:4"),
    "vit": (lambda: tiny_vit("vit"), "16:2:5"),
    "deit": (lambda: tiny_vit("deit"), "32:2:8"),
}


def calibration(inputs, n=4):
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        b = {}
        for k, v in inputs.items():
            b[k] = torch.randint(0, int(v.max()) + 1, v.shape, generator=g) if v.dtype == torch.long else torch.randn(v.shape, generator=g)
        out.append(b)
    return out


def unpermuted_masked_copy(dense, sparse, report):
    ref = copy.deepcopy(dense)
    for r in report.sparse:
        with torch.no_grad():
            weight_matrix(ref.get_submodule(r.name)).copy_(original_order_weight(sparse.get_submodule(r.name), r))
    return ref


@pytest.mark.parametrize("mode", ["free", "all"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_permuted_model_equals_unpermuted_model_with_the_same_masks(family, mode):
    build, pattern = FAMILIES[family]
    dense, inputs = build()
    sparse = copy.deepcopy(dense)
    report = vnm.sparsify(sparse, SparsifyConfig(pattern=pattern, score="wanda", calibration=calibration(inputs),
                                                 permute=mode, permute_time_budget=0.2, progress=False))
    permuted = [r for r in report.sparse if r.permutation]
    assert permuted, "the search found nothing to improve on random weights"
    kinds = " ".join(r.permutation for r in permuted)
    assert "rows absorbed" in kinds and "cols absorbed" in kinds
    assert ("cols gathered" in kinds) == (mode == "all")
    # every V:N:M pattern with M > 4 has rows worth regrouping outside the edges (2:4 has none)
    assert ("rows scattered" in kinds) == (vnm.Pattern.parse(pattern).M > 4)
    # A permutation is kept only if it raises the kept score: of the layer for gathered and attention
    # permutations, of the whole MLP edge (producers and consumer share one permutation).
    by_name = {r.name: r for r in report.sparse}
    for edge in find_edges(sparse):
        names = [n for n in getattr(edge, "producers", []) + [edge.consumer] if n in by_name]
        if isinstance(edge, HeadsEdge):
            names = [edge.consumer] if edge.consumer in by_name else []
        kept = sum(by_name[n].kept_importance * by_name[n].score_total for n in names)
        ident = sum(by_name[n].kept_importance_identity * by_name[n].score_total for n in names)
        assert kept >= ident * (1 - 1e-9), edge
    for r in report.sparse:
        if r.col_gathered or (r.row_scattered and r.col_perm is None):
            assert r.kept_importance > r.kept_importance_identity
        layer = sparse.get_submodule(r.name)
        assert (layer.row_perm is not None) == r.row_scattered  # the scatter is in the layer
        assert (layer.perm is not None) == r.col_gathered
    with torch.no_grad():
        y = output_tensor(sparse(**inputs))
        y_ref = output_tensor(unpermuted_masked_copy(dense, sparse, report)(**inputs))
    assert torch.allclose(y, y_ref, rtol=1e-4, atol=1e-4), (y - y_ref).abs().max()


def test_gathered_permutation_is_stored_in_the_layer(tmp_path):
    dense, inputs = tiny_llama()
    sparse = copy.deepcopy(dense)
    report = vnm.sparsify(sparse, SparsifyConfig(pattern="16:2:8", score="magnitude", permute="all",
                                                 permute_time_budget=0.2, progress=False))
    gathered = [r for r in report.sparse if r.col_gathered]
    assert gathered and any(r.row_scattered for r in report.sparse)
    layer = sparse.get_submodule(gathered[0].name)
    assert isinstance(layer, VNMLinear) and torch.equal(layer.perm.long(), gathered[0].col_perm)
    # a saved permuted model (gathered columns, scattered rows) loads back with identical outputs
    loaded = vnm.load(vnm.save(sparse, tmp_path / "p.safetensors"), tiny_llama()[0])
    with torch.no_grad():
        assert torch.equal(output_tensor(loaded(**inputs)), output_tensor(sparse(**inputs)))


def test_permutation_raises_total_kept_importance_on_minilm_layers():
    from vnm.models import load_minilm

    model, _ = load_minilm()
    report = vnm.sparsify(model, SparsifyConfig(pattern="64:2:8", permute="free", permute_time_budget=0.3,
                                                progress=False),
                          filter_fn=lambda m, name: name.startswith("encoder.layer.0."))
    by = {r.name: r for r in report.sparse}
    p = "encoder.layer.0."
    # edges: value rows -> output-projection columns, intermediate rows -> output columns
    assert "cols absorbed" in by[p + "attention.output.dense"].permutation
    assert by[p + "attention.self.value"].permutation == "rows absorbed"
    assert "cols absorbed" in by[p + "output.dense"].permutation
    assert by[p + "intermediate.dense"].permutation == "rows absorbed"
    # the layers writing to the residual stream (and queries, keys) get their rows scattered back
    for name in ("attention.self.query", "attention.self.key", "attention.output.dense", "output.dense"):
        r = by[p + name]
        assert "rows scattered" in r.permutation and "gathered" not in r.permutation, name
        assert r.kept_importance > r.kept_importance_identity, name
    o = by[p + "attention.output.dense"]
    assert o.kept_importance > o.kept_importance_identity
    mlp = [by[p + "output.dense"], by[p + "intermediate.dense"]]
    assert sum(r.kept_importance * r.score_total for r in mlp) > sum(r.kept_importance_identity * r.score_total for r in mlp)


def test_round_limited_search_is_reproducible():
    """With permute_max_rounds (and a time budget it never reaches) sparsify picks the same
    permutations on every run, whatever the machine's load."""
    dense, inputs = tiny_llama()
    cfg = SparsifyConfig(pattern="16:2:8", permute="all", permute_time_budget=None, permute_max_rounds=3,
                         progress=False)
    reports = []
    for _ in range(2):
        reports.append(vnm.sparsify(copy.deepcopy(dense), cfg))
    for a, b in zip(reports[0].sparse, reports[1].sparse):
        for name in ("row_perm", "col_perm"):
            pa, pb = getattr(a, name), getattr(b, name)
            assert (pa is None) == (pb is None) and (pa is None or torch.equal(pa, pb)), (a.name, name)


def test_bad_permute_value():
    with pytest.raises(ValueError, match="permute must be False, 'free', True or 'all'"):
        vnm.sparsify(nn.Sequential(nn.Linear(64, 64)), SparsifyConfig(permute="some", progress=False))
