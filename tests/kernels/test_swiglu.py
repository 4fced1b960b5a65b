"""Tests for fastft.kernels.swiglu: semantics, kernel == float64 in every dtype and backend, edges, errors, memory.

Every result and gradient is compared with :func:`assert_no_worse_than_torch`: fastft's error against the
float64 answer (same low-precision inputs, upcast) may be at most 2x the error of transformers' formula
``ACT2FN["silu"](gate) * up`` run by PyTorch in the dtype under test, plus a few ulp of the largest value.
fp32 results are also held to 1e-5 relative of float64.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import example, given
from hypothesis import strategies as st
from transformers.activations import ACT2FN

from fastft.kernels._math import sigmoid_pair
from fastft.kernels.swiglu import (
    _launch_config,
    _swiglu_backward_kernel,
    _swiglu_forward_kernel,
    audit_cases,
    swiglu,
    swiglu_reference,
)
from fastft.utils.memory import SavedTensorMeter
from tests.helpers import BACKENDS, DTYPES, assert_no_worse_than_torch, backend

LAYOUTS = ("contiguous", "fused", "batched", "transposed")


def _pair(n_rows, width, layout, dtype, gen, gate_scale=3.0):
    """(gate, up), both requiring grad, in one of the layouts an MLP hands over.

    fused: Phi-3's ``gate_up.chunk(2, -1)`` (row stride 2 * width, read in place); batched: (2, rows, width);
    transposed: the last dimension is not contiguous (the function must copy, not misread).
    """

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    if layout == "fused":
        gate_up = torch.cat((rand(n_rows, width, scale=gate_scale), rand(n_rows, width)), dim=-1).requires_grad_()
        return gate_up.chunk(2, dim=-1)
    if layout == "batched":
        return rand(2, n_rows, width, scale=gate_scale).requires_grad_(), rand(2, n_rows, width).requires_grad_()
    if layout == "transposed":
        gate, up = rand(width, n_rows, scale=gate_scale).t(), rand(width, n_rows).t()
        return gate.requires_grad_(), up.requires_grad_()
    return rand(n_rows, width, scale=gate_scale).requires_grad_(), rand(n_rows, width).requires_grad_()


def _dgate_terms(gate, up, dy):
    """The size of the terms d gate = dy * up * (s + g * s * (1 - s)), s = sigmoid(g), is computed from: it
    cancels where silu' crosses 0 (g ~ -1.28), where no low-precision computation is accurate relative to
    d gate itself, only to |dy * up| * (|s| + |g s (1 - s)|)."""
    g = gate.detach().double()
    s = torch.sigmoid(g)
    return (dy.double() * up.detach().double()).abs() * (s + (g * s * (1 - s)).abs())


def _check(gate, up, backend_name, gen, name=""):
    """swiglu vs float64 and vs transformers' formula in the same dtype: out, d gate, d up (those that exist)."""
    with backend(backend_name):
        out = swiglu(gate, up)
    dy = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    inputs = [t for t in (gate, up) if t.requires_grad]
    grads = torch.autograd.grad(out, inputs, dy) if inputs else ()
    ref = ACT2FN["silu"](gate) * up
    ref_grads = torch.autograd.grad(ref, inputs, dy) if inputs else ()
    g64 = gate.detach().double().requires_grad_(gate.requires_grad)
    u64 = up.detach().double().requires_grad_(up.requires_grad)
    exact = swiglu_reference(g64, u64)
    exact_inputs = [t for t in (g64, u64) if t.requires_grad]
    exact_grads = torch.autograd.grad(exact, exact_inputs, dy.double()) if inputs else ()
    labels = [label for label, t in (("d gate", gate), ("d up", up)) if t.requires_grad]
    for label, ours, theirs, exact_value in zip(
        ["out", *labels], [out, *grads], [ref, *ref_grads], [exact, *exact_grads], strict=True
    ):
        assert ours.shape == exact_value.shape, f"{name} {label}: shape"
        terms = _dgate_terms(gate, up, dy) if label == "d gate" else exact_value.abs()
        scale = terms.max().item() if terms.numel() else None
        assert_no_worse_than_torch(ours, theirs, exact_value, name=f"{name} {label} [{backend_name}]", scale=scale)
        if ours.dtype == torch.float32 and exact_value.numel():
            assert (ours.double() - exact_value).abs().max().item() <= 1e-5 * scale + 1e-30, f"{label}: fp32 vs f64"
    return out, grads


