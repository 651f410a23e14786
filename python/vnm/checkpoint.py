"""Compressed checkpoints: ``vnm.save(model, path)`` and ``vnm.load(path, model_or_config)``.

One safetensors file (never pickle). Its tensors are the model's state dict, where each
:class:`VNMLinear` contributes its canonical storage (``<name>.values``, ``.meta``, ``.columns``,
optional ``.perm``, ``.row_perm``, ``.bias``). Its header metadata holds a JSON description under
the key ``vnm``: format version, library version, the sparse layers with their pattern, shape,
dtype and whether they carry an input or output permutation, and a SHA-256 of all tensor bytes.

Loading validates everything (version, JSON, layer names, shapes and dtypes, storage
well-formedness, checksum) before it changes the model, so a bad file raises ``ValueError`` and
loads nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
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
        # reshape(-1): a 0-dim tensor (CLIP's logit_scale) cannot be viewed as bytes directly
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save(model: nn.Module, path: Union[str, os.PathLike]) -> Path:
    """Write ``model`` (with its :class:`VNMLinear` layers compressed) to ``path`` (.safetensors)."""
    from safetensors.torch import save_file  # noqa: PLC0415

    path = Path(path)
    _check_file_path(path, "vnm.save writes")
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
    # Written under a temporary name in the same folder, then renamed: an error or Ctrl-C leaves
    # the old file (or none) under ``path`` and no temporary file behind.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        save_file(tensors, tmp_name, metadata={_META_KEY: json.dumps(description)})
        # mkstemp and safetensors create files readable by their owner only (0600); a checkpoint
        # gets the mode any new file in the folder gets (0644 under the usual umask 022).
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: set it back at once
    os.umask(mask)
    return mask


def _check_file_path(path: Path, doing: str) -> None:
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.safetensors"))
        raise IsADirectoryError(f"{path} is a folder: {doing} a checkpoint file, such as "
                                f"{path / (inside[0] if inside else 'model.vnm.safetensors')}")


def read_description(path: Union[str, os.PathLike]) -> dict:
    """The JSON description of a vnm checkpoint (``ValueError`` if it is not one)."""
    from safetensors import safe_open  # noqa: PLC0415

    _check_file_path(Path(path), "vnm.load reads")
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
    for name, info in desc["layers"].items():
        if not isinstance(info, dict):
            raise ValueError(f"{path}: the entry of layer {name!r} is a {type(info).__name__}, not an object; "
                             "the metadata was edited")
    version = desc.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format version {version!r} is not supported by vnm {__version__} "
                         f"(which reads version {FORMAT_VERSION}); upgrade vnm or re-save the model")
    return desc


def load(path: Union[str, os.PathLike], model_or_config) -> nn.Module:
    """Load a checkpoint written by :func:`save` into a model of the same architecture.

    ``model_or_config`` is the dense model (e.g. freshly built, weights irrelevant; its dtype
    must be the checkpoint's) or a Hugging Face config (the class that was saved is built, in the
    dtype the checkpoint records, as ``from_pretrained(..., dtype=...)`` builds it). Its sparse
    layers are replaced by :class:`VNMLinear` holding only compressed storage. Any mismatch
    (names, shapes, dtypes) or corruption raises ``ValueError`` before the model is modified.
    """
    from safetensors.torch import load_file  # noqa: PLC0415

    desc = read_description(path)
    model = _model_from(model_or_config, desc, path)
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
        shape = info.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(n, int) for n in shape)):
            raise ValueError(f"{path}: layer {name!r} has shape {shape!r} in the checkpoint, not "
                             "[out_features, in_features]; the metadata was edited")
        shape = tuple(shape)
        expected = _linear_shape(dense)
        if shape != expected:
            raise ValueError(f"{path}: layer {name!r} is {shape[0]}x{shape[1]} in the checkpoint but "
                             f"{expected[0]}x{expected[1]} in the model")
        dtype = _dtype(path, name, info.get("dtype"))
        model_dtype = dense.weight.dtype  # a VNMLinear's weight (a VNMWeight) answers dtype too
        if dtype != model_dtype:
            raise ValueError(f"{path}: layer {name!r} is {_name(dtype)} in the checkpoint but {_name(model_dtype)} "
                             f"in the model: build the model in {_name(dtype)} (from_pretrained(..., "
                             f"dtype=torch.{_name(dtype)})) or pass its config to vnm.load")
        arrays = {}
        keys = ("values", "meta", "columns") + (("perm",) if info.get("perm") else ()) + \
            (("row_perm",) if info.get("row_perm") else ())
        for key in keys:
            full = f"{name}.{key}"
            if full not in tensors:
                raise ValueError(f"{path}: missing tensor {full}")
            arrays[key] = tensors.pop(full)
        bias = tensors.pop(f"{name}.bias", None)
        if info.get("bias") and bias is None:
            raise ValueError(f"{path}: missing tensor {name}.bias")
        for key, t in (("values", arrays["values"]), ("bias", bias)):
            if t is not None and t.dtype != dtype:
                raise ValueError(f"{path}: {name}.{key} is {_name(t.dtype)} but the layer is recorded as "
                                 f"{_name(dtype)}; the file was edited")
        try:
            w = VNMTensor(arrays["values"], arrays["meta"], arrays["columns"], info.get("pattern"), shape,
                          arrays.get("perm"), row_perm=arrays.get("row_perm"))
            new_layers[name] = VNMLinear.from_tensor(w, bias)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: layer {name!r}: {exc}") from exc

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
        if tensors[k].dtype != v.dtype:  # load_state_dict would cast silently
            raise ValueError(f"{path}: {k} is {_name(tensors[k].dtype)} in the checkpoint but {_name(v.dtype)} "
                             f"in the model: build the model in the checkpoint's dtype or pass its config to vnm.load")

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


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype(path, layer: str, name) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"{path}: layer {layer!r} has dtype {name!r}, not one of {', '.join(_DTYPES)}; "
                         "the metadata was edited")
    return _DTYPES[name]


def _recorded_dtype(path, desc: dict) -> torch.dtype:
    """The dtype of the saved model's sparse layers (the dtype to build a model from a config in)."""
    dtypes = {_dtype(path, name, info.get("dtype")) for name, info in desc["layers"].items()}
    if len(dtypes) != 1:
        raise ValueError(f"{path}: the sparse layers are stored in several dtypes "
                         f"({', '.join(sorted(map(_name, dtypes)))}); pass the model itself instead of its config")
    return dtypes.pop()


