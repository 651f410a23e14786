"""Recovery of SmolLM2-135M-Instruct after one-shot second-order pruning: three-stage LoRA
(``vnm.train``) starting from ``vnm.prune_sequential``'s weights and masks, distilling the dense
model (KL on the logits). Held-out perplexity before and after. Not a test.

Text as in bench/llm_table.py (``vnm.data``: calibration and training windows from the 'train'
documents, perplexity on the 'heldout' ones).

    python bench/llm_recovery.py --pattern 64:2:5 --steps 450 --out bench/llm_recovery.jsonl

The defaults (rank, learning rate, steps) were chosen by two 100-step probes at 64:2:5 (bench/RESULTS.md,
"Recovery of SmolLM2"); 450 steps of one 256-token window each fit, with the prune and the three
perplexity evaluations, in 30 minutes on two free CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

_src = Path(__file__).resolve().parents[1] / "python"
if any((_src / "vnm").glob("_C*.so")):
    sys.path.insert(0, str(_src))
import vnm  # noqa: E402
from vnm import data, models  # noqa: E402
from vnm.evaluate import perplexity_of_ids  # noqa: E402
from vnm.train.layers import choose_layers  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pattern", default="64:2:5")
    ap.add_argument("--steps", type=int, default=450)
    ap.add_argument("--train-len", type=int, default=256, help="tokens per training window (one window a step)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--calib-seqs", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--heldout-tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--out", default="bench/llm_recovery.jsonl")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    torch.manual_seed(0)
    start = time.time()
    print(f"load average {os.getloadavg()}", flush=True)

    dense, tok = models.load_smollm2()
    train_text = data.english_sentences("train")
    calib = models.text_windows(tok, train_text, args.calib_seqs, args.calib_len)
    held = tok("\n".join(data.english_sentences("heldout")), return_tensors="pt",
               add_special_tokens=False)["input_ids"][0][:args.heldout_tokens]
    batches = models.text_windows(tok, train_text, 10_000, args.train_len, allow_fewer=True)  # all of it

    def ppl(model):
        return perplexity_of_ids(model, held, window=args.window, batch_size=2, progress=False).perplexity

    dense_ppl = ppl(dense)
    student = copy.deepcopy(dense)
    names = [n for n, _ in choose_layers(student, args.pattern)]
    t = time.time()
    result = vnm.prune_sequential(student, calib, {n: args.pattern for n in names}, progress=False)
    prune_s = time.time() - t
    oneshot_ppl = ppl(student)
    print(f"dense {dense_ppl:.3f}, one-shot sparsegpt {args.pattern} {oneshot_ppl:.3f} ({prune_s:.0f} s)", flush=True)

    vnm.prepare_lora(student, args.pattern, rank=args.rank, masks=result.masks)
    config = vnm.ThreeStageConfig(total_steps=args.steps, lr=args.lr, teacher=dense, distill="kl",
                                  task_weight=0.0, cache_teacher=False, progress=True)
    t = time.time()
    log = vnm.train_three_stage(student, batches, config)
    train_s = time.time() - t
    merged = vnm.train.merge(student)
    # merge stores VNMLinear layers; measure the same function in a dense copy (their dense weights)
    evaluated = copy.deepcopy(dense)
    with torch.no_grad():
        for name in names:
            layer = merged.get_submodule(name)
            w = layer.dense_weight() if isinstance(layer, vnm.VNMLinear) else layer.weight
            vnm.weight_matrix(evaluated.get_submodule(name)).copy_(w)
    recovered_ppl = ppl(evaluated)
    row = dict(pattern=args.pattern, steps=args.steps, train_len=args.train_len, lr=args.lr, rank=args.rank,
               dense=dense_ppl, oneshot=oneshot_ppl, recovered=recovered_ppl, prune_s=prune_s, train_s=train_s,
               first_loss=log[0]["loss"] if log else None, last_loss=log[-1]["loss"] if log else None,
               calib=f"{args.calib_seqs}x{args.calib_len}", heldout_tokens=int(held.numel()),
               total_s=time.time() - start, threads=torch.get_num_threads(), load_avg_1m=os.getloadavg()[0])
    print(json.dumps(row), flush=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
