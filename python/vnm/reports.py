"""Kept-importance reports: how much of each layer's importance a pattern keeps.

``vnm.report(model, "64:2:8", score="wanda", stats=stats)`` prints one row per layer with the
fraction of the layer's score that the exact mask keeps (kept score / total score) and returns the
numbers; ``vnm.report(scores, choice.patterns)`` reports the patterns a
:func:`vnm.choose_pattern` result assigned, one per layer (global or per-layer choice);
``plot="kept.png"`` also saves kept importance against sparsity for 2:4, 4:8, 2:8 and
V:2:M over several V and M (matplotlib, Agg backend).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .layers import LayerFilter
from .mask import select_mask
from .pattern import PatternLike, as_pattern
from .pruning import kept_fraction, layer_scores

PLOT_VS = (16, 64, 128)
PLOT_MS = (4, 5, 6, 8, 10, 12, 16)
PLOT_NM = ("2:4", "4:8", "2:8")
PER_LAYER = "per layer"  # the column of a report on {layer: pattern}


@dataclass
class KeptReport:
    """Kept importance per pattern: ``kept[pattern][layer]`` and the parameter-weighted
    ``overall[pattern]`` (each layer weighted by R * K); ``plot`` is the saved figure, if any.
    For a report on ``{layer: pattern}`` the column is ``"per layer"`` and ``layer_patterns``
    says which pattern each layer was measured with."""

    kept: Dict[str, Dict[str, float]]
    overall: Dict[str, float]
    shapes: Dict[str, tuple]
    plot: Optional[Path] = None
    curve: Dict[str, float] = field(default_factory=dict)  # pattern -> overall kept, for the plot
    layer_patterns: Dict[str, str] = field(default_factory=dict)

    def table(self) -> str:
        pats = list(self.kept)
        width = max([len("layer"), len("overall (weighted by R*K)")] + [len(n) for n in self.shapes])
        pw = max([len("pattern")] + [len(p) for p in self.layer_patterns.values()])
        pcol = (lambda text: f" {text:>{pw}}") if self.layer_patterns else (lambda text: "")
        lines = [f"{'layer':<{width}} {'R x K':>11}{pcol('pattern')} " + " ".join(f"{p:>9}" for p in pats)]
        for name, (R, K) in self.shapes.items():
            lines.append(f"{name:<{width}} {f'{R}x{K}':>11}{pcol(self.layer_patterns.get(name, ''))} "
                         + " ".join(f"{self.kept[p][name]:9.4f}" for p in pats))
        lines.append(f"{'overall (weighted by R*K)':<{width}} {'':>11}{pcol('')} "
                     + " ".join(f"{self.overall[p]:9.4f}" for p in pats))
        return "\n".join(lines)


def _scores_of(model_or_scores, score, stats, layers, score_options) -> Dict[str, torch.Tensor]:
    if isinstance(model_or_scores, nn.Module):
        return layer_scores(model_or_scores, score, stats, layers, **score_options)
    if isinstance(model_or_scores, Mapping) and model_or_scores and all(
            isinstance(v, torch.Tensor) and v.dim() == 2 for v in model_or_scores.values()):
        return dict(model_or_scores)
    raise TypeError("report takes a model (nn.Module) or a non-empty mapping {layer name: R x K scores}")


def _overall(kept: Mapping[str, float], shapes) -> float:
    work = {n: R * K for n, (R, K) in shapes.items()}
    return sum(work[n] * kept[n] for n in kept) / sum(work.values())


def plot_patterns() -> List[str]:
    """The patterns of the kept-vs-sparsity plot: 2:4, 4:8, 2:8 and V:2:M for V in 16/64/128 and
    M in 4..16."""
    return list(PLOT_NM) + [f"{V}:2:{M}" for V in PLOT_VS for M in PLOT_MS]


def report(
    model_or_scores: Union[nn.Module, Mapping[str, torch.Tensor]],
    pattern: Union[PatternLike, Sequence[PatternLike], Mapping[str, PatternLike]] = "64:2:8",
    *,
    score="magnitude",
    stats=None,
    layers: LayerFilter = None,
    plot: Union[None, str, Path] = None,
    print_fn: Optional[Callable[[str], None]] = print,
    backend: str = "auto",
    progress: bool = True,
    **score_options,
) -> KeptReport:
    """Per-layer kept importance under ``pattern`` (one pattern, a list, or ``{layer: pattern}``
    such as ``choice.patterns`` of :func:`vnm.choose_pattern`, which must name exactly the scored
    layers), printed as a table (``print_fn=None`` for silence) and returned as a :class:`KeptReport`.

    ``model_or_scores``: a model (scored with ``score`` and ``stats`` as in
    :func:`vnm.layer_scores`) or ``{name: R x K scores}``. ``plot``: path of a PNG of overall
    kept importance against sparsity for :func:`plot_patterns` (one curve per V, points for the
    plain N:M patterns).
    """
    sc = _scores_of(model_or_scores, score, stats, layers, score_options)
    shapes = {n: tuple(s.shape) for n, s in sc.items()}
    kept: Dict[str, Dict[str, float]] = {}
    layer_patterns: Dict[str, str] = {}
    if isinstance(pattern, Mapping):
        layer_patterns = _layer_patterns(pattern, sc)
        kept[PER_LAYER] = {n: kept_fraction(s, select_mask(s, layer_patterns[n], backend=backend))
                           for n, s in tqdm(sc.items(), desc="report per layer", disable=not progress, leave=False)}
    else:
        pats = [str(as_pattern(p)) for p in ([pattern] if isinstance(pattern, str) or not isinstance(pattern, Sequence) else pattern)]
        for p in pats:
            kept[p] = {n: kept_fraction(s, select_mask(s, p, backend=backend))
                       for n, s in tqdm(sc.items(), desc=f"report {p}", disable=not progress, leave=False)}
    rep = KeptReport(kept, {p: _overall(kept[p], shapes) for p in kept}, shapes, layer_patterns=layer_patterns)
    if print_fn is not None:
        print_fn(rep.table())
    if plot is not None:
        rep.curve = {}
        for p in tqdm(plot_patterns(), desc="report: plot", disable=not progress, leave=False):
            per = kept.get(p) or {n: kept_fraction(s, select_mask(s, p, backend=backend)) for n, s in sc.items()}
            rep.curve[p] = _overall(per, shapes)
        rep.plot = _save_plot(rep.curve, Path(plot), score if isinstance(score, str) else "custom score")
    return rep


def _layer_patterns(pattern: Mapping, sc: Mapping[str, torch.Tensor]) -> Dict[str, str]:
    missing = [n for n in sc if n not in pattern]
    extra = [n for n in pattern if n not in sc]
    if missing or extra:
        raise ValueError(
            f"the pattern mapping must name exactly the reported layers: {len(missing)} scored layer(s) have no "
            f"pattern {missing[:3]}, {len(extra)} pattern(s) name no scored layer {extra[:3]}. Report the scores "
            "the choice was made on (vnm.report(scores, choice.patterns)), or pass layers=list(choice.patterns)"
        )
    return {n: str(as_pattern(pattern[n])) for n in sc}


def _save_plot(curve: Mapping[str, float], path: Path, score_name: str) -> Path:
    # A bare Figure renders with the Agg canvas and leaves pyplot's global backend alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 - optional dependency
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for V in PLOT_VS:
        pts = [(as_pattern(p).sparsity * 100, curve[p]) for p in curve if as_pattern(p).is_vnm and as_pattern(p).V == V]
        pts.sort()
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=f"V:2:M, V={V}")
    # Plain N:M points in their own colours and markers, apart from the V:2:M curves' colour cycle.
    for p, color, marker in zip(PLOT_NM, ("black", "tab:gray", "tab:purple"), ("s", "D", "^")):
        if p in curve:
            ax.scatter([as_pattern(p).sparsity * 100], [curve[p]], color=color, marker=marker, s=50, zorder=3,
                       label=f"{p} (plain N:M)")
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("kept importance (fraction of total score)")
    ax.set_title(f"kept importance vs sparsity ({score_name})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


__all__ = ["report", "KeptReport", "plot_patterns"]
