"""Tests for fastft.kernels.nf4: bit-exact against bitsandbytes, both backends, NF4Weight, errors, audit cases.

The oracle is ``bitsandbytes.functional.dequantize_4bit`` on CPU. fastft computes bitsandbytes' formula
with the same fp32 operations in the same order, so every comparison is ``torch.equal`` (bit for bit): no
tolerance. One caveat about the oracle itself (bitsandbytes 0.50.2, AVX-512 CPU): its native CPU kernel
returns wrong values for a 2-D weight whose rows do not hold whole blocks (e.g. 64 x 64 with blocksize 128;
its own pure-torch backend and its 1-D path agree with each other and with fastft). Quantisation only sees
the flattened weight (a 2-D and a flattened weight give identical bytes and absmax), so the oracle
dequantises the flat weight and reshapes; 2-D calls are compared directly where rows hold whole blocks.
"""

from __future__ import annotations

import ast
import copy
import functools
import math
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch

import fastft.kernels.nf4 as nf4_module
from fastft.kernels import NF4Weight, dequantize_nf4, dequantize_nf4_reference
from fastft.kernels.nf4 import _dequantize_nf4_kernel, _launch_config, audit_cases
from tests.helpers import BACKENDS, DTYPES, backend

# Shapes: one element; odd numel (a padding nibble); rows that split blocks; rows of whole blocks; and one
# spanning several programs (4096 outputs each) with a ragged end and more than 256 blocks at blocksize 64,
# so the nested absmax uses two state2 blocks.
SHAPES = [(1, 1), (7, 33), (3, 40), (4, 256), (97, 201)]


def _quantize(shape, blocksize, quant_type, nested, dtype, seed=0):
    """A bitsandbytes-quantised weight with scales that vary by row (so that blocks differ), and its state."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=gen) * torch.rand(shape[0], 1, generator=gen).mul(4).add(0.1)
    return bnbf.quantize_4bit(weight.to(dtype), blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)


def _bnb_dequantize(packed, quant_state):
    """bitsandbytes' dequantisation of the flattened weight, reshaped (see the module docstring)."""
    flat = copy.copy(quant_state)
    flat.shape = torch.Size((math.prod(quant_state.shape),))
    # Odd sizes take bitsandbytes' torch.compile'd fallback; run it eagerly (same ops, no compile time).
    with torch.compiler.set_stance("force_eager"):
        return bnbf.dequantize_4bit(packed, flat).reshape(tuple(quant_state.shape))


@functools.cache
def _case(shape, blocksize, quant_type, nested, dtype, seed=0):
    """(packed, quant_state, bitsandbytes' dequantisation), shared by both backends' tests (never mutated)."""
    packed, state = _quantize(shape, blocksize, quant_type, nested, dtype, seed)
    return packed, state, _bnb_dequantize(packed, state)


