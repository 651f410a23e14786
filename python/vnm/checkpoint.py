"""Compressed checkpoints: ``vnm.save(model, path)`` and ``vnm.load(path, model_or_config)``.

One safetensors file (never pickle). Its tensors are the model's state dict, where each
:class:`VNMLinear` contributes its canonical storage (``<name>.values``, ``.meta``, ``.columns``,
optional ``.perm``, ``.row_perm``, ``.bias``). Its header metadata holds a JSON description under
the key ``vnm``: format version, library version, the sparse layers with their pattern, shape,
dtype and whether they carry an input or output permutation, and a SHA-256 of all tensor bytes.

Loading validates everything (version, JSON, layer names and shapes, storage well-formedness,
checksum) before it changes the model, so a bad file raises ``ValueError`` and loads nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, Union

import torch
from torch import nn

from ._version import __version__
from .nn import VNMLinear
from .layers import is_prunable
from .sparsify import _set_module
from .tensor import VNMTensor

FORMAT_VERSION = 1
_META_KEY = "vnm"


def _digest(tensors: Dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save(model: nn.Module, path: Union[str, os.PathLike]) -> Path:
    """Write ``model`` (with its :class:`VNMLinear` layers compressed) to ``path`` (.safetensors)."""
    from safetensors.torch import save_file  # noqa: PLC0415

    path = Path(path)
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, VNMLinear):
            layers[name] = {"pattern": m.pattern_text, "shape": [m.out_features, m.in_features],
                            "dtype": str(m.values.dtype).replace("torch.", ""), "perm": m.perm is not None,
                            "row_perm": m.row_perm is not None, "bias": m.bias is not None}
    if not layers:
        raise ValueError("the model has no VNMLinear layer: sparsify it first (vnm.sparsify)")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # safetensors refuses tensors sharing memory (tied weights): keep the first name of each.
    seen, tensors, tied = {}, {}, {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype) if v.numel() else None
        if key is not None and key in seen:
            tied[k] = seen[key]
        else:
            if key is not None:
                seen[key] = k
            tensors[k] = v.clone() if v.numel() else v
    description = {"format_version": FORMAT_VERSION, "vnm_version": __version__,
                   "model_class": type(model).__name__, "layers": layers,
                   "tied": tied, "sha256": _digest(tensors)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(description)})
    os.replace(tmp, path)  # never leave a half-written checkpoint under the final name
    return path


def read_description(path: Union[str, os.PathLike]) -> dict:
    """The JSON description of a vnm checkpoint (``ValueError`` if it is not one)."""
    from safetensors import safe_open  # noqa: PLC0415

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors raises its own error types for truncated headers
        raise ValueError(f"{path} is not a readable safetensors file ({exc}); the file is truncated or corrupt") from exc
    if _META_KEY not in meta:
        raise ValueError(f"{path} is a safetensors file without a vnm description: not written by vnm.save")
    try:
        desc = json.loads(meta[_META_KEY])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: the vnm description is not valid JSON ({exc}); the metadata was edited") from exc
    if not isinstance(desc, dict) or not isinstance(desc.get("layers"), dict):
        raise ValueError(f"{path}: the vnm description has no 'layers' table; the metadata was edited")
    version = desc.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format version {version!r} is not supported by vnm {__version__} "
                         f"(which reads version {FORMAT_VERSION}); upgrade vnm or re-save the model")
    return desc


def load(path: Union[str, os.PathLike], model_or_config) -> nn.Module:
    """Load a checkpoint written by :func:`save` into a model of the same architecture.

    ``model_or_config`` is the dense model (e.g. freshly built, weights irrelevant) or a Hugging
    Face config (the model is built with ``AutoModel``/``AutoModelForCausalLM.from_config``). Its
    sparse layers are replaced by :class:`VNMLinear` holding only compressed storage. Any mismatch
    or corruption raises ``ValueError`` before the model is modified.
    """
    from safetensors.torch import load_file  # noqa: PLC0415

    desc = read_description(path)
    model = _model_from(model_or_config, desc.get("model_class"))
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise ValueError(f"{path}: tensors could not be read ({exc}); the file is truncated or corrupt") from exc
    if _digest(tensors) != desc.get("sha256"):
        raise ValueError(f"{path}: tensor contents do not match the recorded SHA-256; the file was corrupted or edited")
    for name, tgt in desc.get("tied", {}).items():
        if tgt not in tensors:
            raise ValueError(f"{path}: tied tensor {name} refers to missing {tgt}")
        tensors[name] = tensors[tgt]

    # 1. Build every sparse layer from its arrays, validating against the model's dense layer.
    new_layers = {}
    for name, info in desc["layers"].items():
        try:
            dense = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path}: sparse layer {name!r} does not exist in {type(model).__name__}") from None
        if not is_prunable(dense) and not isinstance(dense, VNMLinear):
            raise ValueError(f"{path}: {name!r} is a {type(dense).__name__} in the model, not a linear layer")
        shape = tuple(info.get("shape", ()))
        expected = _linear_shape(dense)
        if shape != expected:
            raise ValueError(f"{path}: layer {name!r} is {shape[0] if shape else '?'}x{shape[1] if len(shape) > 1 else '?'} "
                             f"in the checkpoint but {expected[0]}x{expected[1]} in the model")
        arrays = {}
        keys = ("values", "meta", "columns") + (("perm",) if info.get("perm") else ()) + \
            (("row_perm",) if info.get("row_perm") else ())
        for key in keys:
            full = f"{name}.{key}"
            if full not in tensors:
                raise ValueError(f"{path}: missing tensor {full}")
            arrays[key] = tensors.pop(full)
        try:
            w = VNMTensor(arrays["values"], arrays["meta"], arrays["columns"], info.get("pattern"), shape,
                          arrays.get("perm"), row_perm=arrays.get("row_perm"))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: layer {name!r}: {exc}") from exc
        bias = tensors.pop(f"{name}.bias", None)
        if info.get("bias") and bias is None:
            raise ValueError(f"{path}: missing tensor {name}.bias")
        new_layers[name] = VNMLinear.from_tensor(w, bias)

    # 2. Check the remaining (dense) tensors against the model's state dict.
    expected_state = {k: v for k, v in model.state_dict().items()
                      if not any(k.startswith(n + ".") for n in new_layers)}
    missing = sorted(set(expected_state) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected_state))
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the model: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")
    for k, v in expected_state.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise ValueError(f"{path}: {k} has shape {tuple(tensors[k].shape)} in the checkpoint, "
                             f"{tuple(v.shape)} in the model")

    # 3. Everything is valid: now change the model.
    for name, layer in new_layers.items():
        _set_module(model, name, layer)
    model.load_state_dict(tensors, strict=False)
    return model


def _linear_shape(module: nn.Module):
    if isinstance(module, VNMLinear):
        return (module.out_features, module.in_features)
    if isinstance(module, nn.Linear):
        return (module.out_features, module.in_features)
    return (module.nf, module.weight.shape[0])  # Conv1D: weight (in, out)


def _model_from(model_or_config, model_class) -> nn.Module:
    if isinstance(model_or_config, nn.Module):
        return model_or_config
    try:
        import transformers  # noqa: PLC0415
    except ImportError:  # pragma: no cover
        transformers = None
    if transformers is not None and isinstance(model_or_config, transformers.PretrainedConfig):
        # Build the class that was saved (a config alone does not say whether it was, say,
        # GPT2Model or GPT2LMHeadModel).
        cls = getattr(transformers, model_class or "", None)
        if cls is None or not isinstance(cls, type) or not issubclass(cls, nn.Module):
            raise ValueError(f"the checkpoint's model class {model_class!r} is not a transformers model class; "
                             "pass the model itself instead of its config")
        return cls(model_or_config).eval()
    raise TypeError(f"model_or_config must be an nn.Module or a transformers config, got {type(model_or_config).__name__}")
