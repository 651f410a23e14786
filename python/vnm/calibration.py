"""Calibration: per-input-channel statistics of the activations every prunable layer reads.

``stats = vnm.calibrate(model, batches)`` runs the batches through the model with forward
pre-hooks on every ``nn.Linear`` (and GPT-2 ``Conv1D``) and returns a :class:`Calibration`, a
read-only mapping ``module name -> ChannelStats``. Memory is bounded: each layer keeps a few
vectors of length K (its input channels) and, for the entropy score, a K x bins histogram; no
activation is stored.

What a :class:`ChannelStats` holds for input channel j over the calibration tokens t:

==============  ==========================  ================================================
field           shape, dtype                meaning
==============  ==========================  ================================================
``count``       int                         tokens seen (padding excluded, see below)
``sum``         (K,) float64                sum_t x_tj
``sumsq``       (K,) float64                sum_t x_tj^2
``minimum``     (K,) float32                min_t x_tj
``maximum``     (K,) float32                max_t x_tj
``histogram``   (K, bins) int32 or None     counts of x_tj in ``bins`` equal-width bins
                                            spanning [minimum_j, maximum_j] (int64 when more
                                            than 2**31 - 1 tokens were calibrated)
``l2``          (K,) float32 (property)     ||X_j||_2 = sqrt(sumsq): Wanda's and RIA's norm
``rms``         (K,) float32 (property)     sqrt(sumsq / count), independent of data size
``mean``        (K,) float32 (property)     sum / count
``entropy``     (K,) float32 or None        Shannon entropy (nats) of the histogram
==============  ==========================  ================================================

Padding: when a batch is a mapping with an ``attention_mask`` of shape (B, L) and a layer's input
has shape (B, L, K), only the tokens the mask marks are counted (padding would otherwise add
zeros-like rows of the pad embedding to every statistic). Inputs of other shapes count every row.
``token_mask=lambda batch: ...`` supplies the (B, L) mask for batches that are not mappings. A
batch that is not a mapping and holds a 2-D integer tensor (token ids) while no ``token_mask`` is
given triggers one ``UserWarning`` per call: its padding, if any, is counted.

Encoder-decoder models (Hugging Face models with ``config.is_encoder_decoder`` and an encoder
found by ``model.get_encoder()``, e.g. T5, BART): ``attention_mask`` applies to the encoder's
layers and to layers whose input *is* the encoder's output tensor (the cross-attention keys and
values; recognised by identity with what the encoder returned, or with ``encoder_outputs`` passed
in the batch); every other layer (the decoder's, an LM head) gets the batch's
``decoder_attention_mask``, and counts every decoder token when the batch has none. An encoder
mask is never applied to decoder inputs, even when both sequences have the same length.

The histogram needs each channel's range before it can bin, so with ``entropy_bins`` set the
batches are run twice (norms and ranges, then histograms); pass ``entropy_bins=None`` for one pass
when the entropy score is not needed.

Memory: the histogram pass bins ``HISTOGRAM_CHUNK_VALUES`` (2**22) values at a time, so its
temporaries stay at a few tens of MiB whatever the batch size (measured on the CPU for one
4096 x 11008 float32 input: about 50-90 MiB above the input, against 691 MiB when binning the
whole input at once); the bins are those of the unchunked computation, bit for bit. Each layer
keeps its K x bins histogram on the model's device while calibrating (int32: about 0.58 GB at 128
bins for the 32 blocks of LLaMA-7B). Layers that read the same tensor (q/k/v, gate/up) each keep
their own copy: sharing them would need proof, on every batch and pass, that the tensor is the
same and unmodified, and a way back when it is not; that is not implemented.

For deep models :func:`calibrate_sequential` calibrates block by block, each block reading the
outputs of the blocks before it *after* they were pruned (as Wanda and SparseGPT do).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from .layers import LayerFilter, batch_to, in_features, model_device, prunable_layers, run_model

DEFAULT_ENTROPY_BINS = 128


@dataclass
class ChannelStats:
    """Statistics of one layer's input channels over the calibration tokens (see module doc)."""

    name: str
    count: int
    sum: torch.Tensor
    sumsq: torch.Tensor
    minimum: torch.Tensor
    maximum: torch.Tensor
    histogram: Optional[torch.Tensor] = None
    gram: Optional[torch.Tensor] = None

    @property
    def K(self) -> int:
        return int(self.sumsq.shape[0])

    @property
    def l2(self) -> torch.Tensor:
        """||X_j||_2 over all calibration tokens (K,), float32."""
        return self.sumsq.sqrt().float()

    @property
    def rms(self) -> torch.Tensor:
        """sqrt(mean_t x_tj^2) (K,), float32; zeros if no token was seen."""
        return (self.sumsq / max(self.count, 1)).sqrt().float()

    @property
    def mean(self) -> torch.Tensor:
        return (self.sum / max(self.count, 1)).float()

    @property
    def bins(self) -> Optional[int]:
        return None if self.histogram is None else int(self.histogram.shape[1])

    @property
    def hessian(self) -> Optional[torch.Tensor]:
        """``2 X^T X / count`` (K, K) float64, the Hessian of the layer's squared output error
        ``||X W^T - X W'^T||^2 / count`` in each row of W' (what SparseGPT prunes against);
        ``None`` unless calibrated with ``hessian=True``."""
        if self.gram is None:
            return None
        return self.gram * (2.0 / max(self.count, 1))

    @property
    def entropy(self) -> Optional[torch.Tensor]:
        """Shannon entropy in nats of each channel's histogram (K,), float32; ``None`` without a
        histogram. A constant channel (one occupied bin) has entropy 0; the maximum is ln(bins)."""
        if self.histogram is None:
            return None
        h = self.histogram.double()
        p = h / h.sum(dim=1, keepdim=True).clamp_min(1)
        return -(torch.xlogy(p, p).sum(dim=1)).float()

    def __repr__(self) -> str:
        hist = f", histogram {self.bins} bins" if self.histogram is not None else ""
        gram = ", X^T X" if self.gram is not None else ""
        return f"ChannelStats({self.name!r}, K={self.K}, count={self.count}{hist}{gram})"


