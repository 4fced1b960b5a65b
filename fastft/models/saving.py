"""Saving a fastft model as a plain checkpoint: LoRA adapters merged, quantised bases dequantised, the live model
untouched (it may keep training). Used by :meth:`fastft.FastModel.save_pretrained_merged`.
"""

from __future__ import annotations

import copy
import tempfile
import warnings

import torch
import transformers
from torch import nn

from fastft.models.patch import causal_lm, model_dtype


def _dense_weight(layer: nn.Module) -> torch.Tensor:
    """The weight of a base layer as a dense floating tensor (bitsandbytes 4- and 8-bit weights dequantised)."""
    weight = layer.weight
    kind = type(weight).__name__
    if kind == "Params4bit":
        import bitsandbytes.functional as bnbf

        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes >= 0.49 repacks a CPU weight for AVX512-BF16 at its first no-grad eval forward (nibbles
            # reordered, absmax transposed and rounded to bf16). Unpack the nibbles on a copy of the state (the
            # inverse edits the state it is given) but keep the bf16 absmax the layer now computes with: the
            # inverse would quantise it to 8 bits once more.
            state = copy.deepcopy(state)
            state.original_nested = False
            data, state = bnbf._convert_weight_packed_for_cpu_inverse(data, state)
            state.absmax = state.absmax.T.reshape(-1).float()
        return bnbf.dequantize_4bit(data, state)
    if kind == "Int8Params":
        import bitsandbytes.functional as bnbf

        scales = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
        return bnbf.int8_vectorwise_dequant(weight.data, scales)
    return weight.detach()


def _lora_delta(layer: nn.Module, adapter: str, name: str) -> torch.Tensor:
    """``scaling * B @ A`` in fp32, in the base weight's layout."""
    linear = adapter in layer.lora_A and isinstance(layer.lora_A[adapter], nn.Linear)
    lora_bias = linear and (layer.lora_A[adapter].bias is not None or layer.lora_B[adapter].bias is not None)
    if adapter in getattr(layer, "lora_variant", {}) or lora_bias:
        raise NotImplementedError(
            f"{name}: adapter {adapter!r} is a LoRA variant (DoRA, ...) or has a LoRA bias, which fastft does not "
            "merge; save it with save_method='lora', or merge with PEFT's model.merge_and_unload() and save that"
        )
    if not linear:  # embeddings (and convolutions): PEFT's own formula for their layout
        return layer.get_delta_weight(adapter).float()
    delta = layer.lora_B[adapter].weight.float() @ layer.lora_A[adapter].weight.float()
    return (delta.T if layer.fan_in_fan_out else delta) * layer.scaling[adapter]


def _merged_tensor(module: nn.Module, attr: str, dtype: torch.dtype, name: str) -> torch.Tensor:
    """What a plain checkpoint holds for ``module.<attr>``: adapters merged, quantised weights dequantised."""
    if hasattr(module, "modules_to_save") and hasattr(module, "original_module"):
        active = getattr(module, "active_adapter", None)
        active = active[0] if isinstance(active, list) and len(active) == 1 else active
        use_copy = not getattr(module, "disable_adapters", False) and active in module.modules_to_save
        module = module.modules_to_save[active] if use_copy else module.original_module
    if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
        if attr != "weight":
            return _merged_tensor(module.base_layer, attr, dtype, name)
        weight = _dense_weight(module.base_layer)
        if module.merged or module.disable_adapters:
            return weight.to(dtype)
        embedding_adapters = getattr(module, "lora_embedding_A", {})
        adapters = [a for a in module.active_adapters if a in module.lora_A or a in embedding_adapters]
        merged = weight.float()
        for adapter in adapters:  # every active adapter, as PEFT's own forward adds them all
            merged = merged + _lora_delta(module, adapter, name).to(merged.device)
        return merged.to(dtype)
    if attr == "weight" and type(getattr(module, "weight", None)).__name__ in ("Params4bit", "Int8Params"):
        return _dense_weight(module).to(dtype)
    return getattr(module, attr).detach()


def save_merged_16bit(model: nn.Module, path: str) -> None:
    """Write a plain transformers checkpoint of ``model`` with its adapters merged, leaving ``model`` as it was.

    A weight-less copy of the architecture (meta device) receives the merged tensors; untouched tensors are the
    live ones (no copy), merged and dequantised ones are new, on the CPU, so host memory holds at most one
    16-bit copy of the model and the accelerator none.
    """
    root = causal_lm(model)
    dtype = model_dtype(root)
    config = copy.deepcopy(root.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        config.__dict__.pop(attr, None)
    config.dtype, config.use_cache = dtype, True
    with torch.device("meta"):
        skeleton = type(root)(config)
    merged = {}
    for key in skeleton.state_dict():
        path_to, _, attr = key.rpartition(".")
        merged[key] = _merged_tensor(root.get_submodule(path_to), attr, dtype, key).to("cpu")
    skeleton.load_state_dict(merged, strict=True, assign=True)
    if getattr(root, "generation_config", None) is not None:
        skeleton.generation_config = copy.deepcopy(root.generation_config)
    skeleton.save_pretrained(path)


def save_merged_4bit(model: nn.Module, path: str) -> None:
    """The merged checkpoint, quantised to NF4 the way loading it with ``load_in_4bit=True`` would."""
    warnings.warn(
        "save_method='merged_4bit' rounds W + scaling * B @ A to NF4, which loses much of a small LoRA update; "
        "save_method='merged_16bit' (or 'lora' next to the 4-bit base) keeps it exactly",
        UserWarning,
        stacklevel=3,
    )
    root = causal_lm(model)
    quant = getattr(root.config, "quantization_config", None)
    if not getattr(quant, "load_in_4bit", False):
        quant = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=model_dtype(root),
        )
    device = root.get_input_embeddings().weight.device
    with tempfile.TemporaryDirectory(dir=path) as staging:
        save_merged_16bit(model, staging)
        quantised = type(root).from_pretrained(
            staging, quantization_config=quant, dtype=model_dtype(root), device_map={"": device}
        )
        quantised.save_pretrained(path)
