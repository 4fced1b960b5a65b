"""Gated RMSNorm: semantics (float64, every gated norm module of transformers), Triton and torch paths vs
float64 over property-based shapes and every flag combination, edge cases, errors, and the exact bytes kept
for backward."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from fastft.kernels.rms_norm_gated import (
    _backward_triton,
    _launch_config,
    _Variant,
    audit_cases,
    rms_norm_gated,
    rms_norm_gated_reference,
)
from fastft.utils.memory import SavedTensorMeter
from tests.helpers import BACKENDS, DTYPES, assert_no_worse_than_torch, backend
from tests.kernels.test_rms_norm import _make_x

EPS = 1e-6

# Every flag combination, named after a transformers module that uses it (group_size is drawn separately).
VARIANTS = {
    "qwen3_next": {},  # norm, weight (n rounded to x's dtype first), * silu(gate)
    "qwen4_sigmoid": {"activation": "sigmoid"},
    "kimi_linear": {"activation": "sigmoid", "weight_in_fp32": True},
    "lara_mini": {"weight_in_fp32": True},
    "mamba2": {"norm_before_gate": False},  # x * silu(gate), norm, weight * n.to(x.dtype)
    "falcon_h1_gate_first": {"norm_before_gate": False, "weight_in_fp32": True},
    "offset_gate_last": {"weight_in_fp32": True, "offset": 1.0},  # a Gemma-style 1 + w (no module uses it yet)
    "offset_gate_first_sigmoid": {
        "norm_before_gate": False,
        "activation": "sigmoid",
        "weight_in_fp32": True,
        "offset": 1.0,
    },
}


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


def _make_weight(hidden: int, dtype: torch.dtype, offset: float, gen) -> torch.Tensor:
    # Plain weights sit around 1, offset ones (applied as 1 + w) around 0.
    w = torch.randn(hidden, generator=gen, dtype=torch.float64) * 0.5 + (1.0 if offset == 0 else 0.0)
    return w.to(dtype).requires_grad_()


def _forward_backward(fn, x, z, w, dy, kw, dtype=None):
    """(y, dx, dgate, dw) of ``fn`` on fresh leaves (cast to ``dtype`` if given) with upstream gradient ``dy``."""
    leaves = [(t.detach().to(dtype) if dtype else t.detach()).requires_grad_(t.requires_grad) for t in (x, z, w)]
    y = fn(*leaves, EPS, **kw)
    y.backward(dy.to(y.dtype))
    return (y.detach(), *(t.grad for t in leaves))


def _magnitudes(x, z, w, dy, kw):
    """Per element, the float64 sum of |terms| of y, dx, dgate and dw (what a rounding error is relative to)."""
    x64, z64, w64, dy64 = (t.detach().double() for t in (x, z, w, dy))
    hidden = x.shape[-1]
    size = kw.get("group_size") or hidden
    grouped = (*x.shape[:-1], hidden // size, size)
    sig, sig_c = torch.sigmoid(z64), torch.sigmoid(-z64)
    if kw.get("activation") == "sigmoid":
        a, da = sig, sig * sig_c
    else:
        a, da = z64 * sig, sig * (1 + (z64 * sig_c).abs())  # the terms of sigma (1 + z (1 - sigma))
    weight = kw.get("offset", 0.0) + w64
    gate_last = kw.get("norm_before_gate", True)
    u = (x64 if gate_last else x64 * a).reshape(grouped)
    rstd = torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + EPS)
    normed = (u * rstd).reshape(x.shape)
    rstd = rstd.expand(grouped).reshape(x.shape)

    def group_mean(t):
        return t.reshape(grouped).mean(-1, keepdim=True).expand(grouped).reshape(x.shape)

    if gate_last:
        g = dy64 * a * weight
        du = rstd * (g.abs() + normed.abs() * group_mean((g * normed).abs()))
        terms = {"y": (normed * weight * a).abs(), "dx": du, "dgate": (dy64 * weight * normed).abs() * da}
        terms["dw"] = (dy64 * a * normed).abs().reshape(-1, hidden).sum(0)
    else:
        g = dy64 * weight
        du = rstd * (g.abs() + normed.abs() * group_mean((g * normed).abs()))
        terms = {"y": (normed * weight).abs(), "dx": du * a.abs(), "dgate": du * (x64 * da).abs()}
        terms["dw"] = (dy64 * normed).abs().reshape(-1, hidden).sum(0)
    return terms


def _sigmoid64(z: torch.Tensor) -> torch.Tensor:
    """The logistic sigmoid with a derivative that keeps its relative precision for any z.

    The float64 oracle cannot be the reference itself: autograd differentiates ``torch.sigmoid`` as
    ``(1 - s) * s``, which is 0 or off by 100% in float64 too once z > ~20 (1 - s cancels), where fastft's
    kernels (``1 - s`` as ``sigmoid(-z)``) stay exact. Each branch sees only the half-line where its ``exp``
    cannot overflow, so neither side of the ``where`` has an infinite derivative.
    """
    positive, negative = torch.exp(-z.clamp(min=0)), torch.exp(z.clamp(max=0))
    return torch.where(z >= 0, 1 / (1 + positive), negative / (1 + negative))


def _exact(x, z, w, eps, *, offset=0.0, norm_before_gate=True, group_size=None, activation="silu", **_):
    """The module docstring's formula, one group at a time: the float64 oracle (run on float64 leaves)."""
    size = group_size or x.shape[-1]
    a = _sigmoid64(z) if activation == "sigmoid" else z * _sigmoid64(z)
    u = x if norm_before_gate else x * a
    pieces = []
    for start in range(0, x.shape[-1], size):
        chunk = u[..., start : start + size]
        pieces.append(chunk / torch.sqrt((chunk * chunk).sum(-1, keepdim=True) / size + eps))
    out = torch.cat(pieces, -1) * (offset + w) if x.shape[-1] else u * w
    return out * a if norm_before_gate else out


