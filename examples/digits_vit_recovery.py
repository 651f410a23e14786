"""A small ViT trained here on real images (scikit-learn's 8x8 handwritten digits), pruned one-shot
to 2:4, 64:2:5 and 64:2:8, then recovered with three-stage LoRA and with SR-STE (both with
distillation from the dense model). Tests the V:N:M paper's claim that 64:2:5 with recovery is
within 1 point of dense.

    python examples/digits_vit_recovery.py --seeds 0 1 2 --out docs/

For every seed: a fresh stratified train / held-out split (70 / 30) and a fresh initialisation;
the dense ViT is trained from scratch, then each pattern starts from that dense model.
"""

from __future__ import annotations

import argparse
import copy
import csv
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))  # an in-place build, if any

import vnm  # noqa: E402
import vnm.train as vt  # noqa: E402


def digits(seed):
    """(x_train, y_train, x_test, y_test): 1 x 8 x 8 images scaled to [0, 1] and standardised."""
    from sklearn.datasets import load_digits  # noqa: PLC0415
    from sklearn.model_selection import train_test_split  # noqa: PLC0415

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    i_tr, i_te = train_test_split(range(len(y)), test_size=0.3, stratify=d.target, random_state=seed)
    x_tr, x_te = x[i_tr], x[i_te]
    mean, std = x_tr.mean(), x_tr.std()
    return (x_tr - mean) / std, y[i_tr], (x_te - mean) / std, y[i_te]


def make_vit(seed, hidden, layers, mlp):
    from transformers import ViTConfig, ViTForImageClassification  # noqa: PLC0415

    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=hidden, num_hidden_layers=layers,
                    num_attention_heads=4, intermediate_size=mlp, num_labels=10, hidden_dropout_prob=0.1,
                    attention_probs_dropout_prob=0.0)
    return ViTForImageClassification(cfg)


def epoch_batches(x, y, steps, batch_size, seed):
    """``steps`` training batches, reshuffled every epoch (no augmentation)."""
    g = torch.Generator().manual_seed(seed)
    out, perm, pos = [], torch.randperm(len(y), generator=g), 0
    for _ in range(steps):
        if pos + batch_size > len(y):
            perm, pos = torch.randperm(len(y), generator=g), 0
        idx = perm[pos:pos + batch_size]
        pos += batch_size
        out.append({"pixel_values": x[idx], "labels": y[idx]})
    return out


@torch.no_grad()
def accuracy(model, x, y):
    was = model.training
    model.eval()
    pred = model(pixel_values=x).logits.argmax(-1)
    model.train(was)
    return 100.0 * float((pred == y).float().mean())


