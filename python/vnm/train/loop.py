"""The training loop shared by three-stage LoRA and SR-STE: optimiser and learning-rate schedule,
task and distillation losses, a tqdm progress bar, a loss log (CSV) and resumable checkpoints.

It is a plain PyTorch loop: batches go to the model's device, ``forward_fn(model, batch)`` gives
the outputs, the loss is ``task_weight * task + distill_weight * distill + method regulariser``,
and one optimiser step follows each batch. The method (a *schedule*) gets a hook before every
step (stage changes, mask updates) and after it (what to log), and may add a regulariser to the
loss.
"""

from __future__ import annotations

import csv
import math
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import batch_to, run_model

ForwardFn = Callable[[nn.Module, Any], Any]
LossFn = Callable[[Any, Any], torch.Tensor]  # (model outputs, batch) -> scalar loss

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "linear", "cosine")
DISTILL_KINDS = ("mse", "kl")


@dataclass
class TrainConfig:
    """Optimisation, distillation, logging and checkpoints (shared by both recovery methods).

    lr, optimizer ('adamw' or 'sgd'), momentum (SGD), weight_decay, warmup_steps (linear warm-up:
    step ``s`` uses ``lr * (s + 1) / (warmup_steps + 1)``), lr_schedule ('constant', or 'linear' or
    'cosine' decay over the ``steps - warmup_steps`` steps after the warm-up; the decay reaches zero
    one step after the last, as the Hugging Face schedules do, so the last step still uses
    ``lr / (steps - warmup_steps)`` with 'linear' and about ``lr * (pi / 2)**2 / (steps -
    warmup_steps)**2`` with 'cosine'), grad_clip (max global gradient norm, None for none).
    Distillation: ``distill='mse'`` (mean squared error on a hidden state, padding tokens
    excluded when the batch has an ``attention_mask``) or ``'kl'`` (KL divergence of softened
    logits, scaled by ``temperature**2`` as in Hinton et al.) against ``teacher`` (the dense
    model: a copy taken before ``prepare_*``), on ``distill_on`` ('auto': logits if the outputs
    have them, else ``last_hidden_state``; or a callable ``outputs -> tensor``).
    The loss is ``task_weight * task + distill_weight * distill`` (+ the method's regulariser),
    where task is ``loss_fn(outputs, batch)`` or else the model's own ``outputs.loss``.
    log_path: CSV of (step, stage, loss, ...) written at the end and at every checkpoint.
    checkpoint_dir / checkpoint_every: torch state dicts (model, optimiser, scheduler, log and the
    random number generators: torch CPU and CUDA, Python ``random``, numpy) every n steps and at
    the end, as ``step_XXXXXX.pt`` and ``last.pt``; ``resume`` continues from one, so a run with
    dropout resumed from a list of batches repeats the uninterrupted run.
    train_mode: run the model in train mode (dropout on) while training; False keeps eval mode.
    cache_teacher: compute the teacher's outputs once per batch and reuse them in later epochs
        (needs ``batches`` to be a list; saves a teacher forward per step).
    """

    lr: float = 1e-4
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup_steps: int = 5
    lr_schedule: str = "linear"
    grad_clip: Optional[float] = None
    teacher: Optional[nn.Module] = None
    distill: Optional[str] = None
    distill_on: Union[str, Callable[[Any], torch.Tensor]] = "auto"
    temperature: float = 1.0
    distill_weight: float = 1.0
    task_weight: float = 1.0
    log_path: Optional[Union[str, os.PathLike]] = None
    checkpoint_dir: Optional[Union[str, os.PathLike]] = None
    checkpoint_every: int = 0
    resume: Optional[Union[str, os.PathLike]] = None
    progress: bool = True
    train_mode: bool = True
    cache_teacher: bool = False

    def validate(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}")
        if self.warmup_steps < 0 or self.checkpoint_every < 0:
            raise ValueError("warmup_steps and checkpoint_every must be >= 0")
        if self.distill is not None and self.distill not in DISTILL_KINDS:
            raise ValueError(f"distill must be None, 'mse' or 'kl', got {self.distill!r}")
        if self.distill is not None and self.teacher is None:
            raise ValueError(f"distill={self.distill!r} needs a teacher: pass teacher=<the dense model> "
                             "(copy.deepcopy(model) taken before prepare_lora / prepare_srste)")
        if self.teacher is not None and self.distill is None:
            raise ValueError("a teacher was given but distill is None: pass distill='mse' (hidden states) "
                             "or distill='kl' (logits), or drop the teacher")
        if self.teacher is not None and not isinstance(self.teacher, nn.Module):
            raise TypeError(f"teacher must be a torch.nn.Module, got {type(self.teacher).__name__}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.checkpoint_every and self.checkpoint_dir is None:
            raise ValueError("checkpoint_every is set but checkpoint_dir is None: pass a folder for checkpoints")


# ---- losses ----------------------------------------------------------------------------------

def output_tensor(outputs: Any, which: Union[str, Callable[[Any], torch.Tensor]] = "auto") -> torch.Tensor:
    """The tensor of ``outputs`` to distil: ``which`` is 'auto', an attribute name or a callable."""
    if callable(which):
        return which(outputs)
    if isinstance(outputs, torch.Tensor):
        return outputs
    if which == "auto":
        for key in ("logits", "last_hidden_state"):
            if getattr(outputs, key, None) is not None:
                return getattr(outputs, key)
        if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
            return outputs[0]
        raise ValueError(f"cannot tell which output of {type(outputs).__name__} to distil: pass "
                         "distill_on='logits', 'last_hidden_state' or a callable outputs -> tensor")
    value = getattr(outputs, which, None)
    if value is None and isinstance(outputs, dict):
        value = outputs.get(which)
    if value is None:
        raise ValueError(f"the model outputs ({type(outputs).__name__}) have no {which!r} to distil")
    return value


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse", temperature: float = 1.0,
                      attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Distillation loss of ``student`` against ``teacher`` outputs (same shape).

    'mse': mean squared error over features, averaged over the positions where ``attention_mask``
    (batch x tokens, for hidden states batch x tokens x features) is set, or over everything.
    'kl': ``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, averaged over the leading
    positions (classes on the last axis, padding excluded with ``attention_mask`` for per-token
    logits).
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student output {tuple(student.shape)} and teacher output {tuple(teacher.shape)} differ: "
                         "distil outputs of the same shape (same architecture and inputs)")
    teacher = teacher.detach().to(student.dtype)
    if kind == "mse":
        per_position = (student - teacher).pow(2).mean(-1)
    elif kind == "kl":
        log_p = F.log_softmax(student / temperature, dim=-1)
        log_q = F.log_softmax(teacher / temperature, dim=-1)
        per_position = (log_q.exp() * (log_q - log_p)).sum(-1) * temperature ** 2
    else:
        raise ValueError(f"kind must be 'mse' or 'kl', got {kind!r}")
    if attention_mask is not None and attention_mask.shape == per_position.shape:
        m = attention_mask.to(per_position.dtype)
        return (per_position * m).sum() / m.sum().clamp_min(1)
    return per_position.mean()


