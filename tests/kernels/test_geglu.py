"""Tests for fastft.kernels.geglu (both GELUs) and the erf / normal-CDF helpers it is built on.

Every result and gradient is compared with :func:`assert_no_worse_than_torch`: fastft's error against the
float64 answer (same low-precision inputs, upcast) may be at most 2x the error of transformers' formula
``ACT2FN["gelu"](gate) * up`` (or ``["gelu_pytorch_tanh"]``) run by PyTorch in the dtype under test, plus
a few ulp of the largest value. fp32 results are also held to 1e-5 relative of float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import example, given
from hypothesis import strategies as st
from transformers.activations import ACT2FN

from fastft.kernels._math import erf, normal_cdf_pdf
from fastft.kernels.geglu import (
    _geglu_backward_kernel,
    _geglu_forward_kernel,
    _launch_config,
    audit_cases,
    geglu,
    geglu_reference,
)
from fastft.utils.memory import SavedTensorMeter
from tests.helpers import BACKENDS, DTYPES, assert_no_worse_than_torch, backend

APPROXIMATIONS = ("none", "tanh")
TRANSFORMERS_NAME = {"none": "gelu", "tanh": "gelu_pytorch_tanh"}
LAYOUTS = ("contiguous", "fused", "batched", "transposed")


def _pair(n_rows, width, layout, dtype, gen, gate_scale=3.0):
    """(gate, up), both requiring grad, in one of the layouts an MLP hands over.

    fused: ``gate_up.chunk(2, -1)`` (row stride 2 * width, read in place); batched: (2, rows, width);
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


def _float64_cdf(gate, approximate):
    """The float64 CDF factor of GELU (gelu(g) = g * cdf(g)), written so it does not cancel in the lower tail.
    torch's float64 GELU computes (1 + tanh(y)) / 2 and (1 + erf(x / sqrt 2)) / 2, which lose all digits below
    x ~ -7 (float64's tanh rounds to -1, 1 + erf cancels); the same numbers are sigmoid(2y) and
    erfc(-x / sqrt 2) / 2, accurate there — as the kernels compute them."""
    if approximate == "tanh":
        return torch.sigmoid(2 * math.sqrt(2 / math.pi) * (gate + 0.044715 * gate**3))
    return 0.5 * torch.special.erfc(-gate / math.sqrt(2))


def _float64_geglu(gate, up, approximate):
    return gate * _float64_cdf(gate, approximate) * up


def _term_scales(gate, up, dy, approximate):
    """The size of the terms each result is computed from. d gate = dy * up * (cdf(g) + g * cdf'(g)) cancels
    where gelu' crosses 0 (g ~ -0.75): there no computation in a low precision is accurate relative to d gate
    itself, only to |dy * up| * (|cdf| + |g cdf'|). out and d up are products: their own size."""
    g = gate.detach().double().requires_grad_()
    cdf = _float64_cdf(g, approximate)
    (dcdf,) = torch.autograd.grad(cdf.sum(), g)
    g = g.detach()
    return (dy.double() * up.detach().double()).abs() * (cdf.detach().abs() + (g * dcdf).abs())


def _check(gate, up, approximate, backend_name, gen, name=""):
    """geglu vs float64 and vs transformers' formula in the same dtype: out, d gate, d up (those that exist)."""
    with backend(backend_name):
        out = geglu(gate, up, approximate)
    dy = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    inputs = [t for t in (gate, up) if t.requires_grad]
    grads = torch.autograd.grad(out, inputs, dy) if inputs else ()
    ref = ACT2FN[TRANSFORMERS_NAME[approximate]](gate) * up
    ref_grads = torch.autograd.grad(ref, inputs, dy) if inputs else ()
    g64 = gate.detach().double().requires_grad_(gate.requires_grad)
    u64 = up.detach().double().requires_grad_(up.requires_grad)
    exact = _float64_geglu(g64, u64, approximate)
    exact_inputs = [t for t in (g64, u64) if t.requires_grad]
    exact_grads = torch.autograd.grad(exact, exact_inputs, dy.double()) if inputs else ()
    labels = [label for label, t in (("d gate", gate), ("d up", up)) if t.requires_grad]
    dgate_terms = _term_scales(gate, up, dy, approximate)
    for label, ours, theirs, exact_value in zip(
        ["out", *labels], [out, *grads], [ref, *ref_grads], [exact, *exact_grads], strict=True
    ):
        assert ours.shape == exact_value.shape, f"{name} {label}: shape"
        # GELU is a chain of about eight fp32 roundings (the cubic or erf polynomial, exp, a reciprocal, three
        # products), and so is torch's formula: on a tensor of one or two elements either can land anywhere in
        # that range, so the floor is 8 roundings of the largest value instead of the default 4. On large
        # tensors the 2x-torch term decides (measured on 1M elements: fastft's max error 1.5x torch's).
        terms = dgate_terms if label == "d gate" else exact_value.abs()
        scale = terms.max().item() if terms.numel() else None
        assert_no_worse_than_torch(
            ours, theirs, exact_value, name=f"{name} {approximate} {label} [{backend_name}]", ulps=8.0, scale=scale
        )
        if ours.dtype == torch.float32 and exact_value.numel():
            assert (ours.double() - exact_value).abs().max().item() <= 1e-5 * scale + 1e-30, f"{label}: fp32 vs f64"
    return out, grads


