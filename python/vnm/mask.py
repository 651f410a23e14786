"""Mask selection and validity for V:N:M and N:M patterns.

Exact selection runs in C++ (branch and bound, CPU). Scores on a CUDA device are selected in place
by an exact vectorised torch path (every column set of every block evaluated at once), so a model
on the GPU is not copied to the host for its masks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._checks import require_2d
from ._native import _C
from .pattern import PatternLike, as_pattern


# The torch path enumerates all C(M, 4) column sets of every block: 1820 sets at M = 16. Beyond
# that the C++ branch and bound (which prunes most sets) is the better tool.
TORCH_MAX_M = 16
_BACKENDS = ("auto", "native", "torch")


def select_mask(scores: torch.Tensor, pattern: PatternLike, *, backend: str = "auto") -> torch.Tensor:
    """The mask that keeps the most total score under ``pattern``.

    ``scores`` (R x K, finite and non-negative: importance such as ``weight.abs()``) is any float
    tensor on any device; the result is a ``torch.bool`` tensor of the same shape and device.

    V:N:M: in every V x M block, the 4 columns and per row the 2 of them that maximise the kept
    sum, exactly. N:M: the top N of every M per row. Shapes that are not multiples of V or M are
    padded with zero scores, selected and cropped.

    Scores are converted to float32 first: float64 values beyond float32's range (about 3.4e38)
    raise ``ValueError`` (rescale them), values below its smallest subnormal (about 1.4e-45)
    become 0. A block's kept score is the float32 sum of its rows' top-two sums in one fixed
    order, the same in both backends.

    Ties, the same in both backends, so they return identical masks for identical scores:

    * V:N:M column sets: among the sets of equal kept score, the one whose ascending column
      offsets come first lexicographically ((0, 1, 2, 5) before (0, 1, 3, 4)).
    * Within the 4 selected columns, and within an N:M group, a row keeps the highest scores,
      equal scores going to the lower column offset.

    ``backend``: ``"native"`` runs the C++ core on the CPU (scores on another device are copied
    there and the mask back); ``"torch"`` runs an exact vectorised torch enumeration on the
    scores' own device (N:M, and V:N:M with M <= 16); ``"auto"`` (default) uses torch for CUDA
    scores when it supports the pattern and the C++ core otherwise.

    Cost: the C++ core is a branch and bound over the C(M, 4) column sets of each block, blocks
    spread over the threads. Measured on a 2-core x86_64 CPU with |N(0, 1)| scores: an
    11008 x 4096 layer at 64:2:8 in about 0.25 s (2 threads); one block, on one thread, in about
    0.7 ms at 64:2:64, 5 ms at 64:2:128 and 0.3 s at 256:2:256. Scores with many exact ties near
    the best value prune less: a 256:2:256 block of integers in {0, 1, 2} took 1.3 s.
    """
    p = as_pattern(pattern)
    require_2d(scores, "scores")
    if not scores.dtype.is_floating_point:
        raise TypeError(f"scores must be a floating-point tensor, got {scores.dtype}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    torch_ok = torch_supports(p)
    if backend == "torch" and not torch_ok:
        raise ValueError(
            f"backend='torch' enumerates every column set and supports M <= {TORCH_MAX_M}; "
            f"pattern '{p}' has M={p.M}: use backend='native' (C++ branch and bound)"
        )
    s = _as_float32_scores(scores)
    if backend == "torch" or (backend == "auto" and torch_ok and scores.device.type == "cuda"):
        return _select_mask_torch(s, p)
    R, K = scores.shape
    s = s.to("cpu").contiguous()
    out = torch.empty((R, K), dtype=torch.uint8)
    _C.select_mask(s, R, K, p, out)
    return out.view(torch.bool).to(scores.device)


def torch_supports(pattern: PatternLike) -> bool:
    """Whether the vectorised torch selection handles ``pattern`` (all N:M; V:N:M with M <= 16)."""
    p = as_pattern(pattern)
    return not p.is_vnm or p.M <= TORCH_MAX_M


# ---- exact selection in torch (any device) ------------------------------------------------------

# Elements of the (blocks x V x column sets) working tensors per chunk: ~64 MiB of float32 each,
# so a GPU keeps several in flight without memory pressure and a CPU test stays small.
_CHUNK_ELEMENTS = 1 << 24
# Interleaved partial sums of the C++ lane_sum (detail::kLanes); V is a multiple of 16.
_LANES = 8


def _as_float32_scores(scores: torch.Tensor) -> torch.Tensor:
    """``scores`` as float32 on their device; a finite value that overflows float32 raises
    ``ValueError`` (a later "got inf" would blame the input for what the conversion did)."""
    s = scores.detach().to(torch.float32)
    if torch.finfo(scores.dtype).max > torch.finfo(torch.float32).max:
        overflow = torch.isinf(s) & torch.isfinite(scores)
        if bool(overflow.any()):
            first = int(overflow.flatten().nonzero()[0])
            r, c = divmod(first, scores.shape[1])
            raise ValueError(
                f"scores are converted to float32 for selection and {float(scores[r, c]):g} at "
                f"({r}, {c}) overflows it (float32 max {torch.finfo(torch.float32).max:.3g}): "
                "rescale the scores first, e.g. scores / scores.max()"
            )
    return s


def _lane_sum_rows(x: torch.Tensor) -> torch.Tensor:
    """Sum over dim 1 (V rows, V a multiple of 8) of ``x`` (n, V, C) in exactly the float32
    operations of the C++ core's ``lane_sum`` (cpp/src/block_select.h): 8 interleaved partial sums,
    row r into lane r % 8, each accumulated in row order, then the lanes added in order. With the
    same per-row terms both backends get bit-identical block values, so exact comparisons (and
    the tie rule) give the same column set on CPU and CUDA."""
    lanes = x.unflatten(1, (x.shape[1] // _LANES, _LANES))  # (n, V / 8, 8, C)
    acc = lanes[:, 0]
    for i in range(1, lanes.shape[1]):
        acc = acc + lanes[:, i]
    total = acc[:, 0]
    for lane in range(1, _LANES):
        total = total + acc[:, lane]
    return total


def _check_scores_torch(s: torch.Tensor) -> None:
    bad = ~(s >= 0) | torch.isinf(s)
    if bool(bad.any()):
        first = int(bad.flatten().nonzero()[0])
        r, c = divmod(first, s.shape[1])
        raise ValueError(
            "scores must be finite and non-negative importance values (e.g. weight.abs()); "
            f"got {float(s[r, c]):g} at ({r}, {c})"
        )


def _top2_sum_of_4(a, b, c, d):
    """Sum of the two largest of four tensors, elementwise: the top two of the pairs (a, b) and
    (c, d) merged, max(t1, u1) + max(min(t1, u1), max(t2, u2)) (no sort kernel)."""
    t1, t2 = torch.maximum(a, b), torch.minimum(a, b)
    u1, u2 = torch.maximum(c, d), torch.minimum(c, d)
    return torch.maximum(t1, u1) + torch.maximum(torch.minimum(t1, u1), torch.maximum(t2, u2))


def _select_mask_torch(s: torch.Tensor, p) -> torch.Tensor:
    _check_scores_torch(s)
    if p.is_vnm:
        return _select_vnm_torch(s, p.V, p.M)
    return _select_nm_torch(s, p.N, p.M)


def _select_nm_torch(s: torch.Tensor, N: int, M: int) -> torch.Tensor:
    R, K = s.shape
    G = math.ceil(K / M)
    # A single group is K wide: padding it out to a huge M would only allocate.
    width = M if G > 1 else K
    # Padding scores -1 rank below every real (non-negative) score: a short last group keeps its
    # min(N, width) real columns, as the C++ core does.
    g = F.pad(s, (0, G * width - K), value=-1.0).view(R, G, width)
    # A stable descending sort keeps equal scores in column order: ties go to lower columns.
    top = torch.sort(g, dim=-1, descending=True, stable=True).indices[..., :N]
    mask = torch.zeros(g.shape, dtype=torch.bool, device=s.device).scatter_(-1, top, True)
    return mask.view(R, G * width)[:, :K]


def _select_vnm_torch(s: torch.Tensor, V: int, M: int) -> torch.Tensor:
    R, K = s.shape
    RB, G = math.ceil(R / V), math.ceil(K / M)
    n_blocks = RB * G
    # Zero padding, as the C++ core: padded rows and columns add nothing to any column set.
    blocks = F.pad(s, (0, G * M - K, 0, RB * V - R)).view(RB, V, G, M).permute(0, 2, 1, 3)
    blocks = blocks.reshape(n_blocks, V, M)
    combos = torch.combinations(torch.arange(M, device=s.device), r=4)  # (C, 4), lexicographic
    best = torch.empty(n_blocks, dtype=torch.long, device=s.device)
    chunk = max(1, _CHUNK_ELEMENTS // (V * combos.shape[0]))
    for b0 in range(0, n_blocks, chunk):
        blk = blocks[b0 : b0 + chunk]
        a, b, c, d = (blk[:, :, combos[:, i]] for i in range(4))  # each (chunk, V, C)
        kept = _lane_sum_rows(_top2_sum_of_4(a, b, c, d))  # (chunk, C): each set's kept score
        # argmax returns the first maximum and combos are lexicographic: the tie rule.
        best[b0 : b0 + chunk] = kept.argmax(dim=1)
    selected = combos[best]  # (n_blocks, 4) column offsets, ascending
    sel_rows = selected[:, None, :].expand(n_blocks, V, 4)
    values = torch.gather(blocks, 2, sel_rows)
    # Each row keeps its top 2 of the 4; the stable sort sends ties to the lower offset.
    top = torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :2]
    cols = torch.gather(sel_rows, 2, top)
    mask = torch.zeros((n_blocks, V, M), dtype=torch.bool, device=s.device).scatter_(2, cols, True)
    mask = mask.view(RB, G, V, M).permute(0, 2, 1, 3).reshape(RB * V, G * M)
    return mask[:R, :K]


def _mask_bytes(mask: torch.Tensor) -> torch.Tensor:
    require_2d(mask, "mask")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a torch.bool tensor, got {mask.dtype}")
    return mask.detach().to("cpu").contiguous().view(torch.uint8)


def mask_error(mask: torch.Tensor, pattern: PatternLike) -> str:
    """Empty string if ``mask`` is valid for ``pattern``, else why not (first offending block)."""
    p = as_pattern(pattern)
    m = _mask_bytes(mask)
    return _C.check_mask(m, m.shape[0], m.shape[1], p)


def check_mask(mask: torch.Tensor, pattern: PatternLike) -> None:
    """Raises ``ValueError`` naming the first offending block (row block, column group) and why.

    A mask is valid for V:N:M when every V x M block keeps values in at most 4 columns and every
    row at most 2 per group; for N:M when every row keeps at most N of every M.
    """
    err = mask_error(mask, pattern)
    if err:
        raise ValueError(err)


def is_valid_mask(mask: torch.Tensor, pattern: PatternLike) -> bool:
    """Whether ``mask`` satisfies ``pattern`` (see :func:`check_mask`)."""
    return not mask_error(mask, pattern)