def _check_all(x, z, w, dy, kw, backend_name, names=("y", "dx", "dgate", "dw")):
    """fastft (on ``backend_name``) vs the reference in the same dtypes vs the float64 reference."""
    with backend(backend_name):
        ours = _forward_backward(rms_norm_gated, x, z, w, dy, kw)
    same = _forward_backward(rms_norm_gated_reference, x, z, w, dy, kw)
    exact = _forward_backward(_exact, x, z, w, dy, kw, dtype=torch.float64)
    scales = _magnitudes(x, z, w, dy, kw)
    all_names = ("y", "dx", "dgate", "dw")
    for name, a, t, e in zip(all_names, ours, same, exact):
        if name not in names:
            continue
        terms = scales[name].max().item() if scales[name].numel() else None
        assert_no_worse_than_torch(a, t, e, name=f"{name} [{backend_name}, {kw}]", scale=terms)
        if x.dtype == z.dtype == w.dtype == torch.float32:
            # DESIGN.md: fp32 within ~1e-5 relative of float64, element by element, relative to the magnitude
            # of the terms that make up each value (dx and dw are differences/sums that may cancel).
            error = (a.double() - e).abs()
            assert (error <= 1e-5 * scales[name] + 1e-30).all(), f"{name}: max error {error.max().item():.3e}"
    return ours


def _inputs(lead, hidden, dtype, kw, gen, layouts=("contiguous", "contiguous"), scales=(1.0, 2.0)):
    x = _make_x(lead, hidden, dtype, layouts[0], scales[0], gen)
    z = _make_x(lead, hidden, dtype, layouts[1], scales[1], gen)
    w = _make_weight(hidden, dtype, kw.get("offset", 0.0), gen)
    dy = torch.randn(*lead, hidden, generator=gen).to(dtype)
    return x, z, w, dy


# ----------------------------------------------------------------------------------------------------
# Semantics
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [None, 11, 33])
@pytest.mark.parametrize("variant", VARIANTS)
def test_reference_is_the_float64_formula(variant, group_size):
    kw = {**VARIANTS[variant], "group_size": group_size}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 33, generator=gen, dtype=torch.float64)
    z = 2 * torch.randn(4, 3, 33, generator=gen, dtype=torch.float64)
    w = torch.randn(33, generator=gen, dtype=torch.float64)
    by_hand = _exact(x, z, w, EPS, **kw)
    torch.testing.assert_close(rms_norm_gated_reference(x, z, w, EPS, **kw), by_hand, rtol=1e-13, atol=1e-13)
    # Float64 stays float64 on both backends (the Triton kernels take 16/32-bit floats; float64 runs the torch path).
    for name in BACKENDS:
        with backend(name):
            out = rms_norm_gated(x, z, w, EPS, **kw)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, by_hand, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("variant", VARIANTS)