# ------------------------------------------------------------------------------------------------------
# Semantics
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_is_transformers_gelu_times_up(dtype, approximate):
    """geglu_reference is, bit for bit, what GemmaMLP computes: ACT2FN[hidden_act](gate_proj(x)) * up_proj(x)."""
    gen = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(5, 37, generator=gen).to(dtype) for _ in range(2))
    assert torch.equal(geglu_reference(gate, up, approximate), ACT2FN[TRANSFORMERS_NAME[approximate]](gate) * up)


def _hand_gelu_and_derivative(g, approximate):
    """The module docstring's formulas, written with erf / tanh (not the kernel's sigmoid form), float64."""
    if approximate == "none":
        cdf = 0.5 * (1 + torch.erf(g / math.sqrt(2)))
        return g * cdf, cdf + g * torch.exp(-0.5 * g * g) / math.sqrt(2 * math.pi)
    k = math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)
    dk = math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * g**2)
    t = torch.tanh(k)
    return 0.5 * g * (1 + t), 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * dk


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_float64_semantics_and_hand_derivatives(backend_name, approximate):
    """In float64 (torch path): out = the textbook GELU times up, and the docstring's derivatives are autograd's."""
    gen = torch.Generator().manual_seed(1)
    g = (torch.randn(4, 33, generator=gen, dtype=torch.float64) * 4).requires_grad_()
    u = torch.randn(4, 33, generator=gen, dtype=torch.float64).requires_grad_()
    dy = torch.randn(4, 33, generator=gen, dtype=torch.float64)
    gelu, dgelu = _hand_gelu_and_derivative(g.detach(), approximate)
    with backend(backend_name):
        out = geglu(g, u, approximate)
    dg, du = torch.autograd.grad(out, (g, u), dy)
    ref = geglu_reference(g, u, approximate)
    ref_dg, ref_du = torch.autograd.grad(ref, (g, u), dy)
    for ours, want in ((ref, gelu * u), (out, gelu * u), (ref_dg, dy * u * dgelu), (dg, dy * u * dgelu),
                       (ref_du, dy * gelu), (du, dy * gelu)):  # fmt: skip
        torch.testing.assert_close(ours.detach(), want.detach(), rtol=1e-13, atol=1e-13)
    if approximate == "tanh":  # transformers' Python formulation of the same function (Gemma's gelu_pytorch_tanh)
        torch.testing.assert_close(ACT2FN["gelu_python_tanh"](g.detach()) * u.detach(), gelu * u.detach())


