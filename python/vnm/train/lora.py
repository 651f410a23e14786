"""Three-stage LoRA recovery, after Zhao et al. 2024, "Beyond 2:4: exploring V:N:M sparsity for
efficient transformer inference on GPUs" (arXiv 2410.16135), section 4.3.

The trained weight of every wrapped layer is ``(W + scale * B A) * mask`` with W frozen, A (r x K)
and B (R x r) trainable, ``scale = alpha / r`` and B initialised to zero (so training starts from
the pruned or dense model exactly, as in LoRA):

1. **dense** stage: dense LoRA, no mask. It has something to train only when the loss sees a
   difference from the model it started from: with distillation from that (dense) model as the
   only loss and no dropout active, the student *is* the teacher while B = 0, so the loss and
   every gradient are exactly zero and the stage changes nothing (a warning says so at run time;
   use ``dense_steps=0`` or add a task loss);
2. **dynamic** stage: sparse LoRA; every ``mask_interval`` steps the mask is re-selected with
   :func:`vnm.select_mask` from ``|W + scale B A|`` (or a score you pass), and a regulariser
   ``mask_lambda * sum ||(1 - M) * (W + scale B A)||^2`` over the weights the current mask prunes
   pushes them to zero, so the next selection does not flip them back in;
3. **fixed** stage: sparse LoRA with the mask fixed until the end.

The regulariser is a *sum* over every pruned weight of every wrapped layer, while the
distillation losses are *means* (over positions, and features for 'mse'): its value grows with
the model (in the MiniLM run of ``docs/recovery.md`` it fell from 2.2 to 1.9 while the
distillation loss was 0.06 to 0.22), so the ``reg`` and ``distill`` columns of the log are not
comparable in size. What the sum keeps fixed is the gradient per merged weight:
``2 * mask_lambda * w`` on each pruned weight ``w``, whatever the layer sizes.

:func:`vnm.train.merge` then folds ``(W + scale B A) * mask`` into :class:`vnm.nn.VNMLinear`.

What is sourced and what is ours (see ``docs/papers.md`` section 1c; the paper has no public
code and its method section could not be read, only the abstract, a technical summary and the
reviews):
* sourced from the paper (via summary and reviews): the weight ``(W + BA) * M``, the three stages,
  masks re-selected from ``W + BA`` in stage 2, and "the iterations of the first two stages should
  not exceed 10% of the total" (a warning is issued beyond that);
* inferred, not confirmed: the regulariser's exact form. The paper's Eq. (3) uses a complemented
  previous mask and a coefficient lambda; the squared norm over the pruned weights is our reading,
  by analogy with SR-STE's decay on pruned weights;
* ours: the 5% / 5% / 90% split of the total steps, ``mask_interval`` (5 selections in stage 2),
  ``mask_lambda = 1e-4``. Its gradient on a pruned merged weight, ``2 * 1e-4 * w``, is SR-STE's
  decay term ``lambda_w * w`` with the reference ``lambda_w = 2e-4``; that is the whole of the
  correspondence. It is per weight, and the resulting step is SR-STE's only for plain SGD on the
  dense weight itself. Here the trained parameters are A and B, so the merged weight moves only
  through the factors, and AdamW (the default) divides each factor's gradient by its running
  magnitude, so the pull on pruned weights relative to the distillation gradient is not SR-STE's;
* sourced from Wanda's LoRA fine-tuning of pruned LLaMA (``locuslab/wanda``, ``lora_ft``), since
  the V:N:M paper's values were not found: rank 8, alpha 16, AdamW at lr 1e-4, 5 warm-up steps,
  linear decay (the Hugging Face Trainer default it runs with). Not taken from it: its LoRA
  dropout of 0.05 (``LoRASparseLinear`` has no dropout on the LoRA branch) and its choice of
  q_proj and v_proj only (here every layer :func:`vnm.sparsify` would prune gets factors).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..mask import check_mask, select_mask
from ..pattern import Pattern, PatternLike, as_pattern
from ..sparsify import DEFAULT_SKIP, _set_module
from .layers import MaskScore, PatternSpec, choose_layers, frozen_copy, linear_parts, select_scores
from .loop import ForwardFn, LossFn, Schedule, TrainConfig, TrainLog, train_loop

STAGES = ("dense", "dynamic", "fixed")
# The paper's budget for the first two stages (quoted by its reviewers): at most 10% of all steps.
PAPER_FIRST_STAGES_FRACTION = 0.10


class LoRASparseLinear(nn.Module):
    """``y = x @ W_eff.T + bias`` with ``W_eff = W + scale * B @ A``, times ``mask`` once sparse.

    ``weight`` (out x in) and ``bias`` are frozen copies (``train_bias=True`` trains the bias);
    ``lora_A`` (rank x in) starts Kaiming-uniform as in LoRA, ``lora_B`` (out x rank) at zero.
    ``mask`` (bool, out x in) is a buffer: all ones until :meth:`update_mask` selects one; whether
    it is applied (``is_sparse``) is saved in the state dict. ``mask_score`` and ``score_name``
    are the score (None: magnitude) and layer name mask selections use by default;
    :class:`ThreeStageLoRA` sets them from ``ThreeStageConfig.mask_score``, so that
    :func:`vnm.train.merge` of a layer that never left the dense stage selects its mask the way
    training would have. They are not saved in the state dict (a score is a function).
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], pattern: PatternLike,
                 rank: int = 8, alpha: float = 16.0, train_bias: bool = False):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D (out x in), got shape {tuple(weight.shape)}")
        R, K = weight.shape
        if not isinstance(rank, int) or not 1 <= rank <= min(R, K):
            raise ValueError(f"rank must be an integer in [1, {min(R, K)}] for a {R}x{K} weight, got {rank!r}")
        if not alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        self.pattern: Pattern = as_pattern(pattern)
        self.in_features, self.out_features = K, R
        self.rank, self.alpha = rank, float(alpha)
        self.scaling = self.alpha / rank
        self.weight = frozen_copy(weight)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=train_bias)
        # Factors train in float32 when the frozen weight is half precision (Adam on bf16 stalls).
        factor_dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, K, dtype=factor_dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # LoRA's (and peft's) initialisation
        self.lora_B = nn.Parameter(torch.zeros(R, rank, dtype=factor_dtype, device=weight.device))
        self.register_buffer("mask", torch.ones(R, K, dtype=torch.bool, device=weight.device))
        self.is_sparse = False
        self.mask_score: Optional[MaskScore] = None
        self.score_name = ""

    @classmethod
    def from_linear(cls, module: nn.Module, pattern: PatternLike, rank: int = 8, alpha: float = 16.0,
                    train_bias: bool = False) -> "LoRASparseLinear":
        """Wrap an ``nn.Linear`` (or GPT-2 ``Conv1D``); its weights are copied, not shared."""
        w, b = linear_parts(module)
        return cls(w, b, pattern, rank, alpha, train_bias)

    def merged_weight(self) -> torch.Tensor:
        """``W + scale * B @ A`` (dense, differentiable in A and B; in the factors' dtype)."""
        return self.weight.to(self.lora_A.dtype) + self.scaling * (self.lora_B @ self.lora_A)

    def effective_weight(self) -> torch.Tensor:
        """The weight the forward uses: the merged weight, masked once sparse."""
        w = self.merged_weight()
        # torch.where, not w * mask: multiplying converts the bool mask to floats every call.
        return torch.where(self.mask, w, torch.zeros((), dtype=w.dtype, device=w.device)) if self.is_sparse else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_sparse:
            # Dense stage: the usual LoRA factorisation, never forming B @ A.
            lora = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)
            return F.linear(x, self.weight, self.bias) + (self.scaling * lora).to(x.dtype)
        return F.linear(x, self.effective_weight().to(x.dtype), self.bias)

    def set_mask_score(self, score: Optional[MaskScore], name: str = "") -> None:
        """The score (None: magnitude) and layer name that mask selections use by default."""
        self.mask_score, self.score_name = score, name

    @torch.no_grad()
    def update_mask(self, score: Optional[MaskScore] = None, name: Optional[str] = None) -> Optional[int]:
        """Select the mask from the merged weight (``|W + scale B A|`` or ``score(merged, name)``)
        and make the layer sparse. ``score`` and ``name`` default to :attr:`mask_score` and
        :attr:`score_name`. Returns how many mask entries changed (None at the first selection)."""
        score = self.mask_score if score is None else score
        name = self.score_name if name is None else name
        new = select_mask(select_scores(score, self.merged_weight(), name), self.pattern)
        flips = int((new != self.mask).sum()) if self.is_sparse else None
        self.mask.copy_(new)
        self.is_sparse = True
        return flips

    def set_dense(self) -> None:
        self.is_sparse = False

    def flip_penalty(self) -> torch.Tensor:
        """``||(1 - mask) * (W + scale B A)||^2``: the merged weights the current mask prunes."""
        w = self.merged_weight()
        return torch.where(self.mask, torch.zeros((), dtype=w.dtype, device=w.device), w).pow(2).sum()

    def merged_parts(self) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        """(weight, bias, mask) for :func:`vnm.train.merge`; selects a mask if none was yet (with
        :attr:`mask_score`)."""
        if not self.is_sparse:
            self.update_mask()
        with torch.no_grad():
            weight = self.merged_weight().to(self.weight.dtype)
            return weight, None if self.bias is None else self.bias.detach(), self.mask.clone()

    # is_sparse is part of the training state: a checkpoint taken in stage 2 or 3 resumes sparse.
    def get_extra_state(self) -> Dict[str, Any]:
        return {"is_sparse": self.is_sparse}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        self.is_sparse = bool(state["is_sparse"])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, pattern={self.pattern}, "
                f"rank={self.rank}, alpha={self.alpha:g}, sparse={self.is_sparse}")