def _assert_bit_equal(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(actual, expected), f"max difference {(actual.double() - expected.double()).abs().max():.3e}"


# ----------------------------------------------------------------------------------------------------
# Against bitsandbytes
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
def test_matches_bitsandbytes_bit_for_bit(blocksize, quant_type, nested, dtype, backend_name):
    for seed, shape in enumerate(SHAPES):
        packed, state, expected = _case(shape, blocksize, quant_type, nested, dtype, seed)
        with backend(backend_name):
            _assert_bit_equal(dequantize_nf4(packed, state), expected)
        _assert_bit_equal(dequantize_nf4_reference(packed, state), expected)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("blocksize", [32, 512, 1024, 2048, 4096])
def test_other_blocksizes(blocksize, backend_name):
    # 4096-element blocks fill a whole program; 32 makes 128 blocks per program.
    for nested in (True, False):
        packed, state, expected = _case((9, 1000), blocksize, "nf4", nested, torch.bfloat16)
        with backend(backend_name):
            _assert_bit_equal(dequantize_nf4(packed, state), expected)


@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain"])
def test_matches_bitsandbytes_2d_call_where_rows_hold_whole_blocks(nested):
    packed, state = _quantize((24, 192), 64, "nf4", nested, torch.bfloat16)
    expected = bnbf.dequantize_4bit(packed, state)
    for backend_name in BACKENDS:
        with backend(backend_name):
            _assert_bit_equal(dequantize_nf4(packed, state), expected)


def test_reference_is_the_formula_in_float64():
    # An independent decode (Python bit twiddling per element, float64 arithmetic) of the documented format:
    # element j is the high nibble of byte j // 2 when j is even; scale = code2[u8] * absmax2 + offset.
    shape, blocksize = (5, 27), 32
    packed, state = _quantize(shape, blocksize, "nf4", True, torch.float32)
    data, code = packed.reshape(-1).tolist(), state.code.double()
    products = [
        state.state2.code.double()[int(u)] * state.state2.absmax.double()[b // state.state2.blocksize]
        for b, u in enumerate(state.absmax.tolist())
    ]
    offset = state.offset.double().item()
    n = math.prod(shape)
    codes = torch.stack([code[(data[j // 2] >> 4) if j % 2 == 0 else (data[j // 2] & 15)] for j in range(n)])
    product = torch.tensor([products[j // blocksize] for j in range(n)], dtype=torch.float64)
    exact = (codes * (product + offset)).reshape(shape)
    ours = dequantize_nf4_reference(packed, state).double()
    # fp32 rounds three times (u = 2^-24 each): the product (error u |p|, passed on through + offset and
    # * code), the scale p + offset (u |scale|) and the result (u |result|). The scale can be much smaller
    # than p (the offset cancels it), so the bound is in terms of |p|, not relative to the result.
    u = 2.0**-24
    bound = (codes.abs() * u * (product.abs() + 2 * (product + offset).abs())).reshape(shape) * (1 + 4 * u)
    assert ((ours - exact).abs() <= bound).all()


# ----------------------------------------------------------------------------------------------------
# A real Linear4bit, quant_storage, out=, alignment
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16])
def test_linear4bit_weight(quant_storage, backend_name):
    torch.manual_seed(0)
    linear = bnb.nn.Linear4bit(
        192, 40, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", quant_storage=quant_storage
    )
    linear = linear.to(torch.bfloat16).to("cpu")  # bitsandbytes quantises on the move to a device
    weight = NF4Weight.from_bnb(linear.weight)
    assert weight.shape == torch.Size((40, 192)) and weight.dtype == torch.bfloat16
    assert weight.device == torch.device("cpu")
    assert weight.packed.data_ptr() == linear.weight.data_ptr()  # wrapped, not copied
    with backend(backend_name):
        dense = weight.dequantize()
    _assert_bit_equal(dense, bnbf.dequantize_4bit(linear.weight.data, linear.weight.quant_state))
    # It is the weight the module multiplies by: bitsandbytes' own forward on CPU dequantises and calls
    # F.linear in bf16, so the same bf16 matmul on fastft's weight gives the same result.
    x = torch.randn(3, 192, dtype=torch.bfloat16)
    with torch.compiler.set_stance("force_eager"):
        _assert_bit_equal(torch.nn.functional.linear(x, dense), linear(x))


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_out_buffer_sets_the_output_dtype(out_dtype, backend_name):
    # A bf16 state written into an out of any dtype: the fp32 values rounded once to out's dtype (never via
    # bf16), i.e. what bitsandbytes gives for a state whose dtype is out's.
    packed, state, _ = _case((6, 100), 64, "nf4", True, torch.bfloat16)
    as_out_dtype = copy.copy(state)
    as_out_dtype.dtype = out_dtype
    out = torch.full((6, 100), float("nan"), dtype=out_dtype)
    with backend(backend_name):
        result = dequantize_nf4(packed, state, out=out)
    assert result is out
    _assert_bit_equal(out, _bnb_dequantize(packed, as_out_dtype))


def test_packed_view_at_an_unaligned_offset():
    # The kernel reads int32 words; a packed view that starts mid-word takes the padded-copy path.
    packed, state = _quantize((5, 64), 64, "nf4", True, torch.bfloat16)
    buffer = torch.cat((torch.zeros(1, dtype=torch.uint8), packed.reshape(-1)))
    shifted = buffer[1:]
    assert shifted.data_ptr() % 4 != 0
    with backend("triton"):
        _assert_bit_equal(dequantize_nf4(shifted, state), _bnb_dequantize(packed, state))


# ----------------------------------------------------------------------------------------------------
# NF4Weight
# ----------------------------------------------------------------------------------------------------


def test_nf4weight_interface():
    packed, state = _quantize((12, 64), 64, "fp4", False, torch.float16)
    weight = NF4Weight(packed, state)
    assert isinstance(weight.shape, torch.Size) and weight.shape == (12, 64)
    assert weight.dtype == torch.float16 and weight.device == packed.device
    first, second = weight.dequantize(), weight.dequantize()
    assert first.data_ptr() != second.data_ptr()  # rebuilt on every call, never cached
    assert not first.requires_grad
    _assert_bit_equal(first, _bnb_dequantize(packed, state))
    assert repr(weight) == (
        "NF4Weight(shape=(12, 64), dtype=torch.float16, device=cpu, quant_type='fp4', blocksize=64, not nested)"
    )


def test_nf4weight_errors():
    linear = bnb.nn.Linear4bit(64, 8, bias=False, quant_type="nf4")  # not moved: not quantised yet
    with pytest.raises(ValueError, match="no quant_state, so it is not quantised"):
        NF4Weight.from_bnb(linear.weight)
    packed, state = _quantize((8, 64), 64, "nf4", True, torch.float32)
    flat = copy.copy(state)
    flat.shape = torch.Size((512,))
    with pytest.raises(ValueError, match=r"2-D \(out_features, in_features\), got quant_state.shape \(512,\)"):
        NF4Weight(packed, flat)
    with pytest.raises(ValueError, match="packed holds 1024 bytes"):
        NF4Weight(torch.zeros(1024, dtype=torch.uint8), state)


# ----------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------


def _state_with(**changes):
    packed, state = _quantize((4, 64), 64, "nf4", True, torch.bfloat16)
    state = copy.copy(state)
    for name, value in changes.items():
        setattr(state, name, value)
    return packed, state


class _NoAbsmax:
    shape, dtype, blocksize, quant_type, code, state2 = (4, 64), torch.float32, 64, "nf4", torch.zeros(16), None


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: ([1, 2], _state_with()[1]), TypeError, "packed must be a torch.Tensor"),
        (lambda: (torch.randn(4, 64), _state_with()[1]), ValueError, r"packed holds 1024 bytes .* needs 128"),
        (lambda: _state_with(quant_type="int4"), NotImplementedError, "quant_type 'int4' is not supported"),
        (lambda: _state_with(dtype=torch.float64), TypeError, "dtype must be float32, bfloat16 or float16"),
        (lambda: _state_with(blocksize=48), ValueError, "blocksize must be one of"),
        (lambda: _state_with(absmax=torch.zeros(3, dtype=torch.uint8)), ValueError, "absmax must have .* = 4"),
        (lambda: _state_with(absmax=torch.zeros(4)), TypeError, "nested quant_state.absmax must hold uint8"),
        (lambda: _state_with(code=torch.zeros(8)), ValueError, "code must be a floating-point table of 16"),
        (lambda: _state_with(code=torch.zeros(16, device="meta")), ValueError, "code is on meta"),
        (lambda: _state_with(offset=0.5), ValueError, "offset must be a one-element tensor"),
        (lambda: _state_with(shape=None), ValueError, "shape must be a tuple of sizes"),
        (lambda: (torch.zeros(128, dtype=torch.uint8), _NoAbsmax()), TypeError, "no attribute 'absmax'"),
        (
            lambda: (torch.zeros(128, 2, dtype=torch.bfloat16)[:, 0], _state_with()[1]),
            ValueError,
            "non-contiguous torch.bfloat16",
        ),
    ],
)
def test_bad_input_raises_clear_error(make, error, match):
    packed, state = make()
    with pytest.raises(error, match=match):
        dequantize_nf4(packed, state)


@pytest.mark.parametrize(
    "out,error,match",
    [
        (torch.empty(64, 4), ValueError, r"shape \(4, 64\), got torch.float32 \(64, 4\)"),
        (torch.empty(4, 64, dtype=torch.float64), ValueError, "float32/bfloat16/float16 tensor"),
        (torch.empty(64, 4).t(), ValueError, "out must be contiguous"),
        ("buffer", TypeError, "out must be a torch.Tensor or None"),
    ],
)
def test_bad_out_raises_clear_error(out, error, match):
    packed, state = _state_with()
    with pytest.raises(error, match=match):
        dequantize_nf4(packed, state, out=out)


def test_kernel_module_does_not_import_bitsandbytes():
    tree = ast.parse(Path(nf4_module.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(name.split(".")[0] == "bitsandbytes" for name in imported)


def test_audit_cases_follow_the_launch_heuristics():
    cases = {case.name: case for case in audit_cases()}
    assert set(cases) == {
        "dequantize_nf4_4096x4096_nested",
        "dequantize_nf4_14336x4096_nested",
        "dequantize_nf4_14336x4096",
    }
    words, num_warps = _launch_config(64)
    for case in cases.values():
        assert case.kernel is _dequantize_nf4_kernel and case.num_warps == num_warps
        assert case.constexprs["WORDS"] == words and case.constexprs["BLOCKSIZE"] == 64
    n = 4096 * 4096
    # packed n/2 + bf16 out 2n + one absmax code per 64 + 4 bytes per 256 blocks + the two code tables + offset
    assert cases["dequantize_nf4_4096x4096_nested"].min_bytes == n // 2 + 2 * n + n // 64 + 4 * n // 64 // 256 + 1092
    n = 14336 * 4096
    assert cases["dequantize_nf4_14336x4096"].min_bytes == n // 2 + 2 * n + 4 * n // 64 + 64
