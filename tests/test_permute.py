"""Permutation search (vnm.search_permutation) and zero-cost permutations of torch modules."""

import _thread
import math
import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vnm
from vnm._native import _C
from _util import rel_err

SEARCH_PATTERNS = ["2:4", "2:5", "2:8", "16:2:4", "16:2:5", "16:2:8", "32:2:6", "16:2:9"]


def kept_by_select(scores, pattern):
    """What select_mask keeps, summed in float64: the reference every kept_* value must match."""
    return float((scores.double() * vnm.select_mask(scores, pattern)).sum())


def is_permutation(perm, n):
    return perm.dtype == torch.int64 and perm.shape == (n,) and torch.equal(perm.sort().values, torch.arange(n))


def make_scores(kind, R, K, g):
    if kind == "uniform":
        return torch.rand(R, K, generator=g)
    if kind == "wanda":  # heavy-tailed column scales, as activation norms give
        return torch.randn(R, K, generator=g).abs() * torch.exp(2 * torch.randn(K, generator=g))
    if kind == "ties":  # few distinct values and many zeros
        return torch.randint(0, 3, (R, K), generator=g).float()
    raise AssertionError(kind)


def planted(R, K, pattern, g):
    """A matrix that is exactly sparse in `pattern`: what select_mask keeps of it is everything."""
    truth = vnm.select_mask(torch.rand(R, K, generator=g), pattern)
    return truth.float() * (0.5 + torch.rand(R, K, generator=g))


