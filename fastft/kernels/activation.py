"""Single-input activations of non-gated MLPs, ``h = act(u)``: GELU (erf, tanh, quick), relu^2 and xIELU.

Forward, per element, with Phi / phi the standard normal CDF / density and s = sigmoid::

    "gelu"       gelu(u)  = u Phi(u)                                   GELUActivation, nn.GELU()
    "gelu_tanh"  gelu(u)  = u (1 + tanh(k(u))) / 2 = u s(2 k(u)),       NewGELUActivation ("gelu_new": GPT-2, Phi),
                 k(u)     = sqrt(2/pi) (u + 0.044715 u^3)               GELUTanh ("gelu_pytorch_tanh": StarCoder2),
                                                                        FastGELU, AccurateGELU, nn.GELU("tanh")
    "relu2"      relu2(u) = max(u, 0)^2                                 ReLUSquaredActivation (Nemotron, Persimmon)
    "quick_gelu" qgelu(u) = u s(1.702 u)                                QuickGELUActivation (CLIP towers: LLaVA,
                                                                        Qwen2-VL's vision MLP)
    xIELU        u > 0:   a_p u^2 + beta u                              XIELUActivation (Apertus)
                 u <= 0:  (expm1(min(u, eps)) - u) a_n + beta u
                 a_p = softplus(alpha_p),  a_n = beta + softplus(alpha_n)   (alpha_p, alpha_n: trainable scalars)

Backward, with dh = dL/dh::

    du = dh * act'(u)
    gelu':       Phi(u) + u phi(u)
    gelu_tanh':  s + u * 2 s (1 - s) * k'(u),  s = s(2k),  k'(u) = sqrt(2/pi) (1 + 3 * 0.044715 u^2)
                 (1 + tanh(k)) / 2 = s(2k) and 1 - tanh(k)^2 = 4 s (1 - s): no tanh is evaluated)
    relu2':      2 max(u, 0)
    quick_gelu': s + 1.702 u s (1 - s),  s = s(1.702 u)   (1 - s from sigmoid_pair, no cancellation)
    xIELU':      u > 0:        2 a_p u + beta
                 u < eps:      expm1(u) a_n + beta           (d expm1(u) / du = expm1(u) + 1)
                 u == eps:     (expm1(eps) / 2 - 1/2) a_n + beta    (torch.min gives half the gradient to each
                                                                     argument at a tie; matched here)
                 eps < u <= 0: beta - a_n
    d alpha_p = sigmoid(alpha_p) * sum over u > 0  of dh u^2              (softplus' = sigmoid; 1 above 20, as
    d alpha_n = sigmoid(alpha_n) * sum over u <= 0 of dh (expm1(min(u, eps)) - u)     torch's threshold)

Rounding. Everything elementwise is computed in fp32 (float64 for float64 inputs) and rounded once to u's
dtype. transformers rounds as follows: ReLUSquaredActivation's relu is exact and its square rounds once, so
relu2 is bit-identical in every dtype; GELUActivation and GELUTanh call F.gelu, which also computes bf16/fp16
in fp32 and rounds once (within one ulp, except in the lower tail, u < -5, where F.gelu's (1 + erf) / 2 and
(1 + tanh) / 2 cancel to 0 and fastft keeps the tiny true value); NewGELUActivation and the
other Python formulas, and xIELU, round after every op in bf16/fp16 (fastft is more accurate there). xIELU's
coefficients a_p, a_n are computed as transformers computes them, in the parameters' dtype (``softplus`` of a
bf16 parameter is a bf16 number), so the coefficients are the model's own; beta and eps are its buffers'
values. The tanh GELU is computed through the sigmoid identity (finite for any input) and the erf GELU
through erfc in the lower tail (accurate relative to its tiny values), as in geglu.py. expm1 is a polynomial
near 0, where ``exp(u) - 1`` would lose every digit (xIELU's output near 0 is ~beta u, so an absolute error of
one fp32 ulp of 1 in expm1 would be a relative error of 1e-4 there).

Saved for backward: ``u`` only (for xIELU also a 6-float coefficient vector); the activation is recomputed in
the backward kernel. The xIELU parameter gradients are reduced per program in fp32 into a (programs, 2)
buffer, then summed (deterministic: no atomics).

Layout and launch heuristics are swiglu.py's (a grid of rows x column blocks, a row stride for the input, a
contiguous last dimension); one forward and one backward kernel, the activation a compile-time constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastft.kernels._dispatch import use_triton
from fastft.kernels._math import normal_cdf_pdf, sigmoid_pair
from fastft.kernels._spec import AuditCase, Ptr
from fastft.kernels.geglu import _gelu_and_derivative_torch
from fastft.kernels.swiglu import _TRITON_DTYPES, _as_rows, _compute_dtype, _launch_config

ActivationName = Literal["gelu", "gelu_tanh", "relu2", "quick_gelu"]
ACTIVATIONS = ("gelu", "gelu_tanh", "relu2", "quick_gelu", "xielu")
_SUPPORTED_DTYPES = (*_TRITON_DTYPES, torch.float64)
# The activation as a compile-time constant of the kernels.
_GELU = tl.constexpr(0)
_GELU_TANH = tl.constexpr(1)
_RELU2 = tl.constexpr(2)
_XIELU = tl.constexpr(3)
_QUICK_GELU = tl.constexpr(4)
_CODES = {"gelu": 0, "gelu_tanh": 1, "relu2": 2, "quick_gelu": 4, "xielu": 3}
_QUICK = 1.702  # QuickGELUActivation's constant
# torch.nn.functional.softplus(x) is x itself above this (beta = 1), and its derivative 1.
_SOFTPLUS_THRESHOLD = 20.0


@dataclass(frozen=True, eq=False)
class XIELU:
    """xIELU's parameters: ``alpha_p`` and ``alpha_n`` are the raw trainable scalars (before softplus; any float
    dtype, one element), ``beta`` and ``eps`` constants: one-element tensors (the module's buffers) or Python
    numbers, which are taken as the module would hold them, in the parameters' dtype.

    Gradients flow to ``alpha_p`` and ``alpha_n`` when they require grad (full fine-tuning), never to beta or eps.
    """

    alpha_p: torch.Tensor
    alpha_n: torch.Tensor
    beta: float | torch.Tensor = 0.5
    eps: float | torch.Tensor = -1e-6

    @classmethod
    def from_module(cls, module: object) -> XIELU:
        """The parameters of transformers' ``XIELUActivation`` (its own tensors: cheap, call it per forward)."""
        return cls(module.alpha_p, module.alpha_n, module.beta, module.eps)


Activation = ActivationName | XIELU


def _as_buffer(value: float | torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """beta or eps as XIELUActivation holds it: a 0-d tensor; a Python number in the parameters' dtype."""
    if isinstance(value, torch.Tensor):
        return value.reshape(())
    return torch.tensor(float(value), dtype=param.dtype, device=param.device)


def activation_reference(u: torch.Tensor, activation: Activation) -> torch.Tensor:
    """The semantics, as transformers computes them (in u's dtype; xIELU in the type promotion of u and its
    parameters, as ``XIELUActivation``'s Python path): the test oracle and documentation."""
    if isinstance(activation, XIELU):
        beta, eps = (_as_buffer(v, activation.alpha_p) for v in (activation.beta, activation.eps))
        alpha_p = F.softplus(activation.alpha_p)
        alpha_n = beta + F.softplus(activation.alpha_n)
        return torch.where(u > 0, alpha_p * u * u + beta * u, (torch.expm1(torch.min(u, eps)) - u) * alpha_n + beta * u)
    if activation == "gelu":
        return F.gelu(u)
    if activation == "gelu_tanh":
        return F.gelu(u, approximate="tanh")
    if activation == "relu2":
        return torch.square(F.relu(u))
    if activation == "quick_gelu":
        return u * torch.sigmoid(_QUICK * u)
    raise ValueError(f"activation_reference: unknown activation {activation!r}; use one of {ACTIVATIONS}")


# --------------------------------------------------------------------------------------------------------
# Triton kernels. Grid: (rows, column blocks), as swiglu.py; each program handles BLOCK columns of one row.
# Forward: read u, write h (2 tensors of traffic). Backward: read u and dh, write du (3), in place over dh
# when the caller owns dh (the fused MLP); xIELU adds 8 bytes per program for its parameter gradients.
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _expm1(x):
    """exp(x) - 1 for fp32 x, to a few ulp relative: Taylor to x^9 / 9! for |x| < 0.5 (truncation error below
    1e-9 relative), ``exp(x) - 1`` beyond (no cancellation there: |exp(x) - 1| > 0.39)."""
    p = 2.7557319e-06  # 1/9!
    p = p * x + 2.4801587e-05  # 1/8!
    p = p * x + 1.9841270e-04  # 1/7!
    p = p * x + 1.3888889e-03  # 1/6!
    p = p * x + 8.3333333e-03  # 1/5!
    p = p * x + 4.1666667e-02  # 1/4!
    p = p * x + 1.6666667e-01  # 1/3!
    p = p * x + 0.5
    small = x + (x * x) * p
    return tl.where(tl.abs(x) < 0.5, small, tl.exp(x) - 1.0)


@triton.jit
def _load_xielu_coefficients(coeff_ptr):
    # a_p, a_n, beta, eps (fp32): computed on the host side from the parameters without a device sync.
    return tl.load(coeff_ptr), tl.load(coeff_ptr + 1), tl.load(coeff_ptr + 2), tl.load(coeff_ptr + 3)


@triton.jit
def _activation_forward_kernel(
    u_ptr, h_ptr, coeff_ptr, n_cols, u_row_stride, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr
):
    # The row index is promoted to int64 before it multiplies a stride: row * stride overflows int32 once a
    # tensor holds more than 2^31 elements (131k tokens x 16384 intermediate).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    u = tl.load(u_ptr + row * u_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if ACTIVATION == _GELU:
        cdf, _ = normal_cdf_pdf(u)
        h = u * cdf
    elif ACTIVATION == _GELU_TANH:
        inner = 0.7978845608028654 * u * (1.0 + 0.044715 * u * u)  # k(u) = sqrt(2/pi) (u + 0.044715 u^3)
        cdf, _ = sigmoid_pair(2.0 * inner)  # (1 + tanh(k)) / 2
        h = u * cdf
    elif ACTIVATION == _RELU2:
        positive = tl.maximum(u, 0.0)
        h = positive * positive
    elif ACTIVATION == _QUICK_GELU:
        s, _ = sigmoid_pair(1.702 * u)
        h = u * s
    else:  # _XIELU
        alpha_p, alpha_n, beta, eps = _load_xielu_coefficients(coeff_ptr)
        em1 = _expm1(tl.minimum(u, eps))
        h = tl.where(u > 0.0, alpha_p * u * u + beta * u, (em1 - u) * alpha_n + beta * u)
    tl.store(h_ptr + row * n_cols + cols, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _activation_backward_kernel(
    u_ptr,
    dh_ptr,
    du_ptr,
    coeff_ptr,
    partial_ptr,
    n_cols,
    u_row_stride,
    dh_row_stride,
    ACTIVATION: tl.constexpr,
    COMPUTE_DU: tl.constexpr,
    COMPUTE_DALPHA: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # du = dh * act'(u), act' as derived in the module docstring; du may be dh's own buffer (each element is
    # loaded before it is stored, by the same program). xIELU: this program's sums of dh * dh/da_p and
    # dh * dh/da_n go to partial_ptr[2 * program + (0, 1)].
    row = tl.program_id(0).to(tl.int64)  # int64: see the forward kernel
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    u = tl.load(u_ptr + row * u_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + row * dh_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if ACTIVATION == _GELU:
        cdf, pdf = normal_cdf_pdf(u)
        slope = cdf + u * pdf  # pdf is exactly 0 where u^2 overflows, so no inf * 0
    elif ACTIVATION == _GELU_TANH:
        inner = 0.7978845608028654 * u * (1.0 + 0.044715 * u * u)
        cdf, one_minus_cdf = sigmoid_pair(2.0 * inner)  # s and 1 - s, both without cancellation
        u2 = tl.minimum(u * u, 1.0e4)  # geglu.py's _G2_CAP: k' stays finite where s (1 - s) is exactly 0 anyway
        slope = cdf + u * (2.0 * cdf * one_minus_cdf) * (0.7978845608028654 * (1.0 + 3.0 * 0.044715 * u2))
    elif ACTIVATION == _RELU2:
        slope = 2.0 * tl.maximum(u, 0.0)
    elif ACTIVATION == _QUICK_GELU:
        s, one_minus_s = sigmoid_pair(1.702 * u)
        slope = s + (1.702 * u) * (s * one_minus_s)  # s (1 - s) is exactly 0 where 1.702 u overflows exp: no inf * 0
    else:  # _XIELU
        alpha_p, alpha_n, beta, eps = _load_xielu_coefficients(coeff_ptr)
        em1 = _expm1(tl.minimum(u, eps))
        positive = u > 0.0
        at_eps = (0.5 * em1 - 0.5) * alpha_n + beta
        negative = tl.where(u < eps, em1 * alpha_n + beta, tl.where(u == eps, at_eps, beta - alpha_n))
        slope = tl.where(positive, 2.0 * alpha_p * u + beta, negative)
        if COMPUTE_DALPHA:
            d_alpha_p = tl.sum(tl.where(mask & positive, dh * (u * u), 0.0), axis=0)
            d_alpha_n = tl.sum(tl.where(mask & ~positive, dh * (em1 - u), 0.0), axis=0)
            program = row * tl.num_programs(1) + tl.program_id(1)
            tl.store(partial_ptr + 2 * program, d_alpha_p)
            tl.store(partial_ptr + 2 * program + 1, d_alpha_n)
    if COMPUTE_DU:
        tl.store(du_ptr + row * n_cols + cols, (dh * slope).to(du_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------------
# Host side: launchers, the torch path, the xIELU coefficients.
# --------------------------------------------------------------------------------------------------------


def _activation_forward_triton(u: torch.Tensor, kind: str, coeffs: torch.Tensor | None) -> torch.Tensor:
    """h = act(u) for 2-D u with a contiguous last dimension; h is new and contiguous, in u's dtype."""
    n_rows, n_cols = u.shape
    h = torch.empty((n_rows, n_cols), dtype=u.dtype, device=u.device)
    if h.numel() == 0:
        return h
    block, num_warps = _launch_config(n_cols)
    grid = (n_rows, triton.cdiv(n_cols, block))
    coeff_arg = coeffs if coeffs is not None else u  # never read unless xIELU
    _activation_forward_kernel[grid](
        u, h, coeff_arg, n_cols, u.stride(0), ACTIVATION=_CODES[kind], BLOCK=block, num_warps=num_warps
    )
    return h


def _activation_backward_triton(
    u: torch.Tensor,
    dh: torch.Tensor,
    kind: str,
    coeffs: torch.Tensor | None,
    need_du: bool,
    need_dalpha: bool,
    in_place: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(du or None, the (2,) fp32 sums d a_p, d a_n or None). ``in_place``: du is written into dh when dh is
    contiguous in u's dtype (the fused MLP's own buffer), else into a new tensor."""
    n_rows, n_cols = u.shape
    du = None
    if need_du:
        reuse = in_place and dh.is_contiguous() and dh.dtype == u.dtype
        du = dh if reuse else torch.empty((n_rows, n_cols), dtype=u.dtype, device=u.device)
    block, num_warps = _launch_config(n_cols)
    grid = (n_rows, triton.cdiv(n_cols, block))
    if u.numel() == 0 or not (need_du or need_dalpha):
        return du, u.new_zeros(2, dtype=torch.float32) if need_dalpha else None
    partials = torch.empty((grid[0] * grid[1], 2), dtype=torch.float32, device=u.device) if need_dalpha else None
    _activation_backward_kernel[grid](
        u,
        dh,
        du if need_du else dh,  # an unused output is never touched (constexpr flag off)
        coeffs if coeffs is not None else u,
        partials if need_dalpha else u,
        n_cols,
        u.stride(0),
        dh.stride(0),
        ACTIVATION=_CODES[kind],
        COMPUTE_DU=need_du,
        COMPUTE_DALPHA=need_dalpha,
        BLOCK=block,
        num_warps=num_warps,
    )
    return du, partials.sum(0) if need_dalpha else None


def _xielu_terms_torch(u: torch.Tensor, coeffs: torch.Tensor, slope: bool):
    """(h, act'(u) or None, dh/da_p, dh/da_n) of xIELU in u's dtype (fp32 or float64): the kernel's formulas."""
    alpha_p, alpha_n, beta, eps = coeffs[0], coeffs[1], coeffs[2], coeffs[3]
    positive = u > 0
    em1 = torch.expm1(torch.minimum(u, eps))
    h = torch.where(positive, alpha_p * u * u + beta * u, (em1 - u) * alpha_n + beta * u)
    d = None
    if slope:
        at_eps = (0.5 * em1 - 0.5) * alpha_n + beta
        negative = torch.where(u < eps, em1 * alpha_n + beta, torch.where(u == eps, at_eps, beta - alpha_n))
        d = torch.where(positive, 2.0 * alpha_p * u + beta, negative)
    return h, d, torch.where(positive, u * u, 0.0), torch.where(positive, 0.0, em1 - u)


def _activation_forward_torch(u: torch.Tensor, kind: str, coeffs: torch.Tensor | None) -> torch.Tensor:
    v = u.to(_compute_dtype(u.dtype))
    if kind == "relu2":
        h = v.clamp_min(0.0).square_()
    elif kind == "quick_gelu":
        h = v * torch.sigmoid(_QUICK * v)
    elif kind == "xielu":
        h = _xielu_terms_torch(v, coeffs, slope=False)[0]
    else:
        h, _ = _gelu_and_derivative_torch(v, "tanh" if kind == "gelu_tanh" else "none", derivative=False)
    return h.to(u.dtype)


def _activation_backward_torch(
    u: torch.Tensor,
    dh: torch.Tensor,
    kind: str,
    coeffs: torch.Tensor | None,
    need_du: bool,
    need_dalpha: bool,
    in_place: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    v, g = u.to(_compute_dtype(u.dtype)), dh.to(_compute_dtype(u.dtype))
    dalpha = None
    if kind == "relu2":
        slope = v.clamp_min(0.0).mul_(2.0)
    elif kind == "quick_gelu":
        s = torch.sigmoid(_QUICK * v)
        slope = s + (_QUICK * v) * (s * torch.sigmoid(-_QUICK * v))
    elif kind == "xielu":
        _, slope, d_alpha_p, d_alpha_n = _xielu_terms_torch(v, coeffs, slope=need_du)
        if need_dalpha:
            dalpha = torch.stack(((g * d_alpha_p).sum(), (g * d_alpha_n).sum()))
    else:
        _, slope = _gelu_and_derivative_torch(v, "tanh" if kind == "gelu_tanh" else "none", derivative=True)
    if not need_du:
        return None, dalpha
    du = g.mul_(slope) if g.data_ptr() != dh.data_ptr() else g * slope
    return (dh.copy_(du) if in_place else du.to(u.dtype)), dalpha


def _activation_kernels(triton_path: bool):
    """(forward(u, kind, coeffs) -> h, backward(u, dh, kind, coeffs, need_du, need_dalpha, in_place))."""
    if triton_path:
        return _activation_forward_triton, _activation_backward_triton
    return _activation_forward_torch, _activation_backward_torch


def _softplus_slope(p: torch.Tensor) -> torch.Tensor:
    return torch.where(p > _SOFTPLUS_THRESHOLD, torch.ones_like(p), torch.sigmoid(p))


def _xielu_coefficients(xielu: XIELU, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[a_p, a_n, beta, eps, softplus'(alpha_p), softplus'(alpha_n)] in ``dtype`` on ``device``, from torch ops
    only (no host sync). a_p and a_n are computed as transformers computes them, in the parameters' dtype."""
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        beta, eps = (_as_buffer(v, xielu.alpha_p) for v in (xielu.beta, xielu.eps))
        alpha_p = F.softplus(xielu.alpha_p)
        alpha_n = beta + F.softplus(xielu.alpha_n)
        slopes = (_softplus_slope(xielu.alpha_p.to(dtype)), _softplus_slope(xielu.alpha_n.to(dtype)))
        return torch.stack(
            [t.reshape(()).to(device=device, dtype=dtype) for t in (alpha_p, alpha_n, beta, eps, *slopes)]
        )


def _xielu_parameter_grads(dalpha: torch.Tensor, coeffs: torch.Tensor, layouts, needs) -> tuple:
    """d alpha_p, d alpha_n (each only if ``needs``) in the parameters' (dtype, shape) ``layouts``."""
    return tuple(
        (dalpha[i] * coeffs[4 + i]).to(dtype).reshape(shape) if need else None
        for i, ((dtype, shape), need) in enumerate(zip(layouts, needs, strict=True))
    )


def _layouts(*params: torch.Tensor | None) -> tuple:
    """(dtype, shape) of each xIELU parameter (what the backward needs of them; the tensors are not kept)."""
    return tuple((p.dtype, p.shape) if p is not None else None for p in params)


def _resolve(op: str, activation: object, x: torch.Tensor) -> tuple[str, torch.Tensor | None, XIELU | None]:
    """(kind, xIELU coefficient vector or None, the XIELU or None), after checking ``activation``."""
    if isinstance(activation, XIELU):
        for name in ("alpha_p", "alpha_n"):
            t = getattr(activation, name)
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() != 1:
                raise TypeError(
                    f"{op}: XIELU.{name} must be a one-element floating tensor (the module's parameter), got "
                    f"{type(t).__name__} {tuple(getattr(t, 'shape', ()))}."
                )
            if t.device != x.device:
                raise ValueError(
                    f"{op}: XIELU.{name} is on {t.device} but x is on {x.device}; move them to one device."
                )
        for name in ("beta", "eps"):
            value = getattr(activation, name)
            if isinstance(value, torch.Tensor):
                if value.numel() != 1 or not value.is_floating_point() or value.requires_grad:
                    raise ValueError(
                        f"{op}: XIELU.{name} must be a float or a one-element floating tensor that does not require "
                        f"grad (a constant: the module's buffer), got shape {tuple(value.shape)}, "
                        f"requires_grad={value.requires_grad}."
                    )
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"{op}: XIELU.{name} must be a finite number or a one-element tensor, got {value!r}.")
        return "xielu", _xielu_coefficients(activation, _compute_dtype(x.dtype), x.device), activation
    if activation == "xielu":
        raise ValueError(
            f"{op}: xIELU has trainable parameters; pass XIELU(alpha_p, alpha_n, beta, eps) or "
            "XIELU.from_module(act_fn) instead of the string 'xielu'."
        )
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"{op}: activation must be one of 'gelu' (erf GELU), 'gelu_tanh' (gelu_new, gelu_pytorch_tanh), 'relu2', "
            f"'quick_gelu' or an XIELU, got {activation!r}."
        )
    return activation, None, None


def _check_input(op: str, x: object) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}.")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(
            f"{op}: dtype {x.dtype} is not supported; x must be float32, bfloat16, float16 or float64 (or call "
            "activation_reference for plain PyTorch in any dtype)."
        )


class ActivationFunction(torch.autograd.Function):
    """h = act(u) for 2-D rows u; saves u (and xIELU's 6 coefficients), recomputes act in backward."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, kind: str, coeffs, alpha_p, alpha_n) -> torch.Tensor:
        # The backward runs where the forward ran, whatever backend context it is called in.
        ctx.triton = use_triton(u) and u.dtype in _TRITON_DTYPES
        h = _activation_kernels(ctx.triton)[0](u, kind, coeffs)
        ctx.save_for_backward(u, coeffs)
        ctx.kind, ctx.alphas = kind, _layouts(alpha_p, alpha_n)
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh: torch.Tensor):
        u, coeffs = ctx.saved_tensors
        alpha_needs = ctx.needs_input_grad[3:5]
        need_dalpha = ctx.kind == "xielu" and any(alpha_needs)
        backward = _activation_kernels(ctx.triton)[1]
        du, dalpha = backward(u, _as_rows(dh), ctx.kind, coeffs, ctx.needs_input_grad[0], need_dalpha)
        grads = _xielu_parameter_grads(dalpha, coeffs, ctx.alphas, alpha_needs) if need_dalpha else (None, None)
        return du, None, None, *grads


def activation(x: torch.Tensor, activation: Activation) -> torch.Tensor:
    """``act(x)`` elementwise with fused Triton forward/backward kernels: "gelu" (erf), "gelu_tanh" (gelu_new,
    gelu_pytorch_tanh), "relu2" (relu(x)^2), "quick_gelu" (x sigmoid(1.702 x), CLIP) or an :class:`XIELU`
    (Apertus' xIELU, trainable alphas).

    ``x`` is float32, bfloat16, float16 (float64 runs the torch path in float64) of any shape; the result has
    x's shape and dtype, computed in fp32 and rounded once (see the module docstring for how that compares
    with each transformers module). Autograd saves only ``x`` and recomputes the activation in the backward
    pass; with an XIELU whose alphas require grad, their gradients are computed too. CUDA tensors run the
    Triton kernels, CPU tensors an equivalent torch path (or the interpreted kernels under TRITON_INTERPRET=1).
    """
    _check_input("activation", x)
    kind, coeffs, xielu = _resolve("activation", activation, x)
    rows = _as_rows(x.reshape(1) if x.dim() == 0 else x)
    alphas = (xielu.alpha_p, xielu.alpha_n) if xielu is not None else (None, None)
    # Reshaped outside the Function: the result is an ordinary view the caller may modify in place.
    return ActivationFunction.apply(rows, kind, coeffs, *alphas).view(x.shape)


def activation_name(act: object) -> str | None:
    """Which of :data:`ACTIVATIONS` a transformers activation module (or any callable) computes, or None.

    Checked numerically, on fp32 points from -12 to 12 (so a clipped GELU, ``gelu_10``, is not taken for
    GELU): "gelu", "gelu_tanh", "relu2", "quick_gelu"; "xielu" for a module with xIELU's parameters (``alpha_p``,
    ``alpha_n``, ``beta``, ``eps``) whose output is xIELU's with those parameters (accepted without a check on
    the meta device). For "xielu" build the argument with ``XIELU.from_module(act)``.
    """
    if not callable(act):
        return None
    params = list(act.parameters()) if isinstance(act, torch.nn.Module) else []
    device = params[0].device if params else torch.device("cpu")
    is_xielu = all(isinstance(getattr(act, a, None), torch.Tensor) for a in ("alpha_p", "alpha_n", "beta", "eps"))
    if is_xielu and device.type == "meta":
        return "xielu"
    x = torch.linspace(-12.0, 12.0, 961, device=device)
    candidates = (
        {"xielu": XIELU.from_module(act)} if is_xielu else {name: name for name in ACTIVATIONS if name != "xielu"}
    )
    with torch.no_grad():
        try:
            y = act(x)
            for name, spec in candidates.items():
                expected = activation_reference(x, spec)
                same_kind = isinstance(y, torch.Tensor) and y.shape == x.shape and y.dtype == expected.dtype
                if same_kind and torch.allclose(y, expected, rtol=1e-5, atol=1e-6):
                    return name
        except (TypeError, RuntimeError, ValueError):
            return None
    return None


def audit_cases() -> list[AuditCase]:
    """Forward and backward of each activation at 8192 tokens x 14336 (the suite's MLP width), bf16, contiguous.

    xIELU's backward is audited with the parameter gradients (full fine-tuning: the reduction) and without.
    """
    n_rows, n_cols, element_bytes = 8192, 14336, 2
    block, num_warps = _launch_config(n_cols)
    tensor_bytes = n_rows * n_cols * element_bytes
    programs = n_rows * triton.cdiv(n_cols, block)
    shape = f"{n_rows}x{n_cols} bf16"
    cases = []
    for kind, code in _CODES.items():
        constexprs = {"ACTIVATION": code, "BLOCK": block}
        cases.append(
            AuditCase(
                name=f"activation_forward[{kind}]",
                kernel=_activation_forward_kernel,
                args={
                    "u_ptr": Ptr("bf16"),
                    "h_ptr": Ptr("bf16"),
                    "coeff_ptr": Ptr("fp32"),
                    "n_cols": n_cols,
                    "u_row_stride": n_cols,
                    **constexprs,
                },
                constexprs=constexprs,
                num_warps=num_warps,
                shape=shape,
                min_bytes=2 * tensor_bytes,  # read u; write h
            )
        )
        for dalpha in (False, True) if kind == "xielu" else (False,):
            backward_constexprs = {"ACTIVATION": code, "COMPUTE_DU": True, "COMPUTE_DALPHA": dalpha, "BLOCK": block}
            cases.append(
                AuditCase(
                    name=f"activation_backward[{kind}{'+dalpha' if dalpha else ''}]",
                    kernel=_activation_backward_kernel,
                    args={
                        "u_ptr": Ptr("bf16"),
                        "dh_ptr": Ptr("bf16"),
                        "du_ptr": Ptr("bf16"),
                        "coeff_ptr": Ptr("fp32"),
                        "partial_ptr": Ptr("fp32"),
                        "n_cols": n_cols,
                        "u_row_stride": n_cols,
                        "dh_row_stride": n_cols,
                        **backward_constexprs,
                    },
                    constexprs=backward_constexprs,
                    num_warps=num_warps,
                    shape=shape,
                    # read u, dh; write du (+ two fp32 partial sums per program)
                    min_bytes=3 * tensor_bytes + (8 * programs if dalpha else 0),
                )
            )
    return cases
