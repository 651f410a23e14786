"""Calibration statistics against the same statistics computed from stored activations."""

import copy
import math

import numpy as np
import pytest
import torch

import vnm
from vnm.calibration import calibrate, calibrate_sequential

transformers = pytest.importorskip("transformers")


def tiny_bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=48, max_position_embeddings=32)
    return transformers.BertModel(cfg).eval()


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=60, n_embd=32, n_layer=2, n_head=2, n_positions=32)
    return transformers.GPT2Model(cfg).eval()


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def padded_batches(gen, n_batches=3, batch=4, length=12, vocab=60):
    """Token batches with right padding: row b keeps its first `length - b` tokens."""
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1, vocab, (batch, length), generator=gen)
        mask = torch.ones(batch, length, dtype=torch.long)
        for b in range(batch):
            mask[b, length - b:] = 0
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def stored_inputs(model, batches, names):
    """Every named layer's inputs over the real (unpadded) tokens, stored in full: the reference."""
    store = {n: [] for n in names}
    mods = dict(model.named_modules())
    current = {}
    hooks = [mods[n].register_forward_pre_hook(lambda m, a, n=n: store[n].append(a[0][current["mask"]].double()))
             for n in names]
    with torch.no_grad():
        for b in batches:
            current["mask"] = b["attention_mask"].bool()
            model(**b)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in store.items()}


def assert_matches_stored(st, x, bins):
    assert st.count == x.shape[0]
    assert torch.allclose(st.sum, x.sum(0), rtol=1e-5, atol=1e-6)
    assert torch.allclose(st.sumsq, (x * x).sum(0), rtol=1e-5, atol=1e-6)
    assert torch.allclose(st.l2.double(), x.norm(dim=0), rtol=1e-5)
    assert torch.allclose(st.minimum.double(), x.min(0).values, rtol=1e-6, atol=1e-7)
    assert torch.allclose(st.maximum.double(), x.max(0).values, rtol=1e-6, atol=1e-7)
    # Histograms: numpy in float64 over [min, max]; our float32 bin arithmetic may move a value that
    # sits within float32 round-off of an edge to the neighbouring bin: allow 0.1% of the counts.
    xs = x.numpy()
    moved = 0
    ref_h = []
    for j in range(x.shape[1]):
        ref, _ = np.histogram(xs[:, j], bins=bins, range=(xs[:, j].min(), xs[:, j].max()))
        moved += int(np.abs(ref - st.histogram[j].numpy()).sum())
        p = ref / ref.sum()
        ref_h.append(-sum(q * math.log(q) for q in p if q > 0))
    assert moved <= 0.001 * x.numel()
    assert torch.allclose(st.entropy.double(), torch.tensor(ref_h, dtype=torch.float64), atol=2e-3)


@pytest.mark.slow
def test_bert_stats_equal_stored_activations_and_skip_padding(gen):
    model = tiny_bert()
    batches = padded_batches(gen)
    stats = calibrate(model, batches, entropy_bins=16, progress=False)
    names = list(vnm.prunable_layers(model))
    assert list(stats) == names
    real_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    ref = stored_inputs(model, batches, [n for n in names if n != "pooler.dense"])
    for n in names:
        if n == "pooler.dense":  # reads only the [CLS] token of each sequence: (B, K), counted row by row
            assert stats[n].count == sum(b["input_ids"].shape[0] for b in batches)
            continue
        assert stats[n].count == real_tokens  # the padding positions were not counted
        assert_matches_stored(stats[n], ref[n], bins=16)


def test_gpt2_conv1d_layers_are_calibrated_along_their_input_dimension(gen):
    model = tiny_gpt2()
    batches = padded_batches(gen, n_batches=2)
    stats = calibrate(model, batches, entropy_bins=8, progress=False, hessian=True)
    conv = dict(model.named_modules())["h.0.attn.c_attn"]
    assert type(conv).__name__ == "Conv1D"
    assert tuple(vnm.weight_matrix(conv).shape) == (96, 32)  # R x K view of the K x R storage
    assert stats["h.0.attn.c_attn"].K == 32 and stats["h.0.mlp.c_proj"].K == 128
    ref = stored_inputs(model, batches, ["h.0.attn.c_attn", "h.1.mlp.c_proj"])
    assert_matches_stored(stats["h.0.attn.c_attn"], ref["h.0.attn.c_attn"], bins=8)
    assert_matches_stored(stats["h.1.mlp.c_proj"], ref["h.1.mlp.c_proj"], bins=8)
    # every registered score works on Conv1D through the R x K view
    for name in vnm.scores.names():
        s = vnm.scores.get(name)(vnm.weight_matrix(conv), stats["h.0.attn.c_attn"])
        assert s.shape == (96, 32)


