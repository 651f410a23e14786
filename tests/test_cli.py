"""The `vnm` command line, run as a user runs it (a subprocess), for every subcommand."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def vnm_cmd():
    """The installed console script when it sits next to this interpreter, else `python -m vnm`."""
    script = Path(sys.executable).parent / "vnm"
    return [str(script)] if script.exists() else [sys.executable, "-m", "vnm"]


def run(*args, ok=True, timeout=600):
    env = dict(os.environ)
    if any((ROOT / "python" / "vnm").glob("_C*.so")):  # an in-place development build
        env["PYTHONPATH"] = str(ROOT / "python") + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("VNM_NUM_THREADS", "2")
    p = subprocess.run(vnm_cmd() + [str(a) for a in args], capture_output=True, text=True, env=env, timeout=timeout)
    if ok:
        assert p.returncode == 0, f"vnm {' '.join(map(str, args))} failed:\n{p.stdout}\n{p.stderr}"
    return p


@pytest.mark.parametrize("sub", [[], ["prune"], ["eval"], ["bench"], ["demo"], ["demo-layer"]])
def test_help_on_every_subcommand(sub):
    p = run(*sub, "--help")
    assert "usage: vnm" in p.stdout


@pytest.fixture(scope="module")
def pruned_minilm(tmp_path_factory):
    """(folder, `vnm prune` result) of the bundled model pruned at 64:2:8 by magnitude, shared by the tests."""
    out = tmp_path_factory.mktemp("minilm") / "pruned"
    return out, run("prune", "minilm", "--pattern", "64:2:8", "--score", "magnitude", "--out", out)


def test_prune_eval_bench_minilm(pruned_minilm):
    out, p = pruned_minilm
    assert "36 layers sparsified, 1 left dense" in p.stdout
    assert "pooler.dense" in p.stdout and "output head" in p.stdout
    for name in ("config.json", "model.vnm.safetensors", "vnm_prune.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    p = run("eval", out)
    assert "embedding cosine to dense: mean 0." in p.stdout
    p = run("bench", out, "--batch", "2", "--seq-len", "16", "--repeat", "1")
    lines = {ln.split()[0]: ln.split() for ln in p.stdout.splitlines() if ln.split() and ln.split()[0] in ("dense", "sparse")}
    assert float(lines["sparse"][1]) < float(lines["dense"][1])  # params + buffers MiB


def test_prune_and_eval_a_causal_lm_folder(tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from vnm.models import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=tok.vocab_size, max_position_embeddings=256,
                      architectures=["LlamaForCausalLM"])
    src = tmp_path / "tiny-llama"
    LlamaForCausalLM(cfg).save_pretrained(src)
    tok.save_pretrained(src)
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\nSparse models can be fast.\n")
    run("prune", src, "--pattern", "16:2:8", "--score", "magnitude", "--calib", text, "--out", tmp_path / "out")
    p = run("eval", tmp_path / "out", "--text", text)
    assert "perplexity: dense" in p.stdout


def test_demo_layer_small():
    p = run("demo-layer", "--rows", "256", "--cols", "96", "--tokens", "3")
    for pattern in ("2:4", "64:2:5", "64:2:8"):
        assert any(ln.split()[:1] == [pattern] and "exact" in ln for ln in p.stdout.splitlines()), p.stdout


@pytest.mark.slow
def test_demo_writes_table_and_plot(tmp_path):
    p = run("demo", "--patterns", "64:2:8", "--time-budget", "0.2", "--out", tmp_path)
    assert (tmp_path / "demo.csv").is_file() and (tmp_path / "demo.png").stat().st_size > 10_000
    rows = [ln.split() for ln in p.stdout.splitlines() if ln.split()[:1] in (["dense"], ["64:2:8"])]
    assert len(rows) >= 3  # dense, and 64:2:8 with and without permutation


def test_user_errors_are_reported_not_tracebacks(tmp_path):
    p = run("prune", tmp_path / "nothing", "--out", tmp_path / "o", ok=False)
    assert p.returncode != 0 and "nor a local Hugging Face model folder" in p.stderr
    assert "Traceback" not in p.stderr
    p = run("prune", "minilm", "--pattern", "64:3:8", "--score", "magnitude", "--out", tmp_path / "o", ok=False)
    assert p.returncode == 2 and "need N == 2" in p.stderr
    p = run("eval", tmp_path, ok=False)
    assert p.returncode != 0 and "was not written by `vnm prune`" in p.stderr


def minilm_tokenizer(pad=True, eos=None):
    """The bundled model's tokenizer; pad=False drops its pad token, as LLaMA's and GPT-2's have none."""
    from transformers import AutoTokenizer

    from vnm.models import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    if not pad:
        tok.pad_token = None
    tok.eos_token = eos
    return tok


