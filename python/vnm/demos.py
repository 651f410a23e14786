"""Demonstrations run by the command line: ``vnm demo-layer`` (:func:`layer_demo`) and ``vnm demo``
(:func:`minilm_demo`). The command line imports this module, never the other way round."""

from __future__ import annotations

import statistics
import time

import torch

from .mask import select_mask
from .ops import spmm
from .pattern import as_pattern
from .tensor import VNMTensor


SPMM_CALLS = 3  # timed spmm calls per pattern in layer_demo (the median is shown)


def layer_demo(rows: int = 11008, cols: int = 4096, tokens: int = 16, dtype: torch.dtype = torch.float16,
               patterns=("2:4", "64:2:5", "64:2:8"), seed: int = 0) -> list:
    """Compress a LLaMA-7B-shaped random layer (MLP up projection, 11008 x 4096) in each pattern:
    storage vs dense, bit-exact round trip, and the error of ``spmm`` against dense torch."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=g) * 0.02).to(dtype)
    x = torch.randn(tokens, cols, generator=g).to(dtype)
    dense_bytes = w.numel() * w.element_size()
    # Warm-up, untimed: the first select_mask, from_dense and spmm calls pay one-time costs (torch
    # imports its compiler stack the first time vnm's custom op runs: seconds), which would
    # otherwise be counted against whichever pattern comes first.
    small, small_x = torch.randn(256, 256).to(dtype), torch.randn(2, 256).to(dtype)
    for pattern in patterns:
        spmm(VNMTensor.from_dense(small, select_mask(small.float().abs(), pattern), pattern), small_x)
    print(f"LLaMA-7B-shaped layer {rows} x {cols} {str(dtype).replace('torch.', '')}, random weights, "
          f"{tokens} tokens; dense storage {dense_bytes / 2**20:.1f} MiB")
    print(f"timings after an untimed warm-up of every step on a 256 x 256 layer; spmm ms: median of "
          f"{SPMM_CALLS} calls")
    print(f"{'pattern':>8} {'sparsity':>8} {'storage MiB':>11} {'vs dense':>8} {'round trip':>10} "
          f"{'spmm rel err':>12} {'select s':>8} {'compress s':>10} {'spmm ms':>8}")
    rows_out = []
    for pattern in patterns:
        t0 = time.perf_counter()
        mask = select_mask(w.float().abs(), pattern)
        t1 = time.perf_counter()
        t = VNMTensor.from_dense(w, mask, pattern)
        t2 = time.perf_counter()
        kept = torch.where(mask, w, torch.zeros((), dtype=dtype))
        exact = torch.equal(t.to_dense().view(torch.int16), kept.view(torch.int16))
        spmm_times = []
        for _ in range(SPMM_CALLS):
            t3 = time.perf_counter()
            y = spmm(t, x)
            spmm_times.append(time.perf_counter() - t3)
        ref = x.double() @ kept.double().T
        err = float((y.double() - ref).norm() / ref.norm())
        row = dict(pattern=pattern, sparsity=1 - float(mask.float().mean()), nbytes=t.nbytes,
                   ratio=t.nbytes / dense_bytes, round_trip=exact, rel_err=err,
                   select_s=t1 - t0, compress_s=t2 - t1, spmm_ms=statistics.median(spmm_times) * 1e3)
        rows_out.append(row)
        print(f"{pattern:>8} {row['sparsity']:8.3f} {t.nbytes / 2**20:11.1f} {row['ratio']:8.3f} "
              f"{'exact' if exact else 'WRONG':>10} {err:12.2e} {row['select_s']:8.2f} "
              f"{row['compress_s']:10.2f} {row['spmm_ms']:8.1f}")
        if not exact or not err < 1e-2:
            raise RuntimeError(f"{pattern}: round trip exact={exact}, spmm relative error {err:.2e}")
    print("spmm here is the C++ reference on the CPU (fp32 accumulation); storage counts values, "
          "metadata and column indices.")
    return rows_out


def minilm_demo(out, patterns=("2:4", "64:2:5", "64:2:8"), score: str = "wanda", time_budget=None,
                max_rounds=200, permutes=(False, True)) -> list:
    """The main job: prune the bundled all-MiniLM-L6-v2 in each pattern, with and without channel
    permutation, and compare the sentence embeddings of held-out English text with the dense
    model's. Prints a table, writes ``demo.csv`` and ``demo.png`` under ``out``.

    The permutation search of each layer stops after ``max_rounds`` rounds (and, if set, after
    ``time_budget`` seconds): with a round limit alone two runs print the same numbers."""
    import copy  # noqa: PLC0415
    import csv  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from . import scores as scores_mod  # noqa: PLC0415
    from .calibration import DEFAULT_ENTROPY_BINS, calibrate  # noqa: PLC0415
    from .measure import module_bytes, time_forward  # noqa: PLC0415
    from .data import english_sentences  # noqa: PLC0415
    from .models import embed, embedding_cosine, load_minilm, token_batches  # noqa: PLC0415
    from .nn import VNMLinear  # noqa: PLC0415
    from .sparsify import SparsifyConfig, sparsify  # noqa: PLC0415

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    dense, tok = load_minilm()
    calib, heldout = english_sentences("train"), english_sentences("heldout")
    print(f"all-MiniLM-L6-v2 (real weights), score {score}; calibration: {len(calib)} English sentences, "
          f"evaluation: {len(heldout)} held-out sentences from other documents; permutation search: "
          + (f"{max_rounds} rounds per layer" if time_budget is None else
             f"{time_budget} s per layer" + (f" or {max_rounds} rounds" if max_rounds else "")
             + " (a clock: numbers vary between runs)"))
    ref = embed(dense, tok, heldout)
    # Calibrate the dense model once: every configuration below starts from the same dense weights,
    # so its statistics are the ones sparsify would collect again for each of them.
    stats = None
    if scores_mod.needs_stats(score):
        stats = calibrate(dense, token_batches(tok, calib[:256]),
                          entropy_bins=DEFAULT_ENTROPY_BINS if score == "entropy" else None)
    score_fn = scores_mod.get(score)

    def calibrated_score(weight, _stats, *, layer):
        return score_fn(weight, None if stats is None else stats[layer], layer=layer)

    dense_linear = sum(m.weight.numel() * m.weight.element_size() for n, m in dense.named_modules()
                       if isinstance(m, torch.nn.Linear) and "pooler" not in n)
    lat_batch = None
    if gpu:
        lat_batch = {k: v.cuda() for k, v in tok(heldout[:32], return_tensors="pt", padding="max_length",
                                               truncation=True, max_length=128).items()}
    rows = [dict(pattern="dense", permute=False, sparsity=0.0, linear_mib=dense_linear / 2**20,
                 model_mib=module_bytes(dense) / 2**20, cosine_mean=1.0, cosine_min=1.0,
                 latency_ms=time_forward(dense.cuda(), lat_batch) if gpu else None)]
    if gpu:
        dense.cpu()
    for pattern in patterns:
        for permute in permutes:
            model = copy.deepcopy(dense)
            report = sparsify(model, SparsifyConfig(pattern=pattern, score=calibrated_score, permute=permute,
                                                    permute_time_budget=time_budget,
                                                    permute_max_rounds=max_rounds))
            emb = embed(model, tok, heldout)
            mean, worst = embedding_cosine(ref, emb)
            linear = sum(m.nbytes for m in model.modules() if isinstance(m, VNMLinear))
            row = dict(pattern=pattern, permute=bool(permute), sparsity=float(as_pattern(pattern).sparsity),
                       linear_mib=linear / 2**20, model_mib=module_bytes(model) / 2**20, cosine_mean=mean,
                       cosine_min=worst, latency_ms=time_forward(model.cuda(), lat_batch) if gpu else None,
                       kept=sum(r.kept_importance for r in report.sparse) / len(report.sparse))
            rows.append(row)
            print(f"  {pattern:>7} permute={str(bool(permute)):5}: cosine mean {mean:.4f} (min {worst:.4f}), "
                  f"linear weights {row['linear_mib']:.2f} MiB", flush=True)
    print()
    print(f"{'pattern':>8} {'permute':>7} {'sparsity':>8} {'linear MiB':>10} {'model MiB':>9} {'cos mean':>8} "
          f"{'cos min':>7} {'latency ms':>10}")
    for r in rows:
        lat = f"{r['latency_ms']:10.2f}" if r["latency_ms"] is not None else f"{'(no GPU)':>10}"
        print(f"{r['pattern']:>8} {str(r['permute']):>7} {r['sparsity']:8.3f} {r['linear_mib']:10.2f} "
              f"{r['model_mib']:9.2f} {r['cosine_mean']:8.4f} {r['cosine_min']:7.4f} {lat}")
    with open(out / "demo.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[1].keys()))
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in w.fieldnames})
    _plot_demo(rows, out / "demo.png")
    return rows


def _plot_demo(rows, path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    sparse = [r for r in rows if r["pattern"] != "dense"]
    for permute, marker in ((False, "o"), (True, "s")):
        pts = [r for r in sparse if r["permute"] == permute]
        if pts:
            ax1.plot([r["sparsity"] for r in pts], [r["cosine_mean"] for r in pts], marker=marker,
                     label="with permutation" if permute else "no permutation")
            for r in pts:
                ax1.annotate(r["pattern"], (r["sparsity"], r["cosine_mean"]), fontsize=8,
                             textcoords="offset points", xytext=(4, 4))
    ax1.set_xlabel("sparsity of the linear layers")
    ax1.set_ylabel("mean cosine to dense embeddings")
    ax1.set_title("all-MiniLM-L6-v2: fidelity (held-out text)")
    ax1.legend()
    labels = ["dense"] + [r["pattern"] for r in sparse if not r["permute"]]
    sizes = [rows[0]["linear_mib"]] + [r["linear_mib"] for r in sparse if not r["permute"]]
    ax2.bar(labels, sizes, color=["gray"] + ["tab:blue"] * (len(labels) - 1))
    ax2.set_ylabel("linear-layer weights (MiB)")
    ax2.set_title("storage (values + metadata + indices)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