def prepare_lora(model: nn.Module, pattern: PatternSpec = "64:2:8", rank: int = 8, alpha: float = 16.0,
                 skip: Sequence[str] = DEFAULT_SKIP, filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
                 train_bias: bool = False, freeze: bool = True,
                 masks: Optional[Dict[str, torch.Tensor]] = None) -> List[str]:
    """Replace the linear layers of ``model`` (in place) with :class:`LoRASparseLinear`.

    Layers are chosen as :func:`vnm.sparsify` chooses them (``pattern`` is one pattern or a
    mapping of name globs to patterns; ``skip`` globs and ``filter_fn`` leave layers dense).
    With ``freeze`` (the LoRA setting) every other parameter of the model stops training: only
    the LoRA factors (and with ``train_bias`` the wrapped biases) train; unfreeze others by hand
    (e.g. a classifier head) if you want them trained. Returns the wrapped layer names.

    ``masks`` (``{name: R x K bool}``, e.g. ``vnm.prune_sequential(...).masks`` after a one-shot
    second-order prune that left updated weights in the model): the named layers start sparse
    with these masks (checked against their pattern), so training starts from the pruned model
    exactly; use ``dense_steps=0``, since the dense stage would drop them. Every wrapped layer
    needs one then.
    """
    chosen = choose_layers(model, pattern, skip, filter_fn)
    if masks is not None:
        missing = [name for name, _ in chosen if name not in masks]
        if missing:
            raise ValueError(f"masks has no entry for {missing[0]!r} ({len(missing)} wrapped layers in all): give a mask "
                             "for every layer the pattern selects, or leave those layers out with skip= / filter_fn")
        for name, p in chosen:
            check_mask(masks[name], p)
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    for name, p in chosen:
        layer = LoRASparseLinear.from_linear(model.get_submodule(name), p, rank, alpha, train_bias)
        if masks is not None:
            layer.mask.copy_(masks[name].to(layer.mask.device))
            layer.is_sparse = True
        _set_module(model, name, layer)
    return [name for name, _ in chosen]


