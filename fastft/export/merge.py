"""The weights of a model as one plain checkpoint: LoRA merged, 4-bit bases dequantised, PEFT names removed.

Exports read models, they never change them: :func:`merged_tensors` yields ``(name, tensor)`` with the
names the bare transformers model has in its ``state_dict`` (``model.layers.0.self_attn.q_proj.weight``),
computing each merged weight on the fly, one tensor at a time, so that a large model is never copied whole:

- a PEFT LoRA layer gives ``W + sum_a scaling_a * B_a @ A_a`` over its active, unmerged adapters (PEFT's own
  ``get_delta_weight``, so ``fan_in_fan_out`` and rsLoRA scalings are PEFT's); an adapter already merged
  into ``W`` is not added twice;
- a bitsandbytes 4-bit base weight (``Params4bit`` with its ``quant_state``) is dequantised by
  :func:`fastft.kernels.nf4.dequantize_nf4` (bit-identical to bitsandbytes): the merged weight is the
  4-bit values the model trained on, plus the adapters, in the compute dtype;
- ``modules_to_save`` copies replace the original module; LoRA factors are dropped.

DoRA (a magnitude vector renormalising the merged weight) and 8-bit bases are refused with a way out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (``PeftModel`` -> ``LoraModel`` -> model), else ``model``."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _is_lora_layer(module: torch.nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "base_layer") and hasattr(module, "get_delta_weight")


def _is_modules_to_save(module: torch.nn.Module) -> bool:
    return hasattr(module, "original_module") and hasattr(module, "modules_to_save")


def _plain_weight(param: torch.Tensor, name: str) -> torch.Tensor:
    """A dense tensor for ``param``: 4-bit weights dequantised, 8-bit ones refused."""
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None:
        from fastft.kernels.nf4 import dequantize_nf4

        return dequantize_nf4(param.data, quant_state)
    if param.dtype in (torch.int8, torch.uint8) and hasattr(param, "SCB"):
        raise NotImplementedError(
            f"{name} is a bitsandbytes 8-bit weight, which export cannot dequantise exactly. Load the model in "
            "16 bits (or 4 bits), attach the adapter, and export again."
        )
    return param.detach()


def check_mergeable(model: torch.nn.Module) -> None:
    """Raise before anything is written when a weight of ``model`` cannot be merged (DoRA, 8-bit bases)."""
    for name, module in _base_model(model).named_modules():
        if _is_lora_layer(module):
            for adapter in getattr(module, "active_adapters", []):
                if module.use_dora.get(adapter, False) or adapter in getattr(module, "lora_magnitude_vector", {}):
                    raise NotImplementedError(
                        f"{name} has the DoRA adapter {adapter!r}; export merges plain LoRA only. Call "
                        "model = model.merge_and_unload() first (PEFT merges DoRA) and export the result."
                    )
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dtype == torch.int8 and hasattr(weight, "SCB"):
            _plain_weight(weight, f"{name}.weight")


def _lora_weight(module: torch.nn.Module, name: str) -> torch.Tensor:
    base = module.get_base_layer()
    weight = _plain_weight(base.weight, name)
    merged = set(getattr(module, "merged_adapters", []))
    deltas = [
        module.get_delta_weight(adapter)
        for adapter in module.active_adapters
        if adapter in module.lora_A or adapter in getattr(module, "lora_embedding_A", {})
        if adapter not in merged
    ]
    if not deltas:
        return weight
    out = weight.float()
    for delta in deltas:
        out = out + delta.float()
    if getattr(base.weight, "quant_state", None) is not None:  # a 4-bit base: merged in its compute dtype
        return out.to(getattr(base, "compute_dtype", None) or torch.float32)
    return out.to(weight.dtype)


def _shape_of(tensor: torch.Tensor) -> tuple[int, ...]:
    quant_state = getattr(tensor, "quant_state", None)
    return tuple(quant_state.shape) if quant_state is not None else tuple(tensor.shape)


def merged_entries(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]]:
    """``(name, shape, compute)`` for every parameter and persistent buffer of the merged model.

    Names are those of the bare transformers model, in ``state_dict`` order; ``compute()`` returns the merged,
    detached tensor (it may share storage with the model: do not modify it in place). Nothing is merged until
    ``compute`` is called, so a writer can lay out a file from the shapes and then merge one tensor at a time.
    Tied weights appear under every name ``state_dict`` lists.
    """
    base = _base_model(model)
    wrapped: dict[str, torch.nn.Module] = {}  # module path -> LoRA layer or modules_to_save wrapper
    for path, module in base.named_modules():
        if any(path.startswith(p + ".") for p in wrapped):
            continue
        if _is_modules_to_save(module) or _is_lora_layer(module):
            wrapped[path] = module
    entries: list[tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]] = []
    for name, tensor in base.state_dict(keep_vars=True).items():
        if ".weight." in name:  # bitsandbytes' quantisation statistics (weight.absmax, ...): read with the weight
            continue
        owner = next((p for p in wrapped if name.startswith(p + ".")), None)
        if owner is None:
            entries.append((name, _shape_of(tensor), lambda t=tensor, n=name: _plain_weight(t, n)))
            continue
        module, rest = wrapped[owner], name[len(owner) + 1 :]
        if _is_modules_to_save(module):
            active = [a for a in getattr(module, "active_adapters", []) if a in module.modules_to_save]
            prefix = f"modules_to_save.{active[0]}." if active else "original_module."
            if rest.startswith(prefix):
                entries.append(
                    (f"{owner}.{rest[len(prefix) :]}", _shape_of(tensor), lambda t=tensor, n=name: _plain_weight(t, n))
                )
        elif rest == "base_layer.weight":
            entries.append((f"{owner}.weight", _shape_of(tensor), lambda m=module, n=name: _lora_weight(m, n)))
        elif rest.startswith("base_layer."):  # a bias or a buffer of the wrapped layer
            entries.append(
                (
                    f"{owner}.{rest[len('base_layer.') :]}",
                    _shape_of(tensor),
                    lambda t=tensor, n=name: _plain_weight(t, n),
                )
            )
        # lora_A / lora_B / lora_embedding_* / lora_dropout: the adapter itself, merged above
    return entries


def merged_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every entry of :func:`merged_entries`, merged one at a time."""
    for name, _, compute in merged_entries(model):
        yield name, compute()


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """:func:`merged_tensors` as a dict (for tests and small models)."""
    return dict(merged_tensors(model))
