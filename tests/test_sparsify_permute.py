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
from _util import unpermuted_masked_copy
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
    for edge in find_edges(dense, inputs):  # the edges of the dense model, from its computation
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


# ---- edges proven from the computation: norms between layers, packed GLUs, refusals -----------


class _Block(nn.Module):
    """A pre-norm transformer block in BEiT-3's style: a LayerNorm between the heads and the output
    projection (sub-LN) and one between fc1 and fc2. ``mlp``: 'norm' (fc1 -> GELU -> LayerNorm ->
    fc2), 'glu' (a packed [gate; up] fc1, SiLU(gate) * up, as timm's SwiGLUPacked and Moonshine's
    decoder name it mlp.fc1 / mlp.fc2), 'interleaved' (gate and up interleaved in fc1's rows) or
    'group-norm' (a norm over each half of the hidden features separately)."""

    def __init__(self, dim=64, heads=4, hidden=128, mlp="norm"):
        super().__init__()
        self.heads, self.kind = heads, mlp
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.inner_attn_ln = nn.LayerNorm(dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, 2 * hidden if mlp in ("glu", "interleaved") else hidden)
        self.mlp.ffn_ln = nn.LayerNorm(hidden // 2 if mlp == "group-norm" else hidden)
        self.mlp.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.attn.qkv(self.norm1(x)).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        x = x + self.attn.proj(self.attn.inner_attn_ln(a))
        h = self.mlp.fc1(self.norm2(x))
        if self.kind == "glu":
            gate, up = h.chunk(2, dim=-1)
            h = torch.nn.functional.silu(gate) * up
        elif self.kind == "interleaved":
            h = torch.nn.functional.silu(h[..., 0::2]) * h[..., 1::2]
        else:
            h = torch.nn.functional.gelu(h)
        if self.kind == "group-norm":
            h = self.mlp.ffn_ln(h.unflatten(-1, (2, -1))).flatten(-2)
        else:
            h = self.mlp.ffn_ln(h)
        return x + self.mlp.fc2(h)


class _Net(nn.Module):
    def __init__(self, mlp="norm"):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.Sequential(_Block(mlp=mlp), _Block(mlp=mlp))
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.blocks(x).mean(1))


def _net(mlp="norm"):
    from _families import randomise_norms_and_scales_

    net = _Net(mlp).eval()
    randomise_norms_and_scales_(net)  # norms at their initial 1 and 0 would hide a forgotten norm
    return net, torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(5))


def _sparsify_net(net, x, pattern="16:2:8", permute="free"):
    sparse = copy.deepcopy(net)
    report = vnm.sparsify(sparse, SparsifyConfig(pattern=pattern, permute=permute, permute_time_budget=None,
                                                 permute_max_rounds=3, example_inputs=x, progress=False))
    with torch.no_grad():
        assert torch.allclose(sparse(x), unpermuted_masked_copy(net, sparse, report)(x), rtol=1e-4, atol=1e-5)
    return report


@pytest.mark.parametrize("permute", ["free", "all"])
def test_beit3_norms_between_layers_are_permuted_with_the_features(permute):
    """A LayerNorm between fc1 and fc2, and one between the heads and the output projection,
    normalise over all the permuted features: permuting their weight and bias along is exact."""
    net, x = _net("norm")
    report = _sparsify_net(net, x, permute=permute)
    for b in ("blocks.0.", "blocks.1."):
        assert report[b + "mlp.fc1"].permutation.startswith("rows absorbed")
        assert "cols absorbed" in report[b + "mlp.fc2"].permutation
        assert report[b + "attn.qkv"].permutation.startswith("rows absorbed")
        assert "cols absorbed" in report[b + "attn.proj"].permutation
        for norm in ("mlp.ffn_ln", "attn.inner_attn_ln"):
            for p in ("weight", "bias"):
                assert report.permuted_parameters[b + norm + "." + p] in (b + "mlp.fc2", b + "attn.proj")


def test_a_norm_left_unpermuted_would_show():
    """The check the tests rely on: with random affine parameters, the same edges without the
    norms' parameters permuted change the output by far more than the tolerance."""
    from vnm.graph import edges_from_trace, trace_model
    from vnm.sparsify import _apply_edge_, _random_edge_perm

    net, x = _net("norm")
    with torch.no_grad():
        y = net(x)
    edges, _ = edges_from_trace(trace_model(net, x))
    mlp = next(e for e in edges if e.consumer == "blocks.0.mlp.fc2")
    assert [p.name for p in mlp.params] == ["blocks.0.mlp.ffn_ln.weight", "blocks.0.mlp.ffn_ln.bias"]
    mlp.params = []
    _apply_edge_(net, mlp, _random_edge_perm(net, mlp, torch.Generator().manual_seed(0)))
    with torch.no_grad():
        assert (net(x) - y).abs().max() > 1e-2 * y.abs().max()


