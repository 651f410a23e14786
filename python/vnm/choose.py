"""Choosing V and M for a speed target, after "Beyond 2:4" (Zhao et al., arXiv 2410.16135).

The paper frames the choice as: maximise accuracy subject to the measured V:N:M speedup being at
least a target s, in two phases. Phase 1 keeps the (V, M) candidates whose speedup on the target
GPU meets s. Phase 2 picks among them by an accuracy proxy: per the paper's reviewers (secondary
sources, docs/papers.md section 1a), mask diversity (MD, Hubara et al. 2021: the number of masks
a pattern allows). Whether the paper combines MD with another proxy is UNCONFIRMED (a reviewer
asks why MD rather than parameter count). :func:`choose_pattern` offers two phase-2 rules,
``proxy=``:

* ``"kept"`` (default): **kept importance first, MD breaks near-ties.** For every surviving
  candidate the exact mask is selected on the user's own scores and the kept fraction (kept
  score / total score) is measured per layer; the global value is the parameter-weighted mean
  over layers (each layer's fraction weighted by R * K, so score scales that differ between
  layers do not matter). Among candidates within ``tolerance`` (absolute, default 0.002) of the
  best kept fraction, the one with the highest MD wins (then the smaller M, then the smaller V).
  This is vnm's rule, not the paper's; ``tolerance=1.0`` makes every survivor a near-tie and so
  reduces it to MD alone.
* ``"diversity"``: **the paper's phase 2 as its reviewers describe it**: the survivor with the
  highest MD; candidates whose MD ties (V:2:4 and 2:4) are separated by kept importance, then the
  smaller M and V. Kept importance is measured only for those tied candidates.

ln MD per weight: for V:N:M one V x M block allows C(M,4) * C(4,2)^V masks, so it is
``(ln C(M,4) + V ln 6) / (V M)``; for plain N:M ``ln C(M,N) / M``. Being per weight, it ranks
patterns the same for every layer shape. It falls with M (and, for M > 4, with V); among
:data:`DEFAULT_CANDIDATES` (V = 64, 128) the "diversity" rule therefore picks the smallest M,
then the smallest V, that meets the target: the densest survivor, whatever the scores say.

Why "kept" is the default: kept importance is measured on the user's scores, MD is a prior that
ignores them. Where the scores say a sparser pattern keeps more (e.g. weights that already follow
it), kept importance decides; where they are indifferent, the more flexible pattern wins.

Speedups (``speedup_table``): a CSV written by the kernel benchmark (``bench/bench_spmm.py``)
with at least the columns ``pattern,R,K,N,speedup_dense`` (speedup of the vnm kernel over dense
``torch.matmul`` at that shape and token count; repeated rows are combined by their median).
The row of pattern "2:4" is vnm's own 2:4 kernel (``vnm.spmm``) over dense, not PyTorch's
cuSPARSELt / CUTLASS semi-structured path, which the benchmark reports separately
(``ms_24``, ``speedup_24``; not read here). Of the other columns, ``dtype`` and ``gpu`` select
rows (``dtype=``, default 'float16'; ``gpu=``, required when the table holds several GPUs, see
:class:`SpeedupTable`) and the rest are ignored. Given as a path, else the path in the
environment variable ``VNM_SPEEDUP_TABLE``, else the model below. Lookup rule for a layer R x K
at ``tokens`` N:

* use the rows of the same pattern with exactly R x K if any, else those of the nearest measured
  shape (smallest |ln R - ln R'| + |ln K - ln K'|);
* among those, the exact N if measured, else linear interpolation in ln N between the two
  nearest measured N, clamped to the nearest measured N outside the measured range (no
  extrapolation).

A candidate the table does not list is reported as "not measured" and not chosen.

Without a table a **model** is used and the result says so (``source`` starts with "model"): the
roofline ceilings of DESIGN.md section 4 with fp16 weights (bf16 has the same bytes, so the same
ceilings). Time = max(FLOPs / balance, bytes);
sparse compute is 2/M of dense (2:4 on sparse tensor cores: 1/2), sparse weight bytes are
(2*2 + 0.5)/M per weight (values + 4-bit metadata per row and group) + 4/(V*M) (column indices)
against 2 for dense, activations are the same. ``balance`` = 300 FLOP/byte (about an H100's fp16
tensor-core peak over its memory bandwidth). At large N this gives M/2 x dense, at N = 1 about
the bytes ratio (3.5x at 64:2:8). These are ceilings, not measurements; plain N:M patterns other
than 2:4 have no kernel and get 1.0.

Whole-model speedup (global choice): the dense-time-weighted harmonic mean,
``sum_l RK_l / sum_l (RK_l / s_l)``, i.e. dense time taken proportional to R*K*N per layer.
"""

