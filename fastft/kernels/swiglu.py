"""SwiGLU: ``out = silu(gate) * up``, the gated activation in the MLP of Llama, Mistral, Qwen, Phi-3.

Forward, per element, with sigma the logistic sigmoid::

    silu(g) = g * sigma(g)
    out     = silu(g) * u

transformers computes ``act_fn(gate_proj(x)) * up_proj(x)`` in the input dtype, rounding twice (after the
activation and after the product). Here both happen in fp32 and the result is rounded once.

Backward. With dy = dL/d out and sigma'(g) = sigma(g) (1 - sigma(g)):

    silu'(g) = sigma(g) + g * sigma(g) (1 - sigma(g)) = sigma(g) * (1 + g * (1 - sigma(g)))
    d up     = dy * d out/d u = dy * silu(g)
    d gate   = dy * d out/d g = dy * u * silu'(g)

Saved for backward: ``gate`` and ``up`` only, the caller's own tensors (or views of them), so the saved
memory costs nothing beyond what the projection outputs already hold. The activation ``silu(gate)`` is
not saved but recomputed in the backward kernel (one ``exp`` per element, free in a memory-bound kernel),
where the plain transformers MLP keeps it as an extra ``intermediate_size`` tensor per token.

``gate`` and ``up`` may be the two halves of a fused projection (``gate_up.chunk(2, dim=-1)``, as Phi-3
does): every kernel takes a row stride per input and reads such views in place. Both kernels are one pass:
the forward reads gate and up and writes out; the backward reads gate, up and dy and writes both gradients
(or only the one autograd asks for when the other input is frozen).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastft.kernels._dispatch import use_triton
from fastft.kernels._math import sigmoid_pair
from fastft.kernels._spec import AuditCase, Ptr

# The Triton kernels take these; float64 runs the torch path in float64 (exact semantics, for tests and
# for anyone training in double). Anything else is refused.
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SUPPORTED_DTYPES = (*_TRITON_DTYPES, torch.float64)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The semantics, as transformers computes it (``ACT2FN["silu"](gate) * up``, in the input dtype)."""
    return torch.nn.functional.silu(gate) * up


