"""Tests for fastft.kernels.activation: semantics, kernel == float64 in every dtype and backend, equality with the
transformers activation modules, xIELU's parameter gradients, the probe, edges, errors, memory.

Every result and gradient is compared with :func:`assert_no_worse_than_torch`: fastft's error against the float64
answer (same low-precision inputs, upcast) may be at most 2x the error of the transformers module run by PyTorch
in the dtype under test (GELUActivation, GELUTanh, ReLUSquaredActivation, XIELUActivation's formula), plus 8
roundings of the largest term the value is computed from (a GELU is a chain of about eight fp32 roundings, see
test_geglu.py). fp32 results are also held to 1e-5 of those terms.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from hypothesis import example, given, settings
from hypothesis import strategies as st
from transformers.activations import ACT2FN, XIELUActivation

from fastft.kernels.activation import (
    ACTIVATIONS,
    XIELU,
    _activation_backward_kernel,
    _activation_backward_torch,
    _activation_backward_triton,
    _activation_forward_kernel,
    _expm1,
    _launch_config,
    activation,
    activation_name,
    activation_reference,
    audit_cases,
)
from fastft.utils.memory import SavedTensorMeter
from tests.helpers import BACKENDS, DTYPES, assert_no_worse_than_torch, backend

LAYOUTS = ("contiguous", "strided", "batched", "transposed")
# The transformers module whose output in the dtype under test is the baseline ("what users run today").
BASELINE = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu2": "relu2", "quick_gelu": "quick_gelu"}
# Named tolerances of fastft against the transformers modules (same inputs, same dtype).
F_GELU_FP32 = 1e-6  # F.gelu uses libm erf/tanh in fp32, the kernel its own polynomials: relative to max |h|
F_GELU_LOW_PRECISION_ULPS = 1.0  # both compute in fp32 and round once: at most one ulp apart in bf16/fp16
NEW_GELU_FP32 = 2e-6  # gelu_new's 0.5 u (1 + tanh(k)) cancels in the lower tail: relative to max |h|
XIELU_FP32 = 1e-6  # the same formula and coefficients; expm1 is a polynomial here: relative to the largest term


def _input(n_rows, width, layout, dtype, gen, scale=3.0):
    """u (requires grad) in one of the layouts an MLP hands over: strided = the first ``width`` columns of a
    wider buffer (row stride > width, read in place); batched: (2, rows, width); transposed: non-contiguous
    last dimension (the function must copy, not misread)."""

    def rand(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    if layout == "strided":
        return rand(n_rows, width + 7)[:, :width].detach().requires_grad_()
    if layout == "batched":
        return rand(2, n_rows, width).requires_grad_()
    if layout == "transposed":
        return rand(width, n_rows).t().detach().requires_grad_()
    return rand(n_rows, width).requires_grad_()


def _xielu(gen, dtype, requires_grad=True):
    """An XIELU like XIELUActivation(dtype=dtype) after some training: random raw alphas, beta and eps buffers."""
    alpha_p = (torch.randn(1, generator=gen) * 0.8).to(dtype).requires_grad_(requires_grad)
    alpha_n = (torch.randn(1, generator=gen) * 0.8 - 0.7).to(dtype).requires_grad_(requires_grad)
    return XIELU(alpha_p, alpha_n, torch.tensor(0.5, dtype=dtype), torch.tensor(-1e-6, dtype=dtype))


def _spec(kind, gen, param_dtype, requires_grad=True):
    return _xielu(gen, param_dtype, requires_grad) if kind == "xielu" else kind


def _baseline(u, spec):
    """The transformers module's computation in u's dtype (xIELU with fp32 alphas promotes to fp32: cast back, as
    the down projection under autocast sees it)."""
    if isinstance(spec, XIELU):
        return activation_reference(u, spec).to(u.dtype)
    return ACT2FN[BASELINE[spec]](u)


def _float64(u, spec, dh):
    """Float64 h, du (and d alpha_p, d alpha_n), each with the size of the terms it is computed from.

    GELUs in the forms that do not cancel in the lower tail (sigmoid, erfc; torch's float64 tanh form does).
    xIELU: the coefficients a_p, a_n are the parameters' own softplus values (transformers computes them in the
    parameters' dtype): float64 leaves, chained to the raw alphas by softplus' = sigmoid.
    """
    u64 = u.detach().double().requires_grad_()
    leaves = [u64]
    if spec == "gelu":
        cdf = 0.5 * torch.special.erfc(-u64 / math.sqrt(2))
        h = u64 * cdf
        slope_terms = cdf.abs() + (u64 * torch.exp(-0.5 * u64**2) / math.sqrt(2 * math.pi)).abs()
        h_terms = h.abs()
    elif spec == "gelu_tanh":
        k = math.sqrt(2 / math.pi) * (u64 + 0.044715 * u64**3)
        s = torch.sigmoid(2 * k)
        h = u64 * s
        dk = math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * u64**2)
        slope_terms = s.abs() + (u64 * 2 * s * torch.sigmoid(-2 * k) * dk).abs()
        h_terms = h.abs()
    elif spec == "relu2":
        h = F.relu(u64) ** 2
        slope_terms, h_terms = 2 * F.relu(u64), h.abs()
    elif spec == "quick_gelu":
        s = torch.sigmoid(1.702 * u64)
        h = u64 * s
        slope_terms, h_terms = s.abs() + (1.702 * u64 * s * torch.sigmoid(-1.702 * u64)).abs(), h.abs()
    else:
        with torch.no_grad():
            a_p = F.softplus(spec.alpha_p).double()
            a_n = (spec.beta + F.softplus(spec.alpha_n)).double()
        a_p, a_n = a_p.requires_grad_(), a_n.requires_grad_()
        beta, eps = spec.beta.double(), spec.eps.double()
        em1 = torch.expm1(torch.min(u64, eps))
        positive = u64 > 0
        h = torch.where(positive, a_p * u64 * u64 + beta * u64, (em1 - u64) * a_n + beta * u64)
        leaves += [a_p, a_n]
        with torch.no_grad():
            h_terms = torch.where(positive, (a_p * u64 * u64).abs(), ((em1 - u64) * a_n).abs()) + (beta * u64).abs()
            slope_terms = torch.where(positive, 2 * a_p * u64, (em1 * a_n).abs() + a_n) + beta
    grads = list(torch.autograd.grad(h, leaves, dh.double()))
    scales = [h_terms.detach(), (dh.double().abs() * slope_terms.detach())]
    if not isinstance(spec, XIELU):
        return [h.detach(), *grads], scales
    with torch.no_grad():
        u_, g_ = u64.detach(), dh.double()
        d_a_p = (g_ * u_ * u_).abs()[u_ > 0].sum()
        d_a_n = (g_ * (torch.expm1(torch.min(u_, spec.eps.double())) - u_)).abs()[u_ <= 0].sum()
        slopes = [torch.sigmoid(t.detach().double()).reshape(t.shape) for t in (spec.alpha_p, spec.alpha_n)]
    exact = [h.detach(), grads[0], grads[1] * slopes[0], grads[2] * slopes[1]]
    return exact, [*scales, d_a_p * slopes[0], d_a_n * slopes[1]]


def _check(u, spec, backend_name, gen, name=""):
    """activation vs float64 and vs the transformers module in the same dtype: h, du, d alphas (those that exist)."""
    with backend(backend_name):
        h = activation(u, spec)
    assert h.shape == u.shape and h.dtype == u.dtype
    dh = torch.randn(h.shape, generator=gen, dtype=torch.float64).to(h.dtype)
    alphas = [spec.alpha_p, spec.alpha_n] if isinstance(spec, XIELU) else []
    inputs = [t for t in (u, *alphas) if t.requires_grad]
    grads = torch.autograd.grad(h, inputs, dh) if inputs else ()
    theirs = _baseline(u, spec)
    their_grads = torch.autograd.grad(theirs, inputs, dh) if inputs else ()
    exact, scales = _float64(u, spec, dh)
    labels = ["h"] + [label for label, t in zip(("du", "d alpha_p", "d alpha_n"), (u, *alphas)) if t.requires_grad]
    keep = [0] + [i + 1 for i, t in enumerate((u, *alphas)) if t.requires_grad]
    for label, ours, their, i in zip(labels, (h, *grads), (theirs, *their_grads), keep, strict=True):
        want = exact[i].reshape(ours.shape)
        scale = scales[i].max().item() if scales[i].numel() else None
        assert_no_worse_than_torch(ours, their, want, name=f"{name} {label} [{backend_name}]", ulps=8.0, scale=scale)
        if ours.dtype == torch.float32 and want.numel():
            error = (ours.double() - want).abs().max().item()
            assert error <= 1e-5 * scale + 1e-30, f"{name} {label}: fp32 {error:.3e} vs float64, scale {scale:.3e}"
    return h, grads


# ------------------------------------------------------------------------------------------------------
# Semantics
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_is_the_transformers_modules(dtype):
    """activation_reference is, bit for bit, what the transformers modules compute (xIELU: its Python path)."""
    gen = torch.Generator().manual_seed(0)
    u = (torch.randn(5, 37, generator=gen) * 3).to(dtype)
    for kind, name in BASELINE.items():
        assert torch.equal(activation_reference(u, kind), ACT2FN[name](u)), kind
    module = XIELUActivation(dtype=dtype)
    with torch.no_grad():
        module.alpha_p.fill_(0.3)
        module.alpha_n.fill_(-0.4)
    assert torch.equal(activation_reference(u, XIELU.from_module(module)), module(u))


def _hand_value_and_slope(u, spec):
    """The module docstring's formulas (GELU with erf / tanh, not the kernels' forms), float64."""
    if spec == "gelu":
        cdf = 0.5 * (1 + torch.erf(u / math.sqrt(2)))
        return u * cdf, cdf + u * torch.exp(-0.5 * u * u) / math.sqrt(2 * math.pi)
    if spec == "gelu_tanh":
        k = math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)
        t = torch.tanh(k)
        return 0.5 * u * (1 + t), 0.5 * (1 + t) + 0.5 * u * (1 - t * t) * math.sqrt(2 / math.pi) * (
            1 + 3 * 0.044715 * u**2
        )
    if spec == "relu2":
        return F.relu(u) ** 2, 2 * F.relu(u)
    if spec == "quick_gelu":  # s' = s (1 - s)
        s = 1 / (1 + torch.exp(-1.702 * u))
        return u * s, s + 1.702 * u * s * (1 - s)
    a_p, a_n = F.softplus(spec.alpha_p), spec.beta + F.softplus(spec.alpha_n)
    beta, eps = spec.beta, spec.eps
    value = torch.where(u > 0, a_p * u * u + beta * u, (torch.expm1(torch.clamp(u, max=eps)) - u) * a_n + beta * u)
    negative = torch.where(u < eps, torch.expm1(u) * a_n + beta, beta - a_n)
    return value, torch.where(u > 0, 2 * a_p * u + beta, negative)


@pytest.mark.parametrize("kind", ACTIVATIONS)
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_float64_semantics_and_hand_derivatives(backend_name, kind):
    """In float64 (torch path): h = the textbook formula, and the docstring's derivatives are autograd's."""
    gen = torch.Generator().manual_seed(1)
    spec = _spec(kind, gen, torch.float64)
    u = (torch.randn(4, 33, generator=gen, dtype=torch.float64) * 4).requires_grad_()
    dh = torch.randn(4, 33, generator=gen, dtype=torch.float64)
    value, slope = _hand_value_and_slope(u.detach(), spec)
    with backend(backend_name):
        h = activation(u, spec)
    (du,) = torch.autograd.grad(h, u, dh)
    ref = activation_reference(u, spec)
    (ref_du,) = torch.autograd.grad(ref, u, dh)
    for ours, want in ((ref, value), (h, value), (ref_du, dh * slope), (du, dh * slope)):
        torch.testing.assert_close(ours.detach(), want, rtol=1e-13, atol=1e-13)
    if kind == "gelu_tanh":  # transformers' own Python formulation of the same function (GPT-2, Phi)
        torch.testing.assert_close(ACT2FN["gelu_new"](u.detach()), value)


@triton.jit
def _expm1_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(out_ptr + offsets, _expm1(tl.load(x_ptr + offsets, mask=mask, other=0.0)), mask=mask)


def test_expm1_is_accurate_near_zero():
    """The kernel's expm1: a few fp32 ulp relative everywhere (exp(x) - 1 would be 1e-4 off at 1e-3, where
    xIELU's negative branch lives), including across the 0.5 switch and down to underflow of exp."""
    x = torch.cat((torch.linspace(-30, 3, 66001), torch.logspace(-12, 0, 2001), -torch.logspace(-12, 0, 2001)))
    out = torch.empty_like(x)
    _expm1_kernel[(triton.cdiv(x.numel(), 8192),)](x, out, x.numel(), BLOCK=8192)
    exact = torch.expm1(x.double())
    assert ((out.double() - exact) / exact.abs().clamp_min(1e-300)).abs().max().item() < 4 * 2.0**-24 * 4


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_xielu_at_and_around_eps_matches_autograd(backend_name):
    """u == eps exactly (torch.min's tie: half the gradient), eps < u <= 0 (expm1 frozen), u < eps, 0 and +-tiny:
    the hand-written derivative is autograd's of XIELUActivation's own formula, in fp32."""
    module = XIELUActivation(dtype=torch.float32)
    eps = module.eps.item()
    u = torch.tensor([[eps, eps / 2, 0.0, -0.0, 1e-7, -1e-7, 2 * eps, -1e-3, 1e-3, -3.0, 3.0]]).requires_grad_()
    dh = torch.linspace(0.5, 1.5, u.numel()).reshape(u.shape)
    spec = XIELU.from_module(module)
    with backend(backend_name):
        h = activation(u, spec)
    grads = torch.autograd.grad(h, (u, module.alpha_p, module.alpha_n), dh)
    want = module(u)
    want_grads = torch.autograd.grad(want, (u, module.alpha_p, module.alpha_n), dh)
    torch.testing.assert_close(h, want, rtol=1e-6, atol=1e-12)
    for ours, theirs in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-12)


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
        "param_dtype": draw(st.sampled_from(["same", "float32"])),  # xIELU's alphas: model dtype, or fp32 masters
        "seed": draw(st.integers(0, 2**16)),
    }


