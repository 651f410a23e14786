"""choose_pattern: the speed filter, the accuracy proxy, the speedup sources and the errors."""

import ast
import csv
import itertools
import math
from pathlib import Path

import pytest
import torch

import vnm
from vnm.choose import MODEL_SOURCE, SpeedupTable, log_mask_diversity, model_speedup

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_spmm.py"

CANDIDATES = ["2:4", "64:2:5", "64:2:6", "64:2:8", "128:2:8", "64:2:16"]
SPEEDUPS = {"2:4": 1.2, "64:2:5": 1.6, "64:2:6": 1.9, "64:2:8": 2.4, "128:2:8": 2.5, "64:2:16": 3.5}


def write_table(path, shapes, speedups=SPEEDUPS, ns=(2048,), extra_column=True):
    lines = ["pattern,R,K,N,speedup_dense" + (",tflops" if extra_column else "")]
    for p, s in speedups.items():
        for R, K in shapes:
            for n in ns:
                lines.append(f"{p},{R},{K},{n},{s}" + (",123.0" if extra_column else ""))
    path.write_text("\n".join(lines) + "\n")
    return path


def planted(pattern, R, K, gen):
    """Scores that follow `pattern` exactly (large where a random mask of it keeps, tiny elsewhere)."""
    truth = vnm.select_mask(torch.rand(R, K, generator=gen), pattern)
    return truth.float() * (1 + torch.rand(R, K, generator=gen)) + 1e-3 * torch.rand(R, K, generator=gen)


def brute_kept_fraction(scores, pattern):
    """Best kept fraction by listing every 4-column set of every block (topk per row, float64)."""
    p = vnm.Pattern.parse(pattern)
    s = scores.double()
    sets = torch.tensor(list(itertools.combinations(range(p.M), 4)))
    best = 0.0
    for r0 in range(0, s.shape[0], p.V):
        for c0 in range(0, s.shape[1], p.M):
            blk = torch.nn.functional.pad(s[r0:r0 + p.V, c0:c0 + p.M], (0, p.M - min(p.M, s.shape[1] - c0)))
            best += float(blk[:, sets].topk(2, dim=-1).values.sum(-1).sum(0).max())
    return best / float(s.sum())


def test_global_choice_meets_target_and_maximises_the_proxy(tmp_path, gen):
    # Weights already 64:2:8-shaped: the sparser 64:2:8 keeps more than 64:2:5 / 64:2:6, and 2:4
    # (which would keep everything) is too slow. Kept importance, not density, must decide.
    scores = {"a": planted("64:2:8", 64, 48, gen), "b": planted("64:2:8", 64, 40, gen)}
    table = write_table(tmp_path / "speedups.csv", [(64, 48), (64, 40)])
    choice = vnm.choose_pattern(scores, 1.5, CANDIDATES, table, progress=False)
    survivors = [p for p in CANDIDATES if SPEEDUPS[p] >= 1.5]
    work = {n: s.numel() for n, s in scores.items()}
    proxy = {p: sum(work[n] * brute_kept_fraction(s, p) for n, s in scores.items()) / sum(work.values())
             for p in survivors}
    best = max(proxy, key=proxy.get)
    assert choice.pattern == best == "64:2:8"
    assert choice.speedup == pytest.approx(2.4) and choice.speedup >= 1.5
    assert choice.kept == pytest.approx(proxy[best], rel=1e-6)
    assert choice.source == f"table: {table}"
    by_pattern = {c.pattern: c for c in choice.candidates}
    assert not by_pattern["2:4"].meets and by_pattern["2:4"].kept is None  # filtered before the proxy
    assert by_pattern["64:2:5"].kept == pytest.approx(proxy["64:2:5"], rel=1e-6)
    assert set(choice.patterns.values()) == {"64:2:8"}
    assert "64:2:8" in str(choice)


def test_mask_diversity_breaks_near_ties(tmp_path, gen):
    # 128:2:8-shaped weights: 64:2:8 and 128:2:8 keep the same (up to the noise); 64:2:8 allows
    # more masks, so it wins. With an infinite tolerance every survivor ties and the highest
    # mask diversity (the densest, smallest-V pattern) wins.
    scores = {"a": planted("128:2:8", 128, 64, gen)}
    table = write_table(tmp_path / "t.csv", [(128, 64)])
    assert vnm.choose_pattern(scores, 2.0, CANDIDATES, table, progress=False).pattern == "64:2:8"
    lenient = vnm.choose_pattern(scores, 1.5, CANDIDATES, table, tolerance=1.0, progress=False)
    survivors = [p for p in CANDIDATES if SPEEDUPS[p] >= 1.5]
    assert lenient.pattern == max(survivors, key=log_mask_diversity) == "64:2:5"


