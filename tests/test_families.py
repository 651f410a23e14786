"""The family matrix: 16 transformers families (tiny configs, random weights, every norm and scale
given random affine parameters) sparsified at 64:2:8 and 2:4, with and without permutations. Each
sparse model computes what the unpermuted dense model with the same masked weights computes,
saves and loads back bit for bit (CLIP's 0-dim logit scale included), and, for causal LMs,
generates the same tokens. Permutation edges are found from the traced computation on every
family (MLP, gated MLP, packed gate/up, heads with GQA, fused QKV). timm's ViT and a BEiT-3-style
block are in test_timm.py (CI's timm environment) and test_sparsify_permute.py.

About 5 minutes on 2 loaded cores; the 2:4 half is marked slow (``-m "not slow"`` runs 64:2:8 only).
T5's feed-forward reads ``self.wo.weight.dtype``: it runs because a sparse layer's ``weight`` is a
:class:`vnm.VNMWeight` (docs/sparse_weight.md)."""

import copy

import pytest
import torch

import vnm
from vnm import SparsifyConfig, VNMLinear
from vnm.graph import output_tensors
from _util import unpermuted_masked_copy
from _families import CAUSAL, FAMILIES, randomise_norms_and_scales_

# Output heads each family must leave dense, and why: matched by name, tied to an embedding, or
# found from the traced computation (their output is a model output).
HEADS = {
    "bert": {"pooler.dense": "output head"},
    "roberta": {"pooler.dense": "output head"},
    "gpt2": {"lm_head": "output head"},
    "llama-gqa": {"lm_head": "output head"},
    "opt": {"lm_head": "output head"},
    "vit": {"classifier": "output head"},
    "deit": {"classifier": "output head"},
    "clip": {"text_projection": "output head (its output is a model output)",
             "visual_projection": "output head (its output is a model output)"},
    "whisper": {"proj_out": "weight tied to model.decoder.embed_tokens.weight"},
}

def _family_params():
    return sorted(FAMILIES)


def outputs(model, inputs):
    with torch.no_grad():
        return [t for t in output_tensors(model(**inputs)) if t.dtype.is_floating_point]



def assert_close(ys, refs):
    assert len(ys) == len(refs)
    for y, ref in zip(ys, refs):
        scale = float(ref.abs().max())
        assert torch.allclose(y, ref, rtol=1e-4, atol=1e-4 * scale), float((y - ref).abs().max())


@pytest.mark.parametrize("permute", [False, "all"])
@pytest.mark.parametrize("pattern", ["64:2:8", pytest.param("2:4", marks=pytest.mark.slow)])
@pytest.mark.parametrize("family", _family_params())
def test_family(family, pattern, permute, tmp_path):
    build = FAMILIES[family]
    dense, inputs = build()
    assert randomise_norms_and_scales_(dense) > 0
    sparse = copy.deepcopy(dense)
    report = vnm.sparsify(sparse, SparsifyConfig(pattern=pattern, permute=permute, permute_time_budget=None,
                                                 permute_max_rounds=2, example_inputs=inputs, progress=False))
    assert len(report.sparse) >= 8, [str(r) for r in report.skipped]
    for name, why in HEADS.get(family, {}).items():
        assert report[name].skipped is not None and report[name].skipped.startswith(why), report[name].skipped
        assert not isinstance(sparse.get_submodule(name), VNMLinear)
    if permute:
        kinds = " ".join(r.permutation or "" for r in report.layers)
        # the edges of every family are found from its computation: MLP (or gated / packed MLP) and heads
        assert "rows absorbed" in kinds and "cols absorbed" in kinds and "cols gathered" in kinds, kinds
        if pattern == "2:4":  # every row keeps its own best values: the row order changes nothing
            assert "rows scattered" not in kinds

    y = outputs(sparse, inputs)
    assert_close(y, outputs(unpermuted_masked_copy(dense, sparse, report), inputs))

    path = vnm.save(sparse, tmp_path / "m.safetensors")
    fresh, _ = build()
    loaded = vnm.load(path, fresh)
    for a, b in zip(outputs(loaded, inputs), y):
        assert torch.equal(a, b)

    if family in CAUSAL:
        ids = inputs["input_ids"][:1, :5]
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            tokens = sparse.generate(ids, **kw)
            assert torch.equal(tokens, unpermuted_masked_copy(dense, sparse, report).generate(ids, **kw))
            assert torch.equal(tokens, loaded.generate(ids, **kw))