def run_seed(seed, args, rows):
    x_tr, y_tr, x_te, y_te = digits(seed)
    dense = make_vit(seed, args.hidden, args.layers, args.mlp)
    t0 = time.time()
    vt.train_loop(dense, epoch_batches(x_tr, y_tr, args.dense_steps, 64, seed), args.dense_steps,
                  vt.TrainConfig(lr=1e-3, weight_decay=0.05, warmup_steps=50, lr_schedule="cosine", progress=False),
                  vt.Schedule(), desc="dense")
    dense.eval()
    dense_acc = accuracy(dense, x_te, y_te)
    print(f"seed {seed}: dense {dense_acc:.2f}% on {len(y_te)} held-out images ({time.time() - t0:.0f} s)", flush=True)
    rows.append(dict(seed=seed, pattern="dense", method="dense", accuracy=dense_acc, steps=args.dense_steps))
    batches = epoch_batches(x_tr, y_tr, args.recovery_steps, 64, seed + 1000)
    kd = dict(teacher=dense, distill="kl", temperature=2.0, distill_on="logits", progress=False)
    # Control: the dense model trained for the same extra steps with the same loss and optimiser as
    # SR-STE, without sparsity. Recovery "matching dense" could otherwise be extra training.
    control = copy.deepcopy(dense)
    vt.train_loop(control, batches, args.recovery_steps,
                  vt.TrainConfig(lr=args.srste_lr, optimizer=args.srste_optimizer, lr_schedule="cosine",
                                 warmup_steps=0, **kd), vt.Schedule(), desc="dense control")
    control_acc = accuracy(control, x_te, y_te)
    print(f"  dense + {args.recovery_steps} more steps (control): {control_acc:.2f}%", flush=True)
    rows.append(dict(seed=seed, pattern="dense", method="dense + same extra steps", accuracy=control_acc,
                     steps=args.dense_steps + args.recovery_steps))
    for pattern in args.patterns:
        model = copy.deepcopy(dense)
        vnm.sparsify(model, vnm.SparsifyConfig(pattern=pattern, progress=False))
        res = {"one-shot": accuracy(model, x_te, y_te)}
        if "lora" in args.methods:
            model = copy.deepcopy(dense)
            vt.prepare_lora(model, pattern, rank=args.rank, alpha=2.0 * args.rank)
            vt.train_three_stage(model, batches, vt.ThreeStageConfig(total_steps=args.recovery_steps, lr=args.lora_lr,
                                                                      **kd))
            res["three-stage LoRA"] = accuracy(vt.merge(model), x_te, y_te)
        if "srste" in args.methods:
            model = copy.deepcopy(dense)
            vt.prepare_srste(model, pattern)
            vt.train_srste(model, batches, vt.SRSTEConfig(steps=args.recovery_steps, lr=args.srste_lr,
                                                          optimizer=args.srste_optimizer, **kd))
            res["SR-STE"] = accuracy(vt.merge(model), x_te, y_te)
        for method, acc in res.items():
            rows.append(dict(seed=seed, pattern=pattern, method=method, accuracy=acc,
                             steps=0 if method == "one-shot" else args.recovery_steps))
        print(f"  {pattern:>7}: " + ", ".join(f"{m} {a:.2f}%" for m, a in res.items()), flush=True)


def summarise(rows, patterns):
    seeds = sorted({r["seed"] for r in rows})
    dense = {r["seed"]: r["accuracy"] for r in rows if r["method"] == "dense"}
    table = []
    for pattern in ["dense"] + list(patterns):
        for method in dict.fromkeys(r["method"] for r in rows if r["pattern"] == pattern):
            accs = {r["seed"]: r["accuracy"] for r in rows if r["pattern"] == pattern and r["method"] == method}
            gaps = [accs[s] - dense[s] for s in seeds if s in accs]
            # std: the population standard deviation over the seeds (docs/recovery.md says so).
            table.append(dict(pattern=pattern, method=method, mean=statistics.mean(accs.values()),
                              std=statistics.pstdev(accs.values()), gap=statistics.mean(gaps),
                              worst_gap=min(gaps), per_seed=[accs[s] for s in seeds if s in accs]))
    return table