def two_layer_table(path):
    """Speedups of a 128 x 80 layer (SPEEDUPS) and a 64 x 64 one, which gains 0.5x less."""
    rows = ["pattern,R,K,N,speedup_dense"]
    for p, s in SPEEDUPS.items():
        rows.append(f"{p},128,80,2048,{s}")
        rows.append(f"{p},64,64,2048,{s - 0.5}")
    path.write_text("\n".join(rows))
    return path


def test_per_layer_choice(tmp_path, gen):
    scores = {"wide": planted("64:2:5", 128, 80, gen), "narrow": planted("64:2:8", 64, 64, gen)}
    path = two_layer_table(tmp_path / "t.csv")
    choice = vnm.choose_pattern(scores, 1.5, CANDIDATES, path, per_layer=True, progress=False)
    assert choice.pattern is None and choice.per_layer
    assert choice.patterns == {"wide": "64:2:5", "narrow": "64:2:8"}
    narrow = {c.pattern: c for c in choice.layer_candidates["narrow"]}
    assert not narrow["64:2:6"].meets and narrow["64:2:8"].meets  # 1.9 - 0.5 = 1.4x misses, 2.4 - 0.5 meets
    expected = (128 * 80 + 64 * 64) / (128 * 80 / 1.6 + 64 * 64 / 1.9)
    assert choice.speedup == pytest.approx(expected)


def test_unreachable_target_names_the_best_available(tmp_path, gen):
    scores = {"a": torch.rand(128, 64, generator=gen)}
    table = write_table(tmp_path / "t.csv", [(128, 64)])
    with pytest.raises(ValueError, match=r"no candidate reaches 4x .*the best available is 64:2:16 at 3\.50x"):
        vnm.choose_pattern(scores, 4.0, CANDIDATES, table, progress=False)
    with pytest.raises(ValueError, match=r"for layer 'a' 128x64 .*the best available is 64:2:16 at 3\.50x"):
        vnm.choose_pattern(scores, 4.0, CANDIDATES, table, per_layer=True, progress=False)