# ---- search: validity and the never-worse guarantee -------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    R=st.integers(1, 90),
    K=st.integers(1, 50),
    pattern=st.sampled_from(SEARCH_PATTERNS),
    kind=st.sampled_from(["uniform", "wanda", "ties"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_search_returns_permutations_never_worse_than_identity(R, K, pattern, kind, seed):
    scores = make_scores(kind, R, K, torch.Generator().manual_seed(seed))
    res = vnm.search_permutation(scores, pattern, time_budget=5, seed=seed, progress=False,
                                 max_rounds=12, patience=2)
    assert is_permutation(res.row_perm, R) and is_permutation(res.col_perm, K)
    p = vnm.Pattern.parse(pattern)
    if not (p.is_vnm and p.M > 4):  # rows do not share columns: the row order is irrelevant
        assert torch.equal(res.row_perm, torch.arange(R))
    # reported scores are what select_mask keeps, before and after the permutation
    identity = kept_by_select(scores, pattern)
    permuted = kept_by_select(res.apply(scores), pattern)
    assert res.kept_identity == pytest.approx(identity, rel=1e-9, abs=1e-9)
    assert res.kept == pytest.approx(permuted, rel=1e-9, abs=1e-9)
    assert permuted >= identity * (1 - 1e-9)
    # nothing valid beats every row keeping its own best values
    assert res.kept <= res.kept_unstructured_rows * (1 + 1e-9) + 1e-9
    assert res.kept_unstructured_rows <= res.kept_unstructured * (1 + 1e-9) + 1e-9


def test_search_raises_the_kept_score_of_random_matrices(gen):
    for pattern, shape in [("2:4", (128, 64)), ("32:2:8", (128, 128)), ("16:2:5", (96, 80))]:
        scores = torch.rand(*shape, generator=gen)
        res = vnm.search_permutation(scores, pattern, time_budget=5, progress=False, max_rounds=200)
        assert res.gain > 0.01, (pattern, res.gain)
        assert 0 < res.efficacy() <= 1 and 0 < res.efficacy("global") <= res.efficacy()


def test_apex_random_matrix_reaches_published_efficacy():
    # The matrix of apex ASP's permutation_tests README: np.random.seed(1); rand(128 rows, 64
    # columns). apex reports default 2:4 = 2852.376, 50% rows = 3042.332, and 36.6% efficacy
    # for its best strategy (optimize_stripe_groups,12,0).
    np.random.seed(1)
    scores = torch.from_numpy(np.random.rand(128, 64)).float()
    res = vnm.search_permutation(scores, "2:4", time_budget=5, progress=False)
    assert res.kept_identity == pytest.approx(2852.376, abs=2e-3)
    assert res.kept_unstructured_rows == pytest.approx(3042.332, abs=2e-3)
    assert res.efficacy() >= 0.366


@pytest.mark.parametrize(
    "pattern, R, K, rows, cols",
    [
        ("2:4", 16, 32, False, True),
        ("2:4", 64, 64, False, True),
        ("16:2:8", 64, 32, True, False),
        ("16:2:8", 32, 16, True, True),
        ("16:2:8", 64, 64, True, True),
        ("16:2:5", 48, 40, True, True),
        ("32:2:8", 64, 64, False, True),
    ],
)
def test_search_recovers_a_scrambled_sparse_matrix(pattern, R, K, rows, cols, gen):
    # A matrix that is exactly `pattern`-sparse, rows and/or columns scrambled: some permutation
    # keeps 100% of it, and the search must find one.
    scores = planted(R, K, pattern, gen)
    rp = torch.randperm(R, generator=gen) if rows else torch.arange(R)
    cp = torch.randperm(K, generator=gen) if cols else torch.arange(K)
    scrambled = scores[rp][:, cp]
    res = vnm.search_permutation(scrambled, pattern, time_budget=20, progress=False)
    total = float(scores.double().sum())
    assert res.kept_identity < 0.95 * total  # the scrambling did hide the structure
    assert res.kept == pytest.approx(total, rel=1e-9)
    assert kept_by_select(res.apply(scrambled), pattern) == pytest.approx(total, rel=1e-9)
    assert res.converged


@pytest.mark.parametrize(
    "R, K, pattern, rounds, kwargs",
    [
        (256, 512, "64:2:8", 25, {}),  # wide: pairs and blocks run in parallel
        (2048, 64, "16:2:8", 4, {}),  # tall: row phases of hundreds of swaps among 128 blocks
        (2048, 64, "16:2:8", 4, dict(row_segment=512)),
    ],
)
def test_search_is_deterministic_for_a_seed_and_any_thread_count(R, K, pattern, rounds, kwargs, gen):
    # ends by its round limit, with no wall-clock limit: reproducible bit for bit
    scores = torch.rand(R, K, generator=gen) * torch.exp(torch.randn(K, generator=gen))
    runs = []
    old = _C.num_threads()
    try:
        for threads in (1, 2, 2):
            _C.set_num_threads(threads)
            runs.append(vnm.search_permutation(scores, pattern, time_budget=None, seed=7, progress=False,
                                               max_rounds=rounds, **kwargs))
    finally:
        _C.set_num_threads(old)
    assert all(r.rounds == rounds for r in runs)
    assert not torch.equal(runs[0].row_perm, torch.arange(R))  # the rows did move
    for r in runs[1:]:
        assert torch.equal(r.row_perm, runs[0].row_perm) and torch.equal(r.col_perm, runs[0].col_perm)
        assert r.kept == runs[0].kept
    # a budget the search does not reach gives the same result as no budget
    budgeted = vnm.search_permutation(scores, pattern, time_budget=600, seed=7, progress=False,
                                      max_rounds=rounds, **kwargs)
    assert torch.equal(budgeted.row_perm, runs[0].row_perm) and torch.equal(budgeted.col_perm, runs[0].col_perm)
    other = vnm.search_permutation(scores, pattern, time_budget=None, seed=8, progress=False,
                                   max_rounds=rounds, **kwargs)
    assert not (torch.equal(other.col_perm, runs[0].col_perm) and torch.equal(other.row_perm, runs[0].row_perm))


def test_numpy_numbers_are_accepted_for_seed_rounds_and_budget(gen):
    scores = torch.rand(64, 64, generator=gen)
    plain = vnm.search_permutation(scores, "16:2:8", time_budget=60, seed=3, progress=False, max_rounds=6,
                                   patience=2, col_segment=32)
    numpy = vnm.search_permutation(scores, "16:2:8", time_budget=np.float32(60), seed=np.uint64(3), progress=False,
                                   max_rounds=np.int64(6), patience=np.int32(2), col_segment=np.int16(32))
    assert torch.equal(plain.row_perm, numpy.row_perm) and torch.equal(plain.col_perm, numpy.col_perm)


def test_segments_are_mapped_onto_themselves(gen):
    scores = torch.rand(64, 64, generator=gen) * torch.exp(torch.randn(64, generator=gen))
    res = vnm.search_permutation(scores, "16:2:8", time_budget=5, progress=False, col_segment=16,
                                 row_segment=32)
    assert vnm.is_head_preserving(res.col_perm, 16) and vnm.is_head_preserving(res.row_perm, 32)
    assert res.gain > 0
    assert not torch.equal(res.col_perm, torch.arange(64))  # it did move columns inside segments


@pytest.mark.parametrize("pattern, segment", [("16:2:5", 32), ("2:4", 6), ("16:2:8", 12)])
def test_segments_that_cut_through_groups(pattern, segment, gen):
    # head_dim 32 with M = 5: groups straddle heads, swaps stay inside a head
    scores = torch.rand(32, 96, generator=gen) * torch.exp(torch.randn(96, generator=gen))
    res = vnm.search_permutation(scores, pattern, time_budget=5, progress=False, col_segment=segment)
    assert is_permutation(res.col_perm, 96) and vnm.is_head_preserving(res.col_perm, segment)
    assert res.gain > 0


def test_rows_or_columns_only(gen):
    scores = torch.rand(64, 48, generator=gen)
    cols = vnm.search_permutation(scores, "16:2:8", time_budget=5, progress=False, permute_rows=False)
    rows = vnm.search_permutation(scores, "16:2:8", time_budget=5, progress=False, permute_cols=False)
    assert torch.equal(cols.row_perm, torch.arange(64)) and cols.gain > 0
    assert torch.equal(rows.col_perm, torch.arange(48)) and rows.gain > 0


def test_time_budget_bounds_the_search(gen):
    scores = torch.rand(1024, 2048, generator=gen)
    res = vnm.search_permutation(scores, "64:2:8", time_budget=0.5, progress=False, patience=None)
    assert not res.converged and res.rounds >= 1
    assert res.seconds < 0.5 + 5  # one round and the final exact scoring on top (shared CI cores)
    zero = vnm.search_permutation(scores[:128, :256], "64:2:8", time_budget=0, progress=False)
    assert zero.rounds == 0 and zero.kept >= zero.kept_identity


def test_time_budget_bounds_the_search_on_a_tall_matrix(gen):
    # 16384 rows: a row phase makes thousands of swaps among 1024 row blocks; the clock must be
    # read inside it, not only between rounds (it once took 40 s against a 0.2 s budget)
    scores = torch.rand(16384, 64, generator=gen) ** 4
    t0 = time.perf_counter()
    res = vnm.search_permutation(scores, "16:2:8", time_budget=0.2, progress=False, patience=None)
    wall = time.perf_counter() - t0
    assert wall < 5  # budget, set-up and the final exact scoring, on 2 shared cores
    assert is_permutation(res.row_perm, 16384) and is_permutation(res.col_perm, 64)
    assert res.kept >= res.kept_identity
    assert kept_by_select(res.apply(scores), "16:2:8") == pytest.approx(res.kept, rel=1e-9)


def test_progress_callable_can_stop_a_tall_search_inside_its_row_phase(gen):
    scores = torch.rand(16384, 64, generator=gen) ** 4
    seen = []

    def stop_at_second_call(info):
        seen.append(info)
        return len(seen) < 2

    t0 = time.perf_counter()
    res = vnm.search_permutation(scores, "16:2:8", time_budget=600, progress=stop_at_second_call, patience=None)
    # the second call comes about 0.2 s after the first, from inside the first round (rows
    # first); called only between rounds it came after the whole row phase (tens of seconds)
    assert time.perf_counter() - t0 < 5 and len(seen) >= 2
    assert res.kept >= res.kept_identity and is_permutation(res.row_perm, 16384)


@pytest.mark.slow
@pytest.mark.parametrize("progress", [False, True])
def test_ctrl_c_stops_a_tall_search_with_keyboard_interrupt(progress, gen):
    # Ctrl-C in Python sets a flag that the interpreter acts on at its next bytecode; the search
    # runs without the GIL and calls into Python (the progress callback, or a no-op one) a few
    # times a second, where KeyboardInterrupt is raised and propagates out of the search.
    # _thread.interrupt_main has the same effect as the signal.
    scores = torch.rand(16384, 64, generator=gen) ** 4
    timer = threading.Timer(0.3, _thread.interrupt_main)
    t0 = time.perf_counter()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            vnm.search_permutation(scores, "16:2:8", time_budget=600, progress=progress, patience=None)
    finally:
        timer.cancel()
        timer.join()
    assert time.perf_counter() - t0 < 5


def test_keyboard_interrupt_raised_by_the_progress_callable_propagates(gen):
    def interrupt(info):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        vnm.search_permutation(torch.rand(64, 64, generator=gen), "16:2:8", time_budget=5, progress=interrupt)


def test_progress_callable_sees_the_search_and_can_stop_it(gen):
    scores = torch.rand(512, 1024, generator=gen)
    seen = []

    def stop_at_second_call(info):
        seen.append(info)
        return len(seen) < 2

    res = vnm.search_permutation(scores, "64:2:8", time_budget=60, progress=stop_at_second_call, patience=None)
    assert res.seconds < 30 and len(seen) >= 2
    assert set(seen[0]) == {"elapsed", "rounds", "escapes", "kept_identity", "kept_best", "gain"}
    assert seen[-1]["kept_best"] >= seen[0]["kept_identity"]
    assert res.kept >= res.kept_identity


def test_progress_errors_propagate(gen):
    def boom(info):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        vnm.search_permutation(torch.rand(64, 64, generator=gen), "16:2:8", time_budget=5, progress=boom)


def test_progress_bar_runs(gen, capsys):
    res = vnm.search_permutation(torch.rand(64, 64, generator=gen), "16:2:8", time_budget=0.3)
    assert "permutation 16:2:8 64x64" in capsys.readouterr().err
    assert res.kept >= res.kept_identity


def test_progress_bar_shows_a_small_budget(gen, capsys):
    vnm.search_permutation(torch.rand(64, 64, generator=gen), "16:2:8", time_budget=0.05, patience=None)
    err = capsys.readouterr().err
    assert "/0.05 s" in err and "/0.0 s" not in err
    vnm.search_permutation(torch.rand(64, 64, generator=gen), "16:2:8", time_budget=None, max_rounds=3,
                           patience=None)
    assert "/3 rounds" in capsys.readouterr().err


def test_float64_scores_beyond_float32_range_name_the_conversion():
    scores = torch.rand(32, 48, dtype=torch.float64)
    scores[3, 5] = 1e300
    with pytest.raises(ValueError, match=r"converted to float32.*1e\+300 at \(3, 5\) overflows.*divide the scores"):
        vnm.search_permutation(scores, "16:2:8", time_budget=1, progress=False)
    with pytest.raises(ValueError, match="converted to float32"):
        vnm.kept_score(scores, "2:4")
    # representable float64 scores are fine, and inf stays the plain error
    assert vnm.kept_score(scores.clamp(max=1.0), "2:4") > 0
    scores[3, 5] = float("inf")
    with pytest.raises(ValueError, match=r"finite and non-negative.*\(3, 5\)"):
        vnm.kept_score(scores, "2:4")


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(scores=torch.tensor([[1.0, float("nan"), 0, 0]])), ValueError, r"finite and non-negative.*\(0, 1\)"),
        (dict(scores=torch.tensor([[1.0, -1.0, 0, 0]])), ValueError, r"non-negative.*got -1 at \(0, 1\)"),
        (dict(scores=torch.ones(8)), ValueError, "2-D"),
        (dict(scores=torch.ones(4, 0)), ValueError, "must not be empty"),
        (dict(scores=torch.ones(4, 4, dtype=torch.int64)), TypeError, "floating-point"),
        (dict(pattern="1:4"), ValueError, r"keep 2 per group \(V:2:M or 2:M\)"),
        (dict(pattern="4:8"), ValueError, "keep 2 per group"),
        (dict(pattern="16:2"), ValueError, "needs 1 <= N < M"),
        (dict(pattern=4), TypeError, "pattern must be"),
        (dict(time_budget=-1), ValueError, "time_budget must be a finite number of seconds >= 0"),
        (dict(time_budget=float("nan")), ValueError, "time_budget"),
        (dict(time_budget="1"), TypeError, "time_budget must be a number"),
        (dict(time_budget=None), ValueError, "time_budget=None needs max_rounds"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(seed=True), TypeError, "seed must be an int"),
        (dict(seed=np.bool_(True)), TypeError, "seed must be an int"),
        (dict(seed=1.0), TypeError, "seed must be an int"),
        (dict(max_rounds=0), ValueError, "max_rounds must be >= 1"),
        (dict(max_rounds=2.5), TypeError, "max_rounds must be an int or None, got float"),
        (dict(patience=-2), ValueError, "patience"),
        (dict(col_segment=7), ValueError, "col_segment must be 0 .* divide the column count 48"),
        (dict(row_segment=8), ValueError, "row_segment must be 0 .* a multiple of V=16"),
        # checked alike where rows never move
        (dict(pattern="16:2:4", row_segment=8), ValueError, "row_segment must be 0 .* a multiple of V=16"),
        (dict(pattern="2:4", row_segment=7), ValueError, "row_segment must be 0 .* divide the row count 32"),
        (dict(progress="yes"), TypeError, "progress must be"),
    ],
)
def test_search_rejects_bad_input(kwargs, error, message):
    args = dict(scores=torch.rand(32, 48), pattern="16:2:8", time_budget=1, progress=False)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        vnm.search_permutation(**args)