@dataclass
class ThreeStageConfig(TrainConfig):
    """Stage lengths and mask updates of three-stage LoRA (plus everything in :class:`TrainConfig`).

    Give ``total_steps`` (stage lengths default to 5% dense, 5% dynamic, the rest fixed) or all
    three of ``dense_steps``, ``dynamic_steps``, ``fixed_steps`` (or both, if they add up).
    mask_interval: steps between mask selections in the dynamic stage (default: 5 selections).
    mask_lambda: weight of the flip regulariser in the dynamic stage (0 turns it off); the
        regulariser sums over all pruned weights (see the module docstring for what that means).
    mask_score: ``(merged weight, layer name) -> scores`` for mask selection; None is magnitude.
    Defaults: see the module docstring for which are the paper's, Wanda's and ours.
    """

    total_steps: Optional[int] = None
    dense_steps: Optional[int] = None
    dynamic_steps: Optional[int] = None
    fixed_steps: Optional[int] = None
    mask_interval: Optional[int] = None
    mask_lambda: float = 1e-4
    mask_score: Optional[MaskScore] = None

    def stage_lengths(self) -> Tuple[int, int, int]:
        """(dense, dynamic, fixed) steps; ``ValueError`` if they do not add up or are negative."""
        given = (self.dense_steps, self.dynamic_steps, self.fixed_steps)
        for label, v in zip(("total_steps", "dense_steps", "dynamic_steps", "fixed_steps"), (self.total_steps,) + given):
            if v is not None and (not isinstance(v, int) or v < 0):
                raise ValueError(f"{label} must be a non-negative integer, got {v!r}")
        if None not in given:
            s = tuple(given)
            if self.total_steps is not None and sum(s) != self.total_steps:
                raise ValueError(f"stage lengths {s[0]} + {s[1]} + {s[2]} = {sum(s)} do not add up to "
                                 f"total_steps={self.total_steps}: fix one of them or leave fixed_steps=None")
        else:
            if self.total_steps is None:
                raise ValueError("give total_steps, or all three of dense_steps, dynamic_steps and fixed_steps")
            total = self.total_steps
            dense = round(0.05 * total) if self.dense_steps is None else self.dense_steps
            dynamic = round(0.05 * total) if self.dynamic_steps is None else self.dynamic_steps
            fixed = total - dense - dynamic if self.fixed_steps is None else self.fixed_steps
            if fixed < 0 or dense + dynamic + fixed != total:
                raise ValueError(f"stage lengths {dense} + {dynamic} + {fixed} do not add up to "
                                 f"total_steps={total}: shorten the dense or dynamic stage")
            s = (dense, dynamic, fixed)
        if sum(s) < 1:
            raise ValueError("three-stage LoRA needs at least one step: set total_steps")
        return s

    def validate(self) -> None:
        super().validate()
        s1, s2, s3 = self.stage_lengths()
        if self.mask_interval is not None and (not isinstance(self.mask_interval, int) or self.mask_interval < 1):
            raise ValueError(f"mask_interval must be a positive integer, got {self.mask_interval!r}")
        if self.mask_lambda < 0:
            raise ValueError(f"mask_lambda must be >= 0, got {self.mask_lambda}")
        if s1 + s2 > PAPER_FIRST_STAGES_FRACTION * (s1 + s2 + s3) + 1e-9:
            warnings.warn(f"the dense and dynamic stages take {s1 + s2} of {s1 + s2 + s3} steps: over the "
                          f"{PAPER_FIRST_STAGES_FRACTION:.0%} the paper recommends", stacklevel=3)

    def interval(self) -> int:
        s2 = self.stage_lengths()[1]
        return self.mask_interval or max(1, math.ceil(s2 / 5))