class Calibration(Mapping):
    """Read-only mapping ``module name -> ChannelStats`` returned by :func:`calibrate`.

    ``stats[name]`` raises ``KeyError`` naming the layer and the fix when a layer was not
    calibrated; ``stats.get(name)`` returns ``None``.
    """

    def __init__(self, stats: Dict[str, ChannelStats], batches: int, entropy_bins: Optional[int]):
        self._stats = dict(stats)
        self.batches = batches
        self.entropy_bins = entropy_bins

    def __getitem__(self, name: str) -> ChannelStats:
        try:
            return self._stats[name]
        except KeyError:
            raise KeyError(
                f"no input statistics for layer {name!r}: it was not calibrated. Run "
                "stats = vnm.calibrate(model, batches) on a model containing it (without a `layers` "
                "filter that leaves it out)"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._stats)

    def __len__(self) -> int:
        return len(self._stats)

    @property
    def tokens(self) -> int:
        """Tokens seen by the first calibrated layer (0 if none)."""
        return next(iter(self._stats.values())).count if self._stats else 0

    def __repr__(self) -> str:
        return (f"Calibration({len(self)} layers, {self.batches} batches, {self.tokens} tokens, "
                f"entropy_bins={self.entropy_bins})")


# ---- accumulation -------------------------------------------------------------------------------


# Values binned at a time in the histogram pass. Each chunk's temporaries (the scaled values in
# float32, their bin indices in int32) take 4 bytes per value each, 32 MiB per chunk, plus one
# K x bins int64 bincount: bounded however large the batch is.
HISTOGRAM_CHUNK_VALUES = 1 << 22
_INT32_MAX = 2**31 - 1