_EXTREMES = [
    {"n_rows": 1, "width": 1, "layout": "contiguous", "param_dtype": "same", "seed": 0},  # one element
    {"n_rows": 1, "width": 2049, "layout": "strided", "param_dtype": "float32", "seed": 1},  # one past the block
    {"n_rows": 1, "width": 14336, "layout": "contiguous", "param_dtype": "same", "seed": 2},  # 7 blocks
    {"n_rows": 5, "width": 257, "layout": "transposed", "param_dtype": "same", "seed": 4},  # copied rows
]


def _with_examples(test):
    for case in _EXTREMES:
        test = example(case=case)(test)
    return test


@pytest.mark.parametrize("kind", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name", BACKENDS)
@settings(max_examples=40)
@_with_examples
@given(case=_cases())
def test_activation_matches_float64(backend_name, dtype, kind, case):
    gen = torch.Generator().manual_seed(case["seed"])
    u = _input(case["n_rows"], case["width"], case["layout"], dtype, gen)
    spec = _spec(kind, gen, dtype if case["param_dtype"] == "same" else torch.float32)
    _check(u, spec, backend_name, gen, name=str(case))


# ------------------------------------------------------------------------------------------------------
# Equality with the transformers modules
# ------------------------------------------------------------------------------------------------------


def _ulp_close_or_closer(ours, theirs, exact, ulps):
    """Elementwise within ``ulps`` units of the last place of ``theirs`` (eps * |theirs|, or the dtype's smallest
    subnormal near 0), or closer to float64 than ``theirs`` (F.gelu's (1 + erf) / 2 cancels to 0 below u ~ -5)."""
    finfo = torch.finfo(theirs.dtype)
    bound = ulps * finfo.eps * theirs.double().abs() + finfo.smallest_normal * finfo.eps
    close = (ours.double() - theirs.double()).abs() <= bound
    closer = (ours.double() - exact).abs() <= (theirs.double() - exact).abs()
    return bool((close | closer).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_equals_the_transformers_modules(backend_name, dtype):
    """relu2 is bit-identical; F.gelu (GELUActivation, GELUTanh) is within F_GELU_* (fp32; one ulp or more accurate);
    NewGELUActivation within NEW_GELU_FP32 in fp32 and, where it rounds after every op, no closer to float64
    than fastft; XIELUActivation (fp32 module) within XIELU_FP32."""
    gen = torch.Generator().manual_seed(2)
    u = torch.cat((torch.linspace(-12, 12, 4801), torch.randn(3999, generator=gen) * 3)).to(dtype).reshape(8, -1)
    with backend(backend_name):
        ours = {kind: activation(u, kind) for kind in ("gelu", "gelu_tanh", "relu2")}
    assert torch.equal(ours["relu2"], ACT2FN["relu2"](u))
    for kind, name in (("gelu", "gelu"), ("gelu_tanh", "gelu_pytorch_tanh")):
        theirs = ACT2FN[name](u)
        if dtype == torch.float32:
            scale = theirs.abs().max().item()
            assert (ours[kind] - theirs).abs().max().item() <= F_GELU_FP32 * scale, kind
        else:
            exact = _float64(u, kind, torch.ones_like(u))[0][0]
            assert _ulp_close_or_closer(ours[kind], theirs, exact, F_GELU_LOW_PRECISION_ULPS), kind
    new_gelu = ACT2FN["gelu_new"](u)
    exact = _float64(u, "gelu_tanh", torch.ones_like(u))[0][0]
    if dtype == torch.float32:
        assert (ours["gelu_tanh"] - new_gelu).abs().max().item() <= NEW_GELU_FP32 * new_gelu.abs().max().item()
    assert_no_worse_than_torch(ours["gelu_tanh"], new_gelu, exact, name="gelu_new", ulps=8.0)
    module = XIELUActivation(dtype=torch.float32)
    if dtype == torch.float32:
        with backend(backend_name):
            h = activation(u, XIELU.from_module(module))
        want = module(u)
        terms = _float64(u, XIELU.from_module(module), torch.ones_like(u))[1][0]
        assert (h - want).abs().max().item() <= XIELU_FP32 * terms.max().item()


# ------------------------------------------------------------------------------------------------------
# The probe
# ------------------------------------------------------------------------------------------------------


def test_activation_name_recognises_the_transformers_modules():
    expected = {
        "gelu": "gelu",
        "gelu_python": "gelu",
        "gelu_new": "gelu_tanh",
        "gelu_pytorch_tanh": "gelu_tanh",
        "gelu_python_tanh": "gelu_tanh",
        "gelu_fast": "gelu_tanh",
        "gelu_accurate": "gelu_tanh",
        "relu2": "relu2",
        "quick_gelu": "quick_gelu",
        # not one of these activations: left to transformers
        "gelu_10": None,  # clipped at +-10: the probe reaches 12
        "silu": None,
        "relu": None,
        "relu6": None,
        "tanh": None,
        "mish": None,
        "laplace": None,
    }
    for name, kind in expected.items():
        assert activation_name(ACT2FN[name]) == kind, name
    assert activation_name(torch.nn.GELU()) == "gelu" and activation_name(torch.nn.GELU("tanh")) == "gelu_tanh"
    assert activation_name(F.gelu) == "gelu" and activation_name(lambda t: t) is None
    assert activation_name("gelu") is None and activation_name(None) is None
    for dtype in (torch.float32, torch.bfloat16):
        module = XIELUActivation(dtype=dtype)
        assert activation_name(module) == "xielu"
        assert isinstance(XIELU.from_module(module), XIELU)
    with torch.device("meta"):
        assert activation_name(XIELUActivation(dtype=torch.bfloat16)) == "xielu"


def test_activation_name_rejects_an_xielu_lookalike():
    """The xIELU parameters, another formula: not taken for xIELU."""

    class Lookalike(XIELUActivation):
        def forward(self, x):
            return super().forward(x) * 1.01

    assert activation_name(Lookalike(dtype=torch.float32)) is None


# ------------------------------------------------------------------------------------------------------
# Edge cases
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_extreme_inputs_are_finite_and_correct(backend_name, dtype, kind):
    """u = +-1e4 for the GELUs (the CDFs saturate, their tails underflow); +-100 for the quadratics (fp16 holds
    1e4, not 1e8): finite and correct, as are +-1e-6, where xIELU's eps sits."""
    gen = torch.Generator().manual_seed(5)
    big = [1e4, 1e3, 100.0, 14.0] if kind.startswith("gelu") else [100.0, 30.0, 14.0]
    row = torch.tensor([*big, 10.0, 5.0, 1e-3, 1e-6, 0.0])
    u = torch.cat((row, -row)).to(dtype).reshape(2, -1).requires_grad_()
    h, grads = _check(u, _spec(kind, gen, dtype), backend_name, gen, name="extremes")
    assert torch.isfinite(h).all() and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("shape", [(0, 64), (3, 0), (2, 0, 16), ()], ids=["0-rows", "0-cols", "0-batch", "0-d"])
@pytest.mark.parametrize("kind", ["gelu_tanh", "xielu"])
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_empty_and_scalar(backend_name, kind, shape):
    gen = torch.Generator().manual_seed(6)
    u = torch.randn(shape, generator=gen).to(torch.bfloat16).requires_grad_()
    spec = _spec(kind, gen, torch.bfloat16)
    with backend(backend_name):
        h = activation(u, spec)
    assert h.shape == shape and h.dtype == torch.bfloat16
    h.float().sum().backward()
    assert u.grad.shape == shape
    if kind == "xielu":
        assert spec.alpha_p.grad.shape == (1,) and (u.numel() or spec.alpha_p.grad.item() == 0)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_frozen_alphas_and_frozen_input(backend_name):
    """xIELU with frozen alphas (LoRA) gives du only; with a frozen u (a probe) only the alphas' gradients."""
    gen = torch.Generator().manual_seed(7)
    u = _input(3, 300, "contiguous", torch.bfloat16, gen)
    _check(u, _spec("xielu", gen, torch.bfloat16, requires_grad=False), backend_name, gen, name="frozen alphas")
    spec = _spec("xielu", gen, torch.float32)
    _check(u.detach(), spec, backend_name, gen, name="frozen u")
    with backend(backend_name):
        activation(u.detach(), spec).float().sum().backward()
    assert spec.alpha_p.grad is not None and spec.alpha_p.grad.dtype == torch.float32


@pytest.mark.parametrize("kind", ["gelu", "xielu"])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "batched"])
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_saves_only_u(backend_name, layout, kind):
    """Autograd keeps u itself (a view, no copy) and, for xIELU, 6 coefficients; the activation is not saved."""
    gen = torch.Generator().manual_seed(8)
    u = _input(4, 96, layout, torch.bfloat16, gen)
    with backend(backend_name), SavedTensorMeter() as meter:
        h = activation(u, _spec(kind, gen, torch.bfloat16))
    coefficient_bytes = 6 * 4 if kind == "xielu" else 0
    assert meter.total_bytes == u.untyped_storage().nbytes() + coefficient_bytes
    assert any(t.shape == (4, 96) or t.shape == (8, 96) for t in meter.saved)
    with SavedTensorMeter() as reference:  # transformers' XIELU keeps several N x I tensors
        activation_reference(u, _spec(kind, gen, torch.bfloat16))
    assert reference.total_bytes >= meter.total_bytes
    h.float().sum().backward()


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_inputs_and_grad_are_not_modified(backend_name):
    gen = torch.Generator().manual_seed(9)
    u = _input(3, 130, "strided", torch.float16, gen)
    dh = torch.randn(3, 130, generator=gen).half()
    before = [t.detach().clone() for t in (u, dh)]
    with backend(backend_name):
        h = activation(u, "gelu_tanh")
    (du,) = torch.autograd.grad(h, u, dh)
    for now, then in zip((u, dh), before, strict=True):
        assert torch.equal(now, then)
    assert du.data_ptr() not in (dh.data_ptr(), u.data_ptr())
    h.mul_(2)  # the result is an ordinary tensor: the caller may modify it in place