def test_kept_score_and_result_helpers(gen):
    scores = torch.rand(40, 30, generator=gen)
    assert vnm.kept_score(scores, "16:2:6") == pytest.approx(kept_by_select(scores, "16:2:6"), rel=1e-12)
    assert vnm.kept_score(scores, "2:4") == pytest.approx(kept_by_select(scores, "2:4"), rel=1e-12)
    res = vnm.search_permutation(scores, "16:2:6", time_budget=1, progress=False)
    assert torch.equal(res.unapply(res.apply(scores)), scores)
    # a mask chosen in permuted order, mapped back, keeps the same score of the original matrix
    mask = res.unapply(vnm.select_mask(res.apply(scores), "16:2:6"))
    assert float((scores.double() * mask).sum()) == pytest.approx(res.kept, rel=1e-12)
    assert res.efficacy() == pytest.approx((res.kept - res.kept_identity) / (res.kept_unstructured_rows - res.kept_identity))
    with pytest.raises(ValueError, match="'rows' or 'global'"):
        res.efficacy("apex")


# ---- zero-cost permutations of modules ---------------------------------------------------------


class GatedMLP(torch.nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.gate, self.up, self.down = torch.nn.Linear(d, h), torch.nn.Linear(d, h), torch.nn.Linear(h, d)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


class Attention(torch.nn.Module):
    """Multi-head self-attention made of four nn.Linear layers."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads, self.head_dim = heads, d // heads
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        B, T, d = x.shape

        def split(t):
            return t.view(B, T, self.heads, self.head_dim).transpose(1, 2)

        att = torch.softmax(split(self.q(x)) @ split(self.k(x)).transpose(-1, -2) / math.sqrt(self.head_dim), -1)
        return self.o((att @ split(self.v(x))).transpose(1, 2).reshape(B, T, d))


def test_mlp_permutation_changes_nothing(gen):
    torch.manual_seed(0)
    mlp = GatedMLP(24, 40).double()
    x = torch.randn(5, 24, dtype=torch.double)
    mlp.requires_grad_(False)
    y = mlp(x)
    perm = torch.randperm(40, generator=gen)
    vnm.permute_between([mlp.gate, mlp.up], mlp.down, perm)
    assert rel_err(mlp(x), y) < 1e-13
    assert not torch.equal(mlp.down.weight, mlp.down.weight[:, vnm.invert_permutation(perm)])


def test_attention_value_permutation_within_heads_changes_nothing(gen):
    torch.manual_seed(0)
    att = Attention(32, 4).double()
    x = torch.randn(2, 7, 32, dtype=torch.double)
    att.requires_grad_(False)
    y = att(x)
    perm = torch.cat([h * 8 + torch.randperm(8, generator=gen) for h in range(4)])
    vnm.permute_attention_values(att.v, att.o, perm, head_dim=8)
    assert rel_err(att(x), y) < 1e-13
    across = torch.randperm(32, generator=gen)
    assert not vnm.is_head_preserving(across, 8)
    with pytest.raises(ValueError, match="moves features between heads"):
        vnm.permute_attention_values(att.v, att.o, across, head_dim=8)


def test_gpt2_conv1d_mlp_permutation_changes_nothing(gen):
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(0)
    c_fc, c_proj = conv1d(40, 24).double(), conv1d(24, 40).double()  # Conv1D(out, in): weight (in, out)
    c_fc.requires_grad_(False)
    c_proj.requires_grad_(False)
    x = torch.randn(5, 24, dtype=torch.double)
    y = c_proj(torch.nn.functional.gelu(c_fc(x)))
    w_fc = c_fc.weight.clone()
    perm = torch.randperm(40, generator=gen)
    vnm.permute_between(c_fc, c_proj, perm)
    assert rel_err(c_proj(torch.nn.functional.gelu(c_fc(x))), y) < 1e-13
    assert torch.equal(c_fc.weight, w_fc[:, perm])  # the output features are Conv1D's weight columns


def test_linear_permutations_and_their_inverse(gen):
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 20).double().requires_grad_(False)
    x = torch.randn(3, 12, dtype=torch.double)
    y = lin(x)
    rows, cols = torch.randperm(20, generator=gen), torch.randperm(12, generator=gen)
    vnm.permute_linear_rows(lin, rows)
    assert torch.equal(lin(x), y[:, rows])
    vnm.permute_linear_cols(lin, cols)
    assert rel_err(lin(x[:, cols]), y[:, rows]) < 1e-14
    vnm.permute_linear_rows(lin, vnm.invert_permutation(rows))
    vnm.permute_linear_cols(lin, vnm.invert_permutation(cols))
    assert rel_err(lin(x), y) < 1e-14


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda lin: vnm.permute_linear_rows(lin, torch.arange(5)), ValueError, r"shape \(20,\)"),
        (lambda lin: vnm.permute_linear_cols(lin, torch.zeros(12, dtype=torch.int64)), ValueError, "not a permutation"),
        (lambda lin: vnm.permute_linear_cols(lin, torch.arange(12.0)), TypeError, "integer tensor"),
        (lambda lin: vnm.permute_linear_rows(torch.nn.ReLU(), torch.arange(3)), TypeError, "nn.Linear"),
        (lambda lin: vnm.permute_between(lin, lin, torch.arange(20)), ValueError, "takes 12 inputs"),
        (lambda lin: vnm.permute_attention_values(torch.nn.Linear(12, 8), lin, torch.arange(12), 4), ValueError,
         "v_proj emits 8 features but o_proj takes 12: with grouped-query attention"),
        (lambda lin: vnm.invert_permutation(torch.tensor([0, 0])), ValueError, "not a permutation"),
    ],
)
def test_permutation_helpers_reject_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call(torch.nn.Linear(12, 20))


def _masked_mlp(x, up_w, up_b, up_mask, down_w, down_b, down_mask):
    hidden = torch.relu(torch.nn.functional.linear(x, up_w * up_mask, up_b))
    return torch.nn.functional.linear(hidden, down_w * down_mask, down_b)


@pytest.mark.parametrize("driver", ["down", "up"])
def test_sparse_mlp_with_searched_permutations_equals_the_masked_dense_one(driver, gen):
    # The full path on an MLP: search permutations, fold what can be folded, store the permuted
    # sparse weights, and compare with the original dense model masked by the same masks mapped
    # back to the original order. up's rows and down's columns share the hidden features, so one
    # permutation P of them serves both: down's searched column order ("down" drives) or up's
    # searched row order ("up" drives); the other layer takes P as it comes. up's input comes from
    # outside (a LayerNorm in a transformer), so its column permutation is a gather of x; down's
    # output feeds the residual, so its row permutation is undone by indexing the output.
    torch.manual_seed(0)
    d, h, pattern = 48, 64, "16:2:8"
    up, down = torch.nn.Linear(d, h), torch.nn.Linear(h, d)
    x = torch.randn(6, d)
    up_w, up_b, down_w, down_b = (t.detach().clone() for t in (up.weight, up.bias, down.weight, down.bias))

    if driver == "down":
        down_res = vnm.search_permutation(down_w.abs(), pattern, time_budget=1, progress=False)
        P = down_res.col_perm
        vnm.permute_between(up, down, P)
        up_res = vnm.search_permutation(up.weight.detach().abs(), pattern, time_budget=1, progress=False,
                                        permute_rows=False)
        down_rows, up_cols = down_res.row_perm, up_res.col_perm
        assert torch.equal(down.weight.detach(), down_w[:, P])
    else:
        up_res = vnm.search_permutation(up_w.abs(), pattern, time_budget=1, progress=False)
        P = up_res.row_perm
        vnm.permute_between(up, down, P)
        down_res = vnm.search_permutation(down.weight.detach().abs(), pattern, time_budget=1, progress=False,
                                          permute_cols=False)
        down_rows, up_cols = down_res.row_perm, up_res.col_perm
        assert torch.equal(up.weight.detach(), up_w[P])

    # stored layouts: up is W_up[P][:, up_cols] reading x[..., up_cols]; down is W_down[down_rows][:, P]
    up_stored = up.weight.detach()[:, up_cols]
    down_stored = down.weight.detach()[down_rows]
    up_mask = vnm.select_mask(up_stored.abs(), pattern)
    down_mask = vnm.select_mask(down_stored.abs(), pattern)
    up_sparse = vnm.VNMTensor.from_dense(up_stored, up_mask, pattern, perm=up_cols)
    down_sparse = vnm.VNMTensor.from_dense(down_stored, down_mask, pattern)
    with torch.no_grad():
        hidden = torch.relu(vnm.spmm(up_sparse, x, up.bias.detach()))
        y = vnm.spmm(down_sparse, hidden, down.bias.detach()[down_rows])[:, vnm.invert_permutation(down_rows)]

    # the same masks in the original order of the unpermuted model
    up_mask_orig = torch.zeros_like(up_mask)
    up_mask_orig[P.unsqueeze(1), up_cols.unsqueeze(0)] = up_mask
    down_mask_orig = torch.zeros_like(down_mask)
    down_mask_orig[down_rows.unsqueeze(1), P.unsqueeze(0)] = down_mask
    ref = _masked_mlp(x, up_w, up_b, up_mask_orig, down_w, down_b, down_mask_orig)
    assert rel_err(y, ref) < 1e-6
    # and the driving layer's mask keeps the score its search promised
    res, w, mask = (down_res, down_w, down_mask_orig) if driver == "down" else (up_res, up_w, up_mask_orig)
    assert float((w.abs().double() * mask).sum()) == pytest.approx(res.kept, rel=1e-9)
