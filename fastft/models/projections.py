"""Read a projection module (``nn.Linear``, bitsandbytes 4-bit, or a PEFT LoRA layer around either) as the
plain tensors fastft's fused LoRA Functions take.

:func:`read_projection` returns a :class:`fastft.kernels.lora.LoRAProjection` describing what the module's own
forward would compute *right now* (active adapter, ``disable_adapter()``, merged weights, train/eval for
dropout), or ``None`` when the module does something the fused path does not implement (several active
adapters at once, DoRA and other LoRA variants, a LoRA bias, 8-bit base weights, ``fan_in_fan_out`` on anything
but a transformers ``Conv1D``). ``None`` makes the caller use the module itself, which is always correct.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fastft.kernels.lora import LoRAProjection
from fastft.kernels.nf4 import NF4Weight


def _base_weight(base: nn.Module) -> tuple[object, torch.Tensor | None] | None:
    """(weight, bias) of a base linear layer: a tensor, an :class:`NF4Weight`, or None if unsupported."""
    weight = getattr(base, "weight", None)
    if type(base).__name__ == "Linear4bit" and getattr(weight, "quant_state", None) is not None:
        quant_state = weight.quant_state
        # bitsandbytes repacks a CPU weight for its AVX512 kernel on the first no-grad eval forward; that layout
        # is not the NF4 one the kernel reads, so such a layer keeps its own forward.
        if getattr(quant_state, "quant_type", "nf4") != "nf4" or getattr(quant_state, "packing_format_for_cpu", False):
            return None
        return NF4Weight.from_bnb(weight), base.bias
    if isinstance(base, nn.Linear) and isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight, base.bias
    if isinstance(base, Conv1D) and isinstance(weight, torch.Tensor) and weight.is_floating_point():
        # GPT-2's Conv1D stores (in, out) and computes addmm(b, x, W): the (out, in) weight is W.t(), a view
        # (no copy) through which gradients reach the parameter.
        return weight.t(), base.bias
    return None


def _is_lora_layer(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("lora_A", "lora_B", "scaling", "base_layer", "active_adapters"))


def read_projection(module: nn.Module) -> LoRAProjection | None:
    """The module as a :class:`LoRAProjection` (with the adapter's dropout probability when its dropout is
    active), or None when the fused path cannot reproduce the module."""
    if not _is_lora_layer(module):
        base = _base_weight(module)
        return None if base is None else LoRAProjection(base[0], base[1])
    if getattr(module, "_fastft_unsupported", False):
        return None
    # PEFT sets fan_in_fan_out for a Conv1D base (transposed storage, handled by _base_weight); its lora_A / lora_B
    # are (r, in) and (out, r) either way. On any other base it would be a layout the fused path does not know.
    if getattr(module, "fan_in_fan_out", False) and not isinstance(module.base_layer, Conv1D):
        return None
    base = _base_weight(module.base_layer)
    if base is None:
        return None
    weight, bias = base
    if module.disable_adapters:
        # PEFT unmerges merged weights before a disabled forward; let it do that itself.
        return None if module.merged else LoRAProjection(weight, bias)
    if module.merged:
        return LoRAProjection(weight, bias)
    active = [a for a in module.active_adapters if a in module.lora_A]
    if not active:
        return LoRAProjection(weight, bias)
    if len(active) > 1:
        return None
    name = active[0]
    if name in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(name, False):
        return None
    lora_a, lora_b = module.lora_A[name], module.lora_B[name]
    if getattr(lora_a, "bias", None) is not None or getattr(lora_b, "bias", None) is not None:
        return None
    dropout = module.lora_dropout[name]
    if isinstance(dropout, nn.Dropout):
        p = float(dropout.p) if dropout.training else 0.0
    elif isinstance(dropout, nn.Identity):
        p = 0.0
    else:
        return None  # a custom dropout module: only PEFT's own forward knows what it does
    return LoRAProjection(weight, bias, lora_a.weight, lora_b.weight, float(module.scaling[name]), dropout=p)
