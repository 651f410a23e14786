"""Pruning scores on the real all-MiniLM-L6-v2: kept importance and sentence-embedding fidelity.

Calibrates on ``vnm.data.english_sentences('train')``, then for every score and pattern masks the
36 encoder linears (q, k, v, attention output, intermediate, output of the 6 layers; embeddings
and pooler untouched) by W * mask and compares the pruned model's sentence embeddings with the
dense model's on ``english_sentences('heldout')``. Prints a Markdown table. Not a test.

    python bench/score_table.py [--patterns 2:4 64:2:5 64:2:8] [--entropy-alphas 1]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path

import torch

_src = Path(__file__).resolve().parents[1] / "python"
if any((_src / "vnm").glob("_C*.so")):
    sys.path.insert(0, str(_src))
import vnm  # noqa: E402
from vnm import data, models  # noqa: E402
from vnm.calibration import DEFAULT_ENTROPY_BINS  # noqa: E402


def encoder_linears(name: str, _module) -> bool:
    return name.startswith("encoder.layer.")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patterns", nargs="+", default=["2:4", "64:2:5", "64:2:8"])
    ap.add_argument("--scores", nargs="+", default=vnm.scores.names())
    ap.add_argument("--entropy-alphas", nargs="+", type=float, default=[1.0],
                    help="alpha values of the entropy score to tabulate (one row each)")
    ap.add_argument("--entropy-bins", type=int, default=DEFAULT_ENTROPY_BINS)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--plot", default=None, help="also save kept importance vs sparsity (wanda) to this PNG")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    t0 = time.perf_counter()
    model, tok = models.load_minilm()
    train, heldout = data.english_sentences("train"), data.english_sentences("heldout")
    stats = vnm.calibrate(model, models.token_batches(tok, train, batch_size=args.batch_size),
                          entropy_bins=args.entropy_bins)
    dense_emb = models.embed(model, tok, heldout)
    layers = vnm.prunable_layers(model, encoder_linears)
    print(f"# all-MiniLM-L6-v2, {len(layers)} encoder linears pruned; calibration: {len(train)} train sentences "
          f"({stats.tokens} tokens, entropy histogram {args.entropy_bins} bins); evaluation: {len(heldout)} held-out "
          f"sentences; torch {torch.__version__}, {platform.machine()}, {args.threads} threads")
    print("# kept importance: sum of the score kept by the exact mask / total score, per layer, averaged over")
    print("# layers weighted by R*K (each score measured in its own units). cosine: mean (min) cosine similarity")
    print("# of the pruned model's sentence embeddings to the dense model's on the held-out sentences.\n")

    rows = []
    for score in args.scores:
        variants = [(score, {})] if score != "entropy" else [
            (f"entropy (alpha={a:g})" if len(args.entropy_alphas) > 1 else "entropy", {"alpha": a})
            for a in args.entropy_alphas]
        for label, options in variants:
            sc = vnm.layer_scores(model, score, stats, encoder_linears, **options)
            cells = []
            for pattern in args.patterns:
                masks = {n: vnm.select_mask(s, pattern) for n, s in sc.items()}
                work = {n: s.numel() for n, s in sc.items()}
                kept = sum(work[n] * vnm.kept_fraction(sc[n], masks[n]) for n in sc) / sum(work.values())
                pruned = vnm.apply_masks_(copy.deepcopy(model), masks)
                mean, low = models.embedding_cosine(models.embed(pruned, tok, heldout), dense_emb)
                cells.append((kept, mean, low))
            rows.append((label, cells))
            print(f"# {label}: " + "  ".join(f"{p}: kept {k:.4f} cos {m:.4f} ({lo:.4f})"
                                            for p, (k, m, lo) in zip(args.patterns, cells)), flush=True)

    print()
    print("| score | " + " | ".join(f"{p} kept | {p} cosine (min)" for p in args.patterns) + " |")
    print("|---|" + "---:|---:|" * len(args.patterns))
    for label, cells in rows:
        print(f"| {label} | " + " | ".join(f"{k:.4f} | {m:.4f} ({lo:.3f})" for k, m, lo in cells) + " |")
    if args.plot:
        rep = vnm.report(model, args.patterns, score="wanda", stats=stats, layers=encoder_linears,
                         plot=args.plot, print_fn=None)
        print(f"\n# plot saved to {rep.plot}")
    print(f"\n# total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
