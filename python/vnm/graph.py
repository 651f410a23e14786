"""Where a channel permutation costs nothing, found from the computation a model performs.

An **edge** joins producer layers to a consumer layer: permuting the producers' output rows and
the consumer's input columns by the same permutation leaves the model's function unchanged, so a
permutation searched for the consumer's columns (or the producers' rows) is absorbed at no
inference cost. Two kinds of edge are used:

* :class:`MlpEdge`: everything between the producers (fc1, or gate and up, or a packed
  ``[gate; up]`` projection) and the consumer acts feature by feature, so any permutation of the
  hidden features works (for a packed GLU: the same permutation of both halves).
* :class:`HeadsEdge`: attention combines one head's values at a time, so the value rows and the
  output projection's columns may be permuted by a permutation that maps each head's ``head_dim``
  features onto themselves (with grouped-query attention, one value head's permutation serves the
  columns of every query head that reads it).

**How an edge is proven** (:func:`trace_model`). One forward pass on example inputs runs under a
``TorchDispatchMode`` that sees every aten op. The output of each linear layer is tagged: every
element carries a *label*, the layer's output feature it holds. Labels follow the data through
every op: data-movement ops (view, reshape, transpose, slice, split, cat, expand, dtype casts)
move them as they move the data; elementwise ops keep them (and record a *coupling* when two
labelled operands meet, as gate and up do in a GLU); a reduction over labelled elements (a
LayerNorm's mean and variance, an RMSNorm's mean square, a softmax) records the set it reduces
over; a matrix product or attention that sums over tokens keeps the labels of the operand whose
features it carries; any other op touching a label (a product summing over features, an op not
listed here) refuses every label it touched, and so does a labelled tensor reaching the model's
output. Parameters that meet labelled elements elementwise (a LayerNorm's weight and bias, a
LayerScale) are recorded with the features they meet. At the input of every linear layer the
labels say which producer feature each input column carries.

An edge is accepted only if, under its permutation group, every recorded fact holds: couplings
pair the same feature position; every reduction covers whole orbits (a norm over all of an MLP's
hidden features, or over whole heads), so its result does not change; no value that varies along
the permuted positions (other than a parameter permuted along) meets them; every parameter met
can be permuted exactly (each of its elements meets one feature position, and the parameter is
used nowhere else), and it is then permuted with the edge (a norm between fc1 and fc2, as in
BEiT-3, has its weight and bias permuted: normalising over all features does not depend on their
order). :func:`vnm.sparsify` then checks each accepted edge once more by running the model with a
random permutation of the edge's kind and comparing its outputs with the unpermuted model's.

The same pass finds **output heads**: layers whose output reaches a model output through ops that
read nothing computed from the model's inputs by another path (an LM head, CLIP's
``text_projection``; not the last MLP, whose output is added to the residual stream).

Layers fed by the residual stream (q, k, v, up, gate) have no producer that could absorb an input
permutation; with ``permute='all'`` they gather ``x[..., perm]`` instead.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from .layers import is_prunable, run_model, weight_matrix

log = logging.getLogger("vnm")

aten = torch.ops.aten


# ---- edges ---------------------------------------------------------------------------------------


@dataclass
class ParamPerm:
    """A parameter met elementwise by an edge's features (a norm's weight or bias, a scale):
    element ``e`` (flattened) belongs to feature position ``pos[e]`` of copy ``slot[e]`` (the
    half of a packed GLU, else 0). Permuted with the edge so the model's function is unchanged."""

    name: str
    slot: torch.Tensor  # int64 [numel]
    pos: torch.Tensor  # int64 [numel]

    def permuted(self, param: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        """``param`` with its elements moved as the features move under ``perm`` (new position i
        holds old position ``perm[i]``)."""
        n = int(perm.numel())
        key = self.slot * n + self.pos
        inv = torch.full((int(key.max()) + 1,), -1, dtype=torch.int64)
        inv[key] = torch.arange(key.numel())
        src = inv[self.slot * n + perm.cpu()[self.pos]]
        return param.detach().reshape(-1)[src.to(param.device)].reshape(param.shape)


@dataclass
class MlpEdge:
    producers: List[str]  # full module names whose output rows feed the consumer
    consumer: str
    packed: bool = False  # one producer emitting [gate; up]: both halves take the permutation
    params: List[ParamPerm] = field(default_factory=list)

    def producer_rows(self, perm: torch.Tensor) -> torch.Tensor:
        """The producers' row permutation for a permutation ``perm`` of the consumer's columns."""
        return torch.cat([perm, perm + perm.numel()]) if self.packed else perm


@dataclass
class HeadsEdge:
    producer: str  # module holding the value rows
    value_rows: Tuple[int, int]  # [start, end) of the value rows in the producer's weight
    consumer: str  # output projection
    head_dim: int
    num_heads: int  # query heads (blocks of head_dim columns in the consumer)
    num_kv_heads: int  # value heads (blocks of head_dim rows in the value slice)
    params: List[ParamPerm] = field(default_factory=list)

    @property
    def producers(self) -> List[str]:
        return [self.producer]

    def kv_head_of(self, q_head: int) -> int:
        return q_head // (self.num_heads // self.num_kv_heads)


# ---- the traced forward --------------------------------------------------------------------------

# Ops that only move data: applied to the labels as they are applied to the data.
_MOVES = {
    "view", "_unsafe_view", "reshape", "_reshape_alias", "transpose", "t", "permute", "expand", "clone",
    "contiguous", "unsqueeze", "squeeze", "slice", "select", "split", "split_with_sizes", "unbind", "alias",
    "detach", "lift_fresh", "narrow", "flatten", "unflatten", "movedim", "index_select", "repeat",
    "_to_copy", "to", "_unsafe_split", "split_with_sizes_copy", "unbind_copy", "view_copy", "expand_copy",
    "permute_copy", "transpose_copy", "t_copy", "slice_copy", "select_copy", "squeeze_copy",
    "unsqueeze_copy", "alias_copy", "detach_copy", "_unsafe_view_copy",
}
_JOINS = {"cat", "stack"}
_SAME_SHAPE = {"_to_copy", "to", "clone", "contiguous", "detach", "alias", "lift_fresh", "alias_copy", "detach_copy"}
# Symmetric reductions: their result does not depend on the order of the elements reduced.
_REDUCTIONS = {"sum", "mean", "var", "var_mean", "std", "std_mean", "amax", "amin", "linalg_vector_norm",
               "logsumexp", "prod"}
_SOFTMAX = {"_softmax", "_log_softmax"}
_LAYER_NORMS = {"native_layer_norm", "_fused_rms_norm"}
_ATTENTION = {"_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
              "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
              "_scaled_dot_product_attention_math", "_scaled_dot_product_fused_attention_overrideable"}
_DTYPE_KWARGS = ("dtype", "device", "layout", "pin_memory", "non_blocking", "memory_format", "copy")

_MIXED = "<mixed>"  # purity: computed from the model's inputs along more than one path
_PARAMLIKE = "<param>"  # purity: parameters, constants and what is computed from them only


@dataclass
class Trace:
    """What one traced forward pass established (see the module docstring)."""

    sources: Dict[str, Tuple[int, int]] = field(default_factory=dict)  # layer -> (label offset, rows)
    refusals: List[Tuple[torch.Tensor, str]] = field(default_factory=list)
    couplings: List[torch.Tensor] = field(default_factory=list)  # [n, 2] label pairs
    reductions: List[torch.Tensor] = field(default_factory=list)  # [lines, n] labels reduced together
    foreign: List[torch.Tensor] = field(default_factory=list)  # [lines, n] labels a varying value meets
    blocks: List[torch.Tensor] = field(default_factory=list)  # [heads, head_dim] labels attention keeps together
    params: Dict[str, List[torch.Tensor]] = field(default_factory=dict)  # name -> [n, 2] (element, label)
    param_shapes: Dict[str, Tuple[int, ...]] = field(default_factory=dict)
    params_used_otherwise: Set[str] = field(default_factory=set)
    consumers: Dict[str, List[Optional[torch.Tensor]]] = field(default_factory=dict)  # layer -> column labels
    heads: Set[str] = field(default_factory=set)  # layers whose output is a model output

    @property
    def total_labels(self) -> int:
        return max((o + r for o, r in self.sources.values()), default=0)

    def source_of_label(self, label: int) -> Tuple[str, int]:
        for name, (o, r) in self.sources.items():
            if o <= label < o + r:
                return name, label - o
        raise KeyError(label)


class _Tracer(TorchDispatchMode):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.trace = Trace()
        self.labels = WeakIdKeyDictionary()  # tensor -> int64 labels of the same shape (-1: none)
        self.source_of = WeakIdKeyDictionary()  # layer output tensor -> layer name (labels made lazily)
        self.purity = WeakIdKeyDictionary()  # tensor -> layer name, _MIXED or _PARAMLIKE
        self.param_names: Dict[int, str] = {}
        self.param_ref: Dict[str, torch.Tensor] = {}
        for name, p in list(model.named_parameters(remove_duplicate=False)) + list(
                model.named_buffers(remove_duplicate=False)):
            if p is not None and id(p) not in self.param_names:
                self.param_names[id(p)] = name
                self.param_ref[name] = p
        self.param_index = WeakIdKeyDictionary()  # tensor derived from one parameter -> (name, element index)
        self.inside = 0
        offset = 0
        self.layers: Dict[str, nn.Module] = {}
        for name, m in model.named_modules():
            if is_prunable(m):
                rows = weight_matrix(m).shape[0]
                self.trace.sources[name] = (offset, rows)
                self.layers[name] = m
                offset += rows

    # -- hooks on the linear layers: their inputs are read, their outputs become label sources --

    def pre_hook(self, name):
        def hook(module, args, kwargs=None):
            self.inside += 1
            x = args[0] if args else None
            if isinstance(x, torch.Tensor):
                with _disable_current_modes():
                    lab = self._label(x)
                if lab is not None and bool((lab >= 0).any()):
                    k = lab.shape[-1]
                    lines = lab.reshape(-1, k)
                    cols = lines[0] if bool((lines == lines[:1]).all()) else None
                    self.trace.consumers.setdefault(name, []).append(cols)
        return hook

    def post_hook(self, name):
        def hook(module, args, output):
            self.inside -= 1
            if isinstance(output, torch.Tensor):
                self.source_of[output] = name
                self.purity[output] = name
        return hook

    # -- label bookkeeping --

    def _label(self, t: torch.Tensor) -> Optional[torch.Tensor]:
        lab = self.labels.get(t)
        if lab is None and t in self.source_of:
            offset, rows = self.trace.sources[self.source_of[t]]
            base = torch.arange(offset, offset + rows, dtype=torch.int64, device=t.device)
            lab = torch.empty_like(t, dtype=torch.int64)
            lab.copy_(base.expand(t.shape))
            self.labels[t] = lab
        return lab

    def _param(self, t: torch.Tensor) -> Optional[Tuple[str, torch.Tensor]]:
        got = self.param_index.get(t)
        if got is not None:
            return got
        name = self.param_names.get(id(t))
        if name is None:
            return None
        got = (name, torch.arange(t.numel(), device=t.device).reshape(t.shape))
        self.param_index[t] = got
        return got

    def _kind(self, t: torch.Tensor) -> str:
        k = self.purity.get(t)
        if k is not None:
            return k
        return _PARAMLIKE if id(t) in self.param_names else _MIXED

    def _refuse(self, labs: Sequence[torch.Tensor], why: str) -> None:
        ls = [lab[lab >= 0].unique() for lab in labs if lab is not None]
        ls = [x for x in ls if x.numel()]
        if ls:
            self.trace.refusals.append((torch.cat(ls).unique().cpu(), why))

    # -- the mode --

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.inside:
            return out
        flat_in, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat_in if isinstance(t, torch.Tensor)]
        flat_out, _ = tree_flatten(out)
        outs = [t for t in flat_out if isinstance(t, torch.Tensor)]
        self._purity(tensors, outs)
        labs = [self._label(t) for t in tensors]
        name = func.overloadpacket.__name__
        try:
            if not any(lab is not None for lab in labs):
                self._params_only(func, name, args, kwargs, tensors, out)
                return out
            self._propagate(func, name, args, kwargs, tensors, labs, out)
        except Exception as exc:  # an op the rules do not cover as called: refuse what it touched
            self._refuse(labs, f"{name} ({type(exc).__name__}: {exc})")
            for t in outs:
                self.labels.pop(t, None)
        return out

    def _purity(self, tensors, outs) -> None:
        kinds = {self._kind(t) for t in tensors} - {_PARAMLIKE}
        kind = _PARAMLIKE if not kinds else (kinds.pop() if len(kinds) == 1 else _MIXED)
        for t in outs:
            if t not in self.source_of:
                self.purity[t] = kind

    def _params_only(self, func, name, args, kwargs, tensors, out) -> None:
        """An op on unlabelled tensors: follow parameters through elementwise ops and moves
        (``1 + weight``, ``weight.view(1, 1, -1)``), note every other use of a parameter."""
        params = [(t, self._param(t)) for t in tensors]
        used = [(t, p) for t, p in params if p is not None]
        if not used:
            return
        if len(used) == 1 and len(tensors) == 1 and isinstance(out, torch.Tensor) and (
                name in _MOVES or torch.Tag.pointwise in func.tags):
            t, (pname, idx) = used[0]
            if name in _MOVES:
                new = self._move(func, name, args, kwargs, {id(t): idx})
            else:
                new = idx.expand(out.shape) if idx.shape != out.shape else idx
            if isinstance(new, torch.Tensor) and tuple(new.shape) == tuple(out.shape):
                self.param_index[out] = (pname, new)
                return
        if len(used) == 1 and len(tensors) > 1 and torch.Tag.pointwise in func.tags and all(
                t.numel() <= 1 for t in tensors if t is not used[0][0]) and isinstance(out, torch.Tensor):
            t, (pname, idx) = used[0]
            self.param_index[out] = (pname, idx.expand(out.shape))
            return
        for _, (pname, _) in used:
            self.trace.params_used_otherwise.add(pname)

    def _move(self, func, name, args, kwargs, replace: Dict[int, torch.Tensor]):
        """Apply a data-movement op to label tensors in place of the data tensors."""
        if name in _SAME_SHAPE:
            return replace[id(args[0])].clone()

        def sub(a):
            if isinstance(a, torch.Tensor):
                return replace.get(id(a), a)
            if isinstance(a, (list, tuple)):
                return type(a)(sub(x) for x in a)
            return a

        new_args = [sub(a) for a in args]
        new_kwargs = {k: v for k, v in kwargs.items() if k not in _DTYPE_KWARGS}
        try:
            return func(*new_args, **new_kwargs)
        except RuntimeError:
            if name in ("view", "_unsafe_view", "view_copy"):  # labels laid out differently: reshape
                return new_args[0].reshape(args[1])
            raise

    def _propagate(self, func, name, args, kwargs, tensors, labs, out) -> None:
        by_id = {id(t): lab for t, lab in zip(tensors, labs) if lab is not None}
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if name in _MOVES:
            if self._param(args[0]) is not None and id(args[0]) not in by_id:
                self.trace.params_used_otherwise.add(self._param(args[0])[0])
            data = args[0]
            if id(data) not in by_id:  # e.g. index_select with a labelled index: not a move of labels
                raise ValueError("labelled tensor used as an index")
            new = self._move(func, name, args, kwargs, by_id)
            self._set(outs, new if isinstance(new, (tuple, list)) else (new,))
            return
        if name in _JOINS:
            parts = args[0]
            rep = {id(t): by_id.get(id(t), torch.full(t.shape, -1, dtype=torch.int64, device=t.device)) for t in parts}
            self._set(outs, (func([rep[id(t)] for t in parts], *args[1:], **kwargs),))
            return
        if name == "copy_":
            dst, src = args[0], args[1]
            lab = by_id.get(id(src))
            self.labels[dst] = (lab.expand(dst.shape).clone() if lab is not None
                                else torch.full(dst.shape, -1, dtype=torch.int64, device=dst.device))
            return
        if torch.Tag.pointwise in func.tags:
            self._pointwise(name, tensors, labs, outs[0])
            return
        if name in _REDUCTIONS:
            self._reduce(name, args, kwargs, by_id, outs)
            return
        if name in _SOFTMAX:
            lab = by_id[id(args[0])]
            self._record_lines(self.trace.reductions, lab, [args[1] % lab.dim()])
            self._set(outs, (lab,))
            return
        if name in _LAYER_NORMS:
            self._layer_norm(name, args, by_id, outs)
            return
        if name in ("mm", "bmm"):
            self._matmul(name, args, by_id, outs[0])
            return
        if name in _ATTENTION:
            self._attention(args, by_id, outs)
            return
        raise ValueError("no rule for this op")

    def _set(self, outs, labs) -> None:
        for t, lab in zip(outs, labs):
            if isinstance(t, torch.Tensor) and isinstance(lab, torch.Tensor):
                if bool((lab >= 0).any()):
                    self.labels[t] = lab
                else:
                    self.labels.pop(t, None)

    def _record_lines(self, facts: list, lab: torch.Tensor, dims: Sequence[int]) -> None:
        """The labels that meet along ``dims`` (one row per line), where more than one label does."""
        dims = sorted(set(d % lab.dim() for d in dims)) if lab.dim() else []
        if not dims:
            return
        n = 1
        for d in dims:
            n *= lab.shape[d]
        if n <= 1:
            return
        rest = [d for d in range(lab.dim()) if d not in dims]
        lines = lab.permute(*rest, *dims).reshape(-1, n).unique(dim=0)
        lines = lines[(lines != lines[:, :1]).any(1) & (lines >= 0).any(1)]
        if lines.numel():
            facts.append(lines.cpu())

    def _pointwise(self, name, tensors, labs, out) -> None:
        shape = out.shape
        labelled = [lab.expand(shape) for lab in labs if lab is not None]
        new = labelled[0].clone()
        for other in labelled[1:]:
            both = (new >= 0) & (other >= 0) & (new != other)
            if bool(both.any()):
                self.trace.couplings.append(torch.stack([new[both], other[both]], 1).unique(dim=0).cpu())
            new = torch.where(new >= 0, new, other)
        for t, lab in zip(tensors, labs):
            if lab is not None or t.numel() <= 1:
                continue
            p = self._param(t)
            aligned = (1,) * (len(shape) - t.dim()) + tuple(t.shape)
            if p is not None:
                pname, idx = p
                pairs = torch.stack([idx.expand(shape).reshape(-1), new.reshape(-1)], 1).unique(dim=0)
                self.trace.params.setdefault(pname, []).append(pairs.cpu())
                self.trace.param_shapes[pname] = tuple(self.param_ref[pname].shape)
                continue
            varying = [d for d, n in enumerate(aligned) if n > 1]
            self._record_lines(self.trace.foreign, new, varying) if len(varying) == 1 else [
                self._record_lines(self.trace.foreign, new, [d]) for d in varying]
        self._set((out,), (new,))

    def _reduce(self, name, args, kwargs, by_id, outs) -> None:
        x = args[0]
        lab = by_id[id(x)]
        if name == "linalg_vector_norm":
            dim, keepdim = (args[2] if len(args) > 2 else kwargs.get("dim")), (
                args[3] if len(args) > 3 else kwargs.get("keepdim", False))
        elif name in ("var", "std", "var_mean", "std_mean"):
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            keepdim = kwargs.get("keepdim", args[3] if len(args) > 3 and isinstance(args[3], bool) else False)
        else:
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            keepdim = args[2] if len(args) > 2 and isinstance(args[2], bool) else kwargs.get("keepdim", False)
        if isinstance(dim, int):
            dim = [dim]
        dims = list(range(lab.dim())) if not dim else sorted(d % lab.dim() for d in dim)
        self._record_lines(self.trace.reductions, lab, dims)
        rest = [d for d in range(lab.dim()) if d not in dims]
        n = 1
        for d in dims:
            n *= lab.shape[d]
        lines = lab.permute(*rest, *dims).reshape(-1, max(n, 1))
        const = (lines == lines[:, :1]).all(1)
        red = torch.where(const, lines[:, 0], torch.full_like(lines[:, 0], -1)).reshape([lab.shape[d] for d in rest])
        if keepdim:
            for d in dims:
                red = red.unsqueeze(d)
        self._set(outs, [red] * len(outs))

    def _layer_norm(self, name, args, by_id, outs) -> None:
        x, shape = args[0], args[1]
        lab = by_id[id(x)]
        dims = list(range(lab.dim() - len(shape), lab.dim()))
        self._record_lines(self.trace.reductions, lab, dims)
        params = [args[2], args[3] if name == "native_layer_norm" and len(args) > 3 else None]
        for p in params:
            if isinstance(p, torch.Tensor):
                self._pointwise("mul", [x, p], [lab, None], outs[0])
        self._set(outs[:1], (lab,))
        stat = lab.reshape(*lab.shape[:dims[0]], -1)
        const = (stat == stat[..., :1]).all(-1)
        red = torch.where(const, stat[..., 0], torch.full_like(stat[..., 0], -1))
        for t in outs[1:]:
            if isinstance(t, torch.Tensor) and t.numel() == red.numel():
                self._set((t,), (red.reshape(t.shape),))

    def _matmul(self, name, args, by_id, out) -> None:
        a, b = args[0], args[1]
        la, lb = by_id.get(id(a)), by_id.get(id(b))
        if la is not None and lb is not None:
            self._refuse([la, lb], f"{name} of two operands that both carry features sums over them")
            return
        batched = name == "bmm"
        if lb is not None:  # out[.., i, j] = sum_k a[.., i, k] b[.., k, j]: b's features ride on j
            lab = lb if batched else lb.unsqueeze(0)
            if not bool((lab == lab[:, :1, :]).all()):
                raise ValueError("the product sums over features")
            keep = lab[:, :1, :]
            self.trace.blocks.append(keep[:, 0, :].unique(dim=0).cpu())
            new = keep.expand(lab.shape[0], out.shape[-2], lab.shape[2])
        else:
            lab = la if batched else la.unsqueeze(0)
            if not bool((lab == lab[:, :, :1]).all()):
                raise ValueError("the product sums over features")
            keep = lab[:, :, :1]
            self.trace.blocks.append(keep[:, :, 0].unique(dim=0).cpu())
            new = keep.expand(lab.shape[0], lab.shape[1], out.shape[-1])
        new = new if batched else new[0]
        self._record_lines(self.trace.foreign, new, [0] if batched else [])
        self._set((out,), (new.contiguous(),))

    def _attention(self, args, by_id, outs) -> None:
        q, k, v = args[0], args[1], args[2]
        if id(q) in by_id or id(k) in by_id:  # scores sum over the query and key features
            self._refuse([by_id.get(id(q)), by_id.get(id(k))], "attention scores sum over query and key features")
        lv = by_id.get(id(v))
        if lv is None:
            return
        if not bool((lv == lv[..., :1, :]).all()):
            raise ValueError("attention sums over features")
        head = lv[..., :1, :]
        hq, hkv = q.shape[-3], v.shape[-3]
        if hq != hkv:
            head = head.repeat_interleave(hq // hkv, dim=-3)
        o = outs[0]
        self.trace.blocks.append(lv[..., 0, :].reshape(-1, lv.shape[-1]).unique(dim=0).cpu())
        new = head.expand(*head.shape[:-2], q.shape[-2], head.shape[-1])
        if tuple(new.shape) != tuple(o.shape):
            raise ValueError(f"attention output {tuple(o.shape)} is not laid out as [batch, heads, tokens, dim]")
        self._record_lines(self.trace.foreign, new.contiguous(), list(range(new.dim() - 2)))
        self._set(outs[:1], (new.contiguous(),))


def trace_model(model: nn.Module, inputs: Any) -> Trace:
    """Run ``model`` once on ``inputs`` (a batch as :func:`vnm.layers.run_model` takes it) and
    return what the traced computation establishes about its linear layers. Raises whatever the
    forward raises."""
    tracer = _Tracer(model)
    handles = []
    for name, m in tracer.layers.items():
        handles.append(m.register_forward_pre_hook(tracer.pre_hook(name)))
        handles.append(m.register_forward_hook(tracer.post_hook(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), tracer:
            out = run_model(model, inputs)
        with _disable_current_modes():
            for t in output_tensors(out):
                lab = tracer.labels.get(t)
                if lab is None and t in tracer.source_of:
                    lab = tracer._label(t)
                if lab is not None:
                    tracer._refuse([lab], "reaches the model's output")
                kind = tracer._kind(t)
                if kind not in (_MIXED, _PARAMLIKE):
                    tracer.trace.heads.add(kind)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return tracer.trace


def output_tensors(out) -> List[torch.Tensor]:
    """The tensors of a model call's output (a tensor, a ModelOutput, nested tuples and dicts)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):  # ModelOutput is an OrderedDict
        return [t for v in out.values() for t in output_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in output_tensors(v)]
    return []


# ---- edges from the trace ------------------------------------------------------------------------


class _Classes:
    """Union-find over labels joined by couplings."""

    def __init__(self, pairs: List[torch.Tensor]):
        self.parent: Dict[int, int] = {}
        for p in pairs:
            for a, b in p.tolist():
                self.union(a, b)

    def find(self, a: int) -> int:
        root = a
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while self.parent.get(a, a) != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def members(self) -> Dict[int, List[int]]:
        out: Dict[int, List[int]] = {}
        for a in list(self.parent):
            out.setdefault(self.find(a), []).append(a)
        for root, ms in out.items():
            if root not in ms:
                ms.append(root)
        return out


@dataclass
class Refusal:
    consumer: str
    producers: List[str]
    reason: str

    def __str__(self) -> str:
        src = ", ".join(self.producers) or "?"
        return f"{src} -> {self.consumer}: {self.reason}"


def edges_from_trace(trace: Trace) -> Tuple[List[object], List[Refusal]]:
    """The edges the trace proves sound, and the candidate edges it refuses (with the reason)."""
    n = trace.total_labels
    owner = torch.full((n,), -1, dtype=torch.int64)
    names = list(trace.sources)
    for i, (name, (o, r)) in enumerate(trace.sources.items()):
        owner[o:o + r] = i
    classes = _Classes(trace.couplings)
    members = classes.members()
    edges, refused = [], []
    for consumer, seen in trace.consumers.items():
        cols = seen[0]
        if cols is None or any(c is None or not torch.equal(c, cols) for c in seen):
            srcs = sorted({names[i] for c in seen if c is not None for i in owner[c[c >= 0]].unique().tolist()})
            refused.append(Refusal(consumer, srcs, "its input features differ between tokens or calls"))
            continue
        cols = cols.cpu()
        srcs = [names[i] for i in owner[cols[cols >= 0]].unique().tolist()]
        if bool((cols < 0).any()):
            refused.append(Refusal(consumer, srcs, "only some of its input features come from the producers"))
            continue
        try:
            edge, moved, slot, pos, block = _candidate(trace, consumer, cols, classes, members, owner, names)
        except ValueError as exc:
            refused.append(Refusal(consumer, srcs, str(exc)))
            continue
        why = _violation(trace, consumer, moved, slot, pos, block, edge)
        if why is not None:
            refused.append(Refusal(consumer, edge.producers, why))
            continue
        edges.append(edge)
    return edges, refused


def _candidate(trace, consumer, cols, classes, members, owner, names):
    """The edge the consumer's input labels describe, with the label -> (slot, position, block)
    maps of its permutation group (-1 for labels it does not move)."""
    n = trace.total_labels
    K = cols.numel()
    slot = torch.full((n,), -1, dtype=torch.int64)
    pos = torch.full((n,), -1, dtype=torch.int64)
    block = torch.full((n,), -1, dtype=torch.int64)
    col_list = cols.tolist()
    related = sorted({m for c in col_list for m in members.get(classes.find(c), [c])})
    producers = [names[i] for i in owner[torch.tensor(related)].unique().tolist()]
    block_rows = [b for b in trace.blocks if bool(torch.isin(b, cols).any())]
    if len(producers) == 1 and block_rows:  # attention between producer and consumer: a heads edge
        (p,) = producers
        off, rows = trace.sources[p]
        d = int(block_rows[0].shape[1])
        start, end = int(cols.min()) - off, int(cols.max()) + 1 - off
        values = end - start
        if any(int(b.shape[1]) != d for b in block_rows) or values % d or K % d:
            raise ValueError("attention heads of unequal sizes")
        heads, kv = K // d, values // d
        if kv == 0 or heads % kv:
            raise ValueError(f"{heads} query heads cannot share {kv} value heads evenly")
        group = heads // kv
        h = torch.arange(K) // d
        expected = off + start + (h // group) * d + torch.arange(K) % d
        if not torch.equal(cols, expected):
            raise ValueError("the output projection does not read the value heads in order")
        for rows_of_heads in block_rows:
            head_of = torch.where(rows_of_heads >= 0, (rows_of_heads - off - start) // d, -1)
            first = head_of.max(1, keepdim=True).values
            if not bool(((head_of == first) | (head_of < 0)).all()):
                raise ValueError("attention mixes features of different heads")
        moved = torch.zeros(n, dtype=torch.bool)
        moved[off + start:off + end] = True
        slot[off + start:off + end] = 0
        pos[off + start:off + end] = torch.arange(values)
        block[off + start:off + end] = torch.arange(values) // d
        edge = HeadsEdge(p, (start, end), consumer, d, heads, kv)
        return edge, moved, slot, pos, block
    if len(producers) == 1 and trace.sources[producers[0]][1] == 2 * K:  # packed [gate; up]
        (p,) = producers
        off, _ = trace.sources[p]
        for k, c in enumerate(col_list):
            cls = sorted(members.get(classes.find(c), [c]))
            if cls != [off + k, off + K + k]:
                raise ValueError("the producer's two halves are not paired feature by feature (a packed GLU "
                                 "multiplies feature k of one half with feature k of the other)")
        moved = owner == names.index(p)
        idx = torch.arange(2 * K)
        slot[off:off + 2 * K], pos[off:off + 2 * K], block[off:off + 2 * K] = idx // K, idx % K, 0
        return MlpEdge([p], consumer, packed=True), moved, slot, pos, block
    moved = torch.zeros(n, dtype=torch.bool)
    for i, p in enumerate(producers):
        off, rows = trace.sources[p]
        if rows != K:
            raise ValueError(f"{p} emits {rows} features but {consumer} reads {K}")
        moved[off:off + rows] = True
        slot[off:off + rows], pos[off:off + rows], block[off:off + rows] = i, torch.arange(rows), 0
    for k, c in enumerate(col_list):
        cls = sorted(members.get(classes.find(c), [c]))
        if cls != sorted(trace.sources[p][0] + k for p in producers):
            raise ValueError("the features are reordered or combined across positions between the producers "
                             "and the consumer")
    return MlpEdge(producers, consumer), moved, slot, pos, block


def _violation(trace, consumer, moved, slot, pos, block, edge) -> Optional[str]:
    """Why the edge's permutations would change the model (None if every fact holds); fills
    ``edge.params`` with the parameters to permute along."""
    mv = lambda labels: labels[(labels >= 0)][moved[labels[labels >= 0]]]  # noqa: E731
    for labels, why in trace.refusals:
        if bool(moved[labels].any()):
            return f"the features meet an op that is not elementwise per feature: {why}"
    for other, seen in trace.consumers.items():
        if other != consumer and any(c is not None and bool(moved[c[c >= 0]].any()) for c in seen):
            return f"the producers' features also feed {other}"
    for pairs in trace.couplings:
        a, b = pairs[:, 0], pairs[:, 1]
        touch = moved[a] | moved[b]
        if bool(touch.any()):
            a, b = a[touch], b[touch]
            if not bool((moved[a] & moved[b] & (pos[a] == pos[b])).all()):
                return "an elementwise op pairs features at different positions"
    sizes = torch.bincount(block[moved]) if bool(moved.any()) else torch.zeros(0, dtype=torch.int64)
    for lines in trace.reductions:
        for line in lines:
            ls = mv(line).unique()
            if not ls.numel():
                continue
            key = slot[ls] * (int(block.max()) + 1) + block[ls]
            for k in key.unique().tolist():
                b = k % (int(block.max()) + 1)
                have = pos[ls[key == k]].unique().numel()
                nslots = int(slot[moved].max()) + 1
                if have != int(sizes[b]) // max(nslots, 1):
                    return ("a reduction (a norm, a softmax, a mean) covers part of the permuted features only, "
                            "so its result would change")
    for lines in trace.foreign:
        for line in lines:
            ls = mv(line).unique()
            if ls.numel() > 1:
                key = slot[ls] * (int(block.max()) + 1) + block[ls]
                if key.unique().numel() != key.numel():
                    return "a value computed elsewhere varies along the permuted features and meets them elementwise"
    params = []
    for pname, pair_list in trace.params.items():
        pairs = torch.cat(pair_list).unique(dim=0)
        lab = pairs[:, 1]
        hit = (lab >= 0) & moved[lab.clamp_min(0)]
        if not bool(hit.any()):
            continue
        if not bool(hit.all()):
            return f"parameter {pname} also meets features this edge does not permute"
        if pname in trace.params_used_otherwise:
            return f"parameter {pname} meets the features and is also used elsewhere"
        elem = pairs[:, 0]
        numel = 1
        for s in trace.param_shapes[pname]:
            numel *= s
        if elem.unique().numel() != elem.numel() or elem.numel() != numel:
            return f"parameter {pname} is not one value per permuted feature"
        order = torch.argsort(elem)
        params.append(ParamPerm(pname, slot[lab[order]].clone(), pos[lab[order]].clone()))
    edge.params = params
    return None


# ---- the model's inputs --------------------------------------------------------------------------


def example_inputs(model: nn.Module, batch: int = 2, tokens: int = 8) -> Optional[dict]:
    """Synthetic inputs of the right shape for a Hugging Face model built from a config (random
    token ids, images, audio features) or a timm image model (its ``pretrained_cfg['input_size']``
    or its patch embedding's image size), or None when the model's inputs cannot be told."""
    cfg = getattr(model, "config", None)
    main = getattr(model, "main_input_name", None)
    g = torch.Generator().manual_seed(0)
    if cfg is None or main is None:
        return _timm_images(model, batch, g)
    text = getattr(cfg, "text_config", None) or cfg
    vision = getattr(cfg, "vision_config", None) or cfg
    out = {}

    def ids(n):
        vocab = getattr(text, "vocab_size", None) or getattr(cfg, "vocab_size", None) or 2
        return torch.randint(0, int(vocab), (batch, n), generator=g)

    if main == "input_ids" or getattr(cfg, "text_config", None) is not None:
        out["input_ids"] = ids(tokens)
    if main == "pixel_values" or getattr(cfg, "vision_config", None) is not None:
        size = getattr(vision, "image_size", 32)
        size = size if isinstance(size, int) else size[0]
        out["pixel_values"] = torch.randn(batch, getattr(vision, "num_channels", 3), size, size, generator=g)
    if main == "input_features":
        frames = 2 * getattr(cfg, "max_source_positions", 1500)
        out["input_features"] = torch.randn(batch, getattr(cfg, "num_mel_bins", 80), frames, generator=g)
    if not out:
        return None
    if getattr(cfg, "is_encoder_decoder", False):
        out["decoder_input_ids"] = ids(tokens)
    dtype = next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return {k: (v.to(device=device, dtype=dtype) if v.dtype.is_floating_point else v.to(device))
            for k, v in out.items()}


def _timm_images(model: nn.Module, batch: int, g: torch.Generator) -> Optional[torch.Tensor]:
    size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    embed = getattr(model, "patch_embed", None)
    if size is None and embed is not None and getattr(embed, "img_size", None) is not None:
        proj = getattr(embed, "proj", None)
        channels = getattr(proj, "in_channels", None)
        if channels is not None:
            hw = embed.img_size if isinstance(embed.img_size, (tuple, list)) else (embed.img_size,) * 2
            size = (channels, *hw)
    if size is None:
        return None
    p = next(model.parameters(), None)
    x = torch.randn(batch, *size, generator=g)
    return x if p is None else x.to(device=p.device, dtype=p.dtype if p.dtype.is_floating_point else x.dtype)


def find_edges(model: nn.Module, inputs: Any = None) -> List[object]:
    """Every permutation edge of ``model`` that a traced forward pass on ``inputs`` (default:
    :func:`example_inputs`) proves sound. An empty list when the model cannot be traced."""
    inputs = example_inputs(model) if inputs is None else inputs
    if inputs is None:
        return []
    return edges_from_trace(trace_model(model, inputs))[0]


__all__ = ["MlpEdge", "HeadsEdge", "ParamPerm", "Trace", "Refusal", "trace_model", "edges_from_trace", "output_tensors",
           "find_edges", "example_inputs"]
