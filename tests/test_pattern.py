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


V_RULE = r"V must be a positive multiple of 16 \(the row tile of mma.sp\), at most 256; got V="
SYNTAX = (r"cannot parse pattern '{}': expected 'V:N:M' \(e.g. '64:2:8'\) or 'N:M' \(e.g. '2:4'\), "
          "integer fields separated by ':'")


@pytest.mark.parametrize(
    "text, message",
    [
        # each field of V:N:M names its own rule and the value it got
        ("0:2:8", rf"^pattern '0:2:8': {V_RULE}0$"),
        ("-16:2:8", rf"^pattern '-16:2:8': {V_RULE}-16$"),
        ("60:2:8", rf"^pattern '60:2:8': {V_RULE}60$"),
        ("272:2:8", rf"^pattern '272:2:8': {V_RULE}272$"),
        ("16:0:4", r"^pattern '16:0:4': V:N:M patterns need N == 2 \(.*\); got N=0$"),
        ("64:3:8", r"^pattern '64:3:8': V:N:M patterns need N == 2 \(.*\); got N=3$"),
        ("64:1:8", r"need N == 2 .*got N=1$"),
        ("16:2:0", r"^pattern '16:2:0': V:N:M patterns need 4 <= M <= 256 \(.*\); got M=0$"),
        ("64:2:3", r"need 4 <= M <= 256 .*got M=3$"),
        ("64:2:257", r"need 4 <= M <= 256 .*got M=257$"),
        # N:M
        ("4:4", r"^pattern '4:4': an N:M pattern needs 1 <= N < M; got N=4, M=4$"),
        ("5:4", r"needs 1 <= N < M; got N=5, M=4$"),
        ("0:4", r"^pattern '0:4': an N:M pattern needs 1 <= N < M; got N=0, M=4$"),
        ("-1:4", r"needs 1 <= N < M; got N=-1, M=4$"),
        # not a pattern at all
        ("a:b", "^" + SYNTAX.format("a:b") + "$"),
        ("2:4:", SYNTAX.format("2:4:")),
        ("", SYNTAX.format("")),
        ("1:2:3:4", SYNTAX.format("1:2:3:4")),
        ("2.5:4", SYNTAX.format(r"2\.5:4")),
        ("64 : 2 : 8", SYNTAX.format("64 : 2 : 8")),
        ("99999999999:4", SYNTAX.format("99999999999:4")),
    ],
)
def test_parse_rejects_with_the_rule(text, message):
    with pytest.raises(ValueError, match=message):
        Pattern.parse(text)


@pytest.mark.parametrize(
    "fields, message",
    [((-16, 2, 8), rf"^pattern '-16:2:8': {V_RULE}-16$"),
     ((60, 2, 8), rf"^pattern '60:2:8': {V_RULE}60$"),
     ((16, 3, 8), r"^pattern '16:3:8': .*got N=3$"),
     ((16, 2, 300), r"^pattern '16:2:300': .*got M=300$"),
     ((0, 0, 4), r"^pattern '0:4': an N:M pattern needs 1 <= N < M; got N=0, M=4$")],
)
def test_make_rejects_with_the_rule(fields, message):
    with pytest.raises(ValueError, match=message):
        Pattern.make(*fields)


def test_make_builds_patterns():
    assert Pattern.make(64, 2, 8) == Pattern.parse("64:2:8")
    assert Pattern.make(0, 2, 4) == Pattern.parse("2:4")  # V = 0: plain N:M


@pytest.mark.parametrize("text", [" 64:2:8", "64:2:8 ", "\t64:2:8\n", "  2:4  "])
def test_surrounding_whitespace_is_ignored(text):
    assert Pattern.parse(text) == Pattern.parse(text.strip())
    assert vnm.as_pattern(text) == Pattern.parse(text.strip())
    assert str(Pattern.parse(text)) == text.strip()


def test_as_pattern():
    assert vnm.as_pattern(" 64:2:8 ") == Pattern.parse("64:2:8")
    p = Pattern.parse("2:4")
    assert vnm.as_pattern(p) is p
    with pytest.raises(TypeError, match="string like '64:2:8'"):
        vnm.as_pattern(8)
    with pytest.raises(ValueError, match="needs 1 <= N < M; got N=4, M=2"):
        vnm.as_pattern("4:2")


def test_uncompressible_pattern_cannot_be_stored():
    w = torch.randn(16, 8)
    mask = vnm.select_mask(w.abs(), "4:8")
    with pytest.raises(ValueError, match="cannot be stored compressed"):
        vnm.VNMTensor.from_dense(w, mask, "4:8")


def test_pattern_equals_its_text_and_hashes_alike():
    p = vnm.Pattern.parse("64:2:8")
    assert p == "64:2:8" and p == " 64:2:8 " and p != "64:2:5" and p != "not a pattern" and p != 3
    assert vnm.Pattern.parse("2:4") == "2:4"
    assert hash(p) == hash(vnm.Pattern.parse("64:2:8"))
    assert {p: 1}[vnm.Pattern.parse("64:2:8")] == 1
