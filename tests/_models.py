"""Small models of each supported family, built from configs with random weights (offline)."""

from __future__ import annotations

import torch


def tiny_llama(dtype=None):
    """A 2-layer LLaMA; with ``dtype``, built in that dtype as ``from_pretrained(dtype=...)`` builds it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=101, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg) if dtype is None else LlamaForCausalLM._from_config(cfg, dtype=dtype)
    return model.eval(), {"input_ids": torch.randint(0, 101, (2, 11))}


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=97, n_positions=32)
    return GPT2LMHeadModel(cfg).eval(), {"input_ids": torch.randint(0, 97, (2, 9))}


def tiny_vit(kind: str = "vit"):
    from transformers import DeiTConfig, DeiTForImageClassification, ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cls, cfg_cls = (ViTForImageClassification, ViTConfig) if kind == "vit" else (DeiTForImageClassification, DeiTConfig)
    cfg = cfg_cls(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  image_size=32, patch_size=8, num_channels=3, num_labels=10)
    return cls(cfg).eval(), {"pixel_values": torch.randn(2, 3, 32, 32)}


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     vocab_size=120, max_position_embeddings=64)
    return BertModel(cfg).eval(), {"input_ids": torch.randint(0, 120, (2, 13))}


def tiny_bert_mlm():
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     vocab_size=120, max_position_embeddings=64)
    return BertForMaskedLM(cfg).eval(), {"input_ids": torch.randint(0, 120, (2, 13))}


def output_tensor(out):
    """The main output tensor of a model call (logits or last hidden state)."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    return out[0]
