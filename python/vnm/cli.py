"""The ``vnm`` command line: prune, eval, bench, demo, demo-layer.

    vnm demo                                   # the main job: all-MiniLM-L6-v2 at 2:4, 64:2:5, 64:2:8
    vnm prune minilm --pattern 64:2:8 --score wanda --permute --out pruned/
    vnm eval pruned/
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


def _resolve_model(name: str) -> Path:
    from .models import minilm_path  # noqa: PLC0415

    if name == "minilm":
        return minilm_path()
    path = Path(name)
    if not (path / "config.json").is_file():
        raise SystemExit(f"vnm: {name} is neither 'minilm' nor a local Hugging Face model folder (no config.json); "
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

def prune_model(source: Path, pattern: str, score: str, permute, calib: List[str], dtype, out: Optional[Path],
                time_budget: float = 2.0, progress: bool = True):
    """Load a Hugging Face model, sparsify it and (with ``out``) save it. Returns (model, tokenizer, report)."""
    from .models import load_hf, token_batches  # noqa: PLC0415
    from .sparsify import SparsifyConfig, sparsify  # noqa: PLC0415
    from .checkpoint import save  # noqa: PLC0415

    model, tok = load_hf(source, dtype)
    config = SparsifyConfig(pattern=pattern, score=score, permute=permute, permute_time_budget=time_budget,
                            calibration=None if score == "magnitude" else token_batches(tok, calib),
                            progress=progress)
    report = sparsify(model, config)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(out)
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
                               Path(args.out), args.time_budget)
    print(report)
    sparse = report.sparse
    print(f"\n{len(sparse)} layers sparsified, {len(report.skipped)} left dense; saved to {args.out}")
    return 0


# ---- eval -----------------------------------------------------------------------------------

def load_pruned(folder: Path, dtype=None):
    """(sparse model, tokenizer, prune info) of a folder written by ``vnm prune``."""
    from transformers import AutoConfig, AutoTokenizer  # noqa: PLC0415

    from .checkpoint import load  # noqa: PLC0415
    from .models import load_hf  # noqa: PLC0415

    info_path = folder / PRUNE_INFO
    if not info_path.is_file():
        raise SystemExit(f"vnm: {folder} has no {PRUNE_INFO}: it was not written by `vnm prune`")
    info = json.loads(info_path.read_text())
    dtype = dtype or _torch_dtype(info.get("dtype", "float32"))
    config = AutoConfig.from_pretrained(folder)
    from transformers import AutoModel, AutoModelForCausalLM  # noqa: PLC0415

    causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    model = (AutoModelForCausalLM if causal else AutoModel).from_config(config, dtype=dtype).eval()
    load(folder / CHECKPOINT_NAME, model)
    return model, AutoTokenizer.from_pretrained(folder), info


def evaluate_fidelity(dense, sparse, tok, texts: List[str]) -> dict:
    """Embedding cosine (encoders) or perplexity (causal LMs) of a sparse model against its dense one."""
    from .models import embed, embedding_cosine  # noqa: PLC0415

    if getattr(dense.config, "is_decoder", False) or hasattr(dense, "lm_head"):
        return {"metric": "perplexity", "dense": perplexity(dense, tok, texts), "sparse": perplexity(sparse, tok, texts)}
    a, b = embed(dense, tok, texts), embed(sparse, tok, texts)
    mean, worst = embedding_cosine(a, b)
    return {"metric": "embedding cosine", "mean": mean, "min": worst}


def perplexity(model, tok, texts: List[str], batch_size: int = 8) -> float:
    import torch  # noqa: PLC0415

    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
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


def cmd_eval(args) -> int:
    from .models import load_hf  # noqa: PLC0415

    folder = Path(args.dir)
    sparse, tok, info = load_pruned(folder)
    dense, _ = load_hf(Path(info["source"]), next(sparse.parameters()).dtype)
    texts = _read_lines(args.text, "heldout")
    result = evaluate_fidelity(dense, sparse, tok, texts)
    print(f"{folder}: pattern {info['pattern']}, score {info['score']}, permute {info['permute']}, "
          f"{len(texts)} held-out texts")
    if result["metric"] == "perplexity":
        print(f"perplexity: dense {result['dense']:.3f}, sparse {result['sparse']:.3f}")
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

    from .models import load_hf  # noqa: PLC0415

    folder = Path(args.dir)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sparse, tok, info = load_pruned(folder)
    dense, _ = load_hf(Path(info["source"]), next(sparse.parameters()).dtype)
    texts = (_read_lines(None, "heldout") * 100)[: args.batch]
    batch = {k: v.to(device) for k, v in tok(texts, return_tensors="pt", padding="max_length", truncation=True,
                                            max_length=args.seq_len).items()}
    print(f"device {device}, batch {args.batch} x {args.seq_len} tokens, dtype {info['dtype']}")
    print(f"{'model':>7} {'params+buffers MiB':>18} {'latency ms':>10}")
    for label, model in (("dense", dense), ("sparse", sparse)):
        model.to(device)
        ms = time_forward(model, batch, repeat=args.repeat)
        print(f"{label:>7} {module_bytes(model) / 2**20:18.2f} {ms:10.2f}")
        model.to("cpu")
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

    p = sub.add_parser("prune", help="sparsify a Hugging Face model and save it compressed")
    p.add_argument("model", help="'minilm' (the bundled all-MiniLM-L6-v2) or a local Hugging Face model folder")
    p.add_argument("--pattern", default="64:2:8", help="V:N:M or 2:4 pattern (default 64:2:8)")
    p.add_argument("--score", default="wanda", help="magnitude, wanda, ria or entropy (default wanda)")
    p.add_argument("--permute", nargs="?", const="all", default="none", choices=["none", "free", "all"],
                   help="search channel permutations: 'free' only where a neighbouring layer absorbs them, "
                        "'all' (the default when the flag is given) also gathered input permutations")
    p.add_argument("--time-budget", type=float, default=2.0, help="seconds of permutation search per layer")
    p.add_argument("--calib", help="text file, one calibration text per line (default: English text shipped with Python)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--out", required=True, help="output folder (config, tokenizer, compressed weights)")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("eval", help="fidelity of a pruned model against its dense source")
    p.add_argument("dir", help="folder written by `vnm prune`")
    p.add_argument("--text", help="text file, one evaluation text per line (default: held-out English text)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="latency and memory, dense vs sparse, on the current device")
    p.add_argument("dir", help="folder written by `vnm prune`")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
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