from __future__ import annotations

import csv
import math
import os
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from tqdm.auto import tqdm

from .mask import select_mask
from .pattern import PatternLike, as_pattern
from .pruning import kept_fraction

DEFAULT_CANDIDATES: Tuple[str, ...] = ("2:4",) + tuple(
    f"{V}:2:{M}" for V in (64, 128) for M in (5, 6, 8, 10, 12, 16)
)
DEFAULT_TOKENS = 2048
ENV_TABLE = "VNM_SPEEDUP_TABLE"
REQUIRED_COLUMNS = ("pattern", "R", "K", "N", "speedup_dense")
MODEL_BALANCE = 300.0  # FLOP per byte at which dense fp16 GEMM turns compute-bound (H100-like)
MODEL_SOURCE = "model: roofline ceilings of DESIGN.md section 4 (fp16, balance 300 FLOP/byte), not measured"


# ---- mask diversity -------------------------------------------------------------------------------


def log_mask_diversity(pattern: PatternLike) -> float:
    """ln(mask diversity) per weight: ``(ln C(M,4) + V ln 6) / (V M)`` for V:N:M, ``ln C(M,N) / M``
    for N:M. A layer of R x K weights has MD = exp(R * K * this)."""
    p = as_pattern(pattern)
    if p.is_vnm:
        return (math.log(math.comb(p.M, 4)) + p.V * math.log(math.comb(4, 2))) / (p.V * p.M)
    return math.log(math.comb(p.M, p.N)) / p.M


# ---- speedups ---------------------------------------------------------------------------------------


def model_speedup(pattern: PatternLike, R: int, K: int, N: int, *, balance: float = MODEL_BALANCE) -> float:
    """Roofline-ceiling speedup of ``pattern`` over dense fp16 at R x K with N tokens (see module doc)."""
    p = as_pattern(pattern)
    if not p.compressible:
        return 1.0
    dense_flops = 2.0 * R * K * N
    act_bytes = 2.0 * (N * K + N * R)
    dense_t = max(dense_flops / balance, 2.0 * R * K + act_bytes)
    if p.is_vnm:
        weight_bytes = R * K * ((2 * 2 + 0.5) / p.M + 4.0 / (p.V * p.M))
    else:  # 2:4: two fp16 values and 4 bits of metadata per row per group of 4
        weight_bytes = R * K * (2 * 2 + 0.5) / 4
    sparse_t = max(dense_flops * (2.0 / p.M) / balance, weight_bytes + act_bytes)
    return dense_t / sparse_t


_DTYPE_ALIASES = {"float16": "float16", "fp16": "float16", "half": "float16",
                  "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _dtype_name(dtype: Union[str, torch.dtype]) -> str:
    """'float16' / 'bfloat16' (as bench_spmm.py writes them) for a torch dtype or a common alias."""
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype)
    if not isinstance(dtype, str):
        raise TypeError(f"dtype must be a string such as 'float16' or a torch.dtype, got {type(dtype).__name__}")
    name = dtype.strip().lower().removeprefix("torch.")
    return _DTYPE_ALIASES.get(name, name)


