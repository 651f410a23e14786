"""Perplexity of causal language models on a text, in fixed-length windows.

The text is tokenized once (no special tokens added between lines), cut into consecutive windows
of ``window`` tokens (the last one shorter; a final window of one token is dropped, it predicts
nothing) and every window is scored on its own: token t of a window is predicted from tokens
0..t-1 of the same window. The perplexity is ``exp`` of the mean negative log-likelihood over all
predicted tokens (each window contributes ``len - 1`` tokens, so the mean is token-weighted).
Non-overlapping windows are the common protocol of the LLM pruning papers (SparseGPT, Wanda:
2048-token windows of WikiText-2); a shorter window gives a higher perplexity (less context).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch

DEFAULT_WINDOW = 512


@dataclass
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens
    windows: int
    window: int

    def __str__(self) -> str:
        return (f"perplexity {self.perplexity:.3f} (mean NLL {self.nll:.4f} nats over {self.tokens} tokens, "
                f"{self.windows} windows of {self.window})")


@torch.no_grad()
def perplexity_of_ids(model, ids: torch.Tensor, window: int = DEFAULT_WINDOW, batch_size: int = 4,
                      progress: bool = True) -> Perplexity:
    """Perplexity of ``model`` (a causal LM returning ``.logits``) on token ids (1-D or 1 x n)."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    if not isinstance(window, int) or window < 2:
        raise ValueError(f"window must be an integer >= 2 (tokens per window), got {window!r}")
    ids = torch.as_tensor(ids).reshape(-1)
    if ids.numel() < 2:
        raise ValueError(f"the text has {ids.numel()} token(s): perplexity needs at least 2")
    device = next(model.parameters()).device
    starts = [s for s in range(0, ids.numel(), window) if ids.numel() - s >= 2]
    # Full windows batch together; the last (shorter) one runs alone, so no padding is needed.
    full = [s for s in starts if s + window <= ids.numel()]
    groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    groups += [[s] for s in starts if s + window > ids.numel()]
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        for group in tqdm(groups, desc="perplexity", disable=not progress, leave=False):
            x = torch.stack([ids[s:s + window] for s in group]).to(device)
            logits = model(input_ids=x).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            nll -= float(logp.gather(-1, x[:, 1:, None]).sum(dtype=torch.float64))
            count += x.shape[0] * (x.shape[1] - 1)
    finally:
        model.train(was_training)
    mean = nll / count
    return Perplexity(math.exp(mean), mean, count, len(starts), window)


def perplexity(model, tokenizer, text: Union[str, Path], window: int = DEFAULT_WINDOW, batch_size: int = 4,
               progress: bool = True) -> Perplexity:
    """Perplexity of ``model`` on ``text`` (a string, or the path of a UTF-8 text file) in windows of
    ``window`` tokens (see the module doc)."""
    if isinstance(text, Path):
        if not text.is_file():
            raise FileNotFoundError(f"{text}: no such text file to measure perplexity on")
        text = text.read_text(encoding="utf-8")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the text to measure perplexity on is empty")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    return perplexity_of_ids(model, ids, window, batch_size, progress)


__all__ = ["Perplexity", "perplexity", "perplexity_of_ids", "DEFAULT_WINDOW"]
