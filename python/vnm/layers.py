"""The prunable layers of a model and their weights as R x K matrices.

A prunable layer is an ``nn.Linear`` (weight R x K, ``y = x @ W.T``) or a Hugging Face GPT-2
``transformers.pytorch_utils.Conv1D``, whose weight is stored transposed (K x R, ``y = x @ W``).
Everything in vnm that scores, masks or calibrates a layer sees the weight as R x K (output
features x input features) through :func:`weight_matrix`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterable, Union

import torch
from torch import nn

from .weight import VNMWeight

# A predicate takes (module, name), as vnm.sparsify's filter_fn and torchao's filter_fn do.
LayerFilter = Union[None, Iterable[str], Callable[[nn.Module, str], bool]]


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D  # noqa: PLC0415
    except ImportError:  # transformers is optional: without it there is no Conv1D to find
        return None
    return Conv1D


def is_sparse(module: nn.Module) -> bool:
    """Whether ``module`` is a linear layer already in V:N:M storage (its weight a
    :class:`vnm.weight.VNMWeight`, as in :class:`vnm.VNMLinear`)."""
    return isinstance(getattr(module, "weight", None), VNMWeight)


def is_prunable(module: nn.Module) -> bool:
    """Whether ``module`` is a dense ``nn.Linear`` or a GPT-2 ``Conv1D`` (a sparse layer, though an
    ``nn.Linear``, has nothing left to prune)."""
    conv1d = _conv1d_type()
    return (isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))) and \
        not is_sparse(module)


def is_transposed(module: nn.Module) -> bool:
    """True for GPT-2 ``Conv1D`` (weight stored K x R)."""
    conv1d = _conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The layer's weight as an R x K view (output x input features); a transposed view for
    ``Conv1D``. Writing into the view writes the layer's weight."""
    if is_sparse(module):
        raise TypeError(f"this {type(module).__name__} is already sparse (V:N:M storage): its dense weight is "
                        "module.weight.to_dense(); prune the dense model instead")
    if not is_prunable(module):
        raise TypeError(f"expected an nn.Linear or transformers Conv1D, got {type(module).__name__}")
    w = module.weight
    return w.T if is_transposed(module) else w


def in_features(module: nn.Module) -> int:
    """K, the number of input channels of a prunable layer."""
    return weight_matrix(module).shape[1]


def prunable_layers(model: nn.Module, layers: LayerFilter = None) -> Dict[str, nn.Module]:
    """``{name: module}`` of the model's prunable layers, in ``named_modules`` order.

    ``layers``: ``None`` for all of them; a collection of module names (each must be a prunable
    layer of the model, else ``ValueError``); or a predicate ``f(module, name) -> bool`` (the
    order of :func:`vnm.sparsify`'s ``filter_fn`` and torchao's).
    """
    found = {name: m for name, m in model.named_modules() if is_prunable(m)}
    if layers is None:
        return found
    if callable(layers):
        return {name: m for name, m in found.items() if layers(m, name)}
    if isinstance(layers, str):
        raise TypeError("layers must be a collection of module names or a predicate, not a single string; "
                        f"use layers=[{layers!r}]")
    wanted = list(layers)
    missing = [n for n in wanted if n not in found]
    if missing:
        examples = ", ".join(list(found)[:5])
        raise ValueError(
            f"{missing[0]!r} is not an nn.Linear / Conv1D of this model ({len(missing)} requested name(s) "
            f"not found); prunable layers are named like: {examples}"
        )
    keep = set(wanted)
    return {name: m for name, m in found.items() if name in keep}


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def batch_to(batch: Any, device: torch.device) -> Any:
    """A batch (tensor, or mapping / tuple / list of them, nested) with its tensors on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: batch_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(batch_to(v, device) for v in batch)
    return batch


def run_model(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for a mapping (tokenizer output), ``model(*batch)`` for a tuple or list,
    else ``model(batch)``: how vnm feeds calibration and training batches to a model."""
    if isinstance(batch, str) or (isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], str)):
        # Text would reach the model's embedding as an argument it cannot read, deep inside its forward.
        raise TypeError(f"a batch of text ({batch if isinstance(batch, str) else batch[0]!r:.40}...) is not model "
                        "input: tokenize it first, e.g. vnm.models.token_batches(tokenizer, texts) for a list of "
                        "texts, which gives batches of input_ids and attention_mask")
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


__all__ = ["is_prunable", "is_sparse", "is_transposed", "weight_matrix", "in_features", "prunable_layers", "LayerFilter",
           "model_device", "batch_to", "run_model"]
