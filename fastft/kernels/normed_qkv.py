"""The attention projections q, k, v of an RMSNorm's output, keeping the norm's input instead of its output.

In ``q, k, v = lora_qkv(rms_norm(x, w))`` autograd keeps two sequence-sized tensors for one purpose: the norm keeps
its input x (and one fp32 number per row), the projections keep the normalised rows n = rms_norm(x, w) (for dW and
dA). x is the residual stream, which the model holds anyway (and offloaded checkpointing keeps as the layer input);
n is one more ``tokens x hidden`` tensor per layer, alive until the layer's backward. :func:`normed_lora_qkv` keeps
x alone:

    forward:   q, k, v = P_q(n), P_k(n), P_v(n) on the n the caller already computed (no second norm)
    backward:  n' = rms_norm(x, w) recomputed with the same kernel on the same inputs (bitwise n);
               dn, dW, db, dA, dB as in lora_qkv on n' (fastft.kernels.lora: _group_backward);
               dx, dw = the norm's backward of dn (rms_norm's own hand-written backward, through autograd)

so the gradients are those of ``lora_qkv(rms_norm(x, w))`` exactly (the same ops on the same values, the norm's
backward included), and the saved bytes drop by ``tokens x hidden x itemsize`` per layer. Recompute: one RMSNorm
forward per layer in backward (``tokens x hidden`` elements read and written: memory traffic, no FLOPs to speak of).

The caller passes n detached: its gradient goes to x and w through this Function's own norm backward, so the norm
module's autograd node is never run (it is freed with n when the layer's forward ends). Dropout on an adapter
draws its mask over n in forward and keeps it, as lora_qkv does. Under ``torch.autocast`` use ``lora_qkv`` on the
norm's output (autocast decides the dtypes there); this Function refuses it.
"""

from __future__ import annotations

import torch

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
)
from fastft.kernels.rms_norm import rms_norm

_FIRST_TENSOR = 5  # forward's arguments before the projections' tensors: x, weight, normed, norm, specs


class NormedLoRAQKVFunction(torch.autograd.Function):
    """q, k, v of ``normed`` (= rms_norm(x, weight, *norm)); saves x, not normed (module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, normed, norm: tuple[float, float], specs: tuple, *tensors):
        params = _group(tensors, len(specs))
        needs = _needs(ctx.needs_input_grad, _FIRST_TENSOR, len(specs))
        need_dn = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        with torch.autocast(x.device.type, enabled=False):
            outs, scaled_xa, masks = _group_forward(normed.reshape(-1, normed.shape[-1]), specs, params)
        ctx.save_for_backward(x, weight, *_group_saved(specs, params, scaled_xa, masks, need_dn, needs))
        ctx.specs, ctx.needs, ctx.norm, ctx.dtype = specs, needs, norm, normed.dtype
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_outputs: torch.Tensor):
        x, weight, *saved = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.enable_grad():  # the norm again, under autograd for its own backward
            x_in = x.detach().requires_grad_(need_x)
            w_in = weight.detach().requires_grad_(need_w)
            normed = rms_norm(x_in, w_in, *ctx.norm)
        n2 = normed.detach().reshape(-1, normed.shape[-1])
        grads = [[g.reshape(-1, g.shape[-1])] for g in grad_outputs]
        with torch.autocast(x.device.type, enabled=False):
            dn, results = _group_backward(n2, ctx.specs, saved, grads, need_x or need_w, ctx.needs, ctx.dtype)
        del n2
        dx = dw = None
        if dn is not None:
            wanted = [t for t in (x_in, w_in) if t.requires_grad]
            got = dict(zip(map(id, wanted), torch.autograd.grad(normed, wanted, dn.view(normed.shape)), strict=True))
            dx, dw = got.get(id(x_in)), got.get(id(w_in))
        return dx, dw, None, None, None, *(grad for result in results for grad in result)


def normed_lora_qkv(
    normed: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    offset: float,
    q: LoRAProjection,
    k: LoRAProjection,
    v: LoRAProjection,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`fastft.kernels.lora.lora_qkv` of ``normed = rms_norm(x, weight, eps, offset)``, keeping x for
    backward instead of ``normed`` (module docstring).

    ``normed`` must be that norm's output, computed by :func:`fastft.kernels.rms_norm.rms_norm` (the recompute
    in backward has to give the same values); only its values are used: gradients flow to ``x`` and ``weight``,
    never through ``normed``. The results are lora_qkv's (same shapes, dtypes and numbers).
    """
    if torch.is_autocast_enabled(x.device.type):
        raise ValueError(
            "normed_lora_qkv runs without torch.autocast; under autocast call lora_qkv on the norm's output."
        )
    if not isinstance(normed, torch.Tensor) or not isinstance(x, torch.Tensor) or normed.shape != x.shape:
        raise ValueError(
            "normed_lora_qkv: normed must be rms_norm(x, weight, eps, offset), a tensor of x's shape; got "
            f"{getattr(normed, 'shape', type(normed).__name__)} for x of {getattr(x, 'shape', type(x).__name__)}."
        )
    normed, projs = _prepare("normed_lora_qkv", normed, {"q": q, "k": k, "v": v})
    specs = tuple(_check_projection("normed_lora_qkv", name, p, normed.shape[-1], normed) for name, p in projs.items())
    _check_adapter_dtypes("normed_lora_qkv", projs)
    outs = NormedLoRAQKVFunction.apply(
        x, weight, normed.detach(), (float(eps), float(offset)), specs, *_flat(list(projs.values()))
    )
    q_out, k_out, v_out = (out.view(*normed.shape[:-1], spec.out_features) for out, spec in zip(outs, specs))
    return q_out, k_out, v_out


def audit_cases() -> list:
    """None: the Function launches lora.py's GEMMs and the rms_norm.py kernels, audited there.

    Bytes beyond ``lora_qkv(rms_norm(x, w))``, per token: the norm's forward once more in backward (reads x, writes
    the normalised row: ``2 H s``); the normalised row is not kept between forward and backward (``H s`` bytes of
    memory per layer saved).
    """
    return []