@triton.jit
def _erf_cdf_kernel(x_ptr, erf_ptr, cdf_ptr, pdf_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    cdf, pdf = normal_cdf_pdf(x)
    tl.store(erf_ptr + offsets, erf(x), mask=mask)
    tl.store(cdf_ptr + offsets, cdf, mask=mask)
    tl.store(pdf_ptr + offsets, pdf, mask=mask)


def _erf_cdf(x):
    outputs = [torch.empty_like(x) for _ in range(3)]
    _erf_cdf_kernel[(triton.cdiv(x.numel(), 16384),)](x, *outputs, x.numel(), BLOCK=16384)
    return outputs


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter squares 3e38
def test_erf_is_fp32_accurate():
    """The libdevice-free erf: |error| < 1.5e-7 against float64 (2.5 fp32 ulp near 1), odd, +-1 at the ends."""
    x = torch.cat((
        torch.linspace(-7, 7, 140001),  # across the 0.875 split between the two approximations
        torch.logspace(-30, 0.5, 2001), -torch.logspace(-30, 0.5, 2001),
        torch.tensor([0.0, 0.875, -0.875, 1e4, -1e4, 3e38, -3e38, math.inf, -math.inf]),
    ))  # fmt: skip
    ours, _, _ = _erf_cdf(x)
    exact = torch.erf(x.double())
    assert (ours.double() - exact).abs().max().item() < 1.5e-7
    tiny = x.abs() < 1e-3  # near 0, erf(x) ~ 2x/sqrt(pi): relative accuracy too
    assert ((ours.double() - exact) / exact).abs()[tiny & (x != 0)].max().item() < 2.5e-7
    assert torch.equal(_erf_cdf(-x)[0], -ours)
    assert ours[-6:].tolist() == [1.0, -1.0, 1.0, -1.0, 1.0, -1.0]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_normal_cdf_and_pdf_are_accurate_in_the_tails():
    """Phi to 1.5e-7 absolute everywhere and 1e-5 relative down to Phi(-12) ~ 2e-33; phi likewise; no nan."""
    x = torch.cat((torch.linspace(-12, 9, 210001), torch.tensor([-1e4, 1e4, -3e38, 3e38])))
    _, cdf, pdf = _erf_cdf(x)
    exact_cdf = 0.5 * torch.erfc(-x.double() / math.sqrt(2))  # not torch.special.ndtr: it cancels in the tail
    exact_pdf = torch.exp(-0.5 * x.double() ** 2) / math.sqrt(2 * math.pi)
    assert (cdf.double() - exact_cdf).abs().max().item() < 1.5e-7
    # the lower tail, where (1 + erf) / 2 would lose every digit: only the exponent's rounding is left
    lower = (x < 0) & (x >= -12)
    assert ((cdf.double() - exact_cdf) / exact_cdf)[lower].abs().max().item() < 1e-5
    normal = exact_pdf > 1e-36
    assert ((pdf.double() - exact_pdf) / exact_pdf)[normal].abs().max().item() < 1e-5
    assert cdf[-4:].tolist() == [0.0, 1.0, 0.0, 1.0] and pdf[-4:].tolist() == [0.0] * 4


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
    # gate = -7.5625: tanh-GELU is ~3e-19 there; float64's tanh rounds to -1 (see _float64_geglu)
    {"n_rows": 1, "width": 1, "layout": "contiguous", "seed": 13509},
]


def _with_examples(test):
    for case in _EXTREMES:
        test = example(case=case)(test)
    return test


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name", BACKENDS)
@_with_examples
@given(case=_cases())
def test_geglu_matches_float64(backend_name, dtype, approximate, case):
    gen = torch.Generator().manual_seed(case["seed"])
    gate, up = _pair(case["n_rows"], case["width"], case["layout"], dtype, gen)
    _check(gate, up, approximate, backend_name, gen, name=str(case))


# ------------------------------------------------------------------------------------------------------
# Edge cases
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_extreme_gates_are_finite_and_correct(backend_name, dtype, approximate):
    """gate = +-1e4 and the points where the CDF saturates or its tail underflows: finite, correct everything."""
    gen = torch.Generator().manual_seed(5)
    row = torch.tensor([-1e4, -1e3, -100.0, -14.0, -10.0, -5.0, -1e-3, 0.0, 1e-3, 5.0, 10.0, 14.0, 100.0, 1e3, 1e4])
    gate = torch.stack((row, -row)).to(dtype).requires_grad_()
    up = (torch.randn(gate.shape, generator=gen) * 0.5).to(dtype).requires_grad_()  # 1e4 * up fits in fp16
    out, (dgate, dup) = _check(gate, up, approximate, backend_name, gen, name="+-1e4")
    assert torch.isfinite(out).all() and torch.isfinite(dgate).all() and torch.isfinite(dup).all()


@pytest.mark.parametrize("shape", [(0, 64), (3, 0), (2, 0, 16)], ids=["0-rows", "0-cols", "0-batch"])
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_empty(backend_name, shape):
    gate = torch.randn(shape, dtype=torch.bfloat16, requires_grad=True)
    up = torch.randn(shape, dtype=torch.bfloat16, requires_grad=True)
    with backend(backend_name):
        out = geglu(gate, up, "tanh")
    assert out.shape == shape and out.dtype == torch.bfloat16
    out.sum().backward()
    assert gate.grad.shape == shape and up.grad.shape == shape


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("frozen", ["gate", "up"])
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_frozen_input(backend_name, frozen, approximate):
    """One input with requires_grad=False: the other's gradient is still right, the frozen one gets none."""
    gen = torch.Generator().manual_seed(6)
    gate, up = _pair(3, 300, "contiguous", torch.bfloat16, gen)
    gate, up = (gate.detach(), up) if frozen == "gate" else (gate, up.detach())
    _check(gate, up, approximate, backend_name, gen, name=f"frozen {frozen}")
    with backend(backend_name):
        geglu(gate, up, approximate).sum().backward()
    assert (gate.grad is None) == (frozen == "gate") and (up.grad is None) == (frozen == "up")