def test_float64_gradients_pass_gradcheck(variant):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    z = torch.randn(3, 2, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(12, generator=gen, dtype=torch.float64, requires_grad=True)
    for group_size in (None, 4):
        kw = {**VARIANTS[variant], "group_size": group_size}
        assert torch.autograd.gradcheck(lambda a, b, c, kw=kw: rms_norm_gated(a, b, c, 1e-3, **kw), (x, z, w))


def test_group_size_none_is_one_group_of_the_whole_row():
    gen = torch.Generator().manual_seed(2)
    x, z, w, _ = _inputs((5,), 48, torch.float32, {}, gen)
    for name in BACKENDS:
        with backend(name):
            assert torch.equal(rms_norm_gated(x, z, w, EPS), rms_norm_gated(x, z, w, EPS, group_size=48))


# ----------------------------------------------------------------------------------------------------
# Equality with the transformers modules
# ----------------------------------------------------------------------------------------------------

# (model, class, constructor kwargs beyond (hidden, eps), fastft flags); "G" in the kwargs stands for the
# group size (Mamba-2 family) and "N" for the number of groups (Falcon-H1), filled in by the test.
TRANSFORMERS_MODULES = [
    ("qwen3_next", "Qwen3NextRMSNormGated", {}, {}),
    ("qwen3_5", "Qwen3_5RMSNormGated", {}, {}),
    ("qwen3_5_moe", "Qwen3_5MoeRMSNormGated", {}, {}),
    ("olmo_hybrid", "OlmoHybridRMSNormGated", {}, {}),
    ("qwen4_exp", "Qwen4ExpTextRMSNormGated", {"activation": "sigmoid"}, {"activation": "sigmoid"}),
    ("kimi_linear", "KimiLinearRMSNormGated", {}, {"activation": "sigmoid", "weight_in_fp32": True}),
    ("bailing_hybrid", "BailingHybridRMSNormGated", {}, {"activation": "sigmoid", "weight_in_fp32": True}),
    ("glm5_next", "Glm5NextTextRMSNormGated", {}, {"activation": "sigmoid", "weight_in_fp32": True}),
    ("lara_mini", "LaraMiniRMSNormGated", {}, {"weight_in_fp32": True}),
    ("mamba2", "Mamba2RMSNormGated", {"group_size": "G"}, {"norm_before_gate": False}),
    ("nemotron_h", "NemotronHRMSNormGated", {"group_size": "G"}, {"norm_before_gate": False}),
    ("bamba", "BambaRMSNormGated", {"group_size": "G"}, {"norm_before_gate": False}),
    ("granitemoehybrid", "GraniteMoeHybridRMSNormGated", {"group_size": "G"}, {"norm_before_gate": False}),
    ("zamba2", "Zamba2RMSNormGated", {"group_size": "G"}, {"norm_before_gate": False}),
    (
        "falcon_h1",
        "FalconH1RMSNormGated",
        {"n_groups": "N", "norm_before_gate": False},
        {"norm_before_gate": False, "weight_in_fp32": True},
    ),
    (
        "falcon_h1",
        "FalconH1RMSNormGated",
        {"n_groups": "N", "norm_before_gate": True},
        {"norm_before_gate": True, "weight_in_fp32": True},
    ),
]

# Tolerance of fastft against the transformers module, as a multiple of the dtype's unit roundoff times the
# largest |value| of the compared tensor. fp32: DESIGN.md's ~1e-5 relative (the sums of squares and the
# reductions of the backward run in another order; each is a few fp32 roundings, far below this).
# bf16: 4 roundings. The forward rounds where transformers rounds, so it differs only where a 1-ulp fp32
# difference in rstd crosses a rounding boundary (1 ulp of bf16). transformers' gradients pass through its
# 16-bit intermediates (weight * n.to(bf16) is a bf16 tensor, autograd rounds its gradients to bf16 too),
# fastft's are computed in fp32 and rounded once, so they differ by transformers' own rounding error: up to
# ~2 bf16 roundings of the largest gradient here. A missing or misplaced cast is a systematic error well above.
TOLERANCE_VS_TRANSFORMERS = {torch.float32: 1e-5, torch.bfloat16: 4 * 2.0**-8}


def _transformers_module(model, cls, ctor, hidden, group_size, w):
    modeling = importlib.import_module(f"transformers.models.{model}.modeling_{model}")
    values = {"G": group_size, "N": hidden // group_size}
    kwargs = {k: values.get(v, v) if isinstance(v, str) else v for k, v in ctor.items()}
    module = getattr(modeling, cls)(hidden, eps=EPS, **kwargs)
    module.to(w.dtype).weight.data.copy_(w.detach())
    return module


@pytest.mark.parametrize(
    "x_dtype,w_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)],
    ids=["fp32", "bf16", "bf16-fp32-weight"],
)
@pytest.mark.parametrize("model,cls,ctor,flags", TRANSFORMERS_MODULES, ids=lambda v: v if isinstance(v, str) else "")
def test_matches_transformers(model, cls, ctor, flags, x_dtype, w_dtype):
    pytest.importorskip("transformers")
    hidden = 96
    grouped = any(v in ("G", "N") for v in ctor.values())
    group_size = 32 if grouped else None
    kw = {**flags, "group_size": group_size}
    gen = torch.Generator().manual_seed(3)
    x = _make_x((3, 5), hidden, x_dtype, "contiguous", 3.0, gen)
    z = _make_x((3, 5), hidden, x_dtype, "contiguous", 2.0, gen)
    w = _make_weight(hidden, w_dtype, 0.0, gen)
    module = _transformers_module(model, cls, ctor, hidden, group_size or hidden, w)

    xm, zm = x.detach().clone().requires_grad_(), z.detach().clone().requires_grad_()
    y_hf = module(xm, zm)
    dy = torch.randn(y_hf.shape, generator=gen).to(y_hf.dtype)
    y_hf.backward(dy)
    hf = (y_hf.detach(), xm.grad, zm.grad, module.weight.grad)

    # The reference performs transformers' operations in transformers' dtypes: bit-for-bit equal.
    ref = _forward_backward(rms_norm_gated_reference, x, z, w, dy, kw)
    for name, r, h in zip(("y", "dx", "dgate", "dw"), ref, hf):
        assert r.dtype == h.dtype and torch.equal(r, h), name

    exact = _forward_backward(_exact, x, z, w, dy, kw, dtype=torch.float64)
    tolerance = TOLERANCE_VS_TRANSFORMERS[x_dtype]
    for name in BACKENDS:
        with backend(name):
            ours = _forward_backward(rms_norm_gated, x, z, w, dy, kw)
        for label, a, h, e in zip(("y", "dx", "dgate", "dw"), ours, hf, exact):
            assert a.dtype == h.dtype, f"{label} [{name}]: dtype {a.dtype}, transformers gives {h.dtype}"
            assert_no_worse_than_torch(a, h, e, name=f"{label} vs transformers [{name}]")
            limit = tolerance * h.double().abs().max().item()
            difference = (a.double() - h.double()).abs().max().item()
            assert difference <= limit, f"{label} [{name}]: differs from transformers by {difference:.3e} > {limit:.3e}"
        if x_dtype != torch.float32:
            # Rounding where transformers rounds gives the same bits except where a 1-ulp difference in fp32
            # rstd (summation order) crosses a rounding boundary; rounding anywhere else changes many outputs.
            same_bits = (ours[0] == hf[0]).double().mean().item()
            assert same_bits >= 0.97, f"y [{name}]: only {same_bits:.1%} of outputs equal transformers' bits"


# ----------------------------------------------------------------------------------------------------
# Kernel (interpreted Triton) and torch path vs float64, over shapes
# ----------------------------------------------------------------------------------------------------

LAYOUTS = ["contiguous", "row_slice", "transposed"]


@st.composite
def _cases(draw):
    group = draw(st.one_of(st.integers(1, 80), st.sampled_from([127, 128, 129, 255, 256, 257, 513])))
    n_groups = draw(st.sampled_from([None, 1, 2, 3]))  # None: group_size=None (the whole row)
    lead = draw(st.sampled_from([(), (1,), (3,), (7,), (2, 3), (33,), (0,)]))
    layouts = (draw(st.sampled_from(LAYOUTS)), draw(st.sampled_from(LAYOUTS)))
    variant = draw(st.sampled_from(list(VARIANTS)))
    scales = (draw(st.sampled_from([1e-2, 1.0, 30.0])), draw(st.sampled_from([0.5, 3.0, 12.0])))
    seed = draw(st.integers(0, 2**16))
    return group, n_groups, lead, layouts, variant, scales, seed


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("backend_name", BACKENDS)
@given(case=_cases())
@example(case=(257, None, (3,), ("contiguous", "contiguous"), "qwen3_next", (1.0, 3.0), 0))  # past a power of 2
@example(case=(1025, 4, (10,), ("row_slice", "row_slice"), "mamba2", (1.0, 3.0), 1))  # several tiles per program
@example(case=(128, None, (33,), ("contiguous", "row_slice"), "kimi_linear", (1.0, 3.0), 2))  # 32-row tile + 1
@example(case=(1, 3, (5,), ("transposed", "contiguous"), "falcon_h1_gate_first", (30.0, 3.0), 3))  # groups of 1
@example(case=(64, 2, (65,), ("contiguous", "transposed"), "offset_gate_first_sigmoid", (1.0, 12.0), 4))
def test_forward_and_gradients_vs_float64(backend_name, dtype, case):
    group, n_groups, lead, layouts, variant, scales, seed = case
    hidden = group * (n_groups or 1)
    kw = {**VARIANTS[variant], "group_size": None if n_groups is None else group}
    gen = torch.Generator().manual_seed(seed)
    x, z, w, dy = _inputs(lead, hidden, dtype, kw, gen, layouts, scales)
    y, dx, dz, dw = _check_all(x, z, w, dy, kw, backend_name)
    assert y.shape == x.shape and dx.shape == x.shape and dz.shape == z.shape and dw.shape == w.shape


# ----------------------------------------------------------------------------------------------------
# Edge cases
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("lead", [(0,), (2, 0)])
def test_empty_input(backend_name, lead):
    x = torch.randn(*lead, 64, dtype=torch.bfloat16, requires_grad=True)
    z = torch.randn(*lead, 64, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(64, dtype=torch.float32, requires_grad=True)
    with backend(backend_name):
        y = rms_norm_gated(x, z, w, EPS, norm_before_gate=False, group_size=16)
        assert y.shape == x.shape and y.dtype == torch.float32  # Mamba-2 form: promoted with the weight
        y.sum().backward()
    assert x.grad.shape == x.shape and z.grad.shape == z.shape
    assert torch.equal(w.grad, torch.zeros(64))  # no rows: the weight gradient is exactly zero


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize(
    "rows,hidden,group_size", [(1, 1, None), (1, 64, None), (1, 4096, 1024), (3, 257, None), (2, 4097, None)]
)
def test_edge_shapes(backend_name, rows, hidden, group_size):
    gen = torch.Generator().manual_seed(rows * 10_000 + hidden)
    for variant in ("qwen3_next", "mamba2", "kimi_linear"):
        kw = {**VARIANTS[variant], "group_size": group_size}
        _check_all(*_inputs((rows,), hidden, torch.bfloat16, kw, gen), kw, backend_name)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_gate_as_half_of_a_fused_projection(backend_name):
    # Qwen3-Next-style callers may hand the gate as a slice of a wider projection output: read in place.
    gen = torch.Generator().manual_seed(4)
    x, _, w, dy = _inputs((4, 3), 40, torch.float32, {}, gen)
    fused = torch.randn(4, 3, 80, generator=gen, requires_grad=True)
    z = fused[..., 40:]
    with backend(backend_name):
        y = rms_norm_gated(x, z, w, EPS)
        y.backward(dy)
    xr, fr = x.detach().double().requires_grad_(), fused.detach().double().requires_grad_()
    rms_norm_gated_reference(xr, fr[..., 40:], w.detach().double(), EPS).backward(dy.double())
    torch.testing.assert_close(fused.grad.double(), fr.grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(fused.grad[..., :40], torch.zeros(4, 3, 40))


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_strided_weight(backend_name):
    gen = torch.Generator().manual_seed(6)
    x, z, _, dy = _inputs((3,), 50, torch.float32, {}, gen)
    w = torch.randn(100, generator=gen)[::2].detach().requires_grad_()  # a non-contiguous weight view
    _check_all(x, z, w, dy, {"group_size": 25, "norm_before_gate": False}, backend_name)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_groups_wider_than_the_fused_kernel_run_the_torch_path(backend_name):
    gen = torch.Generator().manual_seed(7)
    kw = {"weight_in_fp32": True}
    _check_all(*_inputs((1,), 65537, torch.float32, kw, gen), kw, backend_name)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("variant", ["qwen3_next", "mamba2"])
def test_sum_loss_gives_expanded_gradient(backend_name, variant):
    # y.sum().backward() hands the backward a stride-0 expanded gradient.
    kw = {**VARIANTS[variant], "group_size": 32}
    x = torch.randn(6, 96, dtype=torch.float16, requires_grad=True)
    z = torch.randn(6, 96, dtype=torch.float16, requires_grad=True)
    w = torch.rand(96, dtype=torch.float16, requires_grad=True)
    with backend(backend_name):
        rms_norm_gated(x, z, w, EPS, **kw).sum().backward()
    xr, zr, wr = (t.detach().double().requires_grad_() for t in (x, z, w))
    rms_norm_gated_reference(xr, zr, wr, EPS, **kw).sum().backward()
    for ours, exact in ((x.grad, xr.grad), (z.grad, zr.grad), (w.grad, wr.grad)):
        torch.testing.assert_close(ours.double(), exact, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("variant", ["qwen3_next", "mamba2", "offset_gate_first_sigmoid"])
def test_frozen_weight(backend_name, variant):
    gen = torch.Generator().manual_seed(8)
    kw = {**VARIANTS[variant], "group_size": 26}
    x, z, w, dy = _inputs((5,), 130, torch.bfloat16, kw, gen)
    w.requires_grad_(False)
    _, dx, dz, dw = _check_all(x, z, w, dy, kw, backend_name, names=("y", "dx", "dgate"))
    assert dw is None and w.grad is None and dx is not None and dz is not None


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("variant", ["qwen3_next", "mamba2"])
@pytest.mark.parametrize("trainable", ["x", "gate", "weight"])
def test_only_one_input_needs_a_gradient(backend_name, variant, trainable):
    gen = torch.Generator().manual_seed(9)
    kw = {**VARIANTS[variant], "group_size": 10}
    x, z, w, dy = _inputs((4,), 70, torch.float32, kw, gen)
    for name, t in (("x", x), ("gate", z), ("weight", w)):
        t.requires_grad_(name == trainable)
    with backend(backend_name):
        rms_norm_gated(x, z, w, EPS, **kw).backward(dy)
    leaves = [t.detach().double().requires_grad_() for t in (x, z, w)]
    rms_norm_gated_reference(*leaves, EPS, **kw).backward(dy.double())
    for name, t, exact in zip(("x", "gate", "weight"), (x, z, w), leaves):
        if name == trainable:
            torch.testing.assert_close(t.grad.double(), exact.grad, rtol=1e-5, atol=1e-5)
        else:
            assert t.grad is None


def test_backward_launcher_skips_unrequested_gradients():
    gen = torch.Generator().manual_seed(10)
    x, z, dy = (torch.randn(9, 300, generator=gen).to(torch.bfloat16) for _ in range(3))
    w = torch.randn(300, generator=gen).to(torch.bfloat16)
    v = _Variant(group_size=100, norm_before_gate=False, sigmoid=False, weight_in_fp32=False, offset=0.0)
    u = (x.float() * torch.nn.functional.silu(z.float())).view(9, 3, 100)
    rstd = torch.rsqrt(u.pow(2).mean(-1) + EPS).reshape(-1)
    for needs in [(True, False, False), (False, True, False), (False, False, True)]:
        grads = _backward_triton(dy, x, z, w, rstd, v, needs)
        for need, grad, shape in zip(needs, grads, [(9, 300), (9, 300), (300,)]):
            assert (grad is not None) == need and (grad is None or (grad.shape == shape and grad.dtype == x.dtype))


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("variant", ["qwen3_next", "mamba2"])
def test_zero_row(backend_name, variant):
    x = torch.zeros(3, 40, requires_grad=True)
    z = torch.randn(3, 40, requires_grad=True)
    w = torch.rand(40, requires_grad=True)
    dy = torch.randn(3, 40)
    with backend(backend_name):
        y = rms_norm_gated(x, z, w, EPS, **VARIANTS[variant])
        y.backward(dy)
    assert torch.equal(y, torch.zeros(3, 40))
    # n = 0, so dx = rstd * dy * w * a with rstd = 1 / sqrt(eps) (also gate first: du * a), dgate = 0, dw = 0
    a = torch.nn.functional.silu(z.detach())
    torch.testing.assert_close(x.grad, dy * w.detach() * a / EPS**0.5, rtol=1e-5, atol=1e-5)
    assert torch.equal(z.grad, torch.zeros(3, 40)) and torch.equal(w.grad, torch.zeros(40))


def test_extreme_gates_stay_finite():
    # silu'(z) and sigmoid'(z) need 1 - sigma(z): computed as sigma(-z), it neither cancels nor overflows.
    z = torch.tensor([[-1e4, -100.0, -30.0, 0.0, 30.0, 100.0, 1e4, 5.0]], requires_grad=True)
    x = torch.ones(1, 8, requires_grad=True)
    for activation in ("silu", "sigmoid"):
        for name in BACKENDS:
            with backend(name):
                rms_norm_gated(x, z, torch.ones(8), EPS, activation=activation).sum().backward()
            assert torch.isfinite(x.grad).all() and torch.isfinite(z.grad).all(), (activation, name)
            x.grad = z.grad = None


def test_weight_gradient_is_deterministic():
    x = torch.randn(300, 48, requires_grad=True)
    z = torch.randn(300, 48, requires_grad=True)
    w = torch.rand(48, requires_grad=True)
    grads = []
    for _ in range(2):
        with backend("triton"):
            rms_norm_gated(x, z, w, EPS, group_size=16).sum().backward()
        grads.append(w.grad.clone())
        w.grad = None
    assert torch.equal(grads[0], grads[1])


# ----------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------


def _ok():
    return torch.randn(2, 8), torch.randn(2, 8), torch.ones(8)


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: (*_ok()[:2], torch.ones(9), {}), ValueError, r"weight must have shape \(H,\) = \(8,\)"),
        (lambda: (torch.randn(2, 8), torch.randn(2, 9), torch.ones(8), {}), ValueError, r"gate must have the shape"),
        (lambda: (torch.randn(2, 8), torch.randn(8), torch.ones(8), {}), ValueError, r"got \(8,\)"),
        (lambda: (*_ok(), {"group_size": 3}), ValueError, r"group_size must be a positive divisor .* \(H=8\), got 3"),
        (lambda: (*_ok(), {"group_size": 0}), ValueError, "group_size must be a positive divisor"),
        (lambda: (*_ok(), {"group_size": 4.0}), TypeError, "group_size must be None or a positive int"),
        (lambda: (*_ok(), {"group_size": True}), TypeError, "group_size must be None or a positive int"),
        (lambda: (*_ok(), {"activation": "gelu"}), ValueError, "activation must be 'silu' or 'sigmoid'"),
        (lambda: (*_ok(), {"norm_before_gate": 1}), TypeError, "norm_before_gate must be True or False"),
        (lambda: (*_ok(), {"weight_in_fp32": None}), TypeError, "weight_in_fp32 must be True or False"),
        (lambda: (*_ok(), {"offset": 1.0}), ValueError, "pass weight_in_fp32=True with it"),
        (lambda: (*_ok(), {"offset": "1"}), TypeError, "offset must be a Python number"),
        (lambda: (*_ok(), {"eps": -1e-6}), ValueError, "eps must be >= 0"),
        (lambda: (*_ok(), {"eps": float("nan")}), ValueError, "eps must be finite"),
        (lambda: (*_ok(), {"eps": torch.tensor(1e-6)}), TypeError, "eps must be a Python number"),
        (lambda: (torch.ones(2, 8, dtype=torch.int32), *_ok()[1:], {}), TypeError, "x must be a floating-point"),
        (lambda: (_ok()[0], torch.ones(2, 8, dtype=torch.bool), _ok()[2], {}), TypeError, "gate must be a floating"),
        (lambda: (*_ok()[:2], torch.ones(8, dtype=torch.int64), {}), TypeError, "weight must be a floating"),
        (lambda: (torch.tensor(1.0), torch.tensor(1.0), torch.ones(1), {}), ValueError, "at least one dimension"),
        (lambda: ([[1.0]], torch.ones(1, 1), torch.ones(1), {}), TypeError, "x must be a torch.Tensor, got list"),
        (lambda: (*_ok()[:2], torch.ones(8, device="meta"), {}), ValueError, "weight is on meta"),
        (lambda: (_ok()[0], torch.ones(2, 8, device="meta"), _ok()[2], {}), ValueError, "gate is on meta"),
    ],
)
def test_bad_input_raises_clear_error(make, error, match):
    x, z, w, kwargs = make()
    kwargs = {"eps": EPS, **kwargs}
    with pytest.raises(error, match=match):
        rms_norm_gated(x, z, w, **kwargs)


# ----------------------------------------------------------------------------------------------------
# Memory: exactly x, the gate, the weight and one fp32 rstd per row and group
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("variant", ["qwen3_next", "mamba2"])
def test_saved_tensors_are_input_gate_weight_and_rstd(backend_name, variant):
    batch, seq, hidden, groups = 2, 6, 256, 4
    x = torch.randn(batch, seq, hidden, dtype=torch.bfloat16, requires_grad=True)
    z = torch.randn(batch, seq, hidden, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(hidden, dtype=torch.bfloat16, requires_grad=True)
    kw = {**VARIANTS[variant], "group_size": hidden // groups}
    with backend(backend_name), SavedTensorMeter() as meter:
        rms_norm_gated(x, z, w, EPS, **kw)
    assert sorted((s.shape, s.dtype) for s in meter.saved) == sorted(
        [
            ((batch, seq, hidden), torch.bfloat16),
            ((batch, seq, hidden), torch.bfloat16),
            ((hidden,), torch.bfloat16),
            ((batch * seq * groups,), torch.float32),
        ]
    )
    assert meter.total_bytes == 2 * batch * seq * hidden * 2 + hidden * 2 + batch * seq * groups * 4
    # transformers' module (the reference performs its operations) keeps fp32 copies of the activations
    with SavedTensorMeter() as reference_meter:
        rms_norm_gated_reference(x, z, w, EPS, **kw)
    assert reference_meter.total_bytes > 3 * meter.total_bytes


# ----------------------------------------------------------------------------------------------------
# Audit cases
# ----------------------------------------------------------------------------------------------------


def test_audit_cases_cover_the_kernels_with_their_bytes_model():
    cases = {case.name: case for case in audit_cases()}
    kernels = set()
    for case in cases.values():
        params = list(inspect.signature(getattr(case.kernel, "fn", case.kernel)).parameters)
        assert sorted(case.args) == sorted(params), case.name
        block, rows, num_warps = _launch_config(case.args["group_size"])
        assert (case.args["BLOCK_SIZE"], case.args["ROWS"], case.num_warps) == (block, rows, num_warps)
        kernels.add(getattr(case.kernel, "fn", case.kernel).__name__)
    assert kernels == {"_rms_norm_gated_forward_kernel", "_rms_norm_gated_backward_kernel"}
    rows, head_dim = 8192 * 32, 128
    # forward: read x, gate (bf16) and w, write y (bf16) and one fp32 rstd per row (one group)
    forward = cases["rms_norm_gated_forward_qwen3_next"]
    assert forward.min_bytes == 3 * rows * head_dim * 2 + head_dim * 2 + rows * 4
    # backward: read x, gate, dy, rstd, w; write dx, dgate and one fp32 row of partial dw per program
    backward = cases["rms_norm_gated_backward_qwen3_next"]
    programs = -(-(rows // backward.args["ROWS"]) // backward.args["tiles_per_program"])
    assert backward.min_bytes == 5 * rows * head_dim * 2 + rows * 4 + head_dim * 2 + programs * head_dim * 4
    # grouped: one rstd per row and group
    grouped = cases["rms_norm_gated_forward_nemotron_h_grouped"]
    assert grouped.min_bytes == 3 * 8192 * 8192 * 2 + 8192 * 2 + 8192 * 8 * 4