def plot(table, rows, path):
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    patterns = list(dict.fromkeys(t["pattern"] for t in table if t["pattern"] != "dense"))
    methods = list(dict.fromkeys(t["method"] for t in table if t["pattern"] != "dense"))
    dense = next(t for t in table if t["method"] == "dense")
    n_seeds = len(dense["per_seed"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.2))
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        pts = [next((t for t in table if t["pattern"] == p and t["method"] == method), None) for p in patterns]
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(patterns))]
        ax1.bar(xs, [t["mean"] if t else 0 for t in pts], width, yerr=[t["std"] if t else 0 for t in pts],
                label=method, capsize=3)
    ax1.axhline(dense["mean"], color="k", lw=1, label=f"dense {dense['mean']:.1f}%")
    ax1.set_xticks(range(len(patterns)))
    ax1.set_xticklabels(patterns)
    ax1.set_ylim(0, 100)
    ax1.set_ylabel(f"held-out accuracy (%), mean ± std of {n_seeds} seeds")
    ax1.set_title("ViT on sklearn digits (8x8)")
    ax1.legend(fontsize=8, loc="lower left")

    # Right: every seed's gap to its own dense model, zoomed in on the 1-point band.
    dense_by_seed = {r["seed"]: r["accuracy"] for r in rows if r["method"] == "dense"}
    groups = [("dense", "dense + same extra steps")] + [(p, m) for p in patterns for m in methods]
    low = -4.0
    for i, (p, m) in enumerate(groups):
        gaps = [r["accuracy"] - dense_by_seed[r["seed"]] for r in rows if r["pattern"] == p and r["method"] == m]
        color = "tab:gray" if p == "dense" else f"C{methods.index(m)}"
        xs = [i + 0.12 * (k - (len(gaps) - 1) / 2) for k in range(len(gaps))]  # seeds side by side
        ax2.scatter(xs, [max(g, low) for g in gaps], color=color, zorder=3, s=18)
        clipped = [g for g in gaps if g < low]
        if clipped:
            ax2.annotate("off scale:\n" + ", ".join(f"{g:.0f}" for g in clipped), (i, low), textcoords="offset points",
                         xytext=(0, 8), fontsize=7, ha="center")
    ax2.axhline(0, color="k", lw=1)
    ax2.axhspan(-1, 0, color="tab:green", alpha=0.08, label="within 1 point of dense")
    ax2.set_xticks(range(len(groups)))
    short = {"three-stage LoRA": "LoRA"}
    ax2.set_xticklabels([f"{short.get(m, m)}\n{p}" if p != "dense" else "dense +\nextra steps" for p, m in groups],
                        fontsize=7)
    ax2.set_ylim(low - 0.3, 1.5)
    ax2.set_ylabel("accuracy - dense accuracy (points, per seed)")
    ax2.set_title("gap to dense, every seed (clipped at -4)")
    ax2.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_rows(path):
    with open(path) as f:
        return [dict(r, seed=int(r["seed"]), accuracy=float(r["accuracy"]), steps=int(r["steps"]))
                for r in csv.DictReader(f)]


def print_table(table):
    print("accuracy %: mean ± population standard deviation over the seeds")
    print(f"{'pattern':>8} {'method':<24} {'accuracy %':>14} {'vs dense':>9} {'worst seed':>10}  per seed")
    for t in table:
        print(f"{t['pattern']:>8} {t['method']:<24} {t['mean']:8.2f} ± {t['std']:.2f} {t['gap']:+9.2f} "
              f"{t['worst_gap']:+10.2f}  {' '.join(f'{a:.2f}' for a in t['per_seed'])}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--patterns", nargs="+", default=["2:4", "64:2:5", "64:2:8"])
    ap.add_argument("--methods", nargs="+", default=["lora", "srste"], choices=["lora", "srste"])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--mlp", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dense-steps", type=int, default=600)
    ap.add_argument("--recovery-steps", type=int, default=300)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--srste-lr", type=float, default=1e-4)
    ap.add_argument("--srste-optimizer", default="adamw")
    ap.add_argument("--threads", type=int, default=1,
                    help="1 by default: on a shared 2-core machine two threads ran 5-10x slower per step")
    ap.add_argument("--out", default="docs")
    ap.add_argument("--replot", metavar="CSV", help="only redraw the table and plot from a results CSV of this script")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        rows = read_rows(args.replot)
        patterns = list(dict.fromkeys(r["pattern"] for r in rows if r["pattern"] != "dense"))
        table = summarise(rows, patterns)
        plot(table, rows, out / "recovery_digits.png")
        print_table(table)
        return
    t_start = time.time()
    rows = []
    for seed in args.seeds:
        run_seed(seed, args, rows)
    with open(out / "recovery_digits.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    table = summarise(rows, args.patterns)
    plot(table, rows, out / "recovery_digits.png")
    print()
    print_table(table)
    print(f"\nwrote {out / 'recovery_digits.csv'}, {out / 'recovery_digits.png'}; total {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