# ------------------------------------------------------------------------------------------------------
# Semantics
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_is_transformers_silu_times_up(dtype):
    """swiglu_reference is, bit for bit, what LlamaMLP computes: ACT2FN["silu"](gate_proj(x)) * up_proj(x)."""
    gen = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(5, 37, generator=gen).to(dtype) for _ in range(2))
    assert torch.equal(swiglu_reference(gate, up), ACT2FN["silu"](gate) * up)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_float64_semantics_and_hand_derivatives(backend_name):
    """In float64 (torch path): out = g / (1 + e^-g) * u, and the docstring's derivatives equal autograd's."""
    gen = torch.Generator().manual_seed(1)
    g = (torch.randn(4, 33, generator=gen, dtype=torch.float64) * 4).requires_grad_()
    u = torch.randn(4, 33, generator=gen, dtype=torch.float64).requires_grad_()
    dy = torch.randn(4, 33, generator=gen, dtype=torch.float64)
    with backend(backend_name):
        out = swiglu(g, u)
    dg, du = torch.autograd.grad(out, (g, u), dy)
    formula = g / (1 + torch.exp(-g)) * u
    torch.testing.assert_close(out, formula, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(swiglu_reference(g, u), formula, rtol=1e-14, atol=1e-14)
    # the hand derivation: silu'(g) = sigma (1 + g (1 - sigma)); d gate = dy u silu'(g); d up = dy silu(g)
    ref_dg, ref_du = torch.autograd.grad(formula, (g, u), dy)
    sig = torch.sigmoid(g.detach())
    torch.testing.assert_close(ref_dg, dy * u.detach() * sig * (1 + g.detach() * (1 - sig)), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(ref_du, dy * g.detach() * sig, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(dg, ref_dg, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(du, ref_du, rtol=1e-13, atol=1e-13)


@triton.jit
def _sigmoid_pair_kernel(x_ptr, sig_ptr, one_minus_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    sig, one_minus = sigmoid_pair(tl.load(x_ptr + offsets, mask=mask, other=0.0))
    tl.store(sig_ptr + offsets, sig, mask=mask)
    tl.store(one_minus_ptr + offsets, one_minus, mask=mask)


def test_sigmoid_pair_is_accurate_and_stable():
    """sigma(x) and 1 - sigma(x) from the shared helper: a few ulp relative, no nan or inf for any finite x."""
    x = torch.cat((torch.linspace(-110, 110, 40001), torch.tensor([-3e38, -1e4, -1e-30, 0.0, 1e-30, 1e4, 3e38])))
    sig, one_minus = torch.empty_like(x), torch.empty_like(x)
    _sigmoid_pair_kernel[(triton.cdiv(x.numel(), 8192),)](x, sig, one_minus, x.numel(), BLOCK=8192)
    exact = torch.sigmoid(x.double())
    for ours, want in ((sig, exact), (one_minus, torch.sigmoid(-x.double()))):
        assert torch.isfinite(ours).all()
        normal = want > torch.finfo(torch.float32).tiny  # below that, fp32 has no relative precision to keep
        relative = ((ours.double() - want).abs() / want)[normal]
        assert relative.max().item() < 4 * torch.finfo(torch.float32).eps
        assert (ours.double() - want).abs().max().item() < torch.finfo(torch.float32).eps


# ------------------------------------------------------------------------------------------------------
# Kernel and torch path vs float64, property-based
# ------------------------------------------------------------------------------------------------------


@st.composite
def _cases(draw):
    return {
        "n_rows": draw(st.integers(1, 5)),
        # odd and tiny widths, and widths just past a power of two / the 2048-column block
        "width": draw(st.one_of(st.integers(1, 70), st.sampled_from([127, 129, 257, 1025, 2047, 2049, 4097]))),
        "layout": draw(st.sampled_from(LAYOUTS)),
        "seed": draw(st.integers(0, 2**16)),
    }


_EXTREMES = [
    {"n_rows": 1, "width": 1, "layout": "contiguous", "seed": 0},  # one element
    {"n_rows": 1, "width": 2049, "layout": "fused", "seed": 1},  # one row, one column past the block
    {"n_rows": 1, "width": 14336, "layout": "contiguous", "seed": 2},  # Llama-3-8B's intermediate size: 7 blocks
    {"n_rows": 3, "width": 4097, "layout": "fused", "seed": 3},  # fused halves, three column blocks
    {"n_rows": 5, "width": 257, "layout": "transposed", "seed": 4},  # non-contiguous last dimension
]


def _with_examples(test):
    for case in _EXTREMES:
        test = example(case=case)(test)
    return test


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name", BACKENDS)
@_with_examples
@given(case=_cases())
def test_swiglu_matches_float64(backend_name, dtype, case):
    gen = torch.Generator().manual_seed(case["seed"])
    gate, up = _pair(case["n_rows"], case["width"], case["layout"], dtype, gen)
    _check(gate, up, backend_name, gen, name=str(case))


# ------------------------------------------------------------------------------------------------------
# Edge cases
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_extreme_gates_are_finite_and_correct(backend_name, dtype):
    """gate = +-1e4 (and the sigmoid's saturation points): finite, correct outputs and gradients."""
    gen = torch.Generator().manual_seed(5)
    row = torch.tensor([-1e4, -1e3, -100.0, -88.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 88.0, 100.0, 1e3, 1e4])
    gate = torch.stack((row, -row)).to(dtype).requires_grad_()
    up = (torch.randn(gate.shape, generator=gen) * 0.5).to(dtype).requires_grad_()  # 1e4 * up fits in fp16
    out, (dgate, dup) = _check(gate, up, backend_name, gen, name="+-1e4")
    assert torch.isfinite(out).all() and torch.isfinite(dgate).all() and torch.isfinite(dup).all()


@pytest.mark.parametrize("shape", [(0, 64), (3, 0), (2, 0, 16)], ids=["0-rows", "0-cols", "0-batch"])
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_empty(backend_name, shape):
    gate = torch.randn(shape, dtype=torch.bfloat16, requires_grad=True)
    up = torch.randn(shape, dtype=torch.bfloat16, requires_grad=True)
    with backend(backend_name):
        out = swiglu(gate, up)
    assert out.shape == shape and out.dtype == torch.bfloat16
    out.sum().backward()
    assert gate.grad.shape == shape and up.grad.shape == shape


@pytest.mark.parametrize("frozen", ["gate", "up"])
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_frozen_input(backend_name, frozen):
    """One input with requires_grad=False: the other's gradient is still right, the frozen one gets none."""
    gen = torch.Generator().manual_seed(6)
    gate, up = _pair(3, 300, "contiguous", torch.bfloat16, gen)
    gate, up = (gate.detach(), up) if frozen == "gate" else (gate, up.detach())
    _check(gate, up, backend_name, gen, name=f"frozen {frozen}")
    with backend(backend_name):
        swiglu(gate, up).sum().backward()
    assert (gate.grad is None) == (frozen == "gate") and (up.grad is None) == (frozen == "up")


@pytest.mark.parametrize("layout", ["contiguous", "fused", "batched"])
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_saves_exactly_gate_and_up(backend_name, layout):
    """Autograd keeps gate and up themselves (views, no copies) and nothing else; the activation is not saved."""
    gen = torch.Generator().manual_seed(7)
    gate, up = _pair(4, 96, layout, torch.bfloat16, gen)
    with backend(backend_name), SavedTensorMeter() as meter:
        out = swiglu(gate, up)
    saved = out._base.grad_fn.saved_tensors  # out is a view of the Function's flat output
    assert len(saved) == 2 and len(meter.saved) == 2
    for kept, original in zip(saved, (gate, up), strict=True):
        assert kept.data_ptr() == original.data_ptr() and torch.equal(kept, original.reshape(kept.shape))
    storages = {gate.untyped_storage().data_ptr(): gate.untyped_storage().nbytes()}
    storages[up.untyped_storage().data_ptr()] = up.untyped_storage().nbytes()
    assert meter.total_bytes == sum(storages.values())  # fused: the one gate_up storage, counted once
    with SavedTensorMeter() as reference:  # transformers keeps silu(gate) as well
        ACT2FN["silu"](gate) * up
    assert reference.total_bytes > meter.total_bytes


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_inputs_and_grad_are_not_modified(backend_name):
    gen = torch.Generator().manual_seed(8)
    gate, up = _pair(3, 130, "fused", torch.float16, gen)
    dy = torch.randn(3, 130, generator=gen).half()
    before = [t.detach().clone() for t in (gate, up, dy)]
    with backend(backend_name):
        out = swiglu(gate, up)
    dgate, dup = torch.autograd.grad(out, (gate, up), dy)
    for now, then in zip((gate, up, dy), before, strict=True):
        assert torch.equal(now, then)
    assert dgate.data_ptr() not in (dy.data_ptr(), gate.data_ptr()) and dup.data_ptr() != dy.data_ptr()


# ------------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------------


def test_errors_name_the_problem():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"same shape.*gate \(2, 8\).*up \(2, 16\).*chunk\(2, dim=-1\)"):
        swiglu(x, torch.randn(2, 16))
    with pytest.raises(TypeError, match=r"same dtype.*torch.float32.*torch.bfloat16"):
        swiglu(x, x.bfloat16())
    with pytest.raises(TypeError, match=r"dtype torch.int32 is not supported.*float32, bfloat16, float16"):
        swiglu(x.int(), x.int())
    with pytest.raises(TypeError, match=r"up must be a torch.Tensor, got list"):
        swiglu(x, [1.0] * 8)
    with pytest.raises(ValueError, match=r"last \(feature\) dimension.*0-d"):
        swiglu(torch.tensor(1.0), torch.tensor(2.0))
    with pytest.raises(ValueError, match=r"gate is on cpu but up is on meta"):
        swiglu(x, torch.empty(2, 8, device="meta"))


# ------------------------------------------------------------------------------------------------------
# Audit cases
# ------------------------------------------------------------------------------------------------------


def test_audit_cases_follow_the_launch_heuristics():
    cases = {case.name: case for case in audit_cases()}
    block, num_warps = _launch_config(14336)
    tensor_bytes = 8192 * 14336 * 2
    assert cases["swiglu_forward"].kernel is _swiglu_forward_kernel
    assert cases["swiglu_backward"].kernel is _swiglu_backward_kernel
    assert cases["swiglu_forward"].min_bytes == 3 * tensor_bytes  # read gate, up; write out
    assert cases["swiglu_backward"].min_bytes == 5 * tensor_bytes  # read gate, up, dy; write d gate, d up
    for case in cases.values():
        assert case.constexprs["BLOCK"] == block and case.num_warps == num_warps