def test_table_lookup_rule(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("\n".join([
        "N,pattern,K,R,speedup_dense,gpu",  # any column order, extra columns ignored
        "16,64:2:8,4096,4096,1.5,h100", "256,64:2:8,4096,4096,3.5,h100",
        "256,64:2:8,4096,4096,3.0,h100", "256,64:2:8,4096,4096,3.7,h100",  # repeats: median 3.5
        "16,64:2:8,384,384,1.1,h100",
    ]))
    t = SpeedupTable(path)
    assert t.speedup("64:2:8", 4096, 4096, 16) == (1.5, "measured")
    v, note = t.speedup("64:2:8", 4096, 4096, 64)  # ln 64 is halfway between ln 16 and ln 256
    assert v == pytest.approx((1.5 + 3.5) / 2) and "interpolated" in note
    assert t.speedup("64:2:8", 4096, 4096, 8192)[0] == 3.5  # clamped, not extrapolated
    v, note = t.speedup("64:2:8", 4000, 11008, 16)  # nearest measured shape
    assert v == 1.5 and "nearest measured shape 4096x4096" in note
    assert t.speedup("64:2:8", 400, 300, 16)[0] == 1.1
    assert t.speedup("2:4", 4096, 4096, 16) == (None, "not measured")


def test_unmeasured_candidates_are_reported_not_chosen(tmp_path, gen):
    table = write_table(tmp_path / "t.csv", [(128, 64)], speedups={"64:2:8": 2.4})
    choice = vnm.choose_pattern({"a": torch.rand(128, 64, generator=gen)}, 1.5, ["2:4", "64:2:8"], table,
                                progress=False)
    assert choice.pattern == "64:2:8"
    assert {c.pattern: c.speedup for c in choice.candidates}["2:4"] is None


def test_env_variable_and_model_source(tmp_path, gen, monkeypatch):
    scores = {"a": torch.rand(256, 256, generator=gen)}
    table = write_table(tmp_path / "t.csv", [(256, 256)])
    monkeypatch.setenv("VNM_SPEEDUP_TABLE", str(table))
    assert vnm.choose_pattern(scores, 1.5, CANDIDATES, progress=False).source == f"table: {table}"
    monkeypatch.delenv("VNM_SPEEDUP_TABLE")
    choice = vnm.choose_pattern(scores, 1.05, CANDIDATES, progress=False)
    assert choice.source == MODEL_SOURCE and choice.source.startswith("model:")
    assert choice.speedup >= 1.05
    assert vnm.choose_pattern(scores, 1.05, CANDIDATES, "model", progress=False).source == MODEL_SOURCE


def test_model_speedup_matches_design_ceilings():
    # Large layer, large N: compute-bound, M/2 x dense (DESIGN.md section 4).
    assert model_speedup("64:2:8", 8192, 8192, 65536) == pytest.approx(4.0, rel=0.01)
    assert model_speedup("64:2:16", 8192, 8192, 65536) == pytest.approx(8.0, rel=0.02)
    assert model_speedup("2:4", 8192, 8192, 65536) == pytest.approx(2.0, rel=0.01)
    # N = 1: memory-bound, about the ratio of weight bytes: 2 / (4.5/8 + 4/512) = 3.51 at 64:2:8.
    assert model_speedup("64:2:8", 8192, 8192, 1) == pytest.approx(2 / (4.5 / 8 + 4 / 512), rel=0.01)
    assert model_speedup("4:8", 8192, 8192, 1) == 1.0  # no kernel for plain 4:8


def test_log_mask_diversity_formula():
    assert log_mask_diversity("64:2:8") == pytest.approx((math.log(70) + 64 * math.log(6)) / 512)
    assert log_mask_diversity("2:4") == pytest.approx(math.log(6) / 4)
    assert log_mask_diversity("16:2:4") == pytest.approx(log_mask_diversity("2:4"))
    assert log_mask_diversity("64:2:5") > log_mask_diversity("128:2:5") > log_mask_diversity("64:2:8")


def test_bad_inputs(tmp_path, gen):
    good = {"a": torch.rand(64, 64, generator=gen)}
    with pytest.raises(ValueError, match=r"scores of layer 'a' hold NaN/Inf.*recalibrate"):
        vnm.choose_pattern({"a": torch.full((64, 64), float("nan"))}, 1.5, progress=False)
    with pytest.raises(ValueError, match="min_speedup must be a positive number"):
        vnm.choose_pattern(good, 0, progress=False)
    with pytest.raises(TypeError, match="vnm.layer_scores"):
        vnm.choose_pattern(torch.nn.Linear(4, 4), 1.5, progress=False)
    with pytest.raises(FileNotFoundError, match="bench_spmm.py"):
        vnm.choose_pattern(good, 1.5, speedup_table=tmp_path / "missing.csv", progress=False)
    bad = tmp_path / "bad.csv"
    bad.write_text("pattern,R,K,speedup\n2:4,64,64,1.2\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['N', 'speedup_dense'\]"):
        vnm.choose_pattern(good, 1.5, speedup_table=bad, progress=False)


# ---- the two phase-2 proxies --------------------------------------------------------------------------


def test_kept_and_diversity_proxies_choose_differently(tmp_path, gen):
    # 64:2:8-shaped weights: kept importance prefers 64:2:8; the paper's rule takes the most
    # diverse pattern that is fast enough, 64:2:5 (2:4 has more masks but misses 1.5x).
    scores = {"a": planted("64:2:8", 64, 48, gen), "b": planted("64:2:8", 64, 40, gen)}
    table = write_table(tmp_path / "t.csv", [(64, 48), (64, 40)])
    kept = vnm.choose_pattern(scores, 1.5, CANDIDATES, table, progress=False)
    diverse = vnm.choose_pattern(scores, 1.5, CANDIDATES, table, proxy="diversity", progress=False)
    fast_enough = [p for p in CANDIDATES if SPEEDUPS[p] >= 1.5]
    assert max(CANDIDATES, key=log_mask_diversity) == "2:4" not in fast_enough
    assert kept.pattern == "64:2:8" and kept.proxy == "kept"
    assert diverse.pattern == max(fast_enough, key=log_mask_diversity) == "64:2:5"
    assert diverse.proxy == "diversity" and "'diversity'" in str(diverse)
    assert diverse.speedup == pytest.approx(1.6)
    by_pattern = {c.pattern: c for c in diverse.candidates}
    assert by_pattern["64:2:5"].kept == pytest.approx({c.pattern: c for c in kept.candidates}["64:2:5"].kept)
    assert by_pattern["64:2:8"].kept is None  # not tied on MD: its kept importance is not needed
    assert diverse.kept == pytest.approx(by_pattern["64:2:5"].kept)


def test_diversity_ties_are_broken_by_kept_importance(tmp_path, gen, monkeypatch):
    scores = {"a": planted("64:2:8", 64, 48, gen)}
    table = write_table(tmp_path / "t.csv", [(64, 48)])
    # V:2:4 and 2:4 allow exactly as many masks per weight, and keep the same: the smaller V wins
    table24 = write_table(tmp_path / "t24.csv", [(64, 48)], speedups={"2:4": 1.6, "16:2:4": 1.6, "64:2:8": 2.4})
    assert vnm.choose_pattern(scores, 1.5, ["16:2:4", "2:4", "64:2:8"], table24, proxy="diversity",
                              progress=False).pattern == "2:4"
    # every candidate tied on MD: kept importance decides, as with proxy="kept"
    monkeypatch.setattr(vnm.choose, "log_mask_diversity", lambda p: 0.0)
    # (tolerance belongs to proxy="kept": there, 1.0 would make all near-ties and pick the smallest M)
    tied = vnm.choose_pattern(scores, 1.5, CANDIDATES, table, proxy="diversity", tolerance=1.0, progress=False)
    assert tied.pattern == "64:2:8"
    assert vnm.choose_pattern(scores, 1.5, CANDIDATES, table, tolerance=1.0, progress=False).pattern == "64:2:5"
    assert all(c.kept is not None for c in tied.candidates if c.meets)


def test_per_layer_diversity_takes_each_layers_most_diverse_fast_pattern(tmp_path, gen):
    scores = {"wide": planted("64:2:8", 128, 80, gen), "narrow": planted("64:2:8", 64, 64, gen)}
    path = two_layer_table(tmp_path / "t.csv")
    kept = vnm.choose_pattern(scores, 1.5, CANDIDATES, path, per_layer=True, progress=False)
    diverse = vnm.choose_pattern(scores, 1.5, CANDIDATES, path, per_layer=True, proxy="diversity", progress=False)
    assert kept.patterns == {"wide": "64:2:8", "narrow": "64:2:8"}
    assert diverse.patterns == {"wide": "64:2:5", "narrow": "64:2:8"}  # narrow: 64:2:5 and 64:2:6 miss 1.5x
    with pytest.raises(ValueError, match=r"proxy must be one of \('kept', 'diversity'\)"):
        vnm.choose_pattern(scores, 1.5, CANDIDATES, path, proxy="md", progress=False)


# ---- the benchmark's CSV: dtypes and GPUs ------------------------------------------------------------


def bench_fieldnames():
    """The columns bench/bench_spmm.py writes: the list passed as csv.DictWriter(fieldnames=...)."""
    tree = ast.parse(BENCH.read_text())
    lists = {t.id: node.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
             for t in node.targets if isinstance(t, ast.Name) and isinstance(node.value, ast.List)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "DictWriter":
            arg = next(k.value for k in node.keywords if k.arg == "fieldnames")
            return ast.literal_eval(lists[arg.id] if isinstance(arg, ast.Name) else arg)
    raise AssertionError("no csv.DictWriter(fieldnames=...) in bench/bench_spmm.py")


def write_bench_csv(path, runs):
    """A CSV as bench_spmm.py writes it, one run (gpu, dtype, {pattern: speedup}) after the other, each
    with its own header (as `cat run1.csv run2.csv` gives)."""
    cols = bench_fieldnames()
    with open(path, "w", newline="") as f:
        for gpu, dtype, speedups in runs:
            writer = csv.DictWriter(f, fieldnames=cols)
            writer.writeheader()
            for pattern, s in speedups.items():
                for N in (16, 2048):
                    ms = 0.1 / s
                    writer.writerow({"gpu": gpu, "dtype": dtype, "pattern": pattern, "R": 11008, "K": 4096, "N": N,
                                     "ms_vnm": ms, "ms_dense": 0.1, "ms_24": float("nan"), "speedup_dense": 0.1 / ms,
                                     "speedup_24": float("nan"), "tflops": 123.4, "gbps": 987.0, "kernel": "t64c",
                                     "shape": "llama7b.up", "timing": "graph/graph/-"})
    return path


def test_bench_header_has_what_the_table_reads():
    cols = bench_fieldnames()
    assert set(vnm.choose.REQUIRED_COLUMNS) <= set(cols) and {"gpu", "dtype"} <= set(cols)


def test_table_keeps_dtypes_apart(tmp_path):
    path = write_bench_csv(tmp_path / "bench.csv", [("NVIDIA H200", "float16", {"64:2:8": 3.0, "2:4": 1.5}),
                                                    ("NVIDIA H200", "bfloat16", {"64:2:8": 2.0, "2:4": 1.2})])
    fp16, bf16 = SpeedupTable(path), SpeedupTable(path, dtype=torch.bfloat16)
    assert fp16.speedup("64:2:8", 11008, 4096, 2048) == (pytest.approx(3.0), "measured")  # not the median 2.5
    assert bf16.speedup("64:2:8", 11008, 4096, 2048)[0] == pytest.approx(2.0)
    assert SpeedupTable(path, dtype="bf16").speedup("2:4", 11008, 4096, 16)[0] == pytest.approx(1.2)
    assert fp16.source == f"table: {path} [float16, NVIDIA H200]" and fp16.gpu == "NVIDIA H200"
    scores = {"up": torch.rand(11008 // 64, 4096 // 64) + 0.1}  # any shape: the nearest measured one is used
    choice = vnm.choose_pattern(scores, 2.5, ["2:4", "64:2:8"], path, progress=False)
    assert choice.pattern == "64:2:8" and choice.speedup == pytest.approx(3.0)
    with pytest.raises(ValueError, match=r"the best available is 64:2:8 at 2\.00x"):
        vnm.choose_pattern(scores, 2.5, ["2:4", "64:2:8"], path, dtype="bfloat16", progress=False)
    # tables without a dtype column, appended to each other: the second header is skipped
    plain = tmp_path / "plain.csv"
    plain.write_text("pattern,R,K,N,speedup_dense\n64:2:8,64,64,16,2.0\npattern,R,K,N,speedup_dense\n64:2:8,64,64,16,4.0\n")
    assert SpeedupTable(plain).speedup("64:2:8", 64, 64, 16)[0] == pytest.approx(3.0)
    only_bf16 = write_bench_csv(tmp_path / "bf16.csv", [("NVIDIA H200", "bfloat16", {"64:2:8": 2.0})])
    with pytest.raises(ValueError, match=r"has no float16 rows \(it has bfloat16\); pass dtype="):
        SpeedupTable(only_bf16)


def test_table_refuses_to_mix_gpus(tmp_path):
    path = write_bench_csv(tmp_path / "bench.csv", [("NVIDIA H200", "float16", {"64:2:8": 3.0}),
                                                    ("NVIDIA A100-SXM4-80GB", "float16", {"64:2:8": 2.2})])
    with pytest.raises(ValueError, match=r"measurements of 2 GPUs .*pass gpu= the one to plan for"):
        SpeedupTable(path)
    assert SpeedupTable(path, gpu="NVIDIA A100-SXM4-80GB").speedup("64:2:8", 11008, 4096, 16)[0] == pytest.approx(2.2)
    with pytest.raises(ValueError, match=r"no float16 rows for gpu 'H100'; its GPUs: \['NVIDIA A100-SXM4-80GB', 'NVIDIA H200'\]"):
        SpeedupTable(path, gpu="H100")
    choice = vnm.choose_pattern({"a": torch.rand(64, 64) + 0.1}, 1.5, ["64:2:8"], path, gpu="NVIDIA H200",
                                progress=False)
    assert choice.speedup == pytest.approx(3.0)
    table = SpeedupTable(path, gpu="NVIDIA H200")
    with pytest.raises(ValueError, match="read it again with vnm.SpeedupTable"):
        vnm.choose_pattern({"a": torch.rand(64, 64) + 0.1}, 1.5, ["64:2:8"], table, dtype="bfloat16", progress=False)
    with pytest.raises(ValueError, match="has no gpu column"):
        SpeedupTable(write_table(tmp_path / "plain.csv", [(64, 64)]), gpu="NVIDIA H200")
