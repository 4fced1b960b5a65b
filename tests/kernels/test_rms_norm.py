"""RMSNorm: semantics (float64, transformers' Llama/Gemma modules), Triton and torch paths vs float64 over
property-based shapes, edge cases, errors, and the exact bytes kept for backward."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from fastft.kernels.rms_norm import (
    _as_rows,
    _launch_config,
    _rms_norm_backward_triton,
    audit_cases,
    rms_norm,
    rms_norm_reference,
)
from fastft.utils.memory import SavedTensorMeter
from tests.helpers import BACKENDS, DTYPES, assert_no_worse_than_torch, backend

EPS = 1e-6
OFFSETS = (0.0, 1.0)  # Llama form, Gemma form


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


def _make_x(lead: tuple[int, ...], hidden: int, dtype: torch.dtype, layout: str, scale: float, gen) -> torch.Tensor:
    """A leaf tensor of shape (*lead, hidden) in the given memory layout."""
    if layout == "contiguous":
        x = torch.randn(*lead, hidden, generator=gen, dtype=torch.float64)
    elif layout == "row_slice":  # last dim contiguous, rows strided: a slice of a wider buffer
        x = torch.randn(*lead, hidden + 7, generator=gen, dtype=torch.float64)[..., :hidden]
    elif layout == "transposed":  # last dim not contiguous
        x = torch.randn(hidden, *lead, generator=gen, dtype=torch.float64).movedim(0, -1)
    else:
        raise AssertionError(layout)
    # .to(dtype) on a float64 view of another dtype copies; rebuild the layout on the low-precision copy.
    low = (x * scale).to(dtype)
    if layout == "row_slice":
        base = torch.zeros(*lead, hidden + 7, dtype=dtype)
        base[..., :hidden] = low
        low = base[..., :hidden]
    elif layout == "transposed":
        low = low.movedim(-1, 0).contiguous().movedim(0, -1)
    return low.detach().requires_grad_()


def _make_weight(hidden: int, dtype: torch.dtype, offset: float, gen) -> torch.Tensor:
    # Llama weights sit around 1, Gemma's (applied as 1 + w) around 0.
    w = torch.randn(hidden, generator=gen, dtype=torch.float64) * 0.5 + (1.0 if offset == 0 else 0.0)
    return w.to(dtype).requires_grad_()


def _forward_backward(fn, x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor, offset: float, dtype=None):
    """(y, dx, dw) of ``fn`` on fresh leaves (cast to ``dtype`` if given) with upstream gradient ``dy``."""
    xl = (x.detach().to(dtype) if dtype else x.detach()).requires_grad_(x.requires_grad)
    wl = (w.detach().to(dtype) if dtype else w.detach()).requires_grad_(w.requires_grad)
    y = fn(xl, wl, EPS, offset)
    y.backward(dy.to(y.dtype))
    return y.detach(), xl.grad, wl.grad


def _check_all(x, w, dy, offset, backend_name, names=("y", "dx", "dw")):
    """fastft (on ``backend_name``) vs the reference in the same dtypes vs the float64 reference."""
    with backend(backend_name):
        ours = _forward_backward(rms_norm, x, w, dy, offset)
    same = _forward_backward(rms_norm_reference, x, w, dy, offset)
    exact = _forward_backward(rms_norm_reference, x, w, dy, offset, dtype=torch.float64)
    scales = _magnitudes(x, w, dy, offset)
    for name, a, t, e in zip(names, ours, same, exact):
        terms = scales[name].max().item() if scales[name].numel() else None
        assert_no_worse_than_torch(a, t, e, name=f"{name} [{backend_name}, offset {offset}]", scale=terms)
        if x.dtype == w.dtype == torch.float32:
            # DESIGN.md: fp32 within ~1e-5 relative of float64, element by element, relative to the magnitude
            # of the terms that make up each value (dx and dw are differences/sums that may cancel).
            error = (a.double() - e).abs()
            assert (error <= 1e-5 * scales[name] + 1e-30).all(), f"{name}: max error {error.max().item():.3e}"
    return ours


def _magnitudes(x, w, dy, offset):
    """Per element, the float64 sum of |terms| of y, dx and dw (the scale a rounding error is relative to)."""
    x64, w64, dy64 = x.detach().double(), w.detach().double(), dy.double()
    rstd = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS)
    normed = x64 * rstd
    g = dy64 * (offset + w64)
    return {
        "y": (normed * (offset + w64)).abs(),
        "dx": rstd * (g.abs() + normed.abs() * (g * normed).abs().mean(-1, keepdim=True)),
        "dw": (dy64 * normed).abs().reshape(-1, x.shape[-1]).sum(0),
    }


# ----------------------------------------------------------------------------------------------------
# Semantics
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [0.0, 1.0, 0.5])
def test_reference_is_the_float64_formula(offset):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 33, generator=gen, dtype=torch.float64)
    w = torch.randn(33, generator=gen, dtype=torch.float64)
    by_hand = x / torch.sqrt((x * x).sum(-1, keepdim=True) / 33 + EPS) * (offset + w)
    torch.testing.assert_close(rms_norm_reference(x, w, EPS, offset), by_hand, rtol=1e-13, atol=1e-13)
    # Float64 stays float64 on both backends (the Triton kernels take 16/32-bit floats; float64 runs the torch path).
    for name in BACKENDS:
        with backend(name):
            out = rms_norm(x, w, EPS, offset)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, by_hand, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_float64_gradients_pass_gradcheck(offset):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-3, offset), (x, w))


# (x dtype, weight dtype): same dtypes, and mixed ones (fp32 weights kept by mixed-precision training, etc.)
DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.float16),
]


def _transformers_norm(offset: float, hidden: int, w: torch.Tensor) -> torch.nn.Module:
    if offset == 0:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        module = LlamaRMSNorm(hidden, eps=EPS)
    else:
        from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

        module = GemmaRMSNorm(hidden, eps=EPS)
    module.to(w.dtype).weight.data.copy_(w.detach())
    return module


@pytest.mark.parametrize("x_dtype,w_dtype", DTYPE_PAIRS, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("offset", OFFSETS, ids=["llama", "gemma"])
def test_matches_transformers(offset, x_dtype, w_dtype):
    pytest.importorskip("transformers")
    gen = torch.Generator().manual_seed(2)
    x = _make_x((3, 5), 96, x_dtype, "contiguous", 3.0, gen)
    w = _make_weight(96, w_dtype, offset, gen)
    module = _transformers_norm(offset, 96, w)

    xm = x.detach().clone().requires_grad_()
    y_hf = module(xm)
    dy = torch.randn(y_hf.shape, generator=gen).to(y_hf.dtype)
    y_hf.backward(dy)
    hf = (y_hf.detach(), xm.grad, module.weight.grad)

    # The reference performs transformers' operations in transformers' dtypes: bit-for-bit equal.
    ref = _forward_backward(rms_norm_reference, x, w, dy, offset)
    for name, r, h in zip(("y", "dx", "dw"), ref, hf):
        assert r.dtype == h.dtype and torch.equal(r, h), name

    exact = _forward_backward(rms_norm_reference, x, w, dy, offset, dtype=torch.float64)
    for name in BACKENDS:
        with backend(name):
            ours = _forward_backward(rms_norm, x, w, dy, offset)
        for label, a, h, e in zip(("y", "dx", "dw"), ours, hf, exact):
            assert a.dtype == h.dtype, f"{label} [{name}]: dtype {a.dtype}, transformers gives {h.dtype}"
            assert_no_worse_than_torch(a, h, e, name=f"{label} vs transformers [{name}]")
        if x_dtype != torch.float32:
            # Rounding where transformers rounds (before the weight for Llama, after it for Gemma) gives the
            # same bits except where a 1-ulp difference in fp32 rstd (summation order) crosses a rounding
            # boundary; rounding anywhere else changes a large share of the outputs.
            same_bits = (ours[0] == hf[0]).double().mean().item()
            assert same_bits >= 0.99, f"y [{name}]: only {same_bits:.1%} of outputs equal transformers' bits"


# ----------------------------------------------------------------------------------------------------
# Kernel (interpreted Triton) and torch path vs float64, over shapes
# ----------------------------------------------------------------------------------------------------


@st.composite
def _cases(draw):
    hidden = draw(st.one_of(st.integers(1, 80), st.sampled_from([127, 128, 129, 255, 256, 257, 511, 513, 1025])))
    lead = draw(st.sampled_from([(), (1,), (3,), (7,), (2, 3), (33,), (0,)]))
    layout = draw(st.sampled_from(["contiguous", "row_slice", "transposed"]))
    offset = draw(st.sampled_from(OFFSETS))
    scale = draw(st.sampled_from([1e-2, 1.0, 30.0]))
    seed = draw(st.integers(0, 2**16))
    return hidden, lead, layout, offset, scale, seed


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("backend_name", BACKENDS)
@given(case=_cases())
@example(case=(257, (3,), "contiguous", 0.0, 1.0, 0))  # just past a power of two
@example(case=(4097, (10,), "row_slice", 1.0, 1.0, 1))  # past 4096; several row tiles per backward program
@example(case=(128, (33,), "contiguous", 0.0, 1.0, 2))  # 32 rows per tile: one full tile + one row
@example(case=(1, (5,), "transposed", 1.0, 30.0, 3))  # H = 1
def test_forward_and_gradients_vs_float64(backend_name, dtype, case):
    hidden, lead, layout, offset, scale, seed = case
    gen = torch.Generator().manual_seed(seed)
    x = _make_x(lead, hidden, dtype, layout, scale, gen)
    w = _make_weight(hidden, dtype, offset, gen)
    dy = torch.randn(*lead, hidden, generator=gen).to(dtype)
    y, dx, dw = _check_all(x, w, dy, offset, backend_name)
    assert y.shape == x.shape and dx.shape == x.shape and dw.shape == w.shape


# ----------------------------------------------------------------------------------------------------
# Edge cases
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("lead", [(0,), (2, 0)])
def test_empty_input(backend_name, lead):
    x = torch.randn(*lead, 64, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(64, dtype=torch.float32, requires_grad=True)
    with backend(backend_name):
        y = rms_norm(x, w)
        assert y.shape == x.shape and y.dtype == torch.float32
        y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros(64))  # no rows: the weight gradient is exactly zero


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("rows,hidden", [(1, 1), (1, 64), (1, 4096), (3, 257), (2, 4097), (65, 64)])
def test_edge_shapes(backend_name, rows, hidden):
    gen = torch.Generator().manual_seed(rows * 10_000 + hidden)
    for offset in OFFSETS:
        x = _make_x((rows,), hidden, torch.bfloat16, "contiguous", 1.0, gen)
        w = _make_weight(hidden, torch.bfloat16, offset, gen)
        _check_all(x, w, torch.randn(rows, hidden, generator=gen).to(torch.bfloat16), offset, backend_name)


def test_strided_rows_are_viewed_not_copied():
    base = torch.randn(4, 6, 100)
    sliced = base[..., :64]  # rows of 64 with a row stride of 100
    rows = _as_rows(sliced, 64)
    assert rows.data_ptr() == base.data_ptr() and rows.shape == (24, 64) and rows.stride() == (100, 1)
    transposed = torch.randn(64, 24).t()  # last dim not contiguous: needs a copy
    rows = _as_rows(transposed, 64)
    assert rows.is_contiguous() and torch.equal(rows, transposed)
    uncollapsible = torch.randn(6, 4, 64).transpose(0, 1)  # last dim contiguous, leading dims not one stride
    assert torch.equal(_as_rows(uncollapsible, 64), uncollapsible.reshape(-1, 64))


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("layout", ["row_slice", "transposed"])
def test_non_contiguous_input(backend_name, layout):
    gen = torch.Generator().manual_seed(3)
    x = _make_x((2, 5), 200, torch.bfloat16, layout, 1.0, gen)
    assert not x.is_contiguous()
    for offset in OFFSETS:
        w = _make_weight(200, torch.bfloat16, offset, gen)
        _check_all(x, w, torch.randn(2, 5, 200, generator=gen).to(torch.bfloat16), offset, backend_name)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_strided_weight(backend_name):
    gen = torch.Generator().manual_seed(6)
    x = _make_x((3,), 50, torch.float32, "contiguous", 1.0, gen)
    w = torch.randn(100, generator=gen)[::2].detach().requires_grad_()  # a non-contiguous weight view
    _check_all(x, w, torch.randn(3, 50, generator=gen), 0.0, backend_name)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_rows_wider_than_the_fused_kernel_run_the_torch_path(backend_name):
    gen = torch.Generator().manual_seed(7)
    x = _make_x((1,), 65537, torch.float32, "contiguous", 1.0, gen)
    w = _make_weight(65537, torch.float32, 1.0, gen)
    _check_all(x, w, torch.randn(1, 65537, generator=gen), 1.0, backend_name)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_sum_loss_gives_expanded_gradient(backend_name):
    # y.sum().backward() hands the backward a stride-0 expanded gradient.
    x = torch.randn(6, 96, dtype=torch.float16, requires_grad=True)
    w = torch.rand(96, dtype=torch.float16, requires_grad=True)
    with backend(backend_name):
        rms_norm(x, w).sum().backward()
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    rms_norm_reference(xr, wr).sum().backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(w.grad.double(), wr.grad, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("offset", OFFSETS)
def test_frozen_weight(backend_name, offset):
    gen = torch.Generator().manual_seed(4)
    x = _make_x((5,), 130, torch.bfloat16, "contiguous", 1.0, gen)
    w = _make_weight(130, torch.bfloat16, offset, gen).requires_grad_(False)
    dy = torch.randn(5, 130, generator=gen).to(torch.bfloat16)
    _, dx, dw = _check_all(x, w, dy, offset, backend_name, names=("y", "dx"))
    assert dw is None and w.grad is None and dx is not None


def test_backward_launcher_skips_unrequested_gradients():
    x, dy = torch.randn(9, 300, dtype=torch.bfloat16), torch.randn(9, 300, dtype=torch.bfloat16)
    w = torch.randn(300, dtype=torch.bfloat16)
    rstd = torch.rsqrt(x.float().pow(2).mean(-1) + EPS)
    dx, dw = _rms_norm_backward_triton(dy, x, w, rstd, 0.0, compute_dx=True, compute_dw=False)
    assert dw is None and dx.shape == x.shape
    dx, dw = _rms_norm_backward_triton(dy, x, w, rstd, 0.0, compute_dx=False, compute_dw=True)
    assert dx is None and dw.shape == (300,) and dw.dtype == torch.bfloat16


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_input_without_grad_still_gives_weight_grad(backend_name):
    gen = torch.Generator().manual_seed(5)
    x = _make_x((4,), 70, torch.float32, "contiguous", 1.0, gen).requires_grad_(False)
    w = _make_weight(70, torch.float32, 1.0, gen)
    with backend(backend_name):
        rms_norm(x, w, EPS, 1.0).backward(torch.ones(4, 70))
    wr = w.detach().double().requires_grad_()
    rms_norm_reference(x.double(), wr, EPS, 1.0).backward(torch.ones(4, 70, dtype=torch.float64))
    torch.testing.assert_close(w.grad.double(), wr.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_zero_row(backend_name):
    x = torch.zeros(3, 40, requires_grad=True)
    w = torch.rand(40, requires_grad=True)
    dy = torch.randn(3, 40)
    with backend(backend_name):
        y = rms_norm(x, w)
        y.backward(dy)
    assert torch.equal(y, torch.zeros(3, 40))
    # n = 0, so dx = rstd * dy * w with rstd = 1 / sqrt(eps), and dw = 0
    torch.testing.assert_close(x.grad, dy * w.detach() / EPS**0.5, rtol=1e-5, atol=1e-5)
    assert torch.equal(w.grad, torch.zeros(40))


def test_weight_gradient_is_deterministic():
    x = torch.randn(300, 48, requires_grad=True)
    w = torch.rand(48, requires_grad=True)
    grads = []
    for _ in range(2):
        with backend("triton"):
            rms_norm(x, w).sum().backward()
        grads.append(w.grad.clone())
        w.grad = None
    assert torch.equal(grads[0], grads[1])


# ----------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: (torch.randn(2, 8), torch.ones(9), {}), ValueError, r"weight must have shape \(H,\) = \(8,\)"),
        (lambda: (torch.randn(2, 8), torch.ones(1, 8), {}), ValueError, r"got \(1, 8\)"),
        (lambda: (torch.ones(2, 8, dtype=torch.int32), torch.ones(8), {}), TypeError, "x must be a floating-point"),
        (lambda: (torch.randn(2, 8), torch.ones(8, dtype=torch.int64), {}), TypeError, "weight must be a floating"),
        (lambda: (torch.randn(2, 8), torch.ones(8), {"eps": -1e-6}), ValueError, "eps must be >= 0"),
        (lambda: (torch.randn(2, 8), torch.ones(8), {"eps": float("nan")}), ValueError, "eps must be finite"),
        (lambda: (torch.randn(2, 8), torch.ones(8), {"eps": torch.tensor(1e-6)}), TypeError, "eps must be a Python"),
        (lambda: (torch.randn(2, 8), torch.ones(8), {"offset": "1"}), TypeError, "offset must be a Python number"),
        (lambda: (torch.randn(2, 8), torch.ones(8), {"offset": float("inf")}), ValueError, "offset must be finite"),
        (lambda: (torch.tensor(1.0), torch.ones(1), {}), ValueError, "at least one dimension"),
        (lambda: ([[1.0, 2.0]], torch.ones(2), {}), TypeError, "expects tensors for x and weight, got list"),
        (lambda: (torch.randn(2, 8), torch.ones(8, device="meta"), {}), ValueError, "weight is on meta"),
    ],
)
def test_bad_input_raises_clear_error(make, error, match):
    x, w, kwargs = make()
    with pytest.raises(error, match=match):
        rms_norm(x, w, **kwargs)


# ----------------------------------------------------------------------------------------------------
# Memory: exactly x, the weight and one fp32 rstd per row
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("weight_grad", [True, False])
def test_saved_tensors_are_input_weight_and_rstd(backend_name, weight_grad):
    batch, seq, hidden = 2, 6, 256
    x = torch.randn(batch, seq, hidden, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(hidden, dtype=torch.bfloat16, requires_grad=weight_grad)
    with backend(backend_name), SavedTensorMeter() as meter:
        rms_norm(x, w)
    assert sorted((s.shape, s.dtype) for s in meter.saved) == sorted(
        [((batch, seq, hidden), torch.bfloat16), ((hidden,), torch.bfloat16), ((batch * seq,), torch.float32)]
    )
    assert meter.total_bytes == batch * seq * hidden * 2 + hidden * 2 + batch * seq * 4
    # transformers' module keeps fp32 copies of the activations instead
    with SavedTensorMeter() as reference_meter:
        rms_norm_reference(x, w)
    assert reference_meter.total_bytes > meter.total_bytes


def test_saved_input_is_the_callers_tensor_not_a_copy():
    base = torch.randn(4, 300, requires_grad=True)
    x = base[:, :256]  # strided view: saved as is, no contiguous copy kept alive
    with backend("triton"), SavedTensorMeter() as meter:
        rms_norm(x, torch.ones(256))
    assert meter.total_bytes == base.numel() * 4 + 256 * 4 + 4 * 4


# ----------------------------------------------------------------------------------------------------
# Audit cases
# ----------------------------------------------------------------------------------------------------


def test_audit_cases_cover_the_kernels_with_their_bytes_model():
    import inspect

    cases = {case.name: case for case in audit_cases()}
    for case in cases.values():
        params = list(inspect.signature(getattr(case.kernel, "fn", case.kernel)).parameters)
        assert sorted(case.args) == sorted(params), case.name
        block, rows, num_warps = _launch_config(case.args["n_cols"])
        assert (case.args["BLOCK_SIZE"], case.args["ROWS"], case.num_warps) == (block, rows, num_warps)
    tokens, hidden = 8192, 4096
    # forward: read x (bf16) and w, write y (bf16) and one fp32 rstd per row
    forward = cases["rms_norm_forward_llama3_8b"]
    assert forward.min_bytes == 2 * tokens * hidden * 2 + hidden * 2 + tokens * 4
    # backward: read x, dy, rstd, w; write dx and one fp32 row of partial dw per program
    backward = cases["rms_norm_backward_llama3_8b"]
    programs = -(-tokens // backward.args["tiles_per_program"])
    assert backward.min_bytes == 3 * tokens * hidden * 2 + tokens * 4 + hidden * 2 + programs * hidden * 4