def _model_from(model_or_config, desc: dict, path) -> nn.Module:
    if isinstance(model_or_config, nn.Module):
        return model_or_config
    try:
        import transformers  # noqa: PLC0415
    except ImportError:  # pragma: no cover
        transformers = None
    if transformers is not None and isinstance(model_or_config, transformers.PretrainedConfig):
        # Build the class that was saved (a config alone does not say whether it was, say,
        # GPT2Model or GPT2LMHeadModel), in the saved dtype, as from_pretrained(dtype=...) does
        # (buffers computed at init, such as rotary frequencies, stay in the dtype the class gives them).
        model_class = desc.get("model_class")
        cls = getattr(transformers, model_class or "", None)
        if cls is None or not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
            raise ValueError(f"the checkpoint's model class {model_class!r} is not a transformers model class; "
                             "pass the model itself instead of its config")
        expected = getattr(cls, "config_class", None)
        if isinstance(expected, type) and not isinstance(model_or_config, expected):
            raise ValueError(f"{path}: the checkpoint's model class {model_class} takes a {expected.__name__}, but the "
                             f"config is a {type(model_or_config).__name__}: the checkpoint's metadata was edited or "
                             "the config belongs to another model; pass the model itself instead of its config")
        return cls._from_config(model_or_config, dtype=_recorded_dtype(path, desc)).eval()
    raise TypeError(f"model_or_config must be an nn.Module or a transformers config, got {type(model_or_config).__name__}")