default_forward = run_model  # model(**batch) / model(*batch) / model(batch)


# ---- log -------------------------------------------------------------------------------------

class TrainLog(list):
    """One dict per step: step, stage, loss, task, distill, reg, lr and what the method adds
    (e.g. mask_flips). ``to_csv(path)`` writes it."""

    def to_csv(self, path: Union[str, os.PathLike]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        keys: List[str] = []
        for row in self:
            keys.extend(k for k in row if k not in keys)
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            for row in self:
                w.writerow({k: row.get(k, "") for k in keys})
        return path

    def column(self, key: str, stage: Optional[str] = None) -> List[Any]:
        return [r[key] for r in self if key in r and (stage is None or r.get("stage") == stage)]


# ---- loop ------------------------------------------------------------------------------------

class Schedule:
    """What a recovery method does around the generic loop (three-stage LoRA, SR-STE)."""

    def begin_step(self, step: int) -> Dict[str, Any]:
        """Called before the forward of ``step``; returns entries for the log (at least 'stage')."""
        return {"stage": "train"}

    def end_step(self, step: int, row: Dict[str, Any]) -> Dict[str, Any]:
        """Called after the optimiser step of ``step`` with its log row (loss, parts, lr); returns
        more entries for the row."""
        return {}

    def regularizer(self, step: int) -> Optional[torch.Tensor]:
        return None


def _lr_lambda(config: TrainConfig, steps: int) -> Callable[[int], float]:
    warm = config.warmup_steps

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if config.lr_schedule == "constant" or steps <= warm:
            return 1.0
        progress = (step - warm) / max(1, steps - warm)
        if config.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def rng_state() -> Dict[str, Any]:
    """The random number generators a training step may draw from (dropout, shuffles)."""
    state: Dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np  # noqa: PLC0415
    except ImportError:
        pass
    else:
        state["numpy"] = np.random.get_state()
    return state


def set_rng_state(state: Dict[str, Any], source: Any) -> None:
    """Restore what :func:`rng_state` saved; warns about the generators it cannot restore."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np  # noqa: PLC0415

        np.random.set_state(state["numpy"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            warnings.warn(f"{source} holds the CUDA RNG states of {len(cuda)} devices but this machine has "
                          f"{torch.cuda.device_count()}: CUDA random ops (dropout) after resuming differ from "
                          "the uninterrupted run", stacklevel=3)


def make_optimizer(params: Sequence[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    if not params:
        raise ValueError("the model has no trainable parameter: prepare it with prepare_lora or prepare_srste")
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def _is_sequence(batches) -> bool:
    return isinstance(batches, Sequence) and not isinstance(batches, (str, bytes))


def _batches_from(batches: Iterable, start: int):
    """(index, batch) forever from step ``start``: a sequence is indexed (step modulo its length,
    so resuming sees the same data), any other iterable is iterated again when it runs out (index
    None)."""
    if _is_sequence(batches):
        if len(batches) == 0:
            raise ValueError("batches is empty: pass at least one batch")
        step = start
        while True:
            yield step % len(batches), batches[step % len(batches)]
            step += 1
    if iter(batches) is batches:
        raise TypeError("batches is a one-shot iterator (e.g. a generator): pass a list of batches or a DataLoader, "
                        "which can be iterated again for every epoch")
    skipped = 0
    while True:
        count = 0
        for batch in batches:
            count += 1
            if skipped < start:
                skipped += 1
                continue
            yield None, batch
        if count == 0:
            raise ValueError("batches is empty: pass at least one batch")


def train_loop(model: nn.Module, batches: Iterable, steps: int, config: TrainConfig, schedule: Schedule,
               loss_fn: Optional[LossFn] = None, forward_fn: Optional[ForwardFn] = None,
               desc: str = "train") -> TrainLog:
    """Run ``steps`` optimiser steps of ``model`` (its trainable parameters) with ``schedule``."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    config.validate()
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    forward_fn = forward_fn or default_forward
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, steps))
    log, start = TrainLog(), 0
    if config.resume is not None:
        state = torch.load(config.resume, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        log.extend(state.get("log", []))
        if "rng" in state:
            set_rng_state(state["rng"], config.resume)
        else:
            warnings.warn(f"{config.resume} has no random number generator state (written before vnm saved it): "
                          "random ops such as dropout after resuming differ from the uninterrupted run", stacklevel=2)
        start = int(state["step"])
        if start > steps:
            raise ValueError(f"the checkpoint {config.resume} is at step {start}, beyond steps={steps}")
    device = next(iter(params)).device
    teacher = config.teacher
    teacher_was_training = teacher.training if teacher is not None else False
    if teacher is not None:
        teacher.eval()
    if config.cache_teacher and not _is_sequence(batches):
        raise ValueError("cache_teacher needs batches as a list (the cache is keyed by position): "
                         "pass list(batches) or cache_teacher=False")
    teacher_cache: Dict[int, torch.Tensor] = {}
    was_training = model.training
    model.train(config.train_mode)
    stream = _batches_from(batches, start)
    bar = tqdm(range(start, steps), desc=desc, disable=not config.progress, initial=start, total=steps)
    try:
        for step in bar:
            info = schedule.begin_step(step)
            index, batch = next(stream)
            batch = batch_to(batch, device)
            outputs = forward_fn(model, batch)
            parts: Dict[str, float] = {}
            loss = torch.zeros((), device=device)
            task = loss_fn(outputs, batch) if loss_fn is not None else getattr(outputs, "loss", None)
            if task is not None:
                loss = loss + config.task_weight * task
                parts["task"] = float(task.detach())
            if config.distill is not None:
                t = teacher_cache.get(index) if config.cache_teacher else None
                if t is None:
                    with torch.no_grad():
                        t = output_tensor(forward_fn(teacher, batch), config.distill_on).detach()
                    if config.cache_teacher:
                        teacher_cache[index] = t
                s = output_tensor(outputs, config.distill_on)
                am = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                kd = distillation_loss(s, t, config.distill, config.temperature, am)
                loss = loss + config.distill_weight * kd
                parts["distill"] = float(kd.detach())
            if task is None and config.distill is None:
                raise ValueError("nothing to train on: pass loss_fn(outputs, batch), batches with labels the model "
                                 "turns into outputs.loss, or distill='mse'/'kl' with a teacher")
            reg = schedule.regularizer(step)
            if reg is not None:
                loss = loss + reg
                parts["reg"] = float(reg.detach())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            row = {"step": step, **info, "loss": float(loss.detach()), **parts, "lr": lr}
            row.update(schedule.end_step(step, row))
            log.append(row)
            if not math.isfinite(row["loss"]):
                raise FloatingPointError(f"loss became {row['loss']} at step {step}: lower lr or enable grad_clip")
            bar.set_postfix(stage=info.get("stage"), loss=f"{row['loss']:.4g}", refresh=False)
            done = step + 1
            if config.checkpoint_every and done % config.checkpoint_every == 0 and done < steps:
                _save_checkpoint(config, model, optimizer, scheduler, log, done)
    finally:
        bar.close()
        model.train(was_training)
        if teacher is not None:
            teacher.train(teacher_was_training)
    if config.checkpoint_dir is not None:
        _save_checkpoint(config, model, optimizer, scheduler, log, steps)
    if config.log_path is not None:
        log.to_csv(config.log_path)
    return log


def _save_checkpoint(config: TrainConfig, model, optimizer, scheduler, log: TrainLog, step: int) -> Path:
    folder = Path(config.checkpoint_dir)
    folder.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "log": list(log), "rng": rng_state()}
    path = folder / f"step_{step:06d}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    last = folder / "last.pt"
    tmp = last.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, last)
    if config.log_path is not None:
        log.to_csv(config.log_path)
    return path


__all__ = ["TrainConfig", "TrainLog", "Schedule", "distillation_loss", "output_tensor", "default_forward",
           "train_loop"]
