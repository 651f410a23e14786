"""``vnm.sparsify``: one call that turns a model's linear layers into :class:`vnm.nn.VNMLinear`.

In the style of torchao's ``sparsify_``: a config dataclass says which pattern (one, or per layer),
which score, which calibration data and whether to search channel permutations; ``filter_fn``
picks layers by module and name. Layers that should stay dense (embeddings are never linear
layers; by default the LM head, classifier and pooler) or whose shape cannot be served are
skipped, and the report says which and why.

Permutations (``permute``) follow the edges :mod:`vnm.graph` proves from a traced forward pass on
example inputs (``SparsifyConfig.example_inputs``, else the first calibration batch, else synthetic
inputs built from a Hugging Face config); before any search, each edge is checked once more by
running the model with a random permutation of the edge's kind and comparing its outputs with the
unpermuted model's, and refused (logged, listed in ``report.refused_edges``) if they differ.
Free at inference (``permute='free'``):
- along an MLP edge one permutation of the hidden features serves as the producers' row order and
  the consumer's column order ("rows absorbed" / "cols absorbed"); along an attention edge a
  per-head permutation of the value features does the same for the output projection;
- every other V:N:M layer's rows (the output projection, the MLP down projection, queries and keys,
  any producer whose rows no edge reordered) are regrouped and written back in the layer's order
  where the kernel stores the output ("rows scattered": ``VNMLinear.row_perm``, the epilogue's
  store goes to column ``row_perm[r]``; on the CPU the reference does the same).
With ``permute='all'`` the layers fed by the residual stream also get a column permutation, which
their forward gathers (``x[..., perm]``, "cols gathered"). Every permutation is kept only if it
raises the kept score over the identity.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import scores as scores_mod
from .graph import HeadsEdge, MlpEdge, Refusal, edges_from_trace, example_inputs, trace_model
from .layers import batch_to, is_prunable, model_device, run_model, weight_matrix
from .mask import select_mask
from .nn import VNMLinear
from .obs import is_obs_method
from .pattern import Pattern, PatternLike, as_pattern
from .permute import invert_permutation, kept_score, permute_linear_cols, permute_linear_rows, search_permutation
from .tensor import VNMTensor

# Module names (fnmatch globs) left dense by default: output heads (LM heads, often tied to the
# embeddings; BERT's masked-LM / NSP head `cls.*`; classifiers, poolers, QA spans; GPT-NeoX's embed_out).
DEFAULT_SKIP: Tuple[str, ...] = ("lm_head", "*.lm_head", "*classifier*", "*pooler*", "head", "head.*", "score",
                                 "*.score", "cls.*", "qa_outputs", "*.qa_outputs", "embed_out")

log = logging.getLogger("vnm")

ScoreFn = Callable[..., torch.Tensor]


@dataclass
class SparsifyConfig:
    """What :func:`sparsify` does.

    pattern: one pattern for every layer ('64:2:8'), or a mapping from module-name globs to
        patterns (first match wins; layers matching none are skipped).
    score: 'magnitude', 'wanda', 'ria', 'entropy', 'obs' (see :mod:`vnm.scores`) or a callable
        ``(weight, stats, *, layer) -> scores``; or 'sparsegpt', the second-order pruner that also
        updates the kept weights, run block by block (:func:`vnm.obs.prune_sequential`; permutations
        are searched on its saliency, block by block).
    calibration: batches (dicts of model inputs, tensors or tuples) run through the model to
        collect input statistics, needed by every score but magnitude.
    permute: False; 'free' (only permutations a neighbouring layer absorbs: MLP up/gate rows into
        down columns, value rows into output-projection columns within heads); or True / 'all'
        (also input permutations gathered at run time for layers fed by the residual stream).
    permute_time_budget: seconds of permutation search per layer (None: no clock, needs
        permute_max_rounds).
    permute_max_rounds: also stop each search after this many rounds. A search that ends by its
        round limit (``permute_time_budget=None``, or a budget it never reaches) gives the same
        permutations for the same model, scores and seed on every machine; a wall-clock budget
        does not.
    skip: module-name globs left dense.
    skip_heads: also leave dense the layers whose weight is tied to another parameter (an LM head
        tied to the input embedding: sparsifying it would untie them) and, when the model can be
        traced, the layers whose output is a model output (CLIP's text_projection and
        visual_projection, LM heads, classifiers).
    example_inputs: one batch (as calibration batches are: a dict of model inputs, a tuple or a
        tensor) to trace the model with (output heads, permutation edges) and to verify the
        permutations on. Default: the first calibration batch when ``calibration`` is a list or
        tuple, else synthetic inputs for a Hugging Face model. Without any, no edge is used (rows
        are still scattered and, with 'all', columns gathered) and a warning says so.
    dtype: the dtype the sparse layers are stored in, which must be the layers' own (checked; a
        sparse layer in another dtype than the rest of the model breaks its forward): to store
        float16, cast the model first (``model.half()``). Default: the layer's.
    """

    pattern: Union[PatternLike, Mapping[str, PatternLike]] = "64:2:8"
    score: Union[str, ScoreFn] = "magnitude"
    calibration: Optional[Iterable] = None
    permute: Union[bool, str] = False
    permute_time_budget: Optional[float] = 2.0
    permute_max_rounds: Optional[int] = None
    skip: Sequence[str] = DEFAULT_SKIP
    skip_heads: bool = True
    example_inputs: Optional[Any] = None
    dtype: Optional[torch.dtype] = None
    seed: int = 0
    progress: bool = True

    def pattern_for(self, name: str) -> Optional[Pattern]:
        if isinstance(self.pattern, Mapping):
            for glob, p in self.pattern.items():
                if fnmatch.fnmatchcase(name, glob):
                    return as_pattern(p)
            return None
        return as_pattern(self.pattern)

    def permute_mode(self) -> Optional[str]:
        if self.permute is False or self.permute is None or self.permute == "none":
            return None
        if self.permute is True or self.permute == "all":
            return "all"
        if self.permute == "free":
            return "free"
        raise ValueError(f"permute must be False, 'free', True or 'all', got {self.permute!r}")


@dataclass
class LayerReport:
    name: str
    shape: Tuple[int, int]  # (out_features, in_features)
    pattern: Optional[str]
    skipped: Optional[str] = None  # reason, when left dense
    kept_importance: Optional[float] = None  # kept score / total score
    kept_importance_identity: Optional[float] = None  # the same without permutations
    score_total: Optional[float] = None  # sum of the layer's scores (to weigh kept importance)
    storage_ratio: Optional[float] = None
    # Permutations applied: rows (stored row i is original row row_perm[i]; undone by the consumer,
    # or where the output is written when row_scattered) and columns (absorbed from the producers,
    # or gathered when col_gathered).
    row_perm: Optional[torch.Tensor] = None
    col_perm: Optional[torch.Tensor] = None
    row_scattered: bool = False
    col_gathered: bool = False

    @property
    def permutation(self) -> Optional[str]:
        """How the layer is permuted, e.g. 'rows absorbed+cols gathered' (None: not permuted).
        A layer left dense can have its rows absorbed: it is permuted in place."""
        parts = []
        if self.row_perm is not None:
            parts.append("rows scattered" if self.row_scattered else "rows absorbed")
        if self.col_perm is not None:
            parts.append("cols gathered" if self.col_gathered else "cols absorbed")
        return "+".join(parts) or None

    def to_dict(self) -> dict:
        """JSON-friendly summary (no tensors)."""
        return {"name": self.name, "shape": list(self.shape), "pattern": self.pattern, "skipped": self.skipped,
                "kept_importance": self.kept_importance, "kept_importance_identity": self.kept_importance_identity,
                "storage_ratio": self.storage_ratio, "permutation": self.permutation}


@dataclass
class SparsifyReport:
    layers: List[LayerReport] = field(default_factory=list)
    # Parameters permuted along an edge (a norm's weight between fc1 and fc2): name -> the edge's consumer.
    permuted_parameters: Dict[str, str] = field(default_factory=dict)
    # Candidate edges refused, with the reason (from the trace or from the check by execution).
    refused_edges: List[str] = field(default_factory=list)

    @property
    def permuted(self) -> List[LayerReport]:
        """Every layer a permutation touched, sparse or left dense (a dense producer absorbs the
        row permutation of an edge whose consumer is sparse)."""
        return [r for r in self.layers if r.row_perm is not None or r.col_perm is not None]

    @property
    def sparse(self) -> List[LayerReport]:
        return [r for r in self.layers if r.skipped is None]

    @property
    def skipped(self) -> List[LayerReport]:
        return [r for r in self.layers if r.skipped is not None]

    def __getitem__(self, name: str) -> LayerReport:
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError(name)

    def __str__(self) -> str:
        lines = [f"{'layer':<48} {'shape':>12} {'pattern':>8} {'kept':>6} {'permutation':>28}  note"]
        for r in self.layers:
            kept = "" if r.kept_importance is None else f"{r.kept_importance:.3f}"
            lines.append(f"{r.name:<48} {f'{r.shape[0]}x{r.shape[1]}':>12} {r.pattern or '-':>8} {kept:>6} "
                         f"{r.permutation or '-':>28}  {r.skipped or ''}")
        return "\n".join(lines)


def serving_problem(shape: Tuple[int, int], pattern: Pattern) -> Optional[str]:
    """Why a layer of this (out, in) shape is not worth serving in ``pattern``, or None.

    Any shape can be stored (rows and columns are padded), but padding beyond a quarter of the
    weight costs more than the pattern saves: such layers stay dense.
    """
    R, K = shape
    Rp = -(-R // pattern.row_block) * pattern.row_block
    Kp = -(-K // pattern.M) * pattern.M
    if Rp * Kp > 1.25 * R * K:
        if not pattern.is_vnm:  # 2:4: rows pad to the 16-row tile, columns to groups of 4
            fix = "too small for 2:4 storage; it stays dense"
        else:
            smaller = [what for what, grows in (("V", Rp > R), ("M", Kp > K)) if grows]
            fix = f"a pattern with a smaller {' and '.join(smaller)} pads less"
        return f"shape {R}x{K} pads to {Rp}x{Kp} under {pattern} (over 25% padding); {fix}"
    return None


def find_layers(model: nn.Module, config: SparsifyConfig,
                filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
                compressed_only: bool = True) -> List[LayerReport]:
    """Every linear layer of ``model`` with the pattern it gets, or why it is skipped.

    ``compressed_only``: a plain N:M pattern (no compressed storage) raises ``ValueError``; False
    lets it through (recovery training can train N:M masks, see :mod:`vnm.train`).
    """
    out = []
    ties = _tied_names(model) if config.skip_heads else {}
    for name, module in model.named_modules():
        if not is_prunable(module):
            continue
        rep = LayerReport(name=name, shape=tuple(weight_matrix(module).shape), pattern=None)
        pattern = config.pattern_for(name)
        problem = None
        tied = [n for n in ties.get(_storage_key(module.weight), []) if n != name + ".weight"]
        if (glob := next((g for g in config.skip if fnmatch.fnmatchcase(name, g)), None)) is not None:
            rep.skipped = (f"output head (default skip pattern '{glob}')" if glob in DEFAULT_SKIP
                           else f"matches config.skip pattern '{glob}'")
        elif tied:
            rep.skipped = (f"weight tied to {tied[0]} (sparsifying it would untie them; "
                           "SparsifyConfig(skip_heads=False) sparsifies it anyway)")
        elif filter_fn is not None and not filter_fn(module, name):
            rep.skipped = "excluded by filter_fn"
        elif pattern is None:
            rep.skipped = "no pattern in config.pattern matches this name"
        elif compressed_only and not pattern.compressible:
            raise ValueError(f"pattern '{pattern}' for {name} cannot be stored compressed: use V:N:M or 2:4")
        elif (problem := serving_problem(rep.shape, pattern)) is not None:
            rep.skipped = problem
        else:
            rep.pattern = str(pattern)
        if rep.skipped is not None:  # heads and the user's choices are expected; a shape that cannot be served is not
            log.log(logging.INFO if problem is None else logging.WARNING, "%s (%dx%d) left dense: %s",
                    name, rep.shape[0], rep.shape[1], rep.skipped)
        out.append(rep)
    return out


def _storage_key(t: torch.Tensor):
    """Where a tensor's memory lives (None for an empty tensor, or a tensor subclass without storage of its own)."""
    if not t.numel():
        return None
    try:
        return (t.device, t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def _tied_names(model: nn.Module) -> Dict[object, List[str]]:
    """Parameter names by storage: a weight with more than one name is tied (the same Parameter
    object reached twice, or parameters sharing memory)."""
    names: Dict[object, List[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        key = _storage_key(p)
        if key is not None:
            names.setdefault(key, []).append(n)
    return {k: v for k, v in names.items() if len(v) > 1}


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


class _Scores:
    """Scores of each layer on its original weights (computed once, on the CPU)."""

    def __init__(self, model, config, names):
        self.model, self.fn = model, scores_mod.get(config.score)
        self.stats = None
        if not callable(config.score) and scores_mod.needs_stats(config.score) or (
                callable(config.score) and config.calibration is not None):
            if config.calibration is None:
                raise ValueError(f"score {config.score!r} needs input statistics: pass calibration batches in "
                                 "SparsifyConfig(calibration=...) (e.g. vnm.models.token_batches(tokenizer, texts))")
            from .calibration import calibrate  # noqa: PLC0415

            self.stats = calibrate(model, config.calibration, layers=list(names), progress=config.progress,
                                   entropy_bins=128 if config.score == "entropy" else None,
                                   hessian=not callable(config.score) and config.score in scores_mod.NEEDS_HESSIAN)
        self._cache: Dict[str, torch.Tensor] = {}

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self._cache:
            w = weight_matrix(self.model.get_submodule(name)).detach()
            st = None if self.stats is None else self.stats.get(name)
            self._cache[name] = self.fn(w, st, layer=name).float().cpu()
        return self._cache[name]


@dataclass
class _Plan:
    row_perm: Optional[torch.Tensor] = None
    col_perm: Optional[torch.Tensor] = None
    row_scattered: bool = False
    col_gathered: bool = False


def _permuted(s: torch.Tensor, plan: _Plan) -> torch.Tensor:
    if plan.row_perm is not None:
        s = s[plan.row_perm]
    if plan.col_perm is not None:
        s = s[:, plan.col_perm]
    return s


def _search(scores: torch.Tensor, pattern: str, config: SparsifyConfig, budget: float, **kw):
    return search_permutation(scores, pattern, time_budget=budget, seed=config.seed, progress=False,
                              max_rounds=config.permute_max_rounds, **kw)


def _is_identity(perm: torch.Tensor) -> bool:
    return bool(torch.equal(perm, torch.arange(perm.numel(), dtype=perm.dtype)))


def _plan_mlp(edge: MlpEdge, scores: _Scores, patterns: Dict[str, str], plans, config) -> Optional[torch.Tensor]:
    """One permutation of the hidden features for the producers' rows and the consumer's columns:
    the better (by total kept score) of the consumer's column search and the producers' row search.
    Returns it (None: the identity stays)."""
    cons = edge.consumer
    prods = [p for p in edge.producers if p in patterns]
    s_cons = scores(cons)

    def total(perm):
        t = kept_score(s_cons[:, perm], patterns[cons])
        return t + sum(kept_score(scores(p)[edge.producer_rows(perm)], patterns[p]) for p in prods)

    ident = torch.arange(s_cons.shape[1])
    candidates = [_search(s_cons, patterns[cons], config, config.permute_time_budget, permute_rows=False).col_perm]
    same = {patterns[p] for p in prods}
    if prods and not edge.packed and len(same) == 1 and as_pattern(next(iter(same))).M > 4:
        # The producers' row order sets which rows share a V-row block: search it on their scores
        # side by side (the same rows), columns fixed.
        stacked = torch.cat([scores(p) for p in prods], dim=1)
        candidates.append(_search(stacked, next(iter(same)), config, config.permute_time_budget,
                                  permute_cols=False).row_perm)
    best, best_total = None, total(ident)
    for perm in candidates:
        t = total(perm)
        if t > best_total:
            best, best_total = perm, t
    if best is not None:
        plans[cons].col_perm = best
        for p in edge.producers:  # skipped producers are dense: they are permuted in place later
            plans.setdefault(p, _Plan()).row_perm = edge.producer_rows(best)
    return best


def _heads_perms(edge: HeadsEdge, value_perm: torch.Tensor, producer_rows: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(producer row permutation, consumer column permutation) for a permutation of the value
    features that maps each value head onto itself."""
    start, end = edge.value_rows
    d, group = edge.head_dim, edge.num_heads // edge.num_kv_heads
    row_perm = torch.arange(producer_rows)
    row_perm[start:end] = start + value_perm
    col_perm = torch.cat([h * d + value_perm[(h // group) * d:(h // group + 1) * d] - (h // group) * d
                          for h in range(edge.num_heads)])
    return row_perm, col_perm


def _plan_heads(edge: HeadsEdge, scores: _Scores, patterns: Dict[str, str], plans, config) -> Optional[torch.Tensor]:
    """A permutation of each value head's features, shared by the query heads that read it, found
    on the output projection's columns of those heads stacked on top of each other. Returns the
    permutation of the value features (None: the identity stays)."""
    cons, d = edge.consumer, edge.head_dim
    s = scores(cons)
    if s.shape[1] != edge.num_heads * d:
        return None
    group = edge.num_heads // edge.num_kv_heads
    if group == 1:
        # One value head per query head: a single search over the whole matrix with the columns
        # kept inside their head. It scores the real V x M blocks, which straddle heads when M does
        # not divide head_dim.
        value_perm = _search(s, patterns[cons], config, config.permute_time_budget, permute_rows=False,
                             col_segment=d).col_perm
    else:
        # Query heads sharing a value head need one permutation: search it on their columns stacked.
        budget = None if config.permute_time_budget is None else config.permute_time_budget / edge.num_kv_heads
        parts = []
        for j in range(edge.num_kv_heads):
            heads = range(j * group, (j + 1) * group)
            stacked = torch.cat([s[:, h * d:(h + 1) * d] for h in heads], dim=0)
            parts.append(j * d + _search(stacked, patterns[cons], config, budget, permute_rows=False).col_perm)
        value_perm = torch.cat(parts)
    rows = weight_matrix(scores.model.get_submodule(edge.producer)).shape[0]
    row_perm, col_perm = _heads_perms(edge, value_perm, rows)
    if kept_score(s[:, col_perm], patterns[cons]) <= kept_score(s, patterns[cons]):
        return None
    plans[cons].col_perm = col_perm
    plans.setdefault(edge.producer, _Plan()).row_perm = row_perm
    return value_perm


# ---- the edges, checked by running the model ---------------------------------------------------


@torch.no_grad()
def _apply_edge_(model: nn.Module, edge, perm: torch.Tensor) -> None:
    """Permute the dense model in place along ``edge`` (``perm``: the hidden features of an MLP edge,
    the value features of a heads edge): producers' rows, consumer's columns, parameters between."""
    if isinstance(edge, MlpEdge):
        rows, cols = edge.producer_rows(perm), perm
        for p in edge.producers:
            permute_linear_rows(model.get_submodule(p), rows)
    else:
        prod = model.get_submodule(edge.producer)
        rows, cols = _heads_perms(edge, perm, weight_matrix(prod).shape[0])
        permute_linear_rows(prod, rows)
    permute_linear_cols(model.get_submodule(edge.consumer), cols)
    for pp in edge.params:
        param = model.get_parameter(pp.name) if _is_parameter(model, pp.name) else model.get_buffer(pp.name)
        param.copy_(pp.permuted(param, perm))


def _is_parameter(model: nn.Module, name: str) -> bool:
    try:
        model.get_parameter(name)
        return True
    except AttributeError:
        return False


def _edge_features(model: nn.Module, edge) -> int:
    if isinstance(edge, MlpEdge):
        return weight_matrix(model.get_submodule(edge.consumer)).shape[1]
    return edge.value_rows[1] - edge.value_rows[0]


def _random_edge_perm(model: nn.Module, edge, g: torch.Generator) -> torch.Tensor:
    n = _edge_features(model, edge)
    if isinstance(edge, MlpEdge):
        return torch.randperm(n, generator=g)
    d = edge.head_dim
    return torch.cat([j * d + torch.randperm(d, generator=g) for j in range(n // d)])


def _outputs(model: nn.Module, inputs) -> List[torch.Tensor]:
    from .graph import output_tensors  # noqa: PLC0415

    with torch.no_grad():
        return [t.detach().clone() for t in output_tensors(run_model(model, inputs)) if t.dtype.is_floating_point]


def _same_outputs(a: List[torch.Tensor], b: List[torch.Tensor]) -> bool:
    """Equal up to the rounding of a different summation order: a relative tolerance of 1e-4 of
    each output's largest magnitude in float32 (1e-2 in 16-bit types). A wrong edge changes the
    outputs by orders of magnitude more once the model's norms and scales are not trivial."""
    for x, y in zip(a, b):
        tol = 1e-4 if x.dtype in (torch.float32, torch.float64) else 1e-2
        scale = float(y.abs().max()) if y.numel() else 0.0
        if x.shape != y.shape or not bool(((x.float() - y.float()).abs() <= tol * max(scale, 1e-30)).all()):
            return False
    return len(a) == len(b)


def _verify_edges(model: nn.Module, edges: List[object], inputs, seed: int) -> Tuple[List[object], List[Refusal]]:
    """The edges along which a random permutation of their kind leaves the model's outputs on
    ``inputs`` unchanged, and the others refused. The model is restored exactly (permutations
    only move values)."""
    if not edges:
        return [], []
    was_training = model.training
    model.eval()
    try:
        ref = _outputs(model, inputs)
        g = torch.Generator().manual_seed(seed)
        perms = [_random_edge_perm(model, e, g) for e in edges]

        def run_with(chosen):
            for e, p in chosen:
                _apply_edge_(model, e, p)
            try:
                return _same_outputs(_outputs(model, inputs), ref)
            finally:
                for e, p in reversed(chosen):
                    _apply_edge_(model, e, invert_permutation(p))

        if run_with(list(zip(edges, perms))):
            return edges, []
        ok, refused = [], []
        for e, p in zip(edges, perms):
            if run_with([(e, p)]):
                ok.append(e)
            else:
                refused.append(Refusal(e.consumer, list(e.producers),
                                       "a random permutation along it changed the model's outputs"))
        return ok, refused
    finally:
        model.train(was_training)


# Tokens of a calibration batch kept for the trace and the edge check: what they establish is per
# feature, the same for every token, while the tracer's cost grows with the tokens (on SmolLM2 a
# 256-token window took 98 s to trace, 16 tokens a few seconds).
TRACE_TOKENS = 16


def _short_text_batch(batch, tokens: int = TRACE_TOKENS):
    """The first sequence and ``tokens`` tokens of a text batch (a mapping with a 2-d ``input_ids``):
    every tensor laid out [batch, tokens, ...] like it is cut alike. Anything else is returned as is."""
    if not isinstance(batch, Mapping) or not isinstance(batch.get("input_ids"), torch.Tensor):
        return batch
    ids = batch["input_ids"]
    if ids.dim() != 2 or (ids.shape[0] == 1 and ids.shape[1] <= tokens):
        return batch
    lead = tuple(ids.shape)
    return {k: (v[:1, :tokens] if isinstance(v, torch.Tensor) and v.dim() >= 2 and tuple(v.shape[:2]) == lead
                else v) for k, v in batch.items()}


def _trace_inputs(model: nn.Module, config: SparsifyConfig):
    if config.example_inputs is not None:
        batch = config.example_inputs
    elif isinstance(config.calibration, (list, tuple)) and config.calibration:
        batch = _short_text_batch(config.calibration[0])
    else:
        batch = example_inputs(model)
    return None if batch is None else batch_to(batch, model_device(model))


def _plan_permutations(model, patterns, scores, config, mode, edges) -> Tuple[Dict[str, _Plan], list]:
    """Plans per layer, and the edges committed with their permutation (for the parameters)."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    plans = {name: _Plan() for name in patterns}
    edges = [e for e in edges if e.consumer in patterns]
    committed = []
    for edge in tqdm(edges, desc="permutation search (absorbed)", disable=not config.progress or not edges):
        perm = (_plan_mlp if isinstance(edge, MlpEdge) else _plan_heads)(edge, scores, patterns, plans, config)
        if perm is not None:
            committed.append((edge, perm))
    # Then each layer on its own: rows that no edge reordered are scattered back by the epilogue
    # (V:N:M with M > 4 only: under 2:4 every row keeps its own best, the row order changes
    # nothing); with mode 'all', the columns of layers fed by the residual stream are gathered.
    absorbed_cols = {e.consumer for e in edges}
    todo = []
    for name, pattern in patterns.items():
        plan = plans[name]
        rows = plan.row_perm is None and as_pattern(pattern).M > 4
        cols = mode == "all" and name not in absorbed_cols and plan.col_perm is None
        if rows or cols:
            todo.append((name, rows, cols))
    for name, rows, cols in tqdm(todo, desc="permutation search (scattered rows, gathered columns)",
                                 disable=not config.progress or not todo):
        plan = plans[name]
        res = _search(_permuted(scores(name), plan), patterns[name], config, config.permute_time_budget,
                      permute_rows=rows, permute_cols=cols)
        if not res.kept > res.kept_identity:
            continue
        if rows and not _is_identity(res.row_perm):
            plan.row_perm, plan.row_scattered = res.row_perm, True
        if cols and not _is_identity(res.col_perm):
            plan.col_perm, plan.col_gathered = res.col_perm, True
    return plans, committed


def _permute_dense_rows_(module: nn.Module, perm: torch.Tensor) -> None:
    """Permute a dense layer's output rows (and bias) in place (producers that stay dense)."""
    w = weight_matrix(module)
    with torch.no_grad():
        w.copy_(w[perm.to(w.device)])
        if getattr(module, "bias", None) is not None:
            module.bias.copy_(module.bias[perm.to(module.bias.device)])


class _FixedScores:
    """Scores given per layer (the planners' interface: ``scores(name)``, ``scores.model``)."""

    def __init__(self, model: nn.Module, scores: Dict[str, torch.Tensor]):
        self.model, self.scores = model, scores

    def __call__(self, name: str) -> torch.Tensor:
        return self.scores[name]


def _sparsegpt_prune_(model, patterns: Dict[str, str], config: SparsifyConfig, mode: Optional[str], edges: list):
    """score='sparsegpt': prune and update the weights in place block by block (vnm.obs), planning
    each block's permutations on its OBS saliency along the verified ``edges``. Returns (scores,
    plans, masks, committed edges) for sparsify's loop, which then stores the updated weights under
    the masks found in the sweep (in the layers' own order: the plans are applied there)."""
    from .obs import prune_sequential  # noqa: PLC0415

    if config.calibration is None:
        raise ValueError("score 'sparsegpt' needs calibration batches: pass SparsifyConfig(calibration=...) "
                         "(e.g. vnm.models.token_batches(tokenizer, texts))")
    plans: Dict[str, _Plan] = {n: _Plan() for n in patterns}
    committed: list = []

    def plan_block(block_patterns, saliency):
        block_plans, block_committed = _plan_permutations(model, block_patterns, _FixedScores(model, saliency),
                                                          config, mode, edges)
        plans.update(block_plans)
        committed.extend(block_committed)
        return block_plans

    result = prune_sequential(model, config.calibration, patterns, plan_fn=plan_block if mode else None,
                              progress=config.progress)
    return _FixedScores(model, result.saliency), plans, result.masks, committed


def sparsify(model: nn.Module, config: Optional[SparsifyConfig] = None,
             filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> SparsifyReport:
    """Replace the chosen linear layers of ``model`` (in place) with :class:`VNMLinear`.

    Returns a :class:`SparsifyReport` (per layer: pattern, kept importance, permutations, or why it
    was left dense). Raises ``ValueError`` when no layer can be sparsified.
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    config = config or SparsifyConfig()
    mode = config.permute_mode()
    layers = find_layers(model, config, filter_fn)
    report = SparsifyReport(layers)
    trace = None
    inputs = _trace_inputs(model, config) if (mode or config.skip_heads) and any(
        r.skipped is None for r in layers) else None
    if inputs is not None:
        try:
            trace = trace_model(model, inputs)
        except Exception as exc:  # noqa: BLE001 - any model the tracer cannot run: no edges, names only
            log.log(logging.WARNING if mode else logging.INFO,
                    "could not trace %s on the example inputs (%s: %s): no permutation edge is used and output "
                    "heads are found by name only; pass SparsifyConfig(example_inputs=...) that the model's "
                    "forward accepts", type(model).__name__, type(exc).__name__, exc)
    if trace is not None and config.skip_heads:
        for r in layers:
            if r.skipped is None and r.name in trace.heads:
                r.pattern, r.skipped = None, "output head (its output is a model output)"
                log.info("%s (%dx%d) left dense: %s", r.name, r.shape[0], r.shape[1], r.skipped)
    chosen = [r for r in layers if r.skipped is None]
    if not chosen:
        done = sum(isinstance(m, VNMLinear) for m in model.modules())
        if done:
            raise ValueError(f"{type(model).__name__} is already sparsified ({done} VNMLinear layers) and has no "
                             "other layer to sparsify: sparsify the dense model instead (to change the pattern, "
                             "start again from the dense weights)")
        reasons = "; ".join(f"{r.name}: {r.skipped}" for r in layers) or "the model has no nn.Linear or Conv1D layer"
        raise ValueError(f"no prunable layer in {type(model).__name__}: {reasons}")
    if config.dtype is not None:
        for r in chosen:
            have = weight_matrix(model.get_submodule(r.name)).dtype
            if have != config.dtype:
                raise ValueError(f"SparsifyConfig(dtype={config.dtype}) but {r.name} is {have}: a sparse layer in "
                                 "another dtype than the model cannot run in it; cast the model instead "
                                 f"(model.to({config.dtype})) and leave dtype unset")
    patterns = {r.name: r.pattern for r in chosen}
    edges = []
    if mode:
        if trace is None:
            log.warning("permute=%r without a traced forward pass: no edge is used (rows are scattered%s only); "
                        "pass calibration batches as a list or SparsifyConfig(example_inputs=...)",
                        config.permute, ", columns gathered" if mode == "all" else "")
        else:
            edges, refused = edges_from_trace(trace)
            wanted = [e for e in edges if e.consumer in patterns]
            checked, failed = _verify_edges(model, wanted, inputs, config.seed)
            edges = checked
            for r in refused + failed:
                if r.consumer in patterns:
                    report.refused_edges.append(str(r))
                    log.log(logging.WARNING if r in failed else logging.INFO, "permutation edge refused: %s", r)
    masks = None
    if is_obs_method(config.score):
        scores, plans, masks, committed = _sparsegpt_prune_(model, patterns, config, mode, edges)
    else:
        scores = _Scores(model, config, patterns)
        plans, committed = (_plan_permutations(model, patterns, scores, config, mode, edges) if mode
                            else ({n: _Plan() for n in patterns}, []))

    by_name = {r.name: r for r in layers}
    for name, plan in plans.items():  # producers left dense still carry their row permutation
        if name not in patterns and plan.row_perm is not None:
            _permute_dense_rows_(model.get_submodule(name), plan.row_perm)
            by_name[name].row_perm = plan.row_perm  # listed: the report shows every layer permuted
    for edge, perm in committed:  # parameters between producers and consumer (a norm's weight and bias)
        with torch.no_grad():
            for pp in edge.params:
                param = model.get_parameter(pp.name) if _is_parameter(model, pp.name) else model.get_buffer(pp.name)
                param.copy_(pp.permuted(param, perm))
                report.permuted_parameters[pp.name] = edge.consumer
    for rep in tqdm(chosen, desc="sparsify", disable=not config.progress):
        module = model.get_submodule(rep.name)
        plan = plans[rep.name]
        weight = weight_matrix(module).detach()
        bias = getattr(module, "bias", None)
        bias = None if bias is None else bias.detach()
        s = scores(rep.name)
        rep.score_total = float(s.double().sum())
        rep.kept_importance_identity = kept_score(s, rep.pattern) / max(rep.score_total, 1e-300)
        if plan.row_perm is not None:
            weight = weight[plan.row_perm.to(weight.device)]
            if not plan.row_scattered:  # a scattered layer keeps its bias in output order
                bias = None if bias is None else bias[plan.row_perm.to(bias.device)]
        if plan.col_perm is not None:
            weight = weight[:, plan.col_perm.to(weight.device)]
        sp = _permuted(s, plan)
        mask = select_mask(sp, rep.pattern) if masks is None else _permuted(masks[rep.name], plan)
        rep.kept_importance = float((sp.double() * mask).sum() / sp.double().sum().clamp_min(1e-300))
        rep.row_perm, rep.col_perm = plan.row_perm, plan.col_perm
        rep.row_scattered, rep.col_gathered = plan.row_scattered, plan.col_gathered
        w = VNMTensor.from_dense(weight, mask.to(weight.device), rep.pattern,
                                 perm=plan.col_perm if plan.col_gathered else None,
                                 row_perm=plan.row_perm if plan.row_scattered else None)
        layer = VNMLinear.from_tensor(w, bias)
        rep.storage_ratio = layer.nbytes / (weight.numel() * weight.element_size())
        _set_module(model, rep.name, layer)
    return report


def original_order_weight(layer: VNMLinear, rep: LayerReport) -> torch.Tensor:
    """The masked dense weight of a sparsified layer in the model's original row and column order:
    the unpermuted model with this weight computes what the permuted sparse model computes."""
    w = layer.dense_weight()  # in the layer's own order (gathered columns, scattered rows undone)
    if rep.col_perm is not None and not rep.col_gathered:
        out = torch.empty_like(w)
        out[:, rep.col_perm] = w
        w = out
    if rep.row_perm is not None and not rep.row_scattered:
        out = torch.empty_like(w)
        out[rep.row_perm] = w
        w = out
    return w


__all__ = ["SparsifyConfig", "SparsifyReport", "LayerReport", "sparsify", "find_layers", "original_order_weight",
           "DEFAULT_SKIP"]
