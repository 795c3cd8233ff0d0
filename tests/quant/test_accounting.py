"""Bit accounting: elements, every block scale, zero points and tensor scales are counted."""

from __future__ import annotations

import math

import pytest
import torch

from mixq import QuantSpec, bit_count, bits_per_value, quantize
from mixq.formats import get
from mixq.quant import GroupSizeError


def test_int4_g64():
    c = bit_count("int4:g64", (256, 512))
    numel = 256 * 512
    assert (c.numel, c.elements, c.scales) == (numel, 4 * numel, 32 * numel / 64)
    assert (c.zero_points, c.tensor_scale) == (0, 0)
    assert c.total == 4.5 * numel and c.per_value == 4.5 and c.bytes == 4.5 * numel / 8
    assert bits_per_value("int4:g64", (256, 512)) == 4.5


def test_asymmetric_adds_zero_points_in_the_element_width():
    c = bit_count("int4:g64:asym", (256, 512))
    assert c.zero_points == 4 * 256 * 512 / 64
    assert c.per_value == 4 + (32 + 4) / 64
    assert bits_per_value("uint8:channel:asym", (16, 128)) == 8 + (32 + 8) / 128


@pytest.mark.parametrize("shape", [(3, 5), (128, 64), (7,), (2, 3, 4)])
def test_per_tensor_scale(shape):
    numel = math.prod(shape)
    assert bits_per_value("fp8_e4m3", shape) == 8 + 32 / numel
    assert bits_per_value("int8", shape) == 8 + 32 / numel
    assert bits_per_value("ternary", shape) == pytest.approx(1.6 + 32 / numel, abs=1e-12)


@pytest.mark.parametrize("shape", [(16, 64), (4, 16), (2, 3, 32)])
def test_nvfp4_counts_the_tensor_scale(shape):
    numel = math.prod(shape)
    c = bit_count("nvfp4", shape)
    assert c.tensor_scale == 32 and c.scales == 8 * numel / 16
    assert c.per_value == 4.5 + 32 / numel
    assert bits_per_value("nvint4", shape) == 4.5 + 32 / numel
    assert bits_per_value("int4:g16:fp8_e4m3:ts=bf16", shape) == 4.5 + 16 / numel


@pytest.mark.parametrize("spec,bits", [("mxfp4", 4.25), ("mxfp6_e3m2", 6.25), ("mxfp6_e2m3", 6.25),
                                       ("mxfp8_e4m3", 8.25), ("mxfp8_e5m2", 8.25), ("mxint8", 8.25),
                                       ("int4:g32:e8m0", 4.25), ("int4:g32:fp16", 4.5),
                                       ("int4:g32:bf16", 4.5),
                                       ("int4:g32:ue5m3", 4.25), ("int4:g32:ue4m3", 4 + 7 / 32),
                                       ("ternary:g64", 1.6 + 0.5), ("nf4:g64", 4.5), ("binary:g32", 2.0),
                                       ("int3:g32:asym", 3 + 35 / 32),
                                       ("mxfp4:sr", 4.25), ("mxfp4:mse", 4.25), ("int4:g32:p99.9", 5.0)])
def test_bits_per_value_table(spec, bits):
    assert bits_per_value(spec, (64, 256)) == pytest.approx(bits, abs=1e-12)


@pytest.mark.parametrize("spec,shape,bits", [("int4:channel", (128, 64), 4 + 32 / 64),
                                             ("int4:channel@1", (128, 64), 4 + 32 / 128),
                                             ("int4:token", (2, 8, 64), 4 + 32 / 64),
                                             ("int4:b16x16", (32, 32), 4 + 32 / 256),
                                             ("int4:g16@0", (64, 8), 4 + 32 / 16)])
def test_granularities(spec, shape, bits):
    assert bits_per_value(spec, shape) == bits


def test_formats_and_specs_are_accepted():
    assert bits_per_value(get("mxfp4"), (4, 64)) == 4.25
    assert bits_per_value(get("int8"), (10,)) == 8 + 3.2
    assert bits_per_value(QuantSpec.parse("int4:g64"), (256, 512)) == 4.5


@pytest.mark.parametrize("spec", ["int4:g32", "int4:g32:asym", "nvfp4", "mxfp4", "ternary:channel",
                                  "fp8_e4m3",
                                  "int4:b4x8:fp16", "int4:g16:fp8_e4m3:ts"])
def test_count_matches_what_quantize_stores(spec):
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    qt = quantize(x, spec)
    s = qt.spec
    stored = qt.codes.numel() * s.format.bits + qt.scale_codes.numel() * s.scale.format.bits
    if qt.zero_points is not None:
        stored += qt.zero_points.numel() * s.format.bits
    if qt.tensor_scale is not None:
        stored += s.scale.tensor_scale.bits
    assert bit_count(spec, x.shape).total == pytest.approx(stored, abs=1e-9)


def test_refuses_shapes_that_do_not_fit():
    with pytest.raises(GroupSizeError):
        bit_count("int4:g128", (64, 576))


def test_empty_tensor():
    c = bit_count("int4:g64", (0, 64))
    assert c.total == 0 and c.per_value == 0.0
