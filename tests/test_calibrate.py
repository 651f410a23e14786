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
    stats = calibrate(model, batches, entropy_bins=8, progress=False)
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
