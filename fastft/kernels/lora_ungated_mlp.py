"""The non-gated MLP ``y = down(act(up(x)))`` with LoRA on both projections, as one autograd Function.

The MLP of GPT-2 (``c_fc``/``c_proj``, transformers' Conv1D: pass ``weight.t()``, a view), GPT-J, CodeGen, GPT-Neo,
GPT-BigCode, Phi (``fc1``/``fc2``), StarCoder2 (``c_fc``/``c_proj``), GPT-NeoX and Persimmon (``dense_h_to_4h`` /
``dense_4h_to_h``), Nemotron and Apertus (``up_proj``/``down_proj``). With u = P_up(x) (N, I), h = act(u)::

    P(x) = x W^T + b + s (drop(x) A^T) B^T         (each projection exactly as lora.py's lora_linear, PEFT's numbers)
    y    = P_down(h),  h = act(u),  u = P_up(x)    (act from activation.py, fp32 inside, rounded once to x's dtype)

Backward, with g = dL/dy (N, out), gBs = s (g B) (N, r) per adapter, act' and the xIELU parameter derivatives as
derived in activation.py::

    dh = g W_d + gBs_d A_d                 (through the down adapter's dropout mask, if any)
    dW_d = g^T h      db_d = sum_rows g    dB_d = g^T (s xa_d)     dA_d = gBs_d^T h     (h recomputed from u)
    du = dh * act'(u)                      (written over dh: one (N, I) buffer for both)
    d alpha_p, d alpha_n (xIELU)           (reduced over all N x I elements of dh in the same pass)
    dx = du W_u + gBs_u A_u   dW_u = du^T x   db_u = sum_rows du   dB_u = du^T (s xa_u)   dA_u = gBs_u^T x

h is recomputed by the forward activation kernel (bit-identical to the forward's h; one pass reading u and
writing h) only when dW_d or dA_d needs it; the backward kernel does not emit h.

Saved for backward, each only when a requested gradient needs it: x (for dW_u and dA_u; the caller's tensor,
never a copy), u (N, I) (the up projection's output, pre-activation), s xa (N, r) per adapter (for dB), the
parameters W, A, B (no memory), per dropout adapter its bool mask (N x in or N x I bytes), and for xIELU a
6-element coefficient vector. Nothing else of size N x I: h, act'(u), their fp32 upcasts and the fp32 copies of
x and h that PEFT's lora_A keeps are never saved. A quantized base weight is dequantized in forward and again in
backward (only if its input gradient is needed), and dropped after each GEMM.

Transient buffers (fp32 adapters over a bf16/fp16 base, as PEFT; they live for one step, not from forward to
backward). Forward: h (N, I) in x's dtype (freed after the down GEMM), the fp32 upcasts of x (N, in) and of h
(N, I) for ``x A^T``, the fp32 LoRA terms (N, I) and (N, out) before they are added into the base outputs.
Backward: h (N, I) again (if needed) and its fp32 upcast for dA_d; dh (N, I) in x's dtype, which becomes du in
place; the upcast gradient blocks g (N, out) and du (N, I) for g B and dB, one at a time; the fp32 LoRA parts of
dh (N, I) and dx (N, in); for xIELU, two fp32 partial sums per Triton program (N x ceil(I / 2048) x 8 bytes).

Autocast and dtypes: as lora.py (x and the projections cast to the autocast dtype before the Function, which
runs with autocast off). xIELU's alphas are not cast: their coefficients are computed in the parameters' dtype,
as transformers does, and their gradients come back in it.
"""

from __future__ import annotations

import torch

from fastft.kernels._dispatch import use_triton
from fastft.kernels._spec import AuditCase
from fastft.kernels.activation import (
    Activation,
    _activation_kernels,
    _layouts,
    _resolve,
    _xielu_parameter_grads,
    activation_reference,
)
from fastft.kernels.lora import (
    LoRAProjection,
    _check_adapter_dtypes,
    _check_projection,
    _flat,
    _group,
    _group_backward,
    _group_forward,
    _group_saved,
    _needs,
    _prepare,
    _Spec,
    lora_linear_reference,
)
from fastft.kernels.swiglu import _TRITON_DTYPES

_OP = "lora_ungated_mlp"
# forward(ctx, x, specs, kind, coeffs, alpha_p, alpha_n, *tensors): where the projection tensors start.
_FIRST_TENSOR = 6


def lora_ungated_mlp_reference(
    x: torch.Tensor, up: LoRAProjection, down: LoRAProjection, activation: Activation
) -> torch.Tensor:
    """The MLP of two PEFT LoRA Linears around a transformers activation module, op for op (test oracle)."""
    return lora_linear_reference(activation_reference(lora_linear_reference(x, up), activation), down)


