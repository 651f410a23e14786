"""Real English text shipped with Python, for calibration and evaluation without a network.

The source is ``pydoc_data.topics`` (the Python language reference topics: 79 documents of
prose). Sentences are cut from prose paragraphs (code and grammar blocks dropped) and the split
into calibration and held-out text is by document, so no held-out sentence shares a document
with calibration text.
"""

from __future__ import annotations

import re
from typing import List, Tuple

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])")


def _prose_paragraphs(doc: str) -> List[str]:
    paragraphs, current = [], []
    for line in doc.splitlines():
        if not line.strip() or line.startswith(" ") or set(line.strip()) <= set("*=-~^"):
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        current.append(line.strip())
    if current:
        paragraphs.append(" ".join(current))
    return paragraphs


def _sentences(doc: str, min_words: int = 6, max_words: int = 60) -> List[str]:
    out = []
    for para in _prose_paragraphs(doc):
        for s in _SENTENCE_END.split(para):
            s = s.strip()
            n = len(s.split())
            if min_words <= n <= max_words and not any(ch in s for ch in "{}[]|") and s[-1] in ".!?":
                out.append(s)
    return out


def english_documents() -> List[Tuple[str, List[str]]]:
    """(topic name, sentences) for every pydoc topic with prose, sorted by name."""
    from pydoc_data import topics  # noqa: PLC0415

    docs = []
    for name in sorted(topics.topics):
        sents = _sentences(topics.topics[name])
        if sents:
            docs.append((name, sents))
    return docs


def english_sentences(split: str = "train", holdout_every: int = 5) -> List[str]:
    """Sentences of real English prose: ``split='train'`` (calibration, training) or ``'heldout'``
    (evaluation). Every ``holdout_every``-th document (sorted by name) is held out."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    out = []
    for i, (_, sents) in enumerate(english_documents()):
        if (i % holdout_every == holdout_every - 1) == (split == "heldout"):
            out.extend(sents)
    return out
