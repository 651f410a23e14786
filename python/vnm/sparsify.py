"""``vnm.sparsify``: one call that turns a model's linear layers into :class:`vnm.nn.VNMLinear`.

In the style of torchao's ``sparsify_``: a config dataclass says which pattern (one, or per layer),
which score, which calibration data and whether to search channel permutations; ``filter_fn``
picks layers by module and name. Layers that should stay dense (embeddings are never linear
layers; by default the LM head, classifier and pooler) or whose shape cannot be served are
skipped, and the report says which and why.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .mask import select_mask
from .nn import VNMLinear, linear_weight
from .pattern import Pattern, PatternLike, as_pattern

# Module names (fnmatch globs) left dense by default: output heads.
DEFAULT_SKIP: Tuple[str, ...] = ("lm_head", "*classifier*", "*pooler*", "head", "head.*", "score", "*.score")

ScoreFn = Callable[[torch.Tensor, object], torch.Tensor]


@dataclass
class SparsifyConfig:
    """What :func:`sparsify` does.

    pattern: one pattern for every layer ('64:2:8'), or a mapping from module-name globs to
        patterns (first match wins; layers matching none are skipped).
    score: 'magnitude', 'wanda', 'ria', 'entropy' (see :mod:`vnm.scores`) or a callable
        ``(weight, stats) -> scores``.
    calibration: batches (dicts of model inputs, tensors or tuples) run through the model to
        collect input statistics, needed by every score but magnitude.
    permute: False; 'free' (only permutations a neighbouring layer absorbs: MLP up/gate rows into
        down columns, value rows into output-projection columns within heads); or True / 'all'
        (also input permutations gathered at run time for layers fed by the residual stream).
    permute_time_budget: seconds of permutation search per layer.
    skip: module-name globs left dense.
    dtype: dtype of the compressed values (default: the layer's).
    """

    pattern: Union[PatternLike, Mapping[str, PatternLike]] = "64:2:8"
    score: Union[str, ScoreFn] = "magnitude"
    calibration: Optional[Iterable] = None
    permute: Union[bool, str] = False
    permute_time_budget: float = 2.0
    skip: Sequence[str] = DEFAULT_SKIP
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


@dataclass
class LayerReport:
    name: str
    shape: Tuple[int, int]  # (out_features, in_features)
    pattern: Optional[str]
    skipped: Optional[str] = None  # reason, when left dense
    kept_importance: Optional[float] = None  # kept score / total score
    permutation: Optional[str] = None  # 'absorbed', 'gathered' or None
    storage_ratio: Optional[float] = None


@dataclass
class SparsifyReport:
    layers: List[LayerReport] = field(default_factory=list)

    @property
    def sparse(self) -> List[LayerReport]:
        return [r for r in self.layers if r.skipped is None]

    @property
    def skipped(self) -> List[LayerReport]:
        return [r for r in self.layers if r.skipped is not None]

    def __str__(self) -> str:
        lines = [f"{'layer':<48} {'shape':>12} {'pattern':>8} {'kept':>6} {'perm':>9}  note"]
        for r in self.layers:
            kept = "" if r.kept_importance is None else f"{r.kept_importance:.3f}"
            lines.append(f"{r.name:<48} {f'{r.shape[0]}x{r.shape[1]}':>12} {r.pattern or '-':>8} {kept:>6} "
                         f"{r.permutation or '-':>9}  {r.skipped or ''}")
        return "\n".join(lines)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def serving_problem(shape: Tuple[int, int], pattern: Pattern) -> Optional[str]:
    """Why a layer of this (out, in) shape is not worth serving in ``pattern``, or None.

    Any shape can be stored (rows and columns are padded), but padding beyond a quarter of the
    weight costs more than the pattern saves: such layers stay dense.
    """
    R, K = shape
    Rp = -(-R // pattern.row_block) * pattern.row_block
    Kp = -(-K // pattern.M) * pattern.M
    if Rp * Kp > 1.25 * R * K:
        return (f"shape {R}x{K} pads to {Rp}x{Kp} under {pattern} (over 25% padding); "
                f"a pattern with smaller V or M fits")
    return None


def find_layers(model: nn.Module, config: SparsifyConfig,
                filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> List[LayerReport]:
    """Every linear layer of ``model`` with the pattern it gets, or why it is skipped."""
    out = []
    for name, module in model.named_modules():
        if not is_linear(module):
            continue
        w = linear_weight(module)
        rep = LayerReport(name=name, shape=tuple(w.shape), pattern=None)
        pattern = config.pattern_for(name)
        if any(fnmatch.fnmatchcase(name, g) for g in config.skip):
            rep.skipped = "output head (in config.skip)"
        elif filter_fn is not None and not filter_fn(module, name):
            rep.skipped = "excluded by filter_fn"
        elif pattern is None:
            rep.skipped = "no pattern in config.pattern matches this name"
        elif not pattern.compressible:
            raise ValueError(f"pattern '{pattern}' for {name} cannot be stored compressed: use V:N:M or 2:4")
        elif (problem := serving_problem(rep.shape, pattern)) is not None:
            rep.skipped = problem
        else:
            rep.pattern = str(pattern)
        out.append(rep)
    return out


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _score_fn(score: Union[str, ScoreFn]) -> ScoreFn:
    if callable(score):
        return score
    if score == "magnitude":
        return lambda w, stats: w.float().abs()
    try:
        from . import scores as scores_mod  # noqa: PLC0415
    except ImportError:  # pragma: no cover
        scores_mod = None
    if scores_mod is None or not hasattr(scores_mod, "get"):
        raise ValueError(f"unknown score {score!r}; available: 'magnitude'")
    return scores_mod.get(score)


def sparsify(model: nn.Module, config: Optional[SparsifyConfig] = None,
             filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> SparsifyReport:
    """Replace the chosen linear layers of ``model`` (in place) with :class:`VNMLinear`.

    Returns a :class:`SparsifyReport` (per layer: pattern, kept importance, permutation, or why it
    was skipped). Raises ``ValueError`` when no layer can be sparsified.
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    config = config or SparsifyConfig()
    layers = find_layers(model, config, filter_fn)
    chosen = [r for r in layers if r.skipped is None]
    if not chosen:
        reasons = "; ".join(f"{r.name}: {r.skipped}" for r in layers) or "the model has no nn.Linear or Conv1D layer"
        raise ValueError(f"no prunable layer in {type(model).__name__}: {reasons}")
    score_fn = _score_fn(config.score)
    stats = _calibrate_if_needed(model, config, [r.name for r in chosen])
    for rep in tqdm(chosen, desc="sparsify", disable=not config.progress):
        module = model.get_submodule(rep.name)
        weight = linear_weight(module).detach()
        if config.dtype is not None:
            weight = weight.to(config.dtype)
        scores = score_fn(weight, None if stats is None else stats.get(rep.name))
        mask = select_mask(scores, rep.pattern)
        rep.kept_importance = float((scores.double() * mask).sum() / scores.double().sum().clamp_min(1e-300))
        layer = VNMLinear.from_linear(_as_linear(module, weight), mask, rep.pattern)
        rep.storage_ratio = layer.nbytes / (weight.numel() * weight.element_size())
        _set_module(model, rep.name, layer)
    return SparsifyReport(layers)


def _as_linear(module: nn.Module, weight: torch.Tensor) -> nn.Linear:
    """An nn.Linear view of ``module`` with ``weight`` (out x in), for Conv1D and dtype changes."""
    if isinstance(module, nn.Linear) and module.weight.dtype == weight.dtype:
        return module
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if module.bias is not None:
        lin.bias = nn.Parameter(module.bias.detach().to(weight.dtype), requires_grad=False)
    return lin


def _calibrate_if_needed(model, config, names):
    if config.score in ("magnitude",) or callable(config.score) and config.calibration is None:
        return None
    if config.calibration is None:
        raise ValueError(f"score {config.score!r} needs input statistics: pass calibration batches in "
                         "SparsifyConfig(calibration=...) (e.g. vnm.models.token_batches(tokenizer, texts))")
    from .calibrate import calibrate  # noqa: PLC0415

    return calibrate(model, config.calibration, layers=names)


__all__ = ["SparsifyConfig", "SparsifyReport", "LayerReport", "sparsify", "find_layers", "DEFAULT_SKIP"]
