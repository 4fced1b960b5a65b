"""Tests for fastft.kernels.mrope: the multimodal rotary tables of Qwen2-VL / 2.5-VL / 3-VL (text and vision).

Semantics: the reference is the float64 formula and, with the column map fastft learns from each transformers
rotary module, bit for bit that module's output. Kernel: the interpreted Triton kernel equals the float64 tables
(of the same fp32 angles, as transformers rounds them) over property-based shapes, no worse than PyTorch in the same
dtype. There are no gradients to check: the tables are functions of integer positions and a frequency buffer (the
rotation that consumes them is fastft.kernels.rope, whose backward is tested there).
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fastft.kernels._spec import AuditCase
from fastft.kernels.mrope import _launch_config, _mrope_table_kernel, audit_cases, mrope_tables, mrope_tables_reference
from fastft.models.rotary import table_layout, table_positions
from fastft.models.tiny_vision_configs import tiny_vision_config
from tests.helpers import BACKENDS, DTYPES, assert_no_worse_than_torch, backend


def _float64_tables(positions, axis, inv_freq, scale):
    """cos, sin in float64 of the fp32 angles (the semantics: transformers rounds the angle once in fp32), column by
    column as the module docstring writes them."""
    n_rows, half = positions.shape[1], axis.shape[0]
    cos = torch.empty(n_rows, 2 * half, dtype=torch.float64)
    sin = torch.empty_like(cos)
    for j in range(half):
        angle = (positions[int(axis[j])].float() * inv_freq[j].float()).double()
        cos[:, j] = cos[:, j + half] = angle.cos() * scale
        sin[:, j] = sin[:, j + half] = angle.sin() * scale
    return cos, sin


def _case(n_rows, half, n_axes, layout, gen):
    positions = torch.randint(0, 8192, (n_axes, n_rows), generator=gen)
    if layout == "expanded":  # the language model's (B, T) positions broadcast to every axis: stride 0
        positions = positions[:1].expand(n_axes, -1)
    elif layout == "transposed":  # the vision tower's (N, A) positions read as (A, N)
        positions = positions.t().contiguous().t()
    elif layout == "strided":
        positions = torch.randint(0, 8192, (n_axes, 2 * n_rows), generator=gen)[:, ::2]
    axis = torch.randint(0, n_axes, (half,), generator=gen)
    inv_freq = 1.0 / (10000.0 ** (torch.rand(half, generator=gen, dtype=torch.float64))).float()
    return positions, axis, inv_freq


# ------------------------------------------------------------------------------------------------------
# Semantics
# ------------------------------------------------------------------------------------------------------


def test_reference_is_the_float64_formula():
    gen = torch.Generator().manual_seed(0)
    positions, axis, inv_freq = _case(23, 11, 3, "contiguous", gen)
    cos, sin = mrope_tables_reference(positions, axis, inv_freq.double(), 0.7, torch.float64)
    want_cos, want_sin = _float64_tables(positions, axis, inv_freq.double(), 0.7)
    # the reference multiplies in float64 here, the semantics in fp32: equal to the fp32 angle's rounding
    torch.testing.assert_close(cos, want_cos, rtol=0, atol=8192 * 2**-24)
    torch.testing.assert_close(sin, want_sin, rtol=0, atol=8192 * 2**-24)


@functools.cache
def _rotary_modules():
    """(name, module, positions) for each transformers rotary embedding the tables replace."""
    from transformers import AutoModelForImageTextToText

    out = []
    gen = torch.Generator().manual_seed(3)
    for model_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        config = tiny_vision_config(model_type)
        # Released sizes of the tables: head_dim 128, sections [16, 24, 24] (Qwen2/2.5-VL), [24, 20, 20] (Qwen3-VL)
        config.text_config.head_dim = 128
        config.text_config.rope_parameters["mrope_section"] = [24, 20, 20] if model_type == "qwen3_vl" else [16, 24, 24]
        model = AutoModelForImageTextToText.from_config(config)
        text = model.model.language_model.rotary_emb
        text.__init__(config.text_config)
        out.append((f"{model_type} text", text, torch.randint(0, 4096, (3, 2, 33), generator=gen)))
        out.append(
            (f"{model_type} vision", model.model.visual.rotary_pos_emb, torch.randint(0, 64, (45, 2), generator=gen))
        )
    return out


@pytest.mark.parametrize("index", range(6))
def test_reference_with_learned_layout_is_transformers_bit_for_bit(index):
    """The column map learned from each module's recomposition_frequencies, through the reference, gives the module's
    own tables exactly (the same fp32 angles, cos and sin elementwise; only the gather moved)."""
    name, module, positions = _rotary_modules()[index]
    layout = table_layout(module)
    assert layout is not None, name
    flat, lead = table_positions(layout, positions)
    x = torch.zeros(1, dtype=torch.bfloat16)
    want = module(x, positions)
    freq = module.inv_freq[layout.freq_index]
    dtype = torch.bfloat16 if "text" in name else torch.float32
    got = mrope_tables_reference(flat, layout.axis, freq, module.attention_scaling, dtype)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.view(*lead, -1), w), name


def test_learned_layouts_are_the_documented_ones():
    modules = {name: module for name, module, _ in _rotary_modules()}
    qwen2 = table_layout(modules["qwen2_vl text"])
    assert qwen2.axis.tolist() == [0] * 16 + [1] * 24 + [2] * 24 and qwen2.freq_index.tolist() == list(range(64))
    qwen3 = table_layout(modules["qwen3_vl text"])
    want = [1 if j % 3 == 1 and j < 60 else 2 if j % 3 == 2 and j < 60 else 0 for j in range(64)]
    assert qwen3.axis.tolist() == want
    vision = table_layout(modules["qwen2_vl vision"])
    quarter = vision.axis.numel() // 2
    assert vision.kind == "vision" and vision.axis.tolist() == [0] * quarter + [1] * quarter
    assert vision.freq_index.tolist() == list(range(quarter)) * 2


# ------------------------------------------------------------------------------------------------------
# Kernel and torch path vs float64, property-based
# ------------------------------------------------------------------------------------------------------


@st.composite
def _cases(draw):
    return {
        "n_rows": draw(st.one_of(st.integers(1, 70), st.sampled_from([127, 129, 257, 1025]))),
        "half": draw(st.one_of(st.integers(1, 70), st.sampled_from([40, 64, 127, 129]))),
        "n_axes": draw(st.integers(1, 4)),
        "layout": draw(st.sampled_from(["contiguous", "expanded", "transposed", "strided"])),
        "scale": draw(st.sampled_from([1.0, 0.5, 1.2])),
        "seed": draw(st.integers(0, 2**16)),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name", BACKENDS)
@settings(max_examples=20)
@example(case={"n_rows": 2048, "half": 64, "n_axes": 3, "layout": "expanded", "scale": 1.0, "seed": 1})
@example(case={"n_rows": 1, "half": 1, "n_axes": 1, "layout": "contiguous", "scale": 1.0, "seed": 2})
@given(case=_cases())
def test_tables_match_float64(backend_name, dtype, case):
    gen = torch.Generator().manual_seed(case["seed"])
    positions, axis, inv_freq = _case(case["n_rows"], case["half"], case["n_axes"], case["layout"], gen)
    with backend(backend_name):
        cos, sin = mrope_tables(positions, axis, inv_freq, case["scale"], dtype)
    torch_cos, torch_sin = mrope_tables_reference(positions, axis, inv_freq, case["scale"], dtype)
    exact = _float64_tables(positions, axis, inv_freq, case["scale"])
    for name, ours, theirs, want in (("cos", cos, torch_cos, exact[0]), ("sin", sin, torch_sin, exact[1])):
        assert not ours.requires_grad
        assert_no_worse_than_torch(ours, theirs, want, name=f"{name} {case}", ulps=4.0, scale=case["scale"])
        if dtype == torch.float32:  # an ulp or two of fp32 for values of size <= scale
            assert (ours.double() - want).abs().max().item() <= 4 * 2**-24 * case["scale"]


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_empty_and_float64(backend_name):
    gen = torch.Generator().manual_seed(4)
    positions, axis, inv_freq = _case(0, 8, 3, "contiguous", gen)
    with backend(backend_name):
        cos, sin = mrope_tables(positions, axis, inv_freq)
        assert cos.shape == sin.shape == (0, 16)
        positions, axis, inv_freq = _case(9, 8, 3, "contiguous", gen)
        cos64, _ = mrope_tables(positions, axis, inv_freq.double(), dtype=torch.float64)
    assert cos64.dtype == torch.float64


# ------------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda p, a, f: (p.float(), a, f), ValueError, "positions must be .axes, tokens. integers"),
        (lambda p, a, f: (p[None], a, f), ValueError, "flatten"),
        (lambda p, a, f: (p, a + 3, f), ValueError, "axis values must index the 3 position axes"),
        (lambda p, a, f: (p, a, f[:-1]), ValueError, "describe the H table columns"),
        (lambda p, a, f: (p, a, f.requires_grad_()), NotImplementedError, "inv_freq.detach"),
        (lambda p, a, f: (p.repeat(2, 1), a, f), ValueError, "1 to 4 position axes"),
    ],
)
def test_errors(change, error, match):
    gen = torch.Generator().manual_seed(5)
    args = change(*_case(5, 4, 3, "contiguous", gen))
    with pytest.raises(error, match=match):
        mrope_tables(*args)


# ------------------------------------------------------------------------------------------------------
# Audit cases
# ------------------------------------------------------------------------------------------------------


def test_audit_cases_follow_the_launch_heuristics():
    cases = {case.name: case for case in audit_cases()}
    assert set(cases) == {"mrope_tables[text]", "mrope_tables[vision]"}
    text = cases["mrope_tables[text]"]
    assert isinstance(text, AuditCase) and text.kernel is _mrope_table_kernel
    config = _launch_config(64)
    assert text.constexprs["BLOCK_N"] == config["BLOCK_N"] and text.constexprs["BLOCK_H"] == 64
    # read 3 x 8192 int64 positions and the 64-column map; write two (8192, 128) bf16 tables
    assert text.min_bytes == 8 * 3 * 8192 + 8 * 64 + 2 * 8192 * 128 * 2
    assert set(text.args) >= set(_mrope_table_kernel.arg_names)
