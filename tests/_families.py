"""Tiny models of 16 transformers families, built from configs with random weights (offline), and
a helper that gives every norm and scale random affine parameters so that a permutation that
forgets one of them changes the output (at initialisation they are exactly 1 and 0)."""

from __future__ import annotations

import torch

H, FF, HEADS, LAYERS = 64, 128, 4, 2


def _ids(vocab, n=9, batch=2):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(1))


def _images(size=32, channels=3, batch=2):
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(2))


def _text(cls_name, cfg_name, **kw):
    def build():
        import transformers

        torch.manual_seed(0)
        cfg = getattr(transformers, cfg_name)(**kw)
        model = getattr(transformers, cls_name)(cfg).eval()
        return model, {"input_ids": _ids(cfg.vocab_size)}
    return build


def _causal(cls_name, cfg_name, **kw):
    common = dict(hidden_size=H, intermediate_size=FF, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  vocab_size=101, max_position_embeddings=64)
    common.update(kw)
    return _text(cls_name, cfg_name, **common)


def _vision(cls_name, cfg_name, **kw):
    def build():
        import transformers

        torch.manual_seed(0)
        cfg = getattr(transformers, cfg_name)(**kw)
        return getattr(transformers, cls_name)(cfg).eval(), {"pixel_values": _images(kw.get("image_size", 32))}
    return build


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=100, d_model=H, d_kv=16, d_ff=FF, num_layers=LAYERS, num_decoder_layers=LAYERS,
                   num_heads=HEADS, decoder_start_token_id=0, feed_forward_proj="gated-gelu")
    return T5ForConditionalGeneration(cfg).eval(), {"input_ids": _ids(100), "decoder_input_ids": _ids(100, 5)}


def _clip():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(hidden_size=H, intermediate_size=FF, num_hidden_layers=LAYERS,
                                      num_attention_heads=HEADS, vocab_size=99, max_position_embeddings=32),
                     vision_config=dict(hidden_size=H, intermediate_size=FF, num_hidden_layers=LAYERS,
                                        num_attention_heads=HEADS, image_size=32, patch_size=8),
                     projection_dim=64)
    return CLIPModel(cfg).eval(), {"input_ids": _ids(99), "pixel_values": _images()}


def _whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=100, d_model=H, encoder_layers=LAYERS, decoder_layers=LAYERS,
                        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FF,
                        decoder_ffn_dim=FF, num_mel_bins=16, max_source_positions=16, max_target_positions=32,
                        decoder_start_token_id=1, pad_token_id=0, eos_token_id=2, bos_token_id=1,
                        suppress_tokens=None, begin_suppress_tokens=None)
    feats = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(3))
    return WhisperForConditionalGeneration(cfg).eval(), {"input_features": feats, "decoder_input_ids": _ids(100, 5)}


FAMILIES = {
    "bert": _text("BertModel", "BertConfig", hidden_size=H, intermediate_size=FF, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, vocab_size=120, max_position_embeddings=64),
    "roberta": _text("RobertaModel", "RobertaConfig", hidden_size=H, intermediate_size=FF, num_hidden_layers=LAYERS,
                     num_attention_heads=HEADS, vocab_size=120, max_position_embeddings=64),
    "distilbert": _text("DistilBertModel", "DistilBertConfig", dim=H, hidden_dim=FF, n_layers=LAYERS,
                        n_heads=HEADS, vocab_size=120, max_position_embeddings=64),
    "gpt2": _text("GPT2LMHeadModel", "GPT2Config", n_embd=H, n_layer=LAYERS, n_head=HEADS, vocab_size=97,
                  n_positions=64, bos_token_id=0, eos_token_id=0),
    "llama-gqa": _causal("LlamaForCausalLM", "LlamaConfig", num_key_value_heads=2),
    "mistral": _causal("MistralForCausalLM", "MistralConfig", num_key_value_heads=2),
    "qwen2": _causal("Qwen2ForCausalLM", "Qwen2Config", num_key_value_heads=2),
    "opt": _text("OPTForCausalLM", "OPTConfig", hidden_size=H, ffn_dim=FF, num_hidden_layers=LAYERS,
                 num_attention_heads=HEADS, vocab_size=101, max_position_embeddings=64, word_embed_proj_dim=H),
    "phi": _causal("PhiForCausalLM", "PhiConfig", partial_rotary_factor=0.5),
    "phi3": _causal("Phi3ForCausalLM", "Phi3Config", num_key_value_heads=2, pad_token_id=0),
    "t5": _t5,
    "vit": _vision("ViTForImageClassification", "ViTConfig", hidden_size=H, intermediate_size=FF,
                   num_hidden_layers=LAYERS, num_attention_heads=HEADS, image_size=32, patch_size=8, num_labels=10),
    "deit": _vision("DeiTForImageClassification", "DeiTConfig", hidden_size=H, intermediate_size=FF,
                    num_hidden_layers=LAYERS, num_attention_heads=HEADS, image_size=32, patch_size=8, num_labels=10),
    "swin": _vision("SwinModel", "SwinConfig", image_size=32, patch_size=4, embed_dim=H, depths=[1, 1],
                    num_heads=[4, 8], window_size=4, mlp_ratio=2.0),
    "clip": _clip,
    "whisper": _whisper,
}
CAUSAL = {"gpt2", "llama-gqa", "mistral", "qwen2", "opt", "phi", "phi3"}


@torch.no_grad()
def randomise_norms_and_scales_(model: torch.nn.Module, seed: int = 0) -> int:
    """Give every parameter that is not a linear layer's weight or an embedding table random values
    (norm weights around 1 with random signs and spread, biases and shifts around 0, scalars such
    as CLIP's logit scale): a permutation that moves features past a norm or a scale without
    permuting its parameters then changes the output. Returns how many tensors were changed."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    for name, p in model.named_parameters():
        if p.dim() >= 2:  # linear weights and embedding tables keep their initialisation
            continue
        r = torch.rand(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
        if name.endswith("bias") or p.dim() == 0:
            p.copy_(r - 0.5)
        else:  # weights and scales: magnitudes 0.5..1.5, some negative
            sign = torch.where(torch.rand(p.shape, generator=g) < 0.2, -1.0, 1.0).to(p.dtype)
            p.copy_((0.5 + r) * sign)
        n += 1
    return n