class SpeedupTable:
    """Measured speedups read from the kernel benchmark's CSV (lookup rule in the module doc).

    ``dtype``: only rows of this dtype are used when the table has a ``dtype`` column (default
    'float16'; 'bfloat16', torch dtypes and 'fp16' / 'bf16' are understood). ``gpu``: the rows of
    this GPU (the ``gpu`` column, as ``torch.cuda.get_device_name()`` names it); required when the
    table holds more than one GPU. Repeated header lines (files concatenated with ``cat``) are
    skipped. A table without these columns is used as it is.
    """

    def __init__(self, path: Union[str, Path], *, dtype: Union[str, torch.dtype] = "float16",
                 gpu: Optional[str] = None):
        self.path = Path(path)
        self.dtype = _dtype_name(dtype)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"speedup table {str(self.path)!r} does not exist; write it with bench/bench_spmm.py on "
                f"your GPU, or pass speedup_table=None (and unset {ENV_TABLE}) to use the model"
            )
        # pattern -> (R, K) -> N -> [speedups]
        self._rows: Dict[str, Dict[Tuple[int, int], Dict[int, List[float]]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(list)))
        with open(self.path, newline="") as f:
            reader = csv.DictReader(f)
            cols = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in REQUIRED_COLUMNS if c not in cols]
            if missing:
                raise ValueError(f"speedup table {str(self.path)!r} lacks column(s) {missing}; it needs "
                                 f"{','.join(REQUIRED_COLUMNS)} (as bench/bench_spmm.py writes)")
            if gpu is not None and "gpu" not in cols:
                raise ValueError(f"speedup table {str(self.path)!r} has no gpu column, so gpu={gpu!r} cannot be "
                                 "selected; pass gpu=None")
            rows = []
            for line_no, row in enumerate(reader, start=2):
                row = {k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items() if k}
                if [row.get(c) for c in cols] == cols:  # the header again: files appended to each other
                    continue
                rows.append((line_no, row))
        dtypes = sorted({_dtype_name(r["dtype"]) for _, r in rows if r.get("dtype")}) if "dtype" in cols else []
        if "dtype" in cols:
            rows = [(n, r) for n, r in rows if _dtype_name(r.get("dtype") or "") == self.dtype]
            if not rows:
                raise ValueError(f"speedup table {str(self.path)!r} has no {self.dtype} rows (it has "
                                 f"{', '.join(dtypes) or 'none'}); pass dtype= one of those, or measure "
                                 f"{self.dtype} with bench/bench_spmm.py --dtype {self.dtype}")
        gpus = sorted({r["gpu"] for _, r in rows if r.get("gpu")}) if "gpu" in cols else []
        if gpu is not None:
            rows = [(n, r) for n, r in rows if r.get("gpu") == gpu]
            if not rows:
                raise ValueError(f"speedup table {str(self.path)!r} has no {self.dtype} rows for gpu {gpu!r}; "
                                 f"its GPUs: {gpus}")
        elif len(gpus) > 1:
            raise ValueError(f"speedup table {str(self.path)!r} holds measurements of {len(gpus)} GPUs {gpus}; "
                             "their speedups must not be mixed: pass gpu= the one to plan for")
        self.gpu = gpu if gpu is not None else (gpus[0] if gpus else None)
        self._labels = [x for x in (self.dtype if "dtype" in cols else None, self.gpu) if x]
        for line_no, row in rows:
            try:
                pat = str(as_pattern(row["pattern"]))
                R, K, N = int(row["R"]), int(row["K"]), int(row["N"])
                s = float(row["speedup_dense"])
            except (ValueError, TypeError) as exc:
                raise ValueError(f"speedup table {str(self.path)!r} line {line_no}: cannot read {row}: {exc}") from None
            if not (math.isfinite(s) and s > 0) or min(R, K, N) <= 0:
                raise ValueError(f"speedup table {str(self.path)!r} line {line_no}: speedup must be a positive "
                                 f"number and R, K, N positive; got {row}")
            self._rows[pat][(R, K)][N].append(s)
        if not self._rows:
            raise ValueError(f"speedup table {str(self.path)!r} has no rows")

    @property
    def source(self) -> str:
        return f"table: {self.path}" + (f" [{', '.join(self._labels)}]" if self._labels else "")

    def patterns(self) -> List[str]:
        return list(self._rows)

    def speedup(self, pattern: PatternLike, R: int, K: int, N: int) -> Tuple[Optional[float], str]:
        """(speedup, how it was obtained), or (None, 'not measured') if the pattern has no rows."""
        shapes = self._rows.get(str(as_pattern(pattern)))
        if not shapes:
            return None, "not measured"
        note = []
        if (R, K) in shapes:
            shape = (R, K)
        else:
            shape = min(shapes, key=lambda s: abs(math.log(s[0] / R)) + abs(math.log(s[1] / K)))
            note.append(f"nearest measured shape {shape[0]}x{shape[1]}")
        by_n = {n: statistics.median(v) for n, v in shapes[shape].items()}
        ns = sorted(by_n)
        if N in by_n:
            value = by_n[N]
        elif N < ns[0] or N > ns[-1]:
            n_near = ns[0] if N < ns[0] else ns[-1]
            value = by_n[n_near]
            note.append(f"N clamped to measured {n_near}")
        else:
            hi = next(n for n in ns if n > N)
            lo = max(n for n in ns if n < N)
            t = (math.log(N) - math.log(lo)) / (math.log(hi) - math.log(lo))
            value = by_n[lo] + t * (by_n[hi] - by_n[lo])
            note.append(f"interpolated in ln N between {lo} and {hi}")
        return value, "; ".join(note) or "measured"


