"""Where a channel permutation costs nothing: the edges of a transformer block along which a
consumer layer's input permutation can be absorbed by its producers' output rows.

Two kinds of edge, found by block class and relative module names:

* **MLP**: everything between the producers (up / gate / fc1) and the consumer (down / fc2) acts
  feature by feature (activation, gate product), so permuting the producers' output rows and the
  consumer's input columns by the same permutation changes nothing.
* **Heads**: attention combines the values of one head at a time, so the value rows and the output
  projection's input columns may be permuted by a permutation that maps every head's ``head_dim``
  features onto themselves. With grouped-query attention one value head serves several query
  heads: the same permutation is applied to the output-projection columns of each of them.

Fused producers (GPT-2 ``c_attn``, timm ``qkv``) hold the values in a slice of their rows.
Layers fed by the residual stream (q, k, v, up, gate) have no producer that could absorb an input
permutation; with ``permute='all'`` they gather ``x[..., perm]`` instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

from torch import nn


@dataclass
class MlpEdge:
    producers: List[str]  # full module names whose output rows feed the consumer
    consumer: str


@dataclass
class HeadsEdge:
    producer: str  # module holding the value rows
    value_rows: Tuple[int, int]  # [start, end) of the value rows in the producer's weight
    consumer: str  # output projection
    head_dim: int
    num_heads: int  # query heads (blocks of head_dim columns in the consumer)
    num_kv_heads: int  # value heads (blocks of head_dim rows in the value slice)

    def kv_head_of(self, q_head: int) -> int:
        return q_head // (self.num_heads // self.num_kv_heads)


# (producers, consumer) paths relative to a block, for each known architecture's MLP.
_MLP_RULES = [
    (("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),  # LLaMA, Mistral, Qwen2
    (("mlp.fc1",), "mlp.fc2"),  # transformers ViT / DeiT (v5), timm ViT
    (("intermediate.dense",), "output.dense"),  # BERT, RoBERTa, ViT (v4)
    (("mlp.c_fc",), "mlp.c_proj"),  # GPT-2 (Conv1D)
]
# (attention module, value producer, consumer, fused): fused producers hold q, k, v rows in thirds.
_HEAD_RULES = [
    ("self_attn", "self_attn.v_proj", "self_attn.o_proj", False),  # LLaMA family
    ("attention", "attention.v_proj", "attention.o_proj", False),  # ViT / DeiT (transformers v5)
    ("attention.self", "attention.self.value", "attention.output.dense", False),  # BERT
    ("attention.attention", "attention.attention.value", "attention.output.dense", False),  # ViT (v4)
    ("attn", "attn.c_attn", "attn.c_proj", True),  # GPT-2
    ("attn", "attn.qkv", "attn.proj", True),  # timm ViT
]


def _sub(module: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _first(obj, names, default=None):
    for n in names:
        v = getattr(obj, n, None)
        if v is not None:
            return v
    return default


def _head_geometry(attn: nn.Module, value_features: int) -> Tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim) of an attention module, from its attributes or config."""
    cfg = getattr(attn, "config", None)
    heads = _first(attn, ("num_heads", "num_attention_heads", "n_head")) or _first(cfg, ("num_attention_heads",))
    head_dim = _first(attn, ("head_dim", "attention_head_size"))
    kv = _first(attn, ("num_key_value_heads",)) or _first(cfg, ("num_key_value_heads",))
    if heads is None:
        raise ValueError(f"cannot tell the number of heads of {type(attn).__name__}")
    head_dim = head_dim or value_features // heads
    kv = kv or value_features // head_dim
    return int(heads), int(kv), int(head_dim)


def _features_out(m: nn.Module) -> int:
    out = getattr(m, "out_features", None)  # nn.Linear, VNMLinear
    return out if out is not None else m.nf  # GPT-2 Conv1D


def edges_of_block(prefix: str, block: nn.Module) -> List[object]:
    """The permutation edges inside ``block`` (``prefix`` is its name followed by '.')."""
    out: List[object] = []
    for producers, consumer in _MLP_RULES:
        if _sub(block, consumer) is not None and all(_sub(block, p) is not None for p in producers):
            out.append(MlpEdge([prefix + p for p in producers], prefix + consumer))
            break
    for attn_path, value, consumer, fused in _HEAD_RULES:
        attn, v, o = _sub(block, attn_path), _sub(block, value), _sub(block, consumer)
        if attn is None or v is None or o is None:
            continue
        rows = _features_out(v)
        start, end = ((2 * rows // 3, rows) if fused else (0, rows))
        heads, kv, head_dim = _head_geometry(attn, end - start)
        out.append(HeadsEdge(prefix + value, (start, end), prefix + consumer, head_dim, heads, kv))
        break
    return out


def find_edges(model: nn.Module) -> List[object]:
    """Every permutation edge of ``model``'s known transformer blocks."""
    out = []
    for name, module in model.named_modules():
        out.extend(edges_of_block(name + "." if name else "", module))
    return out

