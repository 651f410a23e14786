"""timm ViT / DeiT: sparsified, matches the masked dense model, saves and loads back; permuted
BEiT-3 (LayerNorms between the heads and out_proj and between fc1 and fc2) and a ViT with
SwiGLUPacked MLPs (fc1 emits [gate; up]) compute what the unpermuted model with the same masks
computes, with every norm and scale given random affine parameters.

timm needs torchvision, which imports only beside a matching torch; .ci/run runs this file in a
second environment (torch 2.14.1 + torchvision 0.29.1) where it is installed. Elsewhere it skips.
"""

import copy

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm", reason="timm (and torchvision) not installed: the timm leg of .ci/run runs this")

import vnm  # noqa: E402
from vnm import SparsifyConfig, VNMLinear  # noqa: E402


def build(kind):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=10)
    if kind == "deit":  # DeiT: distillation token, two heads
        from timm.models.deit import VisionTransformerDistilled
        return VisionTransformerDistilled(**kw).eval()
    return VisionTransformer(**kw).eval()


@pytest.mark.parametrize("kind", ["vit", "deit"])
def test_timm_vit_sparsify_save_load(kind, tmp_path):
    dense = build(kind)
    sparse = copy.deepcopy(dense)
    report = vnm.sparsify(sparse, SparsifyConfig(pattern="16:2:8", progress=False))
    names = {r.name for r in report.sparse}
    assert "blocks.0.attn.qkv" in names and "blocks.1.mlp.fc2" in names
    assert "head" not in names
    ref = copy.deepcopy(dense)
    for name, m in sparse.named_modules():
        if isinstance(m, VNMLinear):
            with torch.no_grad():
                ref.get_submodule(name).weight.copy_(m.dense_weight())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = sparse(x)
        assert torch.allclose(y, ref(x), atol=1e-4)
    path = vnm.save(sparse, tmp_path / "t.safetensors")
    loaded = vnm.load(path, build(kind))
    with torch.no_grad():
        assert torch.equal(loaded(x), y)


def build_beit3():
    """timm's BEiT-3 (a VisionTransformer with a LayerNorm between the heads and attn.proj and one
    between mlp.fc1 and mlp.fc2, as timm's beit3_* models are built)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0,
                             num_classes=10, scale_attn_norm=True, scale_mlp_norm=True, global_pool="avg").eval()


def build_swiglu_packed():
    from timm.layers import SwiGLUPacked
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0,
                             num_classes=10, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU).eval()


PERMUTED = {"vit": lambda: build("vit"), "beit3": build_beit3, "swiglu-packed": build_swiglu_packed}


@pytest.mark.parametrize("mode", ["free", "all"])
@pytest.mark.parametrize("kind", sorted(PERMUTED))
def test_timm_permuted_equals_unpermuted_with_the_same_masks(kind, mode):
    """Fused qkv (values are its last third) or separate projections, norms between layers, packed
    GLU halves: the permuted sparse model computes what the unpermuted model with the same masks
    computes, with random norm parameters (at their initial 1 and 0 a forgotten norm would hide)."""
    from _families import randomise_norms_and_scales_
    from vnm.sparsify import original_order_weight

    dense = PERMUTED[kind]()
    randomise_norms_and_scales_(dense)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sparse = copy.deepcopy(dense)
    report = vnm.sparsify(sparse, SparsifyConfig(pattern="16:2:8", permute=mode, permute_time_budget=None,
                                                 permute_max_rounds=3, example_inputs=x, progress=False))
    kinds = " ".join(r.permutation or "" for r in report.sparse)
    assert "rows absorbed" in kinds and "cols absorbed" in kinds and "rows scattered" in kinds
    by = {r.name: r for r in report.sparse}
    fc1, fc2 = by["blocks.0.mlp.fc1"], by["blocks.0.mlp.fc2"]
    assert fc1.permutation.startswith("rows absorbed") and "cols absorbed" in fc2.permutation  # the MLP edge holds
    if kind == "beit3":  # its norms between the layers are permuted along
        assert {f"blocks.{i}.{norm}.{p}" for i in (0, 1) for norm in ("mlp.norm", "attn.norm")
                for p in ("weight", "bias")} <= set(report.permuted_parameters)
    if kind == "swiglu-packed":  # both halves of fc1 take the same permutation
        half = fc1.shape[0] // 2
        assert torch.equal(fc1.row_perm[half:], fc1.row_perm[:half] + half)
    ref = copy.deepcopy(dense)
    for r in report.sparse:
        with torch.no_grad():
            ref.get_submodule(r.name).weight.copy_(original_order_weight(sparse.get_submodule(r.name), r))
    with torch.no_grad():
        y, y_ref = sparse(x), ref(x)
    assert torch.allclose(y, y_ref, rtol=1e-4, atol=1e-4 * float(y_ref.abs().max())), (y - y_ref).abs().max()


def test_timm_models_are_traced_without_example_inputs():
    """A timm image model needs no example inputs: vnm builds images of its input size, so the
    edges are found and checked as for a Hugging Face model."""
    dense = build_beit3()
    report = vnm.sparsify(copy.deepcopy(dense), SparsifyConfig(pattern="16:2:8", permute="free",
                                                               permute_time_budget=None, permute_max_rounds=2,
                                                               progress=False))
    assert "cols absorbed" in report["blocks.1.mlp.fc2"].permutation
    assert "blocks.1.mlp.norm.weight" in report.permuted_parameters