class _Accumulator:
    """Running statistics of one layer's inputs. Pass 1: count, sums, range. Pass 2: histogram."""

    def __init__(self, name: str, K: int, chunk_values: int = HISTOGRAM_CHUNK_VALUES, gram: bool = False):
        self.name, self.K = name, K
        self.want_gram = gram
        self.gram = None
        self.count = 0
        self.sum = self.sumsq = self.minimum = self.maximum = None
        self.histogram = None
        self.bins = 0
        self.pass_no = 1
        self.chunk_rows = max(1, chunk_values // K)

    def add(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.K:
            raise ValueError(f"layer {self.name!r} received inputs with {x.shape[-1]} channels, expected {self.K}")
        x = x.detach().reshape(-1, self.K)
        if x.shape[0] == 0:
            return
        if self.pass_no == 1:
            self._add_moments(x.float())
        else:
            self._add_histogram(x)

    def _add_moments(self, x: torch.Tensor) -> None:
        if not bool(torch.isfinite(x).all()):
            raise ValueError(
                f"layer {self.name!r} received NaN/Inf inputs during calibration; the model's "
                "activations overflow (check its dtype or the calibration batches)"
            )
        s = x.sum(0, dtype=torch.float64)
        sq = (x * x).sum(0, dtype=torch.float64)
        if self.want_gram:
            # One float32 product per batch (BLAS speed), summed over batches in float64.
            g = (x.T @ x).double()
            self.gram = g if self.gram is None else self.gram.add_(g)
        lo, hi = x.amin(0), x.amax(0)
        if self.sum is None:
            self.sum, self.sumsq, self.minimum, self.maximum = s, sq, lo, hi
        else:
            self.sum += s
            self.sumsq += sq
            self.minimum = torch.minimum(self.minimum, lo)
            self.maximum = torch.maximum(self.maximum, hi)
        self.count += x.shape[0]

    def start_histogram(self, bins: int) -> None:
        self.pass_no, self.bins = 2, bins
        if self.minimum is None:
            return
        # Pass 2 reads the very tokens pass 1 counted, so no bin can exceed self.count: int32
        # counts suffice unless more than 2**31 - 1 tokens were calibrated.
        dtype = torch.int32 if self.count <= _INT32_MAX else torch.int64
        self.histogram = torch.zeros((self.K, bins), dtype=dtype, device=self.minimum.device)
        width = (self.maximum - self.minimum) / bins
        self._constant = ~(width > 0)  # constant channels (width 0) put every value in bin 0
        self._width = torch.where(width > 0, width, 1.0)
        index_dtype = torch.int32 if self.K * bins <= _INT32_MAX else torch.int64
        self._offsets = (torch.arange(self.K, device=self.minimum.device) * bins).to(index_dtype)

    def _add_histogram(self, x: torch.Tensor) -> None:
        if self.histogram is None:
            return
        flat = self.histogram.view(-1)
        for start in range(0, x.shape[0], self.chunk_rows):
            # bin = floor((x - min) / width), clamped to [0, bins - 1]: the clamp catches the value
            # equal to the maximum (which would land in bin `bins`) and float round-off at the edges.
            scaled = x[start:start + self.chunk_rows].float() - self.minimum
            scaled.div_(self._width).masked_fill_(self._constant, 0.0).floor_().clamp_(0, self.bins - 1)
            idx = scaled.to(self._offsets.dtype).add_(self._offsets)
            del scaled
            flat += torch.bincount(idx.view(-1), minlength=flat.numel()).to(flat.dtype)

    def result(self) -> ChannelStats:
        if self.sum is None:  # the layer never ran: zero statistics, noticed by the scores
            z64 = torch.zeros(self.K, dtype=torch.float64)
            z32 = torch.zeros(self.K)
            gram = torch.zeros(self.K, self.K, dtype=torch.float64) if self.want_gram else None
            return ChannelStats(self.name, 0, z64, z64.clone(), z32, z32.clone(), None, gram)
        return ChannelStats(
            self.name, self.count, self.sum.cpu(), self.sumsq.cpu(), self.minimum.cpu(), self.maximum.cpu(),
            None if self.histogram is None else self.histogram.cpu(),
            None if self.gram is None else self.gram,
        )


@dataclass
class _BatchMasks:
    """The token masks of one batch: True for the tokens to count."""

    tokens: Optional[torch.Tensor] = None   # (B, L): attention_mask (the encoder's, or the only stack's)
    decoder: Optional[torch.Tensor] = None  # (B, L_dec): decoder_attention_mask of encoder-decoder models


def _first_tensor(out: Any) -> Optional[torch.Tensor]:
    """The hidden states in a module's output (a tensor, a tuple / list, or a ModelOutput), or None."""
    if isinstance(out, torch.Tensor):
        return out
    hidden = getattr(out, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def _encoder_of(model: nn.Module) -> Optional[Tuple[str, nn.Module]]:
    """(name, module) of the encoder stack of a Hugging Face encoder-decoder model, else None."""
    get_encoder = getattr(model, "get_encoder", None)
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False) or not callable(get_encoder):
        return None
    encoder = get_encoder()
    if not isinstance(encoder, nn.Module) or encoder is model:
        return None
    return next(((n, m) for n, m in model.named_modules() if m is encoder), None)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


class _MaskRouter:
    """Picks the token mask of the stack whose tokens a layer's input holds (shared by all hooks).

    Without an encoder-decoder split every layer gets ``attention_mask``. With one (see
    :func:`_encoder_of`), the encoder's layers, and any layer reading the encoder's output tensor
    itself (cross-attention keys and values), get ``attention_mask``; all other layers (the
    decoder's, an LM head) get ``decoder_attention_mask``, or no mask when the batch has none.
    A mask is applied only to a (B, L, K) input whose (B, L) equals the mask's shape.
    """

    def __init__(self, decoder_side: frozenset = frozenset()):
        self.decoder_side = decoder_side
        self.masks = _BatchMasks()
        self.encoder_output: Optional[torch.Tensor] = None

    def start(self, masks: _BatchMasks, encoder_output: Optional[torch.Tensor] = None) -> None:
        self.masks, self.encoder_output = masks, encoder_output

    def clear(self) -> None:
        self.start(_BatchMasks())

    def mask_for(self, name: str, x: torch.Tensor) -> Optional[torch.Tensor]:
        if name not in self.decoder_side or (self.encoder_output is not None and x is self.encoder_output):
            return self.masks.tokens
        return self.masks.decoder

    def select(self, name: str, x: torch.Tensor) -> torch.Tensor:
        m = self.mask_for(name, x)
        if m is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(m.shape):
            return x[m.to(x.device)]
        return x


def _router_for(model: nn.Module, names: Iterable[str]) -> Tuple[_MaskRouter, Optional[nn.Module]]:
    """The mask router for hooks on ``names`` and the encoder module whose output it must see."""
    found = _encoder_of(model)
    if found is None:
        return _MaskRouter(), None
    prefix, encoder = found
    return _MaskRouter(frozenset(n for n in names if not _under(n, prefix))), encoder


@contextlib.contextmanager
def _hooks(modules: Dict[str, nn.Module], accs: Dict[str, _Accumulator], router: _MaskRouter,
           encoder: Optional[nn.Module] = None):
    handles = []
    for name, module in modules.items():
        acc = accs[name]

        def pre_hook(_module, args, acc=acc, name=name):
            if args and isinstance(args[0], torch.Tensor):
                acc.add(router.select(name, args[0]))

        handles.append(module.register_forward_pre_hook(pre_hook))
    if encoder is not None:
        handles.append(_record_encoder_output(encoder, router))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _record_encoder_output(encoder: nn.Module, router: _MaskRouter):
    def hook(_module, _args, out):
        router.encoder_output = _first_tensor(out)

    return encoder.register_forward_hook(hook)


TokenMaskFn = Callable[[Any], Optional[torch.Tensor]]


def _mapping_mask(batch: Mapping, key: str) -> Optional[torch.Tensor]:
    m = batch.get(key)
    return m.bool() if isinstance(m, torch.Tensor) and m.dim() == 2 else None


def _holds_token_ids(batch: Any) -> bool:
    parts = batch if isinstance(batch, (tuple, list)) else [batch]
    return any(isinstance(t, torch.Tensor) and t.dim() == 2 and not t.dtype.is_floating_point
               and t.dtype != torch.bool for t in parts)


class _MaskReader:
    """Reads the token masks of each batch (see :func:`calibrate`); warns once per run when a
    batch of token ids comes without any way to tell padding from tokens."""

    def __init__(self, token_mask: Optional[TokenMaskFn]):
        if token_mask is not None and not callable(token_mask):
            raise TypeError("token_mask must be a function batch -> (batch, length) mask tensor or None, "
                            f"e.g. token_mask=lambda batch: batch[1]; got {type(token_mask).__name__}")
        self.token_mask = token_mask
        self.warned = False

    def __call__(self, batch: Any) -> _BatchMasks:
        decoder = _mapping_mask(batch, "decoder_attention_mask") if isinstance(batch, Mapping) else None
        if self.token_mask is not None:
            m = self.token_mask(batch)
            if m is not None and not (isinstance(m, torch.Tensor) and m.dim() == 2):
                raise TypeError("token_mask(batch) must return a (batch, length) tensor (True / 1 for the "
                                f"tokens to count) or None; got {type(m).__name__}"
                                f"{tuple(m.shape) if isinstance(m, torch.Tensor) else ''}")
            return _BatchMasks(None if m is None else m.bool(), decoder)
        if isinstance(batch, Mapping):
            return _BatchMasks(_mapping_mask(batch, "attention_mask"), decoder)
        if not self.warned and _holds_token_ids(batch):
            self.warned = True
            warnings.warn(
                f"calibration batches of type {type(batch).__name__} carry no attention_mask, so padding "
                "tokens (if any) are counted in every statistic. Pass mappings such as tokenizer output "
                "(with attention_mask), or say where the mask is: token_mask=lambda batch: batch[1]",
                UserWarning, stacklevel=3,
            )
        return _BatchMasks(None, decoder)


def _given_encoder_output(batch: Any) -> Optional[torch.Tensor]:
    """The encoder output a batch passes in (``encoder_outputs=``), whose tokens are the encoder's."""
    return _first_tensor(batch.get("encoder_outputs")) if isinstance(batch, Mapping) else None


def _reiterable(batches: Iterable) -> Sequence:
    if isinstance(batches, str):
        raise TypeError("batches is a string: calibration needs tokenized batches, e.g. "
                        "vnm.models.token_batches(tokenizer, texts) for a list of texts")
    if isinstance(batches, (torch.Tensor, Mapping)):
        raise TypeError("batches must be an iterable of batches (e.g. a list of tokenizer outputs), "
                        "not a single batch; wrap it in a list: [batch]")
    out = batches if isinstance(batches, Sequence) else list(batches)
    if len(out) == 0:
        raise ValueError("batches is empty: calibration needs at least one batch of inputs")
    return out


@contextlib.contextmanager
def _eval_no_cache(model: nn.Module):
    """Eval mode (no dropout) and no KV cache while calibrating; both restored afterwards."""
    was_training = model.training
    config = getattr(model, "config", None)
    had_cache = getattr(config, "use_cache", None)
    model.eval()
    if had_cache is not None:
        config.use_cache = False
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        if had_cache is not None:
            config.use_cache = had_cache


def _check_bins(entropy_bins: Optional[int]) -> None:
    if entropy_bins is not None and (not isinstance(entropy_bins, int) or entropy_bins < 2):
        raise ValueError(f"entropy_bins must be an integer >= 2 or None (no histogram), got {entropy_bins!r}")


def calibrate(
    model: nn.Module,
    batches: Iterable,
    layers: LayerFilter = None,
    *,
    entropy_bins: Optional[int] = DEFAULT_ENTROPY_BINS,
    token_mask: Optional[TokenMaskFn] = None,
    progress: bool = True,
    hessian: bool = False,
) -> Calibration:
    """Input-channel statistics of the model's prunable layers over ``batches``.

    ``batches``: inputs of ``model``, each a mapping (``model(**batch)``, e.g. tokenizer output),
    a tuple (``model(*batch)``) or a tensor (``model(batch)``); moved to the model's device.
    ``layers``: which layers to hook: module names, or a predicate ``f(module, name) -> bool``
    taking its arguments in the order of :func:`vnm.sparsify`'s ``filter_fn`` (see
    :func:`vnm.layers.prunable_layers`); default all.
    ``entropy_bins``: bins of the per-channel histogram behind the entropy score (the batches are
    then run twice); ``None`` skips it. ``token_mask``: a function ``batch -> (B, L) mask`` (True
    or 1 for the tokens to count) that replaces the batch's ``attention_mask``, for batches that
    are not mappings (a DataLoader over a TensorDataset yields lists: ``token_mask=lambda b: b[1]``).
    Which mask each layer gets, and the warning for token batches without one: see the module
    documentation. The model runs in eval mode without gradients and without a KV cache; its
    training mode is restored afterwards. ``hessian=True`` also accumulates each layer's
    ``X^T X`` (K x K, float64, on the model's device; :attr:`ChannelStats.hessian`), which the
    second-order pruner :mod:`vnm.obs` needs: K^2 numbers per layer, so for deep models prefer
    :func:`calibrate_sequential`, which holds one block's at a time.

    Returns a :class:`Calibration` (``stats[name].l2`` etc.; see the module documentation).
    """
    _check_bins(entropy_bins)
    modules = prunable_layers(model, layers)
    if not modules:
        raise ValueError("the model has no nn.Linear / Conv1D layers to calibrate (or the `layers` filter matched none)")
    batches = _reiterable(batches)
    device = model_device(model)
    accs = {name: _Accumulator(name, in_features(m), gram=hessian) for name, m in modules.items()}
    read_masks = _MaskReader(token_mask)
    router, encoder = _router_for(model, modules)
    passes = [("calibrate: norms", None)] + ([("calibrate: entropy histograms", entropy_bins)] if entropy_bins else [])
    with _eval_no_cache(model), _hooks(modules, accs, router, encoder):
        for desc, bins in passes:
            if bins:
                for acc in accs.values():
                    acc.start_histogram(bins)
            for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
                moved = batch_to(batch, device)
                router.start(read_masks(batch), _given_encoder_output(moved))
                run_model(model, moved)
            router.clear()
    return Calibration({name: acc.result() for name, acc in accs.items()}, len(batches), entropy_bins)


# ---- sequential (block by block) calibration ----------------------------------------------------


class _StopForward(Exception):
    """Raised by the hook on the first block once its inputs are captured."""


# Keyword arguments through which a block would read or extend a KV cache; calibration replays
# the same inputs many times, so no cache may be carried along.
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


# One batch's inputs of a block: positional args, keyword args, the batch's token masks, and the
# encoder output tensor among the args (encoder-decoder models), whose rows are encoder tokens.
_BlockInputs = Tuple[list, dict, _BatchMasks, Optional[torch.Tensor]]


def _capture_block_inputs(model, first_block, batches, device, progress, read_masks: _MaskReader,
                          encoder: Optional[nn.Module]) -> List[_BlockInputs]:
    captured: List[_BlockInputs] = []
    router = _MaskRouter()  # only records the encoder's output here

    def pre_hook(_module, args, kwargs):
        kw = dict(kwargs)
        for key in _CACHE_KWARGS:
            if key in kw:
                kw[key] = None
        if "use_cache" in kw:
            kw["use_cache"] = False
        captured.append((list(args), kw, _BatchMasks(), None))
        raise _StopForward

    handles = [first_block.register_forward_pre_hook(pre_hook, with_kwargs=True)]
    if encoder is not None:
        handles.append(_record_encoder_output(encoder, router))
    try:
        for batch in tqdm(batches, desc="calibrate: block inputs", disable=not progress, leave=False):
            n = len(captured)
            moved = batch_to(batch, device)
            router.start(_BatchMasks(), _given_encoder_output(moved))
            try:
                run_model(model, moved)
            except _StopForward:
                pass
            if len(captured) != n + 1:
                raise ValueError("blocks[0] did not run during the model's forward pass: blocks must be the "
                                 "model's transformer blocks in execution order (e.g. model.model.layers)")
            args, kw, _, _ = captured[-1]
            captured[-1] = (args, kw, read_masks(batch), router.encoder_output)
    finally:
        for h in handles:
            h.remove()
    return captured


def _hidden_of(args: list, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: list, kwargs: dict, hidden: torch.Tensor) -> Tuple[list, dict]:
    if args:
        return [hidden] + list(args[1:]), kwargs
    kw = dict(kwargs)
    kw["hidden_states"] = hidden
    return list(args), kw


def _block_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    hidden = getattr(out, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise TypeError(f"cannot find the hidden states in a block's output of type {type(out).__name__}")


def calibrate_sequential(
    model: nn.Module,
    batches: Iterable,
    blocks: Sequence[nn.Module],
    prune_fn: Optional[Callable[[nn.Module, Calibration], Any]] = None,
    *,
    entropy_bins: Optional[int] = DEFAULT_ENTROPY_BINS,
    token_mask: Optional[TokenMaskFn] = None,
    progress: bool = True,
    hessian: bool = False,
) -> Calibration:
    """Calibrate (and prune) a deep model block by block.

    ``blocks`` are the transformer blocks in execution order (``model.model.layers`` for LLaMA,
    ``model.transformer.h`` for GPT-2, ``model.encoder.layer`` for BERT). The inputs of
    ``blocks[0]`` are captured by running ``batches`` through the model once; then for each block
    in turn: its prunable layers are calibrated on its current inputs, ``prune_fn(block, stats)``
    is called with that block's statistics (a :class:`Calibration` keyed by full module names of
    ``model``) and may mask the block's weights in place, and the block's outputs *after*
    pruning become the next block's inputs. So each block is calibrated on what the already
    pruned blocks feed it, as in Wanda and SparseGPT. A typical ``prune_fn``::

        lambda block, stats: vnm.apply_masks_(model, vnm.compute_masks(model, "64:2:8", "wanda", stats, layers=list(stats)))

    The block inputs of every batch (tokens x hidden per batch) are held in memory during the
    run, as in Wanda and SparseGPT; per-layer statistics stay bounded as in :func:`calibrate`.
    Layers outside ``blocks`` (embeddings, LM head) are not calibrated. Token masks
    (``token_mask``, padding, encoder-decoder models) work as in :func:`calibrate`. Returns the
    statistics of every block's layers.

    ``hessian=True`` gives ``prune_fn`` each layer's ``X^T X`` as well (:attr:`ChannelStats.hessian`,
    what :func:`vnm.obs.obs_prune` reads); it is dropped once ``prune_fn`` returns, so at most one
    block's worth is held (and the returned statistics carry none).
    """
    _check_bins(entropy_bins)
    blocks = list(blocks)
    if not blocks or not all(isinstance(b, nn.Module) for b in blocks):
        raise TypeError("blocks must be a non-empty sequence of nn.Module (the model's transformer blocks)")
    names_of = {id(m): n for n, m in model.named_modules()}
    prefixes = []
    for i, b in enumerate(blocks):
        if id(b) not in names_of:
            raise ValueError(f"blocks[{i}] ({type(b).__name__}) is not a submodule of the model")
        prefixes.append(names_of[id(b)])
    batches = _reiterable(batches)
    device = model_device(model)
    all_stats: Dict[str, ChannelStats] = {}
    read_masks = _MaskReader(token_mask)
    with _eval_no_cache(model):
        found = _encoder_of(model)
        encoder = found[1] if found else None
        inputs = _capture_block_inputs(model, blocks[0], batches, device, progress, read_masks, encoder)
        bar = tqdm(total=len(blocks), desc="calibrate: blocks", disable=not progress, leave=False)
        for prefix, block in zip(prefixes, blocks):
            local = prunable_layers(block)
            modules = {(f"{prefix}.{n}" if prefix else n): m for n, m in local.items()}
            accs = {name: _Accumulator(name, in_features(m), gram=hessian) for name, m in modules.items()}
            router, _ = _router_for(model, modules)
            passes = [None] + ([entropy_bins] if entropy_bins and modules else [])
            outputs: List[torch.Tensor] = []
            with _hooks(modules, accs, router):
                for bins in passes:
                    if bins:
                        for acc in accs.values():
                            acc.start_histogram(bins)
                    for args, kw, masks, encoder_output in inputs:
                        router.start(masks, encoder_output)
                        out = _block_output(block(*args, **kw))
                        if bins is None and prune_fn is None:
                            outputs.append(out)
                    router.clear()
            block_stats = Calibration({n: a.result() for n, a in accs.items()}, len(batches), entropy_bins)
            del accs
            if prune_fn is not None:
                prune_fn(block, block_stats)
                outputs = [_block_output(block(*args, **kw)) for args, kw, _, _ in inputs]
            all_stats.update({n: dataclasses.replace(st, gram=None) for n, st in block_stats.items()})
            del block_stats
            inputs = [(*_with_hidden(args, kw, out), masks, enc)
                      for (args, kw, masks, enc), out in zip(inputs, outputs)]
            bar.update(1)
        bar.close()
    return Calibration(all_stats, len(batches), entropy_bins)


__all__ = ["ChannelStats", "Calibration", "calibrate", "calibrate_sequential", "DEFAULT_ENTROPY_BINS"]
