"""Channel permutations: search them (:func:`search_permutation`, C++) and fold them into a model
at no inference cost (:func:`permute_linear_rows`, :func:`permute_linear_cols`,
:func:`permute_between`, :func:`permute_attention_values`).

Convention (as ``torch.Tensor`` indexing): a permutation ``perm`` of n lists, for every new
position i, the original index it holds, so ``S[row_perm][:, col_perm]`` is the permuted matrix.

Why a permutation is free. For ``y = x @ W.T`` with W permuted to ``W[row_perm][:, col_perm]``:

* the output comes out as ``y[..., row_perm]``; the layer that consumes y takes it unchanged if
  its own input columns are permuted by the same ``row_perm`` (:func:`permute_between`);
* the layer must read ``x[..., col_perm]``; the layer that produces x emits exactly that if its
  output rows are permuted by ``col_perm`` (again :func:`permute_between`, seen from the other
  side). In a transformer: MLP ``up``/``gate`` rows <-> ``down`` columns (any permutation of the
  intermediate features, since the activation and the gate product act feature by feature), and
  attention ``v_proj`` rows <-> ``o_proj`` columns when the permutation maps every head onto
  itself (:func:`permute_attention_values`; attention mixes tokens, never features of a head with
  another head's).
* where no producer can absorb it (the hidden state after a LayerNorm feeds the residual stream),
  the sparse layer gathers ``x[..., col_perm]`` itself: ``VNMTensor.from_dense(weight[:, perm],
  mask, pattern, perm=perm)`` stores ``perm`` and :func:`vnm.spmm` applies it.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Union

import torch

from ._checks import require_2d
from ._native import _C
from .layers import is_prunable, weight_matrix
from .pattern import Pattern, PatternLike, as_pattern

__all__ = [
    "PermutationResult",
    "search_permutation",
    "kept_score",
    "invert_permutation",
    "check_permutation",
    "is_head_preserving",
    "permute_linear_rows",
    "permute_linear_cols",
    "permute_between",
    "permute_attention_values",
]


# ---- search ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PermutationResult:
    """What :func:`search_permutation` found.

    ``row_perm`` (R,) and ``col_perm`` (K,) are int64 permutations: apply as
    ``S[row_perm][:, col_perm]``. The ``kept_*`` fields are sums of the scores, in float64:

    * ``kept_identity``: what ``select_mask`` keeps on the scores as given;
    * ``kept``: what it keeps on the permuted scores (never below ``kept_identity``);
    * ``kept_random``: on one random permutation of rows and columns (seeded by ``seed``), the
      baseline that says whether the given order was already special;
    * ``kept_unstructured_rows``: every row keeps its own best values, as many as the pattern keeps
      in a row (apex ASP's "50% rows" reference for the efficacy metric at 2:4);
    * ``kept_unstructured``: the best values of the whole matrix, as many as the pattern keeps;
    * ``total``: the sum of all scores.
    """

    row_perm: torch.Tensor
    col_perm: torch.Tensor
    pattern: Pattern
    kept_identity: float
    kept: float
    kept_random: float
    kept_unstructured_rows: float
    kept_unstructured: float
    total: float
    seconds: float
    rounds: int
    escapes: int
    converged: bool

    @property
    def gain(self) -> float:
        """Relative gain in kept score over the identity, ``kept / kept_identity - 1``."""
        return self.kept / self.kept_identity - 1.0 if self.kept_identity > 0 else 0.0

    def efficacy(self, reference: str = "rows") -> float:
        """Share of the gap to an unstructured reference that the permutation closes:
        ``(kept - kept_identity) / (reference - kept_identity)``.

        ``reference='rows'`` is apex ASP's definition (each row keeps its own best values, the
        "50% rows" magnitude at 2:4); ``'global'`` uses the best values of the whole matrix at
        the same density, a larger reference that no row-balanced pattern reaches. Returns 1.0
        when the identity already reaches the reference (as apex does).
        """
        if reference == "rows":
            ref = self.kept_unstructured_rows
        elif reference == "global":
            ref = self.kept_unstructured
        else:
            raise ValueError(f"reference must be 'rows' or 'global', got {reference!r}")
        gap = ref - self.kept_identity
        return 1.0 if gap <= 0 else (self.kept - self.kept_identity) / gap

    def apply(self, matrix: torch.Tensor) -> torch.Tensor:
        """``matrix[row_perm][:, col_perm]`` (on the matrix's device)."""
        dev = matrix.device
        return matrix[self.row_perm.to(dev)][:, self.col_perm.to(dev)]

    def unapply(self, matrix: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`apply`: a matrix in permuted order back in the original order
        (e.g. a mask selected on the permuted scores)."""
        dev = matrix.device
        out = torch.empty_like(matrix)
        out[self.row_perm.to(dev).unsqueeze(1), self.col_perm.to(dev).unsqueeze(0)] = matrix
        return out


def kept_score(scores: torch.Tensor, pattern: PatternLike) -> float:
    """Sum (float64) of the scores that :func:`vnm.select_mask` keeps under ``pattern``."""
    p = as_pattern(pattern)
    s = _scores_f32(scores)
    return float(_C.kept_score(s, s.shape[0], s.shape[1], p))


def _scores_f32(scores: torch.Tensor) -> torch.Tensor:
    require_2d(scores, "scores")
    if not scores.dtype.is_floating_point:
        raise TypeError(f"scores must be a floating-point tensor, got {scores.dtype}")
    s = scores.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if scores.dtype == torch.float64 and bool(torch.isinf(s).any()):
        overflowed = torch.isinf(s) & torch.isfinite(scores.detach().cpu())
        if bool(overflowed.any()):
            r, c = (int(i) for i in overflowed.nonzero()[0])
            raise ValueError(
                f"scores are converted to float32 for the search, and the score {float(scores[r, c]):g} at "
                f"({r}, {c}) overflows it (float32 holds up to {torch.finfo(torch.float32).max:.4g}); divide "
                "the scores by a positive constant first (e.g. scores / scores.max()): scaling all scores "
                "alike does not change which permutation or mask is best"
            )
    return s


def _as_int(value, name: str, what: str = "an int") -> int:
    """``value`` as an int: anything with ``__index__`` (int, numpy integers) but not a bool."""
    if isinstance(value, bool) or type(value).__name__ in ("bool", "bool_"):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}") from None


def _optional_int(value, name: str, minimum: int) -> int:
    if value is None:
        return 0
    value = _as_int(value, name, "an int or None")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum} (or None), got {value}")
    return value


def _seconds_decimals(seconds: float) -> int:
    """Decimals that show ``seconds`` as more than zero: 1 from 0.1 s up, 2 for 0.05 s, ..."""
    if seconds <= 0:
        return 1
    return min(6, max(1, -math.floor(math.log10(seconds))))


ProgressLike = Union[bool, Callable[[dict], Optional[bool]]]

# time_budget=None: the round limit ends the search (a budget of about 31 years)
_UNLIMITED_SECONDS = 1e9


def search_permutation(
    scores: torch.Tensor,
    pattern: PatternLike,
    time_budget: Optional[float] = 10.0,
    seed: int = 0,
    progress: ProgressLike = True,
    *,
    max_rounds: Optional[int] = None,
    patience: Optional[int] = 100,
    permute_rows: bool = True,
    permute_cols: bool = True,
    col_segment: Optional[int] = None,
    row_segment: Optional[int] = None,
) -> PermutationResult:
    """Row and column permutations of ``scores`` (R x K, finite, non-negative importance such as
    ``weight.abs()`` or Wanda scores) under which :func:`vnm.select_mask` keeps more total score.

    ``pattern``: a V:2:M pattern (rows and columns are permuted) or 2:M such as '2:4' (columns
    only: every row keeps its own best values per group, so the row order changes nothing and
    ``row_perm`` is the identity; V:2:4 likewise). The search runs in C++ on all cores (``vnm``
    threads) until ``time_budget`` seconds have passed, ``max_rounds`` rounds are done, or a
    local optimum was not improved by ``patience`` random escapes in a row (``None``: no such
    stop), whichever comes first. The budget bounds the search itself: the set-up before it and
    the exact scoring of the identity, of a random permutation and of the result after it come
    on top, and grow with the size of the matrix. Inside a round the search looks at the clock
    every 64 row swaps, between batches of its row-phase tables and before every column pair,
    so it ends soon after the budget also on tall matrices.

    **Reproducible results: use** ``max_rounds`` (e.g. ``time_budget=None, max_rounds=200``).
    A search that ends by its round limit (or by ``patience``) before the budget runs out
    returns the same permutations, bit for bit, for the same scores, pattern, options and
    ``seed``, whatever the number of threads or the load of the machine. A search that the
    wall-clock budget ends is not reproducible: how far it gets depends on the machine's speed
    at the time. ``time_budget=None`` means no wall-clock limit and needs ``max_rounds``.

    ``progress``: ``True`` shows a tqdm bar (elapsed time against the budget, or rounds against
    ``max_rounds`` when ``time_budget=None``, and the gain); ``False`` nothing; a callable
    receives a dict (``elapsed``, ``rounds``, ``escapes``, ``kept_identity``, ``kept_best``,
    ``gain``) about every 0.2 s and may return ``False`` to stop (the best permutation so far
    is returned); an exception it raises propagates. The search runs without the GIL and calls
    into Python at those moments whatever ``progress`` is, and that is where Ctrl-C is seen: it
    raises ``KeyboardInterrupt`` out of this function, at the latest when the step in progress
    ends (the set-up, a column round, re-scoring every block after an escape, or the final
    scoring; on a matrix with thousands of rows and columns each can take a second or more).

    ``col_segment`` / ``row_segment``: keep every consecutive segment of that many columns / rows
    in place (the permutation maps it onto itself), e.g. ``col_segment=head_dim`` for the input
    columns of an attention output projection. A column segment must divide K (it need not be a
    multiple of M: head_dim 64 works with 64:2:5); a row segment must divide R and, for a V:N:M
    pattern, be a multiple of V (checked even for V:2:4, whose rows never move).

    ``scores`` of any floating dtype are converted to float32 for the search; float64 scores
    beyond float32's range are an error (divide them by a constant first).

    The result is never worse than the identity: both are scored exactly at the end and the
    identity is returned unless it is beaten.
    """
    p = as_pattern(pattern)
    s = _scores_f32(scores)
    R, K = s.shape
    rounds = _optional_int(max_rounds, "max_rounds", 1)
    if time_budget is None:
        if rounds == 0:
            raise ValueError("time_budget=None needs max_rounds to end the search (e.g. max_rounds=200)")
        budget = _UNLIMITED_SECONDS
    else:
        if isinstance(time_budget, bool) or not isinstance(time_budget, numbers.Real):
            raise TypeError(
                f"time_budget must be a number of seconds or None, got {type(time_budget).__name__}")
        budget = float(time_budget)
        if not math.isfinite(budget) or budget < 0:
            raise ValueError(
                f"time_budget must be a finite number of seconds >= 0 (or None), got {time_budget}")
    seed = _as_int(seed, "seed")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    if patience is None:
        patience_value = -1
    else:
        patience_value = _optional_int(patience, "patience", 0)
    col_seg = _optional_int(col_segment, "col_segment", 1)
    row_seg = _optional_int(row_segment, "row_segment", 1)
    if not isinstance(progress, bool) and not callable(progress):
        raise TypeError(f"progress must be True, False or a callable, got {type(progress).__name__}")

    bar = None
    callback = None
    if progress is True:
        from tqdm.auto import tqdm  # noqa: PLC0415

        desc = f"permutation {p} {R}x{K}"
        if time_budget is None:  # no clock to show: rounds against the round limit
            bar = tqdm(total=rounds, unit="round", desc=desc,
                       bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} rounds{postfix}")
        else:
            d = _seconds_decimals(budget)  # so that a 0.05 s budget does not show as 0.0 s
            bar = tqdm(total=budget, unit="s", desc=desc,
                       bar_format=f"{{desc}}: {{percentage:3.0f}}%|{{bar}}| {{n:.{d}f}}/{{total:.{d}f}} s{{postfix}}")

        def callback(elapsed, n_rounds, escapes, kept_identity, kept_best):
            gain = kept_best / kept_identity - 1.0 if kept_identity > 0 else 0.0
            if time_budget is None:
                bar.n = n_rounds
                bar.set_postfix_str(f"gain {gain:+.3%}", refresh=False)
            else:
                bar.n = min(elapsed, budget)
                bar.set_postfix_str(f"gain {gain:+.3%}, {n_rounds} rounds", refresh=False)
            bar.refresh()
            return True

    elif callable(progress):
        user = progress

        def callback(elapsed, n_rounds, escapes, kept_identity, kept_best):
            gain = kept_best / kept_identity - 1.0 if kept_identity > 0 else 0.0
            keep_going = user(dict(elapsed=elapsed, rounds=n_rounds, escapes=escapes,
                                   kept_identity=kept_identity, kept_best=kept_best, gain=gain))
            return keep_going is None or bool(keep_going)

    if callback is None:
        # Still call into Python a few times a second: that is where a pending Ctrl-C is raised
        # (the search runs without the GIL), stopping the search with KeyboardInterrupt.
        def callback(*_):
            return True

    row_perm = torch.empty(R, dtype=torch.int64)
    col_perm = torch.empty(K, dtype=torch.int64)
    info = None
    try:
        info = _C.search_permutation(
            s, R, K, p, budget, seed, rounds, patience_value, bool(permute_rows),
            bool(permute_cols), col_seg, row_seg, callback, row_perm, col_perm,
        )
    finally:
        if bar is not None:
            if info is not None and info["converged"]:  # stopped early: say so, full bar
                bar.n = bar.total
                bar.set_postfix_str(f"{bar.postfix}, converged", refresh=False)
            bar.close()

    return PermutationResult(
        row_perm=row_perm,
        col_perm=col_perm,
        pattern=p,
        kept_identity=float(info["kept_identity"]),
        kept=float(info["kept"]),
        kept_random=float(info["kept_random"]),
        kept_unstructured_rows=float(info["kept_unstructured_rows"]),
        kept_unstructured=float(info["kept_unstructured"]),
        total=float(s.sum(dtype=torch.float64)),
        seconds=float(info["seconds"]),
        rounds=int(info["rounds"]),
        escapes=int(info["escapes"]),
        converged=bool(info["converged"]),
    )


# ---- permutations ------------------------------------------------------------------------------


def check_permutation(perm: torch.Tensor, n: int, what: str = "perm") -> torch.Tensor:
    """``perm`` as an int64 tensor on its device if it is a permutation of ``range(n)``;
    ``ValueError`` / ``TypeError`` naming the problem otherwise."""
    if not isinstance(perm, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor of indices, got {type(perm).__name__}")
    if perm.dtype.is_floating_point or perm.dtype == torch.bool or perm.is_complex():
        raise TypeError(f"{what} must be an integer tensor, got {perm.dtype}")
    if perm.dim() != 1 or perm.shape[0] != n:
        raise ValueError(f"{what} must have shape ({n},), got {tuple(perm.shape)}")
    p = perm.to(torch.int64)
    if not torch.equal(torch.sort(p.cpu()).values, torch.arange(n)):
        raise ValueError(f"{what} is not a permutation of 0..{n - 1} (an index repeats or is out of range)")
    return p


def invert_permutation(perm: torch.Tensor) -> torch.Tensor:
    """The inverse permutation: ``x[perm][inv] == x`` and ``x[inv][perm] == x``."""
    if not isinstance(perm, torch.Tensor) or perm.dim() != 1:
        raise ValueError("perm must be a 1-D tensor of indices")
    p = check_permutation(perm, perm.shape[0])
    inv = torch.empty_like(p)
    inv[p] = torch.arange(p.shape[0], device=p.device)
    return inv


def is_head_preserving(perm: torch.Tensor, head_dim: int) -> bool:
    """Whether ``perm`` maps every block of ``head_dim`` consecutive features onto itself (so
    it can pass through attention: features of one head never move to another)."""
    if head_dim <= 0 or perm.shape[0] % head_dim:
        raise ValueError(f"head_dim={head_dim} must be positive and divide the length {perm.shape[0]}")
    p = perm.to(torch.int64).cpu()
    return bool(torch.equal(p // head_dim, torch.arange(p.shape[0]) // head_dim))


@torch.no_grad()
def permute_linear_rows(linear: torch.nn.Module, perm: torch.Tensor) -> torch.nn.Module:
    """Reorder the output features of ``linear`` (an ``nn.Linear`` or a GPT-2 ``Conv1D``) in
    place: afterwards it computes ``old(x)[..., perm]`` (weight rows and bias permuted). Returns
    the layer."""
    w = _weight_rows_by_cols(linear, "linear")
    p = check_permutation(perm, w.shape[0]).to(w.device)
    w.copy_(w[p])
    if linear.bias is not None:
        linear.bias.copy_(linear.bias[p])
    return linear


@torch.no_grad()
def permute_linear_cols(linear: torch.nn.Module, perm: torch.Tensor) -> torch.nn.Module:
    """Reorder the input features of ``linear`` (an ``nn.Linear`` or a GPT-2 ``Conv1D``) in
    place: afterwards it expects the permuted input, ``new(x[..., perm]) == old(x)``. Returns
    the layer."""
    w = _weight_rows_by_cols(linear, "linear")
    p = check_permutation(perm, w.shape[1]).to(w.device)
    w.copy_(w[:, p])
    return linear


def permute_between(
    producers: Union[torch.nn.Module, Sequence[torch.nn.Module]],
    consumers: Union[torch.nn.Module, Sequence[torch.nn.Module]],
    perm: torch.Tensor,
) -> None:
    """Permute the features that flow from ``producers`` to ``consumers`` without changing what
    the pair computes: the producers' output rows and the consumers' input columns are permuted
    by the same ``perm``, in place.

    Valid when everything between them acts feature by feature (activations, the gate product of
    a gated MLP, dropout): ``permute_between([gate, up], down, perm)``. With ``perm`` the column
    permutation the search found for ``down``, ``down``'s weight columns come out in its searched
    order and no gather is needed; with ``perm`` a row permutation searched for ``up`` (and
    ``gate``), ``down`` absorbs it. Attention needs :func:`permute_attention_values`.

    Producers and consumers are whole layers, each an ``nn.Linear`` or a GPT-2 ``Conv1D`` (its
    weight is stored transposed; GPT-2's ``mlp.c_fc`` -> ``mlp.c_proj`` works). A producer that
    emits the features in a slice of its rows (a fused QKV projection) is not handled here:
    :func:`vnm.sparsify` permutes those itself.
    """
    producers = [producers] if isinstance(producers, torch.nn.Module) else list(producers)
    consumers = [consumers] if isinstance(consumers, torch.nn.Module) else list(consumers)
    if not producers or not consumers:
        raise ValueError("permute_between needs at least one producer and one consumer")
    outs = [_weight_rows_by_cols(m, f"producers[{i}]").shape[0] for i, m in enumerate(producers)]
    ins = [_weight_rows_by_cols(m, f"consumers[{i}]").shape[1] for i, m in enumerate(consumers)]
    n = outs[0]
    for i, out in enumerate(outs):
        if out != n:
            raise ValueError(f"producers[{i}] has {out} outputs but producers[0] has {n}")
    for i, k in enumerate(ins):
        if k != n:
            raise ValueError(f"consumers[{i}] takes {k} inputs but the producers emit {n} features")
    check_permutation(perm, n)
    for m in producers:
        permute_linear_rows(m, perm)
    for m in consumers:
        permute_linear_cols(m, perm)


def permute_attention_values(
    v_proj: torch.nn.Module, o_proj: torch.nn.Module, perm: torch.Tensor, head_dim: int
) -> None:
    """Permute the value features of attention: ``v_proj``'s output rows and ``o_proj``'s input
    columns by ``perm``, in place. ``perm`` must map every head's ``head_dim`` features onto
    themselves (search it with ``search_permutation(..., col_segment=head_dim)`` on ``o_proj``),
    since attention weights combine one head's values only.

    Handles separate value and output projections with as many value heads as query heads, each
    layer an ``nn.Linear`` (or a GPT-2 ``Conv1D``). Not handled here: grouped-query attention
    (fewer value heads than query heads, ``v_proj``'s outputs fewer than ``o_proj``'s inputs: one
    value permutation must then serve the ``o_proj`` columns of several query heads) and fused
    QKV projections (GPT-2's ``c_attn``, whose value features are a slice of its rows).
    :func:`vnm.sparsify` finds and permutes both kinds itself."""
    v_out = _weight_rows_by_cols(v_proj, "v_proj").shape[0]
    o_in = _weight_rows_by_cols(o_proj, "o_proj").shape[1]
    p = check_permutation(perm, o_in)
    if v_out != o_in:
        raise ValueError(
            f"v_proj emits {v_out} features but o_proj takes {o_in}: with grouped-query attention "
            "one value head serves several query heads, which this helper does not handle "
            "(vnm.sparsify does)"
        )
    if not is_head_preserving(p, head_dim):
        raise ValueError(
            "perm moves features between heads; search it with col_segment=head_dim so that every "
            f"block of {head_dim} features maps onto itself"
        )
    permute_linear_rows(v_proj, p)
    permute_linear_cols(o_proj, p)


def _weight_rows_by_cols(m, what: str) -> torch.Tensor:
    """The layer's weight as an R x K view (output x input features), or TypeError."""
    if not is_prunable(m):
        raise TypeError(f"{what} must be a torch.nn.Linear or a GPT-2 Conv1D, got {type(m).__name__}")
    return weight_matrix(m)
