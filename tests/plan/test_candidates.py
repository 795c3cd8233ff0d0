"""Search candidates: parsing, families, bits with every scale counted, fit checks."""

import pytest

from mixq.plan import DEFAULT_CANDIDATES, KEEP_BITS, PlanError, candidate_named, parse_candidate, parse_candidates
from mixq.quant import bit_count


def test_default_candidates_parse_and_span_2_5_to_16_bits():
    cands = parse_candidates(DEFAULT_CANDIDATES)
    bits = [c.weight_bits((576, 1536)) / (576 * 1536) for c in cands]
    assert min(bits) == pytest.approx(2.5) and max(bits) == KEEP_BITS
    assert {c.family for c in cands} == {"int", "float", "keep"}


@pytest.mark.parametrize("text,family", [("int4:g64", "int"), ("mxint8", "int"), ("ternary:channel", "int"),
                                         ("mxfp4", "float"), ("nf4:g64", "float"), ("fp8_e4m3:channel", "float"),
                                         ("keep", "keep")])
def test_family(text, family):
    assert parse_candidate(text).family == family


def test_weight_bits_is_the_accounting_function():
    c = parse_candidate("nvfp4")
    assert c.weight_bits((64, 128)) == bit_count("nvfp4", (64, 128)).total
    assert parse_candidate("keep").weight_bits((3, 5)) == 16 * 15


def test_inputs_after_at_sign():
    c = parse_candidate("int8:channel@int8:token")
    assert str(c.spec.inputs) == "int8:token" and c.activation_bits == 8.0
    assert parse_candidate("int4:g64").activation_bits == KEEP_BITS


def test_fits_names_the_shape():
    c = parse_candidate("int4:g64")
    assert c.fits((8, 128)) is None
    assert "[8, 100]" in c.fits((8, 100))


@pytest.mark.parametrize("text,message", [("", "at least one"), (" , ", "at least one"),
                                          ("int4:g64,int4:g64", "repeats"), ("int4:g64@", "input spec after"),
                                          ("int4:g6x", "g64")])
def test_bad_lists(text, message):
    with pytest.raises(PlanError, match=message):
        parse_candidates(text)


def test_candidate_named_suggests():
    cands = parse_candidates("int4:g64,mxfp4,keep")
    assert candidate_named(cands, "mxfp4").name == "mxfp4"
    with pytest.raises(PlanError, match="close: int4:g64"):
        candidate_named(cands, "int4:g32")