def test_layers_filter_and_single_pass(gen):
    model = tiny_bert()
    batches = padded_batches(gen, n_batches=2)
    stats = calibrate(model, iter(batches), layers=["encoder.layer.0.output.dense"], entropy_bins=None, progress=False)
    assert list(stats) == ["encoder.layer.0.output.dense"]
    assert stats["encoder.layer.0.output.dense"].histogram is None
    assert stats["encoder.layer.0.output.dense"].entropy is None
    with pytest.raises(KeyError, match=r"no input statistics for layer 'encoder.layer.1.output.dense'.*vnm.calibrate"):
        stats["encoder.layer.1.output.dense"]
    assert stats.get("encoder.layer.1.output.dense") is None
    assert model.training is False


def test_calibrate_input_errors(gen):
    model = tiny_bert()
    with pytest.raises(ValueError, match="batches is empty"):
        calibrate(model, [], progress=False)
    with pytest.raises(TypeError, match="not a single batch"):
        calibrate(model, padded_batches(gen, 1)[0], progress=False)
    with pytest.raises(ValueError, match="is not an nn.Linear / Conv1D of this model"):
        calibrate(model, padded_batches(gen, 1), layers=["encoder.layer.0"], progress=False)
    with pytest.raises(ValueError, match="entropy_bins"):
        calibrate(model, padded_batches(gen, 1), entropy_bins=1, progress=False)


def test_calibrate_restores_training_mode_and_reports_nan_activations(gen):
    model = tiny_bert().train()
    with torch.no_grad():
        model.encoder.layer[0].attention.output.LayerNorm.weight[3] = float("nan")
    with pytest.raises(ValueError, match="received NaN/Inf inputs"):
        calibrate(model, padded_batches(gen, 1), progress=False)
    assert model.training is True


# ---- sequential -------------------------------------------------------------------------------------


def llama_batches(gen, n=3):
    return padded_batches(gen, n_batches=n, batch=3, length=10, vocab=64)


def block_names(model, i):
    prefix = f"model.layers.{i}."
    return [n for n in vnm.prunable_layers(model) if n.startswith(prefix)]


@pytest.mark.slow
def test_sequential_without_pruning_equals_one_pass_calibration(gen):
    model = tiny_llama()
    batches = llama_batches(gen)
    seq = calibrate_sequential(model, batches, model.model.layers, entropy_bins=8, progress=False)
    full = calibrate(model, batches, entropy_bins=8, progress=False)
    inside = [n for n in full if n.startswith("model.layers.")]
    assert sorted(seq) == sorted(inside)  # the LM head is outside the blocks
    for n in inside:
        assert seq[n].count == full[n].count
        assert torch.allclose(seq[n].sumsq, full[n].sumsq, rtol=1e-5)
        assert torch.allclose(seq[n].maximum, full[n].maximum, rtol=1e-5, atol=1e-6)
        assert torch.equal(seq[n].histogram, full[n].histogram) or \
            int((seq[n].histogram - full[n].histogram).abs().sum()) <= 2


@pytest.mark.slow
def test_sequential_blocks_see_the_pruned_outputs_of_earlier_blocks(gen):
    model = tiny_llama()
    dense = copy.deepcopy(model)
    batches = llama_batches(gen)
    calls = []

    def prune_fn(block, stats):
        calls.append((block, list(stats)))
        masks = vnm.compute_masks(model, "2:4", "wanda", stats, layers=list(stats), progress=False)
        vnm.apply_masks_(model, masks)
        calls[-1] += (masks,)

    seq = calibrate_sequential(model, batches, model.model.layers, prune_fn, entropy_bins=None, progress=False)
    assert [c[0] for c in calls] == list(model.model.layers)
    for i, (_, names, _) in enumerate(calls):
        assert names == block_names(model, i)
    for n in block_names(model, 0):
        w = vnm.weight_matrix(dict(model.named_modules())[n])
        vnm.check_mask(w != 0, "2:4")  # block 0 really was pruned in place

    # Reference for block 1: the dense model with only block 0 pruned by the same masks.
    ref_model = copy.deepcopy(dense)
    vnm.apply_masks_(ref_model, calls[0][2])
    ref = calibrate(ref_model, batches, layers=block_names(model, 1), entropy_bins=None, progress=False)
    dense_stats = calibrate(dense, batches, layers=block_names(model, 1), entropy_bins=None, progress=False)
    for n in block_names(model, 1):
        assert torch.allclose(seq[n].sumsq, ref[n].sumsq, rtol=1e-5)
        # and the pruning upstream did change what block 1 reads
        assert not torch.allclose(seq[n].sumsq, dense_stats[n].sumsq, rtol=1e-3)