def test_every_family_finds_its_edges_from_the_computation():
    """Which edges the traced forward pass proves, per family: heads edges carry the attention's
    geometry (grouped-query attention, fused QKV), MLP edges their producers (gated, packed)."""
    from vnm.graph import HeadsEdge, MlpEdge, edges_from_trace, trace_model

    seen = {}
    for family, build in FAMILIES.items():
        model, inputs = build()
        edges, _ = edges_from_trace(trace_model(model, inputs))
        heads = [e for e in edges if isinstance(e, HeadsEdge)]
        mlps = [e for e in edges if isinstance(e, MlpEdge)]
        seen[family] = (len(heads), len(mlps), heads[0], mlps[0])
    # one heads edge per attention (Whisper and T5 decoders: self and cross attention) and one MLP edge per block
    assert {f: s[:2] for f, s in seen.items()} == {
        "bert": (2, 2), "roberta": (2, 2), "distilbert": (2, 2), "gpt2": (2, 2), "llama-gqa": (2, 2),
        "mistral": (2, 2), "qwen2": (2, 2), "opt": (2, 2), "phi": (2, 2), "phi3": (2, 2), "t5": (6, 4),
        "vit": (2, 2), "deit": (2, 2), "swin": (2, 2), "clip": (4, 4), "whisper": (6, 4)}
    for family in ("llama-gqa", "mistral", "qwen2", "phi3"):  # 4 query heads share 2 value heads
        h = seen[family][2]
        assert (h.num_heads, h.num_kv_heads, h.head_dim) == (4, 2, 16), family
    gpt2 = seen["gpt2"][2]
    assert gpt2.producer.endswith("attn.c_attn") and gpt2.value_rows == (128, 192)  # the last third
    phi3 = seen["phi3"]
    assert phi3[2].producer.endswith("qkv_proj") and phi3[2].value_rows == (96, 128)  # q 64, k 32, v 32
    assert phi3[3].packed and phi3[3].producers == ["model.layers.0.mlp.gate_up_proj"]
    assert seen["llama-gqa"][3].producers == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    assert seen["t5"][3].producers == ["encoder.block.0.layer.1.DenseReluDense.wi_0",
                                       "encoder.block.0.layer.1.DenseReluDense.wi_1"]


def test_tied_weights_stay_dense_whatever_their_name():
    """GPT-2's lm_head is tied to the token embedding: without the default skip names it is still
    left dense (found from the shared Parameter), the report says so, and the tie holds."""
    model, inputs = FAMILIES["gpt2"]()
    report = vnm.sparsify(model, SparsifyConfig(pattern="64:2:8", skip=(), example_inputs=inputs, progress=False))
    assert report["lm_head"].skipped.startswith("weight tied to transformer.wte.weight")
    assert model.lm_head.weight is model.transformer.wte.weight
    model, _ = FAMILIES["gpt2"]()
    report = vnm.sparsify(model, SparsifyConfig(pattern="2:4", skip=(), skip_heads=False, progress=False))
    assert "lm_head" in {r.name for r in report.sparse}  # asked for explicitly


def test_layer_predicates_take_module_then_name_everywhere():
    """sparsify's filter_fn and calibrate's layers take (module, name), as torchao's filter_fn."""
    model, inputs = FAMILIES["llama-gqa"]()
    calls = []

    def only_mlp(module, name):
        calls.append((type(module).__name__, name))
        return ".mlp." in name

    stats = vnm.calibrate(model, [inputs], layers=only_mlp, entropy_bins=None, progress=False)
    assert sorted(stats) == sorted(n for n, _ in vnm.prunable_layers(model).items() if ".mlp." in n)
    assert calls and all(kind == "Linear" for kind, _ in calls)
    report = vnm.sparsify(model, SparsifyConfig(pattern="2:4", example_inputs=inputs, progress=False),
                          filter_fn=only_mlp)
    assert sorted(r.name for r in report.sparse) == sorted(stats)


def test_the_padding_message_suggests_what_helps():
    from torch import nn

    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(6, 8), nn.Linear(68, 64), nn.Linear(64, 40))
    report = vnm.sparsify(model, SparsifyConfig(pattern="2:4", progress=False))
    assert report["1"].skipped == "shape 8x6 pads to 16x8 under 2:4 (over 25% padding); too small for 2:4 storage; it stays dense"
    report = vnm.sparsify(nn.Sequential(nn.Linear(64, 64), nn.Linear(9, 64), nn.Linear(64, 40)),
                          SparsifyConfig(pattern="64:2:8", progress=False))
    assert report["1"].skipped.endswith("a pattern with a smaller M pads less")  # 9 columns pad to 16
    assert report["2"].skipped.endswith("a pattern with a smaller V pads less")  # 40 rows pad to 64


def test_zero_dim_parameters_and_buffers_save_and_load(tmp_path):
    from torch import nn

    model = nn.Sequential(nn.Linear(64, 64))
    model.scale = nn.Parameter(torch.tensor(2.5))
    model.register_buffer("step", torch.tensor(7))
    vnm.sparsify(model, SparsifyConfig(pattern="2:4", progress=False))
    fresh = nn.Sequential(nn.Linear(64, 64))
    fresh.scale = nn.Parameter(torch.tensor(0.0))
    fresh.register_buffer("step", torch.tensor(0))
    loaded = vnm.load(vnm.save(model, tmp_path / "z.safetensors"), fresh)
    assert loaded.scale.shape == () and float(loaded.scale.detach()) == 2.5 and int(loaded.step) == 7
