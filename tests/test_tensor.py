import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vnm
from vnm import VNMTensor
from _util import bits, masked

PATTERNS = ["2:4", "16:2:4", "16:2:5", "32:2:6", "64:2:8", "16:2:16", "128:2:8", "48:2:7", "16:2:32"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@settings(max_examples=80, deadline=None)
@given(
    R=st.integers(1, 150),
    K=st.integers(1, 70),
    pattern=st.sampled_from(PATTERNS),
    dtype=st.sampled_from(DTYPES),
    drop=st.floats(0.0, 0.6),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_is_bit_exact(R, K, pattern, dtype, drop, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(R, K, generator=g).to(dtype)
    w[torch.rand(R, K, generator=g) < 0.05] = -0.0  # signed zeros survive too
    mask = vnm.select_mask(torch.rand(R, K, generator=g), pattern)
    mask &= torch.rand(R, K, generator=g) >= drop  # masks may keep fewer than 2 per row and group
    t = VNMTensor.from_dense(w, mask, pattern)
    assert t.shape == (R, K) and t.dtype == dtype and t.pattern == vnm.Pattern.parse(pattern)
    assert torch.equal(bits(t.to_dense()), bits(masked(w, mask)))
    held = t.mask()
    assert vnm.is_valid_mask(held, pattern)
    assert torch.all(held | ~mask)  # every kept position is held


@pytest.mark.parametrize("pattern", ["64:2:8", "2:4", "128:2:5"])
def test_storage_shapes_follow_the_format(pattern):
    p = vnm.Pattern.parse(pattern)
    R, K = 100, 30
    w = torch.randn(R, K)
    t = VNMTensor.from_dense(w, vnm.select_mask(w.abs(), p), p)
    Rp = -(-R // p.row_block) * p.row_block
    G = -(-K // p.M)
    assert t.values.shape == (Rp, G, 2) and t.values.dtype == torch.float32
    assert t.meta.shape == (Rp, -(-G // 2)) and t.meta.dtype == torch.uint8
    assert t.columns.shape == (Rp // p.row_block, G, 4) and t.columns.dtype == torch.uint8
    assert t.perm is None
    # offsets ascending in [0, M); meta nibbles first < second
    assert torch.all(t.columns[..., 1:] > t.columns[..., :-1]) and int(t.columns.max()) < p.M
    lo = t.meta & 0x3
    hi = (t.meta >> 2) & 0x3
    assert torch.all(lo < hi)


def test_values_hold_kept_weights_in_column_order():
    # One 16:2:8 block where row r keeps columns {1, 6}: values are w[r, 1], w[r, 6].
    w = torch.arange(16 * 8, dtype=torch.float32).view(16, 8) + 1
    mask = torch.zeros(16, 8, dtype=torch.bool)
    mask[:, 1] = mask[:, 6] = True
    t = VNMTensor.from_dense(w, mask, "16:2:8")
    assert t.columns[0, 0].tolist() == [0, 1, 2, 6]  # 1 and 6 used, filled with lowest 0 and 2
    assert torch.equal(t.values[:, 0, 0], w[:, 1]) and torch.equal(t.values[:, 0, 1], w[:, 6])
    assert torch.all(t.meta[:, 0] == (1 | (3 << 2)))  # positions 1 and 3 of [0, 1, 2, 6]


def test_fp16_64_2_8_storage_is_small():
    R, K = 1024, 2048
    w = torch.randn(R, K).half()
    t = VNMTensor.from_dense(w, vnm.select_mask(w.float().abs(), "64:2:8"), "64:2:8")
    assert t.nbytes <= 0.30 * R * K * 2
    assert t.values.numel() * 2 == 0.25 * R * K * 2


def test_perm_is_stored_and_checked(gen):
    w = torch.randn(32, 16, generator=gen)
    mask = vnm.select_mask(w.abs(), "16:2:8")
    perm = torch.randperm(16, generator=gen)
    t = VNMTensor.from_dense(w, mask, "16:2:8", perm=perm)
    assert t.perm.dtype == torch.int32 and torch.equal(t.perm.long(), perm)
    assert t.nbytes == VNMTensor.from_dense(w, mask, "16:2:8").nbytes + 16 * 4
    with pytest.raises(ValueError, match=r"perm must have shape \(16,\)"):
        VNMTensor.from_dense(w, mask, "16:2:8", perm=perm[:8])
    with pytest.raises(ValueError, match="not a permutation"):
        VNMTensor.from_dense(w, mask, "16:2:8", perm=torch.zeros(16, dtype=torch.int64))
    with pytest.raises(TypeError, match="integer tensor"):
        VNMTensor.from_dense(w, mask, "16:2:8", perm=perm.float())


def test_row_perm_is_stored_checked_and_undone_by_effective_dense(gen):
    w = torch.randn(40, 24, generator=gen)
    mask = vnm.select_mask(w.abs(), "16:2:8")
    rows = torch.randperm(40, generator=gen)
    cols = torch.randperm(24, generator=gen)
    t = VNMTensor.from_dense(w, mask, "16:2:8", perm=cols, row_perm=rows)
    assert t.row_perm.dtype == torch.int32 and torch.equal(t.row_perm.long(), rows)
    assert set(t.arrays()) == {"values", "meta", "columns", "perm", "row_perm"}
    assert t.nbytes == VNMTensor.from_dense(w, mask, "16:2:8").nbytes + (24 + 40) * 4
    assert torch.equal(t.to_dense(), masked(w, mask))  # stored order, bit for bit
    eff = t.effective_dense()
    stored = masked(w, mask)
    for r, k in ((0, 0), (17, 5), (39, 23)):  # W[row_perm[r], perm[k]] = stored[r, k]
        assert eff[rows[r], cols[k]] == stored[r, k]
    assert "row_perm" in repr(t)
    moved = t.to(torch.float16)
    assert torch.equal(moved.row_perm, t.row_perm) and moved.dtype == torch.float16
    a = {k: v.clone() for k, v in t.arrays().items()}
    bad = a["row_perm"].clone()
    bad[0] = bad[1]
    with pytest.raises(ValueError, match="row_perm is not a permutation of 0..39"):
        VNMTensor(a["values"], a["meta"], a["columns"], "16:2:8", (40, 24), a["perm"], row_perm=bad)


def test_nonfinite_kept_weights_are_rejected_with_count_and_position():
    w = torch.randn(16, 8)
    mask = vnm.select_mask(torch.ones(16, 8), "16:2:8")  # keeps columns 0 and 1
    w[:, 5] = float("nan")  # pruned: fine
    VNMTensor.from_dense(w, mask, "16:2:8")
    w[3, 1] = float("inf")
    w[7, 0] = float("nan")
    with pytest.raises(ValueError, match=r"2 NaN/Inf value\(s\) at positions the mask keeps, the first at \(row 3, column 1\)"):
        VNMTensor.from_dense(w.half(), mask, "16:2:8")


def test_from_dense_input_errors():
    w = torch.randn(16, 8)
    m = vnm.select_mask(w.abs(), "16:2:8")
    with pytest.raises(ValueError, match="5 distinct columns"):
        bad = torch.zeros(16, 8, dtype=torch.bool)
        bad[:5, :5] = torch.eye(5, dtype=torch.bool)
        VNMTensor.from_dense(w, bad, "16:2:8")
    with pytest.raises(ValueError, match=r"mask has shape \(8, 16\) but the weight has shape \(16, 8\)"):
        VNMTensor.from_dense(w, m.T.contiguous(), "16:2:8")
    with pytest.raises(TypeError, match="float32, torch.float16 and torch.bfloat16"):
        VNMTensor.from_dense(w.double(), m, "16:2:8")
    with pytest.raises(TypeError, match="torch.bool"):
        VNMTensor.from_dense(w, m.float(), "16:2:8")
    with pytest.raises(ValueError, match="2-D"):
        VNMTensor.from_dense(w[0], m[0], "16:2:8")
    with pytest.raises(TypeError, match="torch.Tensor"):
        VNMTensor.from_dense(w.numpy(), m, "16:2:8")


def test_constructor_rejects_tampered_storage(gen):
    w = torch.randn(32, 24, generator=gen)
    t = VNMTensor.from_dense(w, vnm.select_mask(w.abs(), "16:2:8"), "16:2:8")
    a = {k: v.clone() for k, v in t.arrays().items()}
    VNMTensor(a["values"], a["meta"], a["columns"], "16:2:8", (32, 24))  # intact: accepted
    cols = a["columns"].clone()
    cols[1, 2] = torch.tensor([0, 3, 3, 5], dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"columns\[1, 2\] = \[0, 3, 3, 5\] must be 4 ascending"):
        VNMTensor(a["values"], a["meta"], cols, "16:2:8", (32, 24))
    cols[1, 2] = torch.tensor([0, 3, 4, 9], dtype=torch.uint8)
    with pytest.raises(ValueError, match="below M=8"):
        VNMTensor(a["values"], a["meta"], cols, "16:2:8", (32, 24))
    meta = a["meta"].clone()
    meta[5, 0] = 0x0E  # group 0 of row 5: positions 2 and 3, fine; group 1: 0 and 0, corrupt
    with pytest.raises(ValueError, match="meta of row 5, group 1 holds positions 0 and 0"):
        VNMTensor(a["values"], meta, a["columns"], "16:2:8", (32, 24))
    meta = a["meta"].clone()
    meta[6, 1] = (int(meta[6, 1]) & 0xF) | 0x40  # 3 groups: the high nibble of byte 1 is unused
    with pytest.raises(ValueError, match="unused high nibble of meta row 6"):
        VNMTensor(a["values"], meta, a["columns"], "16:2:8", (32, 24))
    with pytest.raises(ValueError, match=r"values has shape \(32, 3, 1\), expected \(32, 3, 2\)"):
        VNMTensor(a["values"][..., :1], a["meta"], a["columns"], "16:2:8", (32, 24))
    with pytest.raises(TypeError, match="meta must be uint8"):
        VNMTensor(a["values"], a["meta"].to(torch.int16), a["columns"], "16:2:8", (32, 24))
    vals = a["values"].clone()
    vals[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        VNMTensor(vals, a["meta"], a["columns"], "16:2:8", (32, 24))


def test_to_device_and_dtype(gen):
    w = torch.randn(20, 12, generator=gen)
    mask = vnm.select_mask(w.abs(), "16:2:4")
    t = VNMTensor.from_dense(w, mask, "16:2:4")
    assert t.to("cpu").device.type == "cpu"
    h = t.to(dtype=torch.bfloat16)
    assert h.dtype == torch.bfloat16
    assert torch.equal(h.to_dense(), masked(w, mask).to(torch.bfloat16))
    assert t.to(torch.bfloat16).dtype == torch.bfloat16  # positional dtype, as torch.Tensor.to
    assert t.to("cpu", torch.float16).dtype == torch.float16
    big = VNMTensor.from_dense(w * 1e6, mask, "16:2:4")
    with pytest.raises(ValueError, match="overflows"):
        big.to(dtype=torch.float16)
    with pytest.raises(ValueError, match="overflows"):
        big.to(torch.float16)  # the positional form runs the same checks
    with pytest.raises(TypeError, match="float32, torch.float16 and torch.bfloat16"):
        t.to(torch.float64)
    assert "64:2:8" not in repr(t) and "16:2:4" in repr(t)