def test_sequential_rejects_blocks_outside_the_model(gen):
    model = tiny_llama()
    with pytest.raises(ValueError, match="not a submodule"):
        calibrate_sequential(model, llama_batches(gen, 1), [torch.nn.Linear(2, 2)], progress=False)
    model.unused = torch.nn.Identity()  # registered but never called by forward
    with pytest.raises(ValueError, match="did not run"):
        calibrate_sequential(model, llama_batches(gen, 1), [model.unused], progress=False)


# ---- encoder-decoder models, batches without a mask ------------------------------------------------


def tiny_t5(lm_head=False):
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_decoder_layers=1,
                                num_heads=2)
    return (transformers.T5ForConditionalGeneration if lm_head else transformers.T5Model)(cfg).eval()


def t5_batch(gen, decoder_mask=False):
    """Encoder and decoder of the same length 6, so shapes cannot tell their masks apart: row 1 of
    the encoder has 3 padding tokens; with decoder_mask, row 0 of the decoder has 2."""
    ids = torch.randint(1, 50, (2, 6), generator=gen)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 3:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": torch.randint(1, 50, (2, 6), generator=gen)}
    if decoder_mask:
        dmask = torch.ones(2, 6, dtype=torch.long)
        dmask[0, 4:] = 0
        batch["decoder_attention_mask"] = dmask
    return batch


ENC_Q = "encoder.block.0.layer.0.SelfAttention.q"
DEC_Q = "decoder.block.0.layer.0.SelfAttention.q"
CROSS = "decoder.block.0.layer.1.EncDecAttention"


def test_encoder_decoder_layers_get_their_own_stack_mask(gen):
    model = tiny_t5()
    batch = t5_batch(gen)
    stats = calibrate(model, [batch], entropy_bins=None, progress=False)
    for n in stats:  # 9 real encoder tokens; the decoder has no mask, so all 12 of its tokens count
        from_encoder = n.startswith("encoder.") or n in (f"{CROSS}.k", f"{CROSS}.v")
        assert stats[n].count == (9 if from_encoder else 12), n
    with_mask = t5_batch(gen, decoder_mask=True)
    stats = calibrate(model, [with_mask], entropy_bins=8, progress=False)
    assert stats[DEC_Q].count == stats[f"{CROSS}.q"].count == 10  # decoder_attention_mask: 12 - 2
    assert stats[f"{CROSS}.k"].count == stats[ENC_Q].count == 9
    # and the statistics are those of exactly these tokens
    store, mods = {}, dict(model.named_modules())
    hooks = [mods[n].register_forward_pre_hook(lambda m, a, n=n: store.__setitem__(n, a[0].double()))
             for n in (ENC_Q, DEC_Q, f"{CROSS}.k")]
    with torch.no_grad():
        model(**with_mask)
    for h in hooks:
        h.remove()
    enc, dec = with_mask["attention_mask"].bool(), with_mask["decoder_attention_mask"].bool()
    for n, m in ((ENC_Q, enc), (DEC_Q, dec), (f"{CROSS}.k", enc)):
        assert_matches_stored(stats[n], store[n][m], bins=8)


def test_encoder_decoder_lm_head_given_encoder_outputs_and_sequential(gen):
    model = tiny_t5(lm_head=True)
    batch = t5_batch(gen, decoder_mask=True)
    stats = calibrate(model, [batch], entropy_bins=None, progress=False)
    assert stats["lm_head"].count == 10  # reads the decoder's tokens
    # encoder outputs passed in: the encoder does not run, its tensor still marks the cross-attention inputs
    with torch.no_grad():
        enc_out = model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    given = {k: v for k, v in batch.items() if k != "input_ids"} | {"encoder_outputs": (enc_out.last_hidden_state,)}
    again = calibrate(model, [given], entropy_bins=None, progress=False)
    assert again[f"{CROSS}.k"].count == 9 and again[DEC_Q].count == 10
    assert torch.allclose(again[f"{CROSS}.k"].sumsq, stats[f"{CROSS}.k"].sumsq)
    seq = calibrate_sequential(model, [batch], model.decoder.block, entropy_bins=None, progress=False)
    assert seq[DEC_Q].count == 10 and seq[f"{CROSS}.v"].count == 9
    assert torch.allclose(seq[DEC_Q].sumsq, stats[DEC_Q].sumsq)