# --------------------------------------------------------------------------------------------------------
# Triton kernels. Grid: (rows, column blocks); each program handles BLOCK columns of one row. Only the last
# dimension must be contiguous; each input has its own row stride, so the halves of a fused gate_up
# projection (row stride 2 * n_cols) are read without a copy. Outputs are fresh and contiguous.
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _swiglu_forward_kernel(gate_ptr, up_ptr, out_ptr, n_cols, gate_row_stride, up_row_stride, BLOCK: tl.constexpr):
    # The row index is promoted to int64 before it multiplies a stride: row * stride overflows int32 once
    # a tensor holds more than 2^31 elements (e.g. 128k tokens x 2 x 14336 for a fused gate_up).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(gate_ptr + row * gate_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * up_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    sig, _ = sigmoid_pair(gate)
    out = gate * sig * up
    tl.store(out_ptr + row * n_cols + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(
    gate_ptr,
    up_ptr,
    dout_ptr,
    dgate_ptr,
    dup_ptr,
    n_cols,
    gate_row_stride,
    up_row_stride,
    dout_row_stride,
    COMPUTE_DGATE: tl.constexpr,
    COMPUTE_DUP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # d up = dy * silu(g); d gate = dy * u * sigma(g) * (1 + g * (1 - sigma(g))). With a frozen input the
    # other gradient's store (and, for a frozen gate, the load of up) compiles away.
    row = tl.program_id(0).to(tl.int64)  # int64: see the forward kernel
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(gate_ptr + row * gate_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(dout_ptr + row * dout_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    sig, one_minus_sig = sigmoid_pair(gate)
    if COMPUTE_DUP:
        dup = dout * (gate * sig)
        tl.store(dup_ptr + row * n_cols + cols, dup.to(dup_ptr.dtype.element_ty), mask=mask)
    if COMPUTE_DGATE:
        up = tl.load(up_ptr + row * up_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        # Finite for every finite g: sigma and 1 - sigma come from exp(-|g|) (no overflow), and where g is
        # huge the factor multiplying it is exactly 0 (g * 0), never inf * 0.
        dsilu = sig * (1.0 + gate * one_minus_sig)
        dgate = dout * up * dsilu
        tl.store(dgate_ptr + row * n_cols + cols, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------------
# Host side: launch heuristics, launchers and the torch path (also used by geglu.py).
# --------------------------------------------------------------------------------------------------------

# Up to 2048 columns per program, 16 elements per thread (4 warps): two 128-bit loads per input per
# thread in bf16, enough bytes in flight per SM to stream HBM, few registers (32-64, no spills at the
# audit shape). 2048 divides most intermediate sizes (8192, 14336, 28672), so no lanes idle there; a
# ragged last block only masks lanes, it moves no extra bytes. Narrow rows get one block per row.
_MAX_BLOCK = 2048
_MIN_BLOCK = 16
_ELEMENTS_PER_THREAD = 16


def _launch_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of ``n_cols`` elements (grid axis 1 allows 65535 blocks: 134M columns)."""
    block = min(_MAX_BLOCK, max(_MIN_BLOCK, triton.next_power_of_2(n_cols)))
    num_warps = max(1, min(4, block // (32 * _ELEMENTS_PER_THREAD)))
    return block, num_warps


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a 2-D (rows, last dim) tensor with a contiguous last dimension: a view whenever one exists
    (contiguous inputs, halves of a fused projection, batch dims that merge), a copy otherwise."""
    n_cols = x.shape[-1]
    rows = x.reshape(math.prod(x.shape[:-1]), n_cols)
    if rows.stride(-1) != 1 and n_cols > 1:
        rows = rows.contiguous()
    return rows


def _check_gated_inputs(op: str, gate: object, up: object) -> None:
    """Validate the (gate, up) pair of a gated activation; raise a ValueError/TypeError that says the fix."""
    for name, value in (("gate", gate), ("up", up)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}.")
    if gate.shape != up.shape:
        raise ValueError(
            f"{op}: gate and up must have the same shape (..., intermediate_size), got gate {tuple(gate.shape)} "
            f"and up {tuple(up.shape)}. For a fused gate_up projection output, split it first: "
            "gate, up = gate_up.chunk(2, dim=-1)."
        )
    if gate.dim() == 0:
        raise ValueError(f"{op}: gate and up must have a last (feature) dimension, got 0-d tensors; use x.reshape(1).")
    if gate.dtype != up.dtype:
        raise TypeError(
            f"{op}: gate and up must have the same dtype, got gate {gate.dtype} and up {up.dtype}; "
            f"cast one of them, e.g. up.to({gate.dtype})."
        )
    if gate.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(
            f"{op}: dtype {gate.dtype} is not supported; gate and up must be float32, bfloat16, float16 or "
            f"float64 (or call {op}_reference(gate, up) for plain PyTorch in any dtype)."
        )
    if gate.device != up.device:
        raise ValueError(f"{op}: gate is on {gate.device} but up is on {up.device}; move both to one device.")


def _launch_gated_forward(kernel, gate: torch.Tensor, up: torch.Tensor, **flags) -> torch.Tensor:
    """Launch a gated-activation forward kernel (this file's or geglu's) over (rows, column blocks)."""
    n_rows, n_cols = gate.shape
    out = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    if out.numel() == 0:
        return out
    block, num_warps = _launch_config(n_cols)
    grid = (n_rows, triton.cdiv(n_cols, block))
    kernel[grid](gate, up, out, n_cols, gate.stride(0), up.stride(0), **flags, BLOCK=block, num_warps=num_warps)
    return out


def _launch_gated_backward(
    kernel, gate: torch.Tensor, up: torch.Tensor, dout: torch.Tensor, need_dgate: bool, need_dup: bool, **flags
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Launch a gated-activation backward kernel; only the requested gradients are allocated and written."""
    n_rows, n_cols = gate.shape
    dgate = torch.empty_like(gate, memory_format=torch.contiguous_format) if need_dgate else None
    dup = torch.empty_like(up, memory_format=torch.contiguous_format) if need_dup else None
    if gate.numel() == 0 or not (need_dgate or need_dup):
        return dgate, dup
    block, num_warps = _launch_config(n_cols)
    grid = (n_rows, triton.cdiv(n_cols, block))
    kernel[grid](
        gate,
        up,
        dout,
        dgate if need_dgate else dout,  # an unused output is never touched (constexpr flag off)
        dup if need_dup else dout,
        n_cols,
        gate.stride(0),
        up.stride(0),
        dout.stride(0),
        **flags,
        COMPUTE_DGATE=need_dgate,
        COMPUTE_DUP=need_dup,
        BLOCK=block,
        num_warps=num_warps,
    )
    return dgate, dup


def _swiglu_forward_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _launch_gated_forward(_swiglu_forward_kernel, gate, up)


def _swiglu_backward_triton(
    gate: torch.Tensor, up: torch.Tensor, dout: torch.Tensor, need_dgate: bool, need_dup: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    return _launch_gated_backward(_swiglu_backward_kernel, gate, up, dout, need_dgate, need_dup)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the torch path computes in: fp32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _swiglu_forward_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    compute = _compute_dtype(gate.dtype)
    return F.silu(gate.to(compute)).mul_(up.to(compute)).to(gate.dtype)


def _swiglu_backward_torch(
    gate: torch.Tensor, up: torch.Tensor, dout: torch.Tensor, need_dgate: bool, need_dup: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    # Same formulas as the kernel, in fp32 (float64 for float64); 1 - sigma as sigma(-g): no cancellation.
    compute = _compute_dtype(gate.dtype)
    g, dy = gate.to(compute), dout.to(compute)
    sig = torch.sigmoid(g)
    dup = (dy * g).mul_(sig).to(up.dtype) if need_dup else None
    dgate = None
    if need_dgate:
        dsilu = torch.sigmoid(-g).mul_(g).add_(1.0).mul_(sig)
        dgate = (dy * up.to(compute)).mul_(dsilu).to(gate.dtype)
    return dgate, dup


class SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up with a fused forward and a fused, hand-derived backward; saves only gate and up."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate_rows, up_rows = _as_rows(gate), _as_rows(up)
        # The backward runs where the forward ran, whatever backend context it is called in.
        ctx.triton = use_triton(gate) and gate.dtype in _TRITON_DTYPES
        forward = _swiglu_forward_triton if ctx.triton else _swiglu_forward_torch
        out = forward(gate_rows, up_rows)
        ctx.save_for_backward(gate_rows, up_rows)
        ctx.shape = gate.shape
        return out  # flat; reshaped outside the Function, so the caller may change it in place

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        gate_rows, up_rows = ctx.saved_tensors
        need_dgate, need_dup = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        backward = _swiglu_backward_triton if ctx.triton else _swiglu_backward_torch
        dgate, dup = backward(gate_rows, up_rows, _as_rows(dout), need_dgate, need_dup)
        return (
            dgate.view(ctx.shape) if dgate is not None else None,
            dup.view(ctx.shape) if dup is not None else None,
        )


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation ``silu(gate) * up`` with fused Triton forward/backward kernels.

    ``gate`` and ``up`` have the same shape ``(..., intermediate_size)`` and dtype (float32, bfloat16, float16;
    float64 runs the torch path in float64); they may be the two halves of a fused projection
    (``gate_up.chunk(2, dim=-1)``), which are read in place. The result is a new tensor of that shape, computed
    in fp32 and rounded once, so it is at least as accurate as ``ACT2FN["silu"](gate) * up``. Autograd saves
    only ``gate`` and ``up`` and recomputes the activation in the backward pass. CUDA tensors run the Triton
    kernels; CPU tensors run an equivalent torch path (or the interpreted kernels under ``TRITON_INTERPRET=1``).
    """
    _check_gated_inputs("swiglu", gate, up)
    return SwiGLUFunction.apply(gate, up).view(gate.shape)


def audit_cases() -> list[AuditCase]:
    """Both kernels at Llama-3-8B's MLP shape: 8192 tokens x intermediate 14336, bf16, contiguous."""
    n_rows, n_cols, element_bytes = 8192, 14336, 2
    block, num_warps = _launch_config(n_cols)
    tensor_bytes = n_rows * n_cols * element_bytes
    shape = f"{n_rows}x{n_cols} bf16"
    forward = AuditCase(
        name="swiglu_forward",
        kernel=_swiglu_forward_kernel,
        args={
            "gate_ptr": Ptr("bf16"),
            "up_ptr": Ptr("bf16"),
            "out_ptr": Ptr("bf16"),
            "n_cols": n_cols,
            "gate_row_stride": n_cols,
            "up_row_stride": n_cols,
            "BLOCK": block,
        },
        constexprs={"BLOCK": block},
        num_warps=num_warps,
        shape=shape,
        min_bytes=3 * tensor_bytes,  # read gate, up; write out
    )
    backward = AuditCase(
        name="swiglu_backward",
        kernel=_swiglu_backward_kernel,
        args={
            "gate_ptr": Ptr("bf16"),
            "up_ptr": Ptr("bf16"),
            "dout_ptr": Ptr("bf16"),
            "dgate_ptr": Ptr("bf16"),
            "dup_ptr": Ptr("bf16"),
            "n_cols": n_cols,
            "gate_row_stride": n_cols,
            "up_row_stride": n_cols,
            "dout_row_stride": n_cols,
            "COMPUTE_DGATE": True,
            "COMPUTE_DUP": True,
            "BLOCK": block,
        },
        constexprs={"COMPUTE_DGATE": True, "COMPUTE_DUP": True, "BLOCK": block},
        num_warps=num_warps,
        shape=shape,
        min_bytes=5 * tensor_bytes,  # read gate, up, dy; write d gate, d up
    )
    return [forward, backward]