@pytest.mark.parametrize("pattern", ["16:2:8", "2:4"])
def test_packed_glu_permutes_both_halves_alike(pattern):
    """fc1 emits [gate; up] and the MLP multiplies feature k of one half with feature k of the
    other: the edge permutes both halves of fc1's rows by the same permutation."""
    from vnm.graph import MlpEdge, edges_from_trace, trace_model

    net, x = _net("glu")
    edges, _ = edges_from_trace(trace_model(net, x))
    fc = next(e for e in edges if e.consumer == "blocks.0.mlp.fc2")
    assert isinstance(fc, MlpEdge) and fc.packed and fc.producers == ["blocks.0.mlp.fc1"]
    report = _sparsify_net(net, x, pattern=pattern)
    rows = report["blocks.0.mlp.fc1"].row_perm
    assert rows is not None and torch.equal(rows[128:], rows[:128] + 128)  # the same permutation of each half
    assert "cols absorbed" in report["blocks.0.mlp.fc2"].permutation


@pytest.mark.parametrize("mlp, why", [
    ("interleaved", "the producer's two halves are not paired feature by feature"),
    ("group-norm", "a reduction (a norm, a softmax, a mean) covers part of the permuted features only"),
])
def test_edges_that_are_not_elementwise_per_feature_are_refused_by_name(mlp, why):
    net, x = _net(mlp)
    report = _sparsify_net(net, x)
    for b in ("blocks.0.", "blocks.1."):
        refused = [r for r in report.refused_edges if r.startswith(f"{b}mlp.fc1 -> {b}mlp.fc2: ")]
        assert refused and why in refused[0], report.refused_edges
        assert report[b + "mlp.fc1"].permutation in (None, "rows scattered")  # nothing absorbed
        assert "cols absorbed" not in (report[b + "mlp.fc2"].permutation or "")
        assert "cols absorbed" in report[b + "attn.proj"].permutation  # the heads edge still holds


def test_an_edge_that_changes_the_output_is_refused_by_the_check_that_runs_the_model(monkeypatch):
    """Every edge is run once with a random permutation before any search: an edge that the trace
    got wrong (here: forged by dropping the norms' parameters) is refused, named, and not used."""
    import sys

    sp = sys.modules["vnm.sparsify"]  # the module (vnm.sparsify is also the function)
    real = sp.edges_from_trace

    def forged(trace):
        edges, refused = real(trace)
        for e in edges:
            e.params = []
        return edges, refused

    monkeypatch.setattr(sp, "edges_from_trace", forged)
    net, x = _net("norm")
    report = _sparsify_net(net, x)
    msg = "a random permutation along it changed the model's outputs"
    for b in ("blocks.0.", "blocks.1."):
        assert f"{b}mlp.fc1 -> {b}mlp.fc2: {msg}" in report.refused_edges
        assert f"{b}attn.qkv -> {b}attn.proj: {msg}" in report.refused_edges
    assert not report.permuted_parameters
    assert not any("absorbed" in (r.permutation or "") for r in report.layers)


def test_layers_left_dense_that_absorb_a_permutation_are_listed():
    """A producer excluded by filter_fn stays dense but absorbs its edge's row permutation in
    place: the report lists it, skipped and permuted."""
    dense, inputs = tiny_llama()
    sparse = copy.deepcopy(dense)
    report = vnm.sparsify(sparse, SparsifyConfig(pattern="16:2:8", permute="free", permute_time_budget=None,
                                                 permute_max_rounds=3, example_inputs=inputs, progress=False),
                          filter_fn=lambda m, name: not name.endswith("up_proj"))
    up = report["model.layers.0.mlp.up_proj"]
    assert up.skipped == "excluded by filter_fn" and up.permutation == "rows absorbed"
    assert isinstance(sparse.model.layers[0].mlp.up_proj, nn.Linear)
    assert up in report.permuted and "model.layers.0.mlp.up_proj" in [r.name for r in report.skipped]
    assert "up_proj" in str(report)
    with torch.no_grad():
        assert torch.allclose(output_tensor(sparse(**inputs)),
                              output_tensor(unpermuted_masked_copy(dense, sparse, report)(**inputs)), atol=1e-4)