@pytest.mark.parametrize("layout", ["contiguous", "fused", "batched"])
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_saves_exactly_gate_and_up(backend_name, layout):
    """Autograd keeps gate and up themselves (views, no copies) and nothing else; the activation is not saved."""
    gen = torch.Generator().manual_seed(7)
    gate, up = _pair(4, 96, layout, torch.bfloat16, gen)
    with backend(backend_name), SavedTensorMeter() as meter:
        out = geglu(gate, up, "tanh")
    saved = out._base.grad_fn.saved_tensors  # out is a view of the Function's flat output
    assert len(saved) == 2 and len(meter.saved) == 2
    for kept, original in zip(saved, (gate, up), strict=True):
        assert kept.data_ptr() == original.data_ptr() and torch.equal(kept, original.reshape(kept.shape))
    storages = {gate.untyped_storage().data_ptr(): gate.untyped_storage().nbytes()}
    storages[up.untyped_storage().data_ptr()] = up.untyped_storage().nbytes()
    assert meter.total_bytes == sum(storages.values())  # fused: the one gate_up storage, counted once
    with SavedTensorMeter() as reference:  # transformers keeps gelu(gate) as well
        ACT2FN["gelu_pytorch_tanh"](gate) * up
    assert reference.total_bytes > meter.total_bytes


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_inputs_and_grad_are_not_modified(backend_name):
    gen = torch.Generator().manual_seed(8)
    gate, up = _pair(3, 130, "fused", torch.float16, gen)
    dy = torch.randn(3, 130, generator=gen).half()
    before = [t.detach().clone() for t in (gate, up, dy)]
    with backend(backend_name):
        out = geglu(gate, up, "none")
    dgate, dup = torch.autograd.grad(out, (gate, up), dy)
    for now, then in zip((gate, up, dy), before, strict=True):
        assert torch.equal(now, then)
    assert dgate.data_ptr() not in (dy.data_ptr(), gate.data_ptr()) and dup.data_ptr() != dy.data_ptr()


# ------------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------------


def test_errors_name_the_problem():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"approximate must be 'none'.*or 'tanh'.*got 'erf'"):
        geglu(x, x, approximate="erf")
    with pytest.raises(ValueError, match=r"approximate.*got None"):
        geglu(x, x, None)
    with pytest.raises(ValueError, match=r"same shape.*gate \(2, 8\).*up \(2, 16\).*chunk\(2, dim=-1\)"):
        geglu(x, torch.randn(2, 16))
    with pytest.raises(TypeError, match=r"same dtype.*torch.float32.*torch.float16"):
        geglu(x, x.half())
    with pytest.raises(TypeError, match=r"dtype torch.int64 is not supported.*float32, bfloat16, float16"):
        geglu(x.long(), x.long())
    with pytest.raises(TypeError, match=r"gate must be a torch.Tensor, got ndarray"):
        geglu(x.numpy(), x)


# ------------------------------------------------------------------------------------------------------
# Audit cases
# ------------------------------------------------------------------------------------------------------


def test_audit_cases_follow_the_launch_heuristics():
    cases = {case.name: case for case in audit_cases()}
    block, num_warps = _launch_config(14336)
    tensor_bytes = 8192 * 14336 * 2
    for approximate in APPROXIMATIONS:
        forward, backward = cases[f"geglu_forward[{approximate}]"], cases[f"geglu_backward[{approximate}]"]
        assert forward.kernel is _geglu_forward_kernel and backward.kernel is _geglu_backward_kernel
        assert (
            forward.constexprs["APPROXIMATE_TANH"] == backward.constexprs["APPROXIMATE_TANH"] == (approximate == "tanh")
        )
        assert forward.min_bytes == 3 * tensor_bytes  # read gate, up; write out
        assert backward.min_bytes == 5 * tensor_bytes  # read gate, up, dy; write d gate, d up
    for case in cases.values():
        assert case.constexprs["BLOCK"] == block and case.num_warps == num_warps