def save_folder(model, tok, folder):
    model.save_pretrained(folder)
    if tok is not None:
        tok.save_pretrained(folder)
    return folder


def calib_file(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\nSparse models can be fast.\n"
                    "A longer sentence, so that the batch needs padding to be rectangular.\n")
    return text


def tiny_llama_folder(tmp_path, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=tok.vocab_size, max_position_embeddings=256,
                      architectures=["LlamaForCausalLM"])
    return save_folder(LlamaForCausalLM(cfg), tok, tmp_path / "tiny-llama")


def test_causal_lm_tokenizer_without_pad_token_pads_with_eos(tmp_path):
    tok = minilm_tokenizer(pad=False, eos="[SEP]")
    src = tiny_llama_folder(tmp_path, tok)
    text, out = calib_file(tmp_path), tmp_path / "out"
    run("prune", src, "--pattern", "16:2:8", "--score", "wanda", "--calib", text, "--out", out)
    p = run("eval", out, "--text", text)
    assert "perplexity: dense" in p.stdout
    p = run("bench", out, "--batch", "2", "--seq-len", "16", "--repeat", "1")
    assert "sparse" in p.stdout


def test_tokenizer_without_pad_or_eos_token_is_a_clear_error(tmp_path):
    src = tiny_llama_folder(tmp_path, minilm_tokenizer(pad=False, eos=None))
    p = run("prune", src, "--pattern", "16:2:8", "--score", "wanda", "--calib", calib_file(tmp_path),
            "--out", tmp_path / "out", ok=False)
    assert p.returncode == 2 and "has neither a pad token nor an EOS token" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_gpt2_keeps_its_lm_head_dense_and_is_evaluated_by_perplexity(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    import vnm

    tok = minilm_tokenizer(pad=False, eos="[SEP]")  # GPT-2's tokenizer has no pad token either
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=tok.vocab_size, n_positions=128,
                     architectures=["GPT2LMHeadModel"])
    src = save_folder(GPT2LMHeadModel(cfg), tok, tmp_path / "tiny-gpt2")
    text, out = calib_file(tmp_path), tmp_path / "out"
    p = run("prune", src, "--pattern", "16:2:8", "--score", "wanda", "--calib", text, "--out", out)
    assert "4 layers sparsified, 1 left dense" in p.stdout
    assert any(ln.startswith("lm_head ") and "output head" in ln for ln in p.stdout.splitlines()), p.stdout
    desc = vnm.checkpoint.read_description(out / "model.vnm.safetensors")
    assert desc["model_class"] == "GPT2LMHeadModel" and "lm_head" not in desc["layers"]
    p = run("eval", out, "--text", text)
    assert "perplexity: dense" in p.stdout