def test_batches_without_a_mask_warn_once_and_token_mask_fixes_them(gen):
    model = tiny_bert()
    batches = padded_batches(gen, n_batches=2)
    as_dicts = calibrate(model, batches, entropy_bins=None, progress=False)
    # what a DataLoader over TensorDataset(input_ids, attention_mask) yields: lists of tensors
    as_lists = [[b["input_ids"], b["attention_mask"]] for b in batches]
    with pytest.warns(UserWarning, match=r"carry no attention_mask.*token_mask=lambda batch: batch\[1\]") as caught:
        blind = calibrate(model, as_lists, entropy_bins=None, progress=False)
    assert len([w for w in caught if "attention_mask" in str(w.message)]) == 1  # once, not per batch and pass
    name = "encoder.layer.0.attention.self.query"
    assert blind[name].count == sum(b["input_ids"].numel() for b in batches)  # padding counted
    fixed = calibrate(model, as_lists, token_mask=lambda b: b[1], entropy_bins=None, progress=False)
    assert fixed[name].count == as_dicts[name].count
    assert torch.equal(fixed[name].sumsq, as_dicts[name].sumsq)
    with pytest.raises(TypeError, match=r"token_mask\(batch\) must return a \(batch, length\) tensor"):
        calibrate(model, as_lists, token_mask=lambda b: b[1][0], entropy_bins=None, progress=False)


def test_float_inputs_without_a_mask_do_not_warn(gen, recwarn):
    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    calibrate(model, [(torch.randn(5, 8, generator=gen),)], entropy_bins=None, progress=False)
    assert not [w for w in recwarn if "attention_mask" in str(w.message)]


# ---- histogram pass: chunks and count type -------------------------------------------------------------


def test_chunked_histogram_is_bit_identical_to_binning_all_values_at_once(gen):
    from vnm.calibration import _Accumulator

    K, bins = 24, 16
    x = torch.randn(333, K, generator=gen) * torch.rand(K, generator=gen) * 5
    x[:, 3] = 0.25  # a constant channel: everything in bin 0
    x[7, 5] = x[:, 5].max() + 1  # one outlier: the maximum lands in the last bin, not past it
    accs = [_Accumulator("l", K, chunk_values=v) for v in (K * 10 ** 6, K * 7, 1)]  # all at once, 7 rows, 1 row
    for acc in accs:
        for part in x.split(100):
            acc.add(part)
        acc.start_histogram(bins)
        for part in x.split(100):
            acc.add(part)
    # the unchunked formula: floor((x - min) / width) clamped to [0, bins - 1]
    lo, hi = x.amin(0), x.amax(0)
    width = (hi - lo) / bins
    scaled = torch.where(width > 0, (x - lo) / torch.where(width > 0, width, 1.0), 0.0)
    idx = scaled.floor().clamp_(0, bins - 1).long() + torch.arange(K) * bins
    expected = torch.bincount(idx.flatten(), minlength=K * bins).view(K, bins)
    for acc in accs:
        h = acc.result().histogram
        assert h.dtype == torch.int32
        assert torch.equal(h.long(), expected)
    assert int(expected[3, 0]) == 333 and int(expected[5, -1]) >= 1 and int(expected.sum()) == 333 * K


def test_histogram_counts_promote_to_int64_beyond_int32(gen):
    from vnm.calibration import _Accumulator

    acc = _Accumulator("l", 4)
    acc.add(torch.randn(3, 4, generator=gen))
    acc.count = 2**31  # as if that many tokens had been seen: a bin could overflow int32
    acc.start_histogram(8)
    assert acc.histogram.dtype == torch.int64


def test_hessian_is_the_gram_matrix_of_the_real_tokens(gen):
    """hessian=True: 2 X^T X / n over the unpadded tokens, per layer, Conv1D included; sequential
    calibration hands it to prune_fn and drops it afterwards."""
    model = tiny_gpt2()
    batches = padded_batches(gen, n_batches=2)
    names = ["h.0.attn.c_attn", "h.1.mlp.c_proj"]
    stats = calibrate(model, batches, layers=names, entropy_bins=None, progress=False, hessian=True)
    ref = stored_inputs(model, batches, names)
    for n in names:
        x = ref[n].reshape(-1, stats[n].K)
        torch.testing.assert_close(stats[n].hessian, 2 * x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6)
    assert calibrate(model, batches, layers=names, entropy_bins=None, progress=False)[names[0]].hessian is None
    seen = {}

    def prune_fn(block, st):
        seen.update({n: s.hessian is not None for n, s in st.items()})

    seq = calibrate_sequential(model, batches, model.h, prune_fn, entropy_bins=None, progress=False, hessian=True)
    assert seen and all(seen.values())
    assert all(s.gram is None for s in seq.values())


@pytest.mark.parametrize("batches", [["some text", "more text"], [["some text"]], "some text"])
def test_text_instead_of_tokenized_batches_names_the_fix(batches):
    # calibration=["text"] used to fail deep inside BERT with "'str' object has no attribute 'size'".
    with pytest.raises(TypeError, match="token_batches"):
        calibrate(tiny_bert(), batches, progress=False)
    with pytest.raises(TypeError, match="token_batches"):
        vnm.sparsify(tiny_bert(), vnm.SparsifyConfig(pattern="2:4", score="wanda", calibration=batches,
                                                     progress=False))