class ThreeStageLoRA(Schedule):
    """The stage logic, as hooks around any training loop::

        schedule = ThreeStageLoRA(model, config)
        for step in range(config.total):
            schedule.begin_step(step)           # stage switch, mask selection
            loss = task_loss(...) + schedule.regularizer(step)   # regulariser: 0 outside stage 2
            ...backward, optimiser step...
    """

    def __init__(self, model: nn.Module, config: ThreeStageConfig):
        self.layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRASparseLinear)]
        if not self.layers:
            raise ValueError(f"{type(model).__name__} has no LoRASparseLinear layer: call vnm.train.prepare_lora first")
        self.config = config
        self.dense_steps, self.dynamic_steps, self.fixed_steps = config.stage_lengths()
        self.total = self.dense_steps + self.dynamic_steps + self.fixed_steps
        self.mask_interval = config.interval()
        for name, layer in self.layers:
            layer.set_mask_score(config.mask_score, name)
        # Dense-stage steps this run has seen, and whether any of them had a non-zero loss.
        self.dense_steps_seen = 0
        self.dense_loss_nonzero = False

    def stage(self, step: int) -> str:
        if step < self.dense_steps:
            return "dense"
        if step < self.dense_steps + self.dynamic_steps:
            return "dynamic"
        return "fixed"

    def update_masks(self) -> Optional[int]:
        flips = [m.update_mask(self.config.mask_score, n) for n, m in self.layers]
        return None if any(f is None for f in flips) else sum(flips)

    def begin_step(self, step: int) -> Dict[str, Any]:
        stage = self.stage(step)
        info: Dict[str, Any] = {"stage": stage}
        if stage == "dense":
            for _, m in self.layers:
                m.set_dense()
        elif stage == "dynamic":
            if (step - self.dense_steps) % self.mask_interval == 0 or not all(m.is_sparse for _, m in self.layers):
                flips = self.update_masks()
                info["mask_flips"] = flips if flips is not None else ""
        elif not all(m.is_sparse for _, m in self.layers):
            # No dynamic stage (or resumed without masks): select once; fixed from here on.
            self.update_masks()
        return info

    def regularizer(self, step: int) -> Optional[torch.Tensor]:
        if self.stage(step) != "dynamic" or self.config.mask_lambda == 0:
            return None
        return self.config.mask_lambda * sum(m.flip_penalty() for _, m in self.layers)

    def end_step(self, step: int, row: Dict[str, Any]) -> Dict[str, Any]:
        if self.stage(step) == "dense":
            self.dense_steps_seen += 1
            self.dense_loss_nonzero |= row["loss"] != 0.0
            if step == self.dense_steps - 1 and not self.dense_loss_nonzero:
                warnings.warn(
                    f"the loss was exactly 0 in all {self.dense_steps_seen} dense-stage steps, so the dense stage "
                    "trained nothing: the dense LoRA model equals the model it started from while lora_B is 0 "
                    "(LoRA's initialisation), so distilling from that model gives zero loss and zero gradients. "
                    "Set dense_steps=0 to skip the stage, or give a task loss (loss_fn or labels) for it to train "
                    "on", stacklevel=4)
        return {}


def train_three_stage(model: nn.Module, batches, config: ThreeStageConfig, loss_fn: Optional[LossFn] = None,
                      forward_fn: Optional[ForwardFn] = None) -> TrainLog:
    """Three-stage LoRA on a model prepared with :func:`prepare_lora`; returns the log.

    ``batches``: a list (indexed by step modulo its length) or a re-iterable loader of batches
    (dicts are passed as ``model(**batch)``). ``loss_fn(outputs, batch)`` is the task loss (or
    the model's ``outputs.loss``); ``config.distill`` with ``config.teacher`` adds distillation.
    Afterwards call :func:`vnm.train.merge` to get ``VNMLinear`` layers.
    """
    if not isinstance(config, ThreeStageConfig):
        raise TypeError(f"config must be a ThreeStageConfig, got {type(config).__name__}")
    schedule = ThreeStageLoRA(model, config)
    return train_loop(model, batches, schedule.total, config, schedule, loss_fn, forward_fn, desc="3-stage LoRA")


__all__ = ["LoRASparseLinear", "prepare_lora", "ThreeStageConfig", "ThreeStageLoRA", "train_three_stage"]