def test_text_classifier_accuracy_on_labelled_texts(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    from vnm.cli import load_pruned, predict_classes

    tok = minilm_tokenizer()
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     vocab_size=tok.vocab_size, max_position_embeddings=128, num_labels=2,
                     initializer_range=0.3,  # large random weights: pruning changes some predictions
                     id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1},
                     architectures=["BertForSequenceClassification"])
    dense = BertForSequenceClassification(cfg).eval()
    src = save_folder(dense, tok, tmp_path / "tiny-classifier")
    out = tmp_path / "out"
    p = run("prune", src, "--pattern", "2:4", "--score", "magnitude", "--out", out)
    assert any(ln.startswith("classifier ") and "output head" in ln for ln in p.stdout.splitlines()), p.stdout

    from vnm.data import english_sentences

    texts = english_sentences("heldout")[:40]
    labels = [i % 2 for i in range(len(texts))]
    labelled = tmp_path / "labelled.tsv"
    labelled.write_text("".join(f"{['negative', '1'][y]}\t{t}\n" for t, y in zip(texts, labels)))
    p = run("eval", out, "--labels", labelled)
    # the printed figures are the models' accuracies on these labels
    sparse, tok_out, _ = load_pruned(out)
    a, b, truth = predict_classes(dense, tok, texts), predict_classes(sparse, tok_out, texts), torch.tensor(labels)
    acc = lambda pred: f"{float((pred == truth).double().mean()):.4f}"  # noqa: E731
    agreement = f"{float((a == b).double().mean()):.4f}"
    assert len({acc(a), acc(b), agreement}) == 3  # so that no figure can stand in for another
    assert f"accuracy: dense {acc(a)}, sparse {acc(b)}" in p.stdout, p.stdout
    assert f"on {agreement} of the texts" in p.stdout

    p = run("eval", out)  # no labels: agreement with the dense model only
    assert "sparse predicts the dense model's class on" in p.stdout and "accuracy needs --labels" in p.stdout
    labelled.write_text(f"neutral\t{texts[0]}\n")
    p = run("eval", out, "--labels", labelled, ok=False)
    assert p.returncode == 2 and "unknown label 'neutral'; the model's labels are negative, positive" in p.stderr


def test_labels_on_a_model_without_classes_is_a_clear_error(pruned_minilm, tmp_path):
    out, _ = pruned_minilm
    labelled = tmp_path / "labelled.tsv"
    labelled.write_text("0\tA sentence.\n")
    p = run("eval", out, "--labels", labelled, ok=False)
    assert p.returncode == 2 and "--labels needs a sequence classification model" in p.stderr, p.stderr


def test_image_classifier_prunes_by_magnitude_benches_on_random_pixels(tmp_path):
    from _models import tiny_vit

    model, _ = tiny_vit("vit")
    model.config.architectures = ["ViTForImageClassification"]
    src = save_folder(model, None, tmp_path / "tiny-vit")
    out = tmp_path / "out"
    p = run("prune", src, "--pattern", "16:2:8", "--score", "wanda", "--out", out, ok=False)
    assert p.returncode == 2 and "reads pixel_values, not text" in p.stderr and "--score magnitude" in p.stderr
    p = run("prune", src, "--pattern", "16:2:8", "--score", "magnitude", "--out", out)
    assert any(ln.startswith("classifier ") and "output head" in ln for ln in p.stdout.splitlines()), p.stdout
    p = run("eval", out, ok=False)
    assert p.returncode == 2 and "measures fidelity on text" in p.stderr and "Traceback" not in p.stderr
    p = run("bench", out, "--batch", "2", "--repeat", "1")
    assert "batch 2 random 32x32 images" in p.stdout
    lines = {ln.split()[0]: ln.split() for ln in p.stdout.splitlines() if ln.split()[:1] in (["dense"], ["sparse"])}
    assert float(lines["sparse"][1]) < float(lines["dense"][1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_bench_on_cuda_without_cuda_is_a_clear_error(pruned_minilm):
    out, _ = pruned_minilm
    p = run("bench", out, "--device", "cuda", ok=False)
    assert p.returncode == 2 and "torch sees no CUDA device" in p.stderr and "Traceback" not in p.stderr


def test_bench_memory_counts_the_packed_kernel_copy():
    from _models import tiny_llama

    from vnm import SparsifyConfig, VNMLinear, cuda_ops, sparsify
    from vnm.cli import held_bytes, module_bytes

    model, _ = tiny_llama(torch.float16)
    sparsify(model, SparsifyConfig(pattern="16:2:8", progress=False))
    assert held_bytes(model) == module_bytes(model)  # on the CPU a layer holds its canonical arrays only
    packed_bytes = 0
    for m in model.modules():
        if isinstance(m, VNMLinear):  # what the layer builds and keeps when it lands on a GPU
            m._packed = cuda_ops.pack(m.weight_vnm)
            packed_bytes += m._packed.values.nbytes + m._packed.meta.nbytes + m._packed.kidx.nbytes
    assert packed_bytes > 0 and held_bytes(model) == module_bytes(model) + packed_bytes
