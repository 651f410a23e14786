"""timm ViT / DeiT: sparsified, matches the masked dense model, saves and loads back.

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


@pytest.mark.parametrize("mode", ["free", "all"])
def test_timm_vit_permuted_equals_unpermuted_with_the_same_masks(mode):
    """timm's fused qkv (values are its last third) and proj: the permuted sparse model computes
    what the unpermuted model with the same masks computes."""
    from vnm.sparsify import original_order_weight

    dense = build("vit")
    sparse = copy.deepcopy(dense)
    report = vnm.sparsify(sparse, SparsifyConfig(pattern="16:2:8", permute=mode, permute_time_budget=None,
                                                 permute_max_rounds=3, progress=False))
    kinds = " ".join(r.permutation or "" for r in report.sparse)
    assert "rows absorbed" in kinds and "cols absorbed" in kinds and "rows scattered" in kinds
    ref = copy.deepcopy(dense)
    for r in report.sparse:
        with torch.no_grad():
            ref.get_submodule(r.name).weight.copy_(original_order_weight(sparse.get_submodule(r.name), r))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(sparse(x), ref(x), atol=1e-4)
