import pickle

import pytest
import torch

import vnm
from vnm import Pattern


@pytest.mark.parametrize(
    "text, V, N, M",
    [("64:2:8", 64, 2, 8), ("16:2:4", 16, 2, 4), ("256:2:256", 256, 2, 256), ("128:2:5", 128, 2, 5),
     ("2:4", None, 2, 4), ("1:4", None, 1, 4), ("4:8", None, 4, 8), ("3:7", None, 3, 7)],
)
def test_parse_fields_and_text(text, V, N, M):
    p = Pattern.parse(text)
    assert (p.V, p.N, p.M) == (V, N, M)
    assert str(p) == text
    assert p.density == pytest.approx(N / M)
    assert p.sparsity == pytest.approx(1 - N / M)
    assert Pattern.parse(str(p)) == p
    assert hash(Pattern.parse(text)) == hash(p)
    assert pickle.loads(pickle.dumps(p)) == p


def test_compressible_patterns():
    assert Pattern.parse("64:2:8").compressible
    assert Pattern.parse("2:4").compressible
    assert not Pattern.parse("4:8").compressible
    assert not Pattern.parse("1:4").compressible
    assert Pattern.parse("2:4").row_block == 16
    assert Pattern.parse("128:2:8").row_block == 128


@pytest.mark.parametrize(
    "text, message",
    [
        ("64:3:8", "need N == 2"),
        ("64:1:8", "need N == 2"),
        ("64:2:3", "4 <= M <= 256"),
        ("64:2:257", "4 <= M <= 256"),
        ("60:2:8", "multiple of 16"),
        ("272:2:8", "multiple of 16 up to 256"),
        ("4:4", "1 <= N < M"),
        ("5:4", "1 <= N < M"),
        ("0:4", "positive integers"),
        ("-1:4", "positive integers"),
        ("a:b", "cannot parse"),
        ("2:4:", "cannot parse"),
        ("", "cannot parse"),
        ("1:2:3:4", "cannot parse"),
        ("2.5:4", "cannot parse"),
    ],
)
def test_parse_rejects_with_the_rule(text, message):
    with pytest.raises(ValueError, match=message):
        Pattern.parse(text)


def test_as_pattern():
    assert vnm.as_pattern(" 64:2:8 ") == Pattern.parse("64:2:8")
    p = Pattern.parse("2:4")
    assert vnm.as_pattern(p) is p
    with pytest.raises(TypeError, match="string like '64:2:8'"):
        vnm.as_pattern(8)


def test_uncompressible_pattern_cannot_be_stored():
    w = torch.randn(16, 8)
    mask = vnm.select_mask(w.abs(), "4:8")
    with pytest.raises(ValueError, match="cannot be stored compressed"):
        vnm.VNMTensor.from_dense(w, mask, "4:8")