def resolve_speedup_table(speedup_table=None, *, dtype: Union[None, str, torch.dtype] = None,
                          gpu: Optional[str] = None) -> Optional[SpeedupTable]:
    """The table to use: the argument (a path, a SpeedupTable, or "model" for none), else
    ``$VNM_SPEEDUP_TABLE``, else None (the model). A path is read with ``dtype`` (default
    'float16') and ``gpu`` (see :class:`SpeedupTable`); a SpeedupTable given with a different
    ``dtype`` or ``gpu`` is an error."""
    if isinstance(speedup_table, SpeedupTable):
        if dtype is not None and _dtype_name(dtype) != speedup_table.dtype or gpu is not None and gpu != speedup_table.gpu:
            raise ValueError(f"the SpeedupTable given holds {speedup_table.dtype} rows of gpu {speedup_table.gpu!r}, "
                             f"not dtype={dtype!r} gpu={gpu!r}; read it again with "
                             "vnm.SpeedupTable(path, dtype=..., gpu=...) or pass its path")
        return speedup_table
    if isinstance(speedup_table, str) and speedup_table == "model":
        return None
    options = {"dtype": "float16" if dtype is None else dtype, "gpu": gpu}
    if speedup_table is None:
        env = os.environ.get(ENV_TABLE)
        return SpeedupTable(env, **options) if env else None
    if isinstance(speedup_table, (str, Path)):
        return SpeedupTable(speedup_table, **options)
    raise TypeError(f"speedup_table must be a CSV path, a vnm.SpeedupTable, 'model' or None; got {type(speedup_table).__name__}")


# ---- the choice -------------------------------------------------------------------------------------


@dataclass
class Candidate:
    """One (V, M) candidate as evaluated by :func:`choose_pattern` (global, or for one layer)."""

    pattern: str
    speedup: Optional[float]  # None: not measured in the table
    meets: bool
    log_md: float  # ln mask diversity per weight
    kept: Optional[float] = None  # kept importance; None where the speedup filter dropped it
    note: str = ""


