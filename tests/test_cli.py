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


def test_prune_eval_bench_minilm(tmp_path):
    out = tmp_path / "pruned"
    p = run("prune", "minilm", "--pattern", "64:2:8", "--score", "magnitude", "--out", out)
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