class LoRAUngatedMLPFunction(torch.autograd.Function):
    """down(act(up(x))) with LoRA on both projections; saves x, u and (N, r) intermediates, recomputes act(u)."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        specs: tuple[_Spec, _Spec],
        kind: str,
        coeffs: torch.Tensor | None,
        alpha_p: torch.Tensor | None,
        alpha_n: torch.Tensor | None,
        *tensors: torch.Tensor | None,
    ) -> torch.Tensor:
        (up_params,), (down_params,) = _group(tensors[:4], 1), _group(tensors[4:], 1)
        (up_needs,) = _needs(ctx.needs_input_grad, _FIRST_TENSOR, 1)
        (down_needs,) = _needs(ctx.needs_input_grad, _FIRST_TENSOR + 4, 1)
        need_x = ctx.needs_input_grad[0]
        alpha_needs = (kind == "xielu" and ctx.needs_input_grad[4], kind == "xielu" and ctx.needs_input_grad[5])
        need_du = need_x or any(up_needs)
        need_dh = need_du or any(alpha_needs)  # the activation's backward runs
        need_h = down_needs[0] or (specs[1].rank > 0 and down_needs[2])  # backward recomputes h for dW_d / dA_d
        x2 = x.reshape(-1, x.shape[-1])
        with torch.autocast(x.device.type, enabled=False):
            (u,), up_sxa, up_masks = _group_forward(x2, specs[:1], [up_params])
            ctx.triton = use_triton(u) and u.dtype in _TRITON_DTYPES
            h = _activation_kernels(ctx.triton)[0](u, kind, coeffs)
            (y,), down_sxa, down_masks = _group_forward(h, specs[1:], [down_params])
            del h
        keep_x = up_needs[0] or (specs[0].rank > 0 and up_needs[2])
        ctx.save_for_backward(
            x if keep_x else None,
            u if need_dh or need_h else None,
            coeffs,
            *_group_saved(specs[:1], [up_params], up_sxa, up_masks, need_x, [up_needs]),
            *_group_saved(specs[1:], [down_params], down_sxa, down_masks, need_dh, [down_needs]),
        )
        ctx.specs, ctx.kind, ctx.x_shape, ctx.dtype = specs, kind, x.shape, x.dtype
        ctx.up_needs, ctx.down_needs, ctx.alpha_needs = up_needs, down_needs, alpha_needs
        ctx.need_du, ctx.need_dh, ctx.need_h = need_du, need_dh, need_h
        ctx.alphas = _layouts(alpha_p, alpha_n)
        return y  # 2-D; reshaped by lora_ungated_mlp outside the Function, so callers may modify it in place

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        x, u, coeffs, *saved = ctx.saved_tensors
        specs = ctx.specs
        act_forward, act_backward = _activation_kernels(ctx.triton)
        g = grad_y.reshape(-1, grad_y.shape[-1])
        dx, up_grads, alpha_grads = None, [None] * 4, (None, None)
        with torch.autocast(grad_y.device.type, enabled=False):
            # Down projection: its input h is recomputed (not saved) only if dW_d or dA_d needs it.
            h = act_forward(u, ctx.kind, coeffs) if ctx.need_h else None
            dh, (down_grads,) = _group_backward(
                h, specs[1:], saved[5:], [[g]], ctx.need_dh, [ctx.down_needs], ctx.dtype
            )
            del h
            if ctx.need_dh:
                # dh is this function's own fresh (N, I) buffer: du overwrites it.
                du, dalpha = act_backward(u, dh, ctx.kind, coeffs, ctx.need_du, any(ctx.alpha_needs), in_place=True)
                del dh
                if dalpha is not None:
                    alpha_grads = _xielu_parameter_grads(dalpha, coeffs, ctx.alphas, ctx.alpha_needs)
                if ctx.need_du:
                    x2 = x.reshape(-1, x.shape[-1]) if x is not None else None
                    need_x = ctx.needs_input_grad[0]
                    dx, (up_grads,) = _group_backward(
                        x2, specs[:1], saved[:5], [[du]], need_x, [ctx.up_needs], ctx.dtype
                    )
        dx = dx.view(ctx.x_shape) if dx is not None else None
        return dx, None, None, None, *alpha_grads, *up_grads, *down_grads


def lora_ungated_mlp(x: torch.Tensor, up: LoRAProjection, down: LoRAProjection, activation: Activation) -> torch.Tensor:
    """The non-gated MLP ``down(act(up(x)))`` with LoRA projections, as one autograd Function.

    ``activation`` is "gelu" (erf GELU: GPT-NeoX), "gelu_tanh" (gelu_new, gelu_pytorch_tanh: GPT-2, Phi,
    StarCoder2), "relu2" (relu(u)^2: Nemotron, Persimmon) or an :class:`fastft.kernels.activation.XIELU`
    (Apertus; ``XIELU.from_module(mlp.act_fn)``, whose alphas get gradients when they require them). Each
    projection has lora_linear's semantics (PEFT's numbers, dropout, quantized base weights, full fine-tuning);
    a transformers Conv1D (GPT-2) is passed as ``LoRAProjection(conv.weight.t(), conv.bias, ...)``. ``x`` is
    (..., in_features); the result (..., down.out_features) in x's dtype, an ordinary tensor the caller may
    modify in place. Autograd keeps x, the up projection's output and (N, r) LoRA products; the activation
    output is recomputed in backward, where PEFT + transformers keep it (and fp32 copies of x and of it).
    """
    x, projs = _prepare(_OP, x, {"up": up, "down": down})
    kind, coeffs, xielu = _resolve(_OP, activation, x)
    up_spec = _check_projection(_OP, "up", projs["up"], x.shape[-1], x)
    down_spec = _check_projection(_OP, "down", projs["down"], up_spec.out_features, x)
    _check_adapter_dtypes(_OP, projs)
    alphas = (xielu.alpha_p, xielu.alpha_n) if xielu is not None else (None, None)
    tensors = _flat([projs["up"], projs["down"]])
    y = LoRAUngatedMLPFunction.apply(x, (up_spec, down_spec), kind, coeffs, *alphas, *tensors)
    return y.view(*x.shape[:-1], down_spec.out_features)


def audit_cases() -> list[AuditCase]:
    """None: this module launches no Triton kernel of its own (GEMMs are cuBLAS, the activation kernels are
    activation.py's, audited there).

    Bytes model beyond a plain MLP backward, per token (s = itemsize, I the intermediate size): the recompute of
    h reads u and writes h (2 I s); the backward kernel reads u and dh and writes du over dh (3 I s), where
    autograd through transformers' activation reads u and dh and writes du as well, and PEFT kept h alive.
    """
    return []