@pytest.mark.parametrize("backward", [_activation_backward_triton, _activation_backward_torch], ids=BACKENDS)
@pytest.mark.parametrize("kind", ACTIVATIONS)
def test_backward_in_place_writes_du_over_dh(backward, kind):
    """What the fused MLP uses: du in dh's own buffer, the same numbers as out of place."""
    gen = torch.Generator().manual_seed(10)
    u = torch.randn(5, 300, generator=gen).bfloat16()
    dh = torch.randn(5, 300, generator=gen).bfloat16()
    coeffs = None
    if kind == "xielu":
        from fastft.kernels.activation import _xielu_coefficients

        coeffs = _xielu_coefficients(_xielu(gen, torch.bfloat16), torch.float32, u.device)
    du, dalpha = backward(u, dh, kind, coeffs, True, kind == "xielu")
    du_in_place, dalpha_in_place = backward(u, dh.clone(), kind, coeffs, True, kind == "xielu", in_place=True)
    assert torch.equal(du, du_in_place)
    buffer = dh.clone()
    assert backward(u, buffer, kind, coeffs, True, False, in_place=True)[0].data_ptr() == buffer.data_ptr()
    if kind == "xielu":
        torch.testing.assert_close(dalpha, dalpha_in_place)


# ------------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------------