@dataclass
class PatternChoice:
    """Result of :func:`choose_pattern`.

    ``pattern``: the chosen pattern (global choice) or None (per layer); ``patterns``: layer ->
    pattern (always set; pass it to :func:`vnm.report`); ``proxy``: the phase-2 rule used; ``speedup``: whole-model speedup estimate with those patterns; ``kept``:
    parameter-weighted kept importance; ``source``: where speedups came from ("table: <path>" or
    "model: ..."); ``candidates``: the global evaluation (global choice) and ``layer_candidates``
    per layer (per-layer choice).
    """

    pattern: Optional[str]
    patterns: Dict[str, str]
    speedup: float
    kept: float
    min_speedup: float
    tokens: int
    source: str
    per_layer: bool
    candidates: List[Candidate] = field(default_factory=list)
    layer_candidates: Dict[str, List[Candidate]] = field(default_factory=dict)
    proxy: str = "kept"

    def __str__(self) -> str:
        head = (f"choose_pattern: target >= {self.min_speedup:g}x at N={self.tokens}, proxy {self.proxy!r}; "
                f"speedups from {self.source}\n"
                f"chosen: {self.pattern if self.pattern else 'per layer'}  (model speedup {self.speedup:.2f}x, "
                f"kept importance {self.kept:.4f})")
        lines = [head]
        if self.candidates:
            lines.append(f"{'pattern':>10} {'speedup':>8} {'meets':>5} {'kept':>8} {'lnMD/w':>7}  note")
            for c in self.candidates:
                sp = "-" if c.speedup is None else f"{c.speedup:.2f}"
                kept = "-" if c.kept is None else f"{c.kept:.4f}"
                lines.append(f"{c.pattern:>10} {sp:>8} {'yes' if c.meets else 'no':>5} {kept:>8} {c.log_md:7.4f}  {c.note}")
        if self.per_layer:
            for name, p in self.patterns.items():
                lines.append(f"  {name}: {p}")
        return "\n".join(lines)


def _check_layer_scores(layer_scores) -> Dict[str, torch.Tensor]:
    if isinstance(layer_scores, torch.nn.Module):
        raise TypeError("layer_scores must map layer names to R x K score tensors; compute them with "
                        "vnm.layer_scores(model, score, stats)")
    if not isinstance(layer_scores, Mapping) or not layer_scores:
        raise TypeError("layer_scores must be a non-empty mapping {layer name: R x K score tensor} "
                        "(e.g. vnm.layer_scores(model, 'wanda', stats))")
    out = {}
    for name, s in layer_scores.items():
        if not isinstance(s, torch.Tensor) or s.dim() != 2 or s.numel() == 0 or not s.dtype.is_floating_point:
            raise TypeError(f"scores of layer {name!r} must be a non-empty 2-D float tensor, got "
                            f"{type(s).__name__}{'' if not isinstance(s, torch.Tensor) else tuple(s.shape)}")
        if not bool(torch.isfinite(s).all()):
            raise ValueError(f"scores of layer {name!r} hold NaN/Inf (NaN input statistics or weights?); "
                             "recalibrate with vnm.calibrate and recompute the scores")
        if bool((s < 0).any()):
            raise ValueError(f"scores of layer {name!r} are negative somewhere; importance scores must be >= 0")
        out[name] = s
    return out


PROXIES = ("kept", "diversity")


def _rank_key(c: Candidate):
    p = as_pattern(c.pattern)
    return (-c.log_md, p.M, p.V or 1)  # plain N:M counts as V = 1


def _most_diverse(cands: List[Candidate]) -> List[Candidate]:
    """The candidates of maximal ln MD per weight (equal up to float round-off: V:2:4 and 2:4)."""
    best = max(c.log_md for c in cands)
    return [c for c in cands if math.isclose(c.log_md, best, rel_tol=1e-12)]


def _pick(cands: List[Candidate], proxy: str, tolerance: float) -> Candidate:
    """The winner among survivors whose ``kept`` is set (for "diversity": those :func:`_most_diverse` returns)."""
    if proxy == "diversity":
        tied = _most_diverse(cands)
        best_kept = max(c.kept for c in tied)
        return min((c for c in tied if c.kept == best_kept), key=_rank_key)
    best_kept = max(c.kept for c in cands)
    near = [c for c in cands if c.kept >= best_kept - tolerance]
    return min(near, key=_rank_key)


