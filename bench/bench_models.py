"""End-to-end latency and memory, dense vs V:N:M, of a LLaMA-7B-shaped decoder stack and DeiT-base
(random weights built from configs), fp16, on the current device. Not a test: prints a table.

    python bench/bench_models.py                       # on a GPU: LLaMA-7B layers x2, DeiT-base
    python bench/bench_models.py --small --device cpu  # a tiny smoke run of the same code

Latency: median of CUDA-event timings (perf_counter on the CPU) after warm-up. Memory: bytes of
parameters and buffers, and on a GPU the allocator's count after loading, which also holds the
packed kernel layout that VNMLinear keeps next to its canonical buffers.
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
from pathlib import Path

import torch

_src = Path(__file__).resolve().parents[1] / "python"
if any((_src / "vnm").glob("_C*.so")):
    sys.path.insert(0, str(_src))
import vnm  # noqa: E402
from vnm.cli import module_bytes, time_forward  # noqa: E402


def build(kind: str, small: bool):
    from transformers import DeiTConfig, DeiTModel, LlamaConfig, LlamaModel  # noqa: PLC0415

    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(hidden_size=64 if small else 4096, intermediate_size=176 if small else 11008,
                          num_hidden_layers=2, num_attention_heads=4 if small else 32,
                          num_key_value_heads=4 if small else 32, vocab_size=1024, max_position_embeddings=8192)
        model = LlamaModel(cfg)
        def inputs(n, device):
            return {"input_ids": torch.randint(0, 1024, (1, n), device=device)}
        sizes = [1, 16, 128] if small else [1, 16, 128, 2048]
    else:
        cfg = DeiTConfig() if not small else DeiTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                        intermediate_size=256, image_size=32, patch_size=8)
        model = DeiTModel(cfg, add_pooling_layer=False)
        def inputs(n, device):
            return {"pixel_values": torch.randn(n, 3, cfg.image_size, cfg.image_size, device=device)}
        sizes = [1, 8] if small else [1, 32, 128]
    return model.eval(), inputs, sizes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["llama", "deit"])
    ap.add_argument("--patterns", nargs="+", default=["2:4", "64:2:5", "64:2:8"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--small", action="store_true", help="tiny shapes (smoke run)")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not (torch.cuda.is_available() and vnm.CUDA_BUILT):
        # Before building the models: LLaMA-sized layers take a while on the CPU.
        print(f"--device cuda needs a CUDA GPU and vnm built with CUDA (torch.cuda.is_available()="
              f"{torch.cuda.is_available()}, vnm.CUDA_BUILT={vnm.CUDA_BUILT})", file=sys.stderr)
        return 2
    if device.type == "cpu" and dtype != torch.float32 and not args.small:
        print("note: fp16 on the CPU runs the C++ reference; use a GPU for meaningful figures")
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"# {gpu}, {args.dtype}, torch {torch.__version__}, vnm {vnm.__version__}")
    print(f"{'model':>6} {'pattern':>8} {'tokens/batch':>12} {'ms':>9} {'x dense':>8} {'param MiB':>9} {'alloc MiB':>9}")
    for kind in args.models:
        dense, make_inputs, sizes = build(kind, args.small)
        dense = dense.to(dtype)
        variants = [("dense", dense)]
        for p in args.patterns:
            m = copy.deepcopy(dense)
            vnm.sparsify(m, vnm.SparsifyConfig(pattern=p, progress=False))
            variants.append((p, m))
        base = {}
        for name, model in variants:
            if device.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
                before = torch.cuda.memory_allocated()
            model.to(device)
            alloc = (torch.cuda.memory_allocated() - before) / 2**20 if device.type == "cuda" else float("nan")
            for n in sizes:
                ms = time_forward(model, make_inputs(n, device), args.repeat, args.warmup)
                if name == "dense":
                    base[n] = ms
                print(f"{kind:>6} {name:>8} {n:>12} {ms:9.3f} {base[n] / ms:8.2f} "
                      f"{module_bytes(model) / 2**20:9.1f} {alloc:9.1f}", flush=True)
            model.to("cpu")


if __name__ == "__main__":
    sys.exit(main())