def test_errors_name_the_problem():
    u = torch.randn(2, 8)
    gen = torch.Generator().manual_seed(11)
    with pytest.raises(ValueError, match=r"activation must be one of 'gelu'.*'quick_gelu' or an XIELU, got 'silu'"):
        activation(u, "silu")
    with pytest.raises(ValueError, match=r"pass XIELU\(alpha_p, alpha_n, beta, eps\) or XIELU.from_module"):
        activation(u, "xielu")
    with pytest.raises(TypeError, match=r"dtype torch.int64 is not supported.*float32, bfloat16, float16"):
        activation(u.long(), "gelu")
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor, got ndarray"):
        activation(u.numpy(), "gelu")
    with pytest.raises(TypeError, match=r"XIELU.alpha_p must be a one-element floating tensor.*\(3,\)"):
        activation(u, XIELU(torch.zeros(3), torch.zeros(1)))
    with pytest.raises(ValueError, match=r"XIELU.alpha_n is on meta but x is on cpu"):
        activation(u, XIELU(torch.zeros(1), torch.zeros(1, device="meta")))
    with pytest.raises(ValueError, match=r"XIELU.eps must be a float or a one-element .*requires_grad=True"):
        activation(u, XIELU(torch.zeros(1), torch.zeros(1), eps=torch.zeros((), requires_grad=True)))
    with pytest.raises(TypeError, match=r"XIELU.beta must be a finite number.*nan"):
        activation(u, XIELU(torch.zeros(1), torch.zeros(1), beta=float("nan")))
    assert activation(u, _xielu(gen, torch.float32, requires_grad=False)).shape == u.shape


# ------------------------------------------------------------------------------------------------------
# Audit cases
# ------------------------------------------------------------------------------------------------------


def test_audit_cases_follow_the_launch_heuristics():
    cases = {case.name: case for case in audit_cases()}
    block, num_warps = _launch_config(14336)
    tensor_bytes = 8192 * 14336 * 2
    for kind in ACTIVATIONS:
        forward, backward = cases[f"activation_forward[{kind}]"], cases[f"activation_backward[{kind}]"]
        assert forward.kernel is _activation_forward_kernel and backward.kernel is _activation_backward_kernel
        assert forward.min_bytes == 2 * tensor_bytes  # read u; write h
        assert backward.min_bytes == 3 * tensor_bytes  # read u, dh; write du
        assert not backward.constexprs["COMPUTE_DALPHA"]
    reduction = cases["activation_backward[xielu+dalpha]"]
    assert reduction.constexprs["COMPUTE_DALPHA"] and reduction.min_bytes == 3 * tensor_bytes + 8 * 8192 * 7
    for case in cases.values():
        assert case.constexprs["BLOCK"] == block and case.num_warps == num_warps
    assert len(cases) == 2 * len(ACTIVATIONS) + 1