def choose_pattern(
    layer_scores: Mapping[str, torch.Tensor],
    min_speedup: float,
    candidates: Sequence[PatternLike] = DEFAULT_CANDIDATES,
    speedup_table=None,
    per_layer: bool = False,
    *,
    tokens: int = DEFAULT_TOKENS,
    proxy: str = "kept",
    tolerance: float = 0.002,
    dtype: Union[None, str, torch.dtype] = None,
    gpu: Optional[str] = None,
    backend: str = "auto",
    progress: bool = True,
) -> PatternChoice:
    """Choose the V:N:M pattern (one for the model, or one per layer) that meets ``min_speedup``
    and is best by the accuracy ``proxy`` (rules, speedup sources and lookup in the module doc).

    ``layer_scores``: ``{name: R x K scores}``, e.g. ``vnm.layer_scores(model, "wanda", stats)``.
    ``min_speedup``: target over dense at ``tokens`` tokens per matmul (N). ``candidates``:
    patterns to consider. ``speedup_table``: CSV path / ``"model"`` / None (see module doc).
    ``per_layer``: choose each layer's pattern separately (each layer must meet the target);
    otherwise one pattern whose whole-model speedup meets it. ``proxy``: ``"kept"`` (default:
    kept importance, mask diversity within ``tolerance``) or ``"diversity"`` (the paper's phase 2
    as its reviewers describe it: maximal mask diversity, ties by kept importance).
    ``dtype`` / ``gpu``: which rows of the speedup table to use (default 'float16'; see
    :class:`SpeedupTable`).

    Raises ``ValueError`` when no candidate meets the target (naming the best available), when
    scores hold NaN/Inf, or for bad arguments.
    """
    scores = _check_layer_scores(layer_scores)
    if not isinstance(min_speedup, (int, float)) or not math.isfinite(min_speedup) or min_speedup <= 0:
        raise ValueError(f"min_speedup must be a positive number (e.g. 1.5 for 1.5x dense), got {min_speedup!r}")
    if not isinstance(tokens, int) or tokens <= 0:
        raise ValueError(f"tokens must be a positive int (N, tokens per matmul), got {tokens!r}")
    if proxy not in PROXIES:
        raise ValueError(f"proxy must be one of {PROXIES} ('kept': kept importance first; 'diversity': the "
                         f"paper's mask diversity first), got {proxy!r}")
    pats = [str(as_pattern(c)) for c in candidates]
    if not pats:
        raise ValueError("candidates is empty")
    table = resolve_speedup_table(speedup_table, dtype=dtype, gpu=gpu)
    source = table.source if table is not None else MODEL_SOURCE
    shapes = {name: tuple(s.shape) for name, s in scores.items()}
    work = {name: R * K for name, (R, K) in shapes.items()}

    # Phase 1: speedups per candidate and layer.
    speed: Dict[str, Dict[str, Optional[float]]] = {}
    notes: Dict[str, set] = {}
    for p in pats:
        speed[p], notes[p] = {}, set()
        for name, (R, K) in shapes.items():
            if table is None:
                speed[p][name] = model_speedup(p, R, K, tokens)
            else:
                v, note = table.speedup(p, R, K, tokens)
                speed[p][name] = v
                if note != "measured":
                    notes[p].add(note)

    def whole_model(assign: Mapping[str, str]) -> float:
        return sum(work.values()) / sum(work[n] / speed[assign[n]][n] for n in shapes)

    kept_cache: Dict[Tuple[str, str], float] = {}

    def kept(p: str, name: str) -> float:
        if (p, name) not in kept_cache:
            kept_cache[(p, name)] = kept_fraction(scores[name], select_mask(scores[name], p, backend=backend))
        return kept_cache[(p, name)]

    total_work = sum(work.values())
    if not per_layer:
        glob: List[Candidate] = []
        for p in pats:
            measured = all(v is not None for v in speed[p].values())
            s = whole_model({n: p for n in shapes}) if measured else None
            glob.append(Candidate(p, s, bool(s is not None and s >= min_speedup), log_mask_diversity(p),
                                  note="; ".join(sorted(notes[p]))))
        survivors = [c for c in glob if c.meets]
        if not survivors:
            avail = [c for c in glob if c.speedup is not None]
            if not avail:
                raise ValueError(f"none of the candidates {pats} is in the speedup table ({source}); measure them "
                                 "with bench/bench_spmm.py or pass candidates the table lists")
            best = max(avail, key=lambda c: c.speedup)
            raise ValueError(
                f"no candidate reaches {min_speedup:g}x over dense at N={tokens} ({source}); the best available "
                f"is {best.pattern} at {best.speedup:.2f}x. Lower min_speedup or add candidates with larger M"
            )
        # The "diversity" proxy needs kept importance only to break ties in mask diversity.
        measure = _most_diverse(survivors) if proxy == "diversity" else survivors
        bar = tqdm(total=len(measure) * len(shapes), desc="choose_pattern: kept importance",
                   disable=not progress, leave=False)
        for c in measure:
            acc = 0.0
            for name in shapes:
                acc += work[name] * kept(c.pattern, name)
                bar.update(1)
            c.kept = acc / total_work
        bar.close()
        chosen = _pick(measure, proxy, tolerance)
        assign = {n: chosen.pattern for n in shapes}
        return PatternChoice(chosen.pattern, assign, whole_model(assign), chosen.kept, float(min_speedup), tokens,
                             source, False, candidates=glob, proxy=proxy)

    # Per layer: each layer meets the target on its own.
    per: Dict[str, List[Candidate]] = {}
    unmet = []
    for name in shapes:
        per[name] = [Candidate(p, speed[p][name], bool(speed[p][name] is not None and speed[p][name] >= min_speedup),
                               log_mask_diversity(p)) for p in pats]
        if not any(c.meets for c in per[name]):
            avail = [c for c in per[name] if c.speedup is not None]
            best = max(avail, key=lambda c: c.speedup) if avail else None
            unmet.append((name, best))
    if unmet:
        name, best = unmet[0]
        more = f" ({len(unmet) - 1} more layer(s) likewise)" if len(unmet) > 1 else ""
        best_txt = f"the best available is {best.pattern} at {best.speedup:.2f}x" if best else "no candidate is measured"
        raise ValueError(
            f"no candidate reaches {min_speedup:g}x over dense at N={tokens} for layer {name!r} "
            f"{shapes[name][0]}x{shapes[name][1]} ({source}); {best_txt}{more}. Lower min_speedup, add candidates "
            "with larger M, or choose globally (per_layer=False)"
        )
    measure = {name: (_most_diverse if proxy == "diversity" else list)([c for c in cs if c.meets])
               for name, cs in per.items()}
    bar = tqdm(total=sum(len(cs) for cs in measure.values()), desc="choose_pattern: kept importance",
               disable=not progress, leave=False)
    assign = {}
    for name, cs in measure.items():
        for c in cs:
            c.kept = kept(c.pattern, name)
            bar.update(1)
        assign[name] = _pick(cs, proxy, tolerance).pattern
    bar.close()
    kept_total = sum(work[n] * kept(assign[n], n) for n in shapes) / total_work
    return PatternChoice(None, assign, whole_model(assign), kept_total, float(min_speedup), tokens, source, True,
                         layer_candidates=per, proxy=proxy)


__all__ = ["choose_pattern", "PatternChoice", "Candidate", "SpeedupTable", "model_speedup", "log_mask_diversity",
           "DEFAULT_CANDIDATES", "resolve_speedup_table", "PROXIES"]
