"""``fastft.patch(model)``: make an existing transformers (or PEFT-wrapped) causal LM fast, in place.

The walk over the model recognises blocks by structure (:mod:`fastft.models.recognize`), confirms each kind
with a probe of its own forward, and swaps the instance's class (:mod:`fastft.models.layers`). What could not
be patched is named in one log line; it keeps running transformers' code, so results stay correct.
Patching is idempotent: a second call changes nothing and returns the same report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from fastft.models import layers
from fastft.models.families import family_of
from fastft.models.recognize import (
    attention_layout,
    mlp_layout,
    norm_eps_attr,
    probe_mlp,
    probe_norm_offset,
    probe_rope,
    rotary_dim,
    rotary_function_home,
)

logger = logging.getLogger("fastft")


@dataclass
class PatchReport:
    """What :func:`patch` did: counts per kind, and the modules it left alone with the reason."""

    model_type: str
    norms: int = 0
    mlps: int = 0
    attentions: int = 0
    fused_loss: bool = False
    skipped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        done = (
            f"fastft: patched {self.model_type}: {self.norms} RMSNorm, {self.mlps} gated MLP, "
            f"{self.attentions} attention (RoPE, fused LoRA q/k/v), fused loss {'on' if self.fused_loss else 'off'}"
        )
        if not self.skipped:
            return done
        left = "; ".join(f"{kind} ({reason})" for kind, reason in sorted(self.skipped.items()))
        return f"{done}; left unpatched: {left}"


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def model_dtype(model: nn.Module) -> torch.dtype:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _model_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    return weight.device if isinstance(weight, torch.Tensor) else torch.device("cpu")


def patch(model: nn.Module, *, fused_loss: bool = True) -> nn.Module:
    """Make ``model`` (a transformers causal LM, or a PEFT model around one) use fastft's kernels, in place.

    RMSNorm-like modules run :func:`fastft.kernels.rms_norm`; gated MLPs run the fused LoRA MLP Function (or
    the modules with a fused activation where an adapter feature is not supported); attention keeps
    transformers' forward (so every attention implementation, cache and mask works) with fastft's RoPE and a
    fused q/k/v LoRA Function; and for families whose head is ``lm_head`` plus an optional softcap, the
    training loss is :func:`fastft.kernels.fused_linear_cross_entropy` and TRL's trainers score tokens with
    :func:`fastft.kernels.linear_log_probs` (:mod:`fastft.rl.trl_integration`; ``fused_loss=False`` keeps
    transformers' head and TRL's). Returns ``model``. The result is logged in one line and kept as
    ``model.fastft_report``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastft.patch expects a torch.nn.Module (a transformers or PEFT model), got {type(model)!r}")
    root = causal_lm(model)
    config = getattr(root, "config", None)
    if config is None:
        raise TypeError(
            f"fastft.patch expects a transformers PreTrainedModel (or a PEFT model around one); {type(root).__name__}"
            " has no .config"
        )
    model_type, family = family_of(config)
    report = PatchReport(model_type)
    dtype, device = model_dtype(root), _model_device(root)
    norm_offsets: dict[type, float | None] = {}
    mlp_layouts: dict[type, object] = {}
    rope_ok: dict[type, bool] = {}

    for module in list(root.modules()):
        cls = type(module)
        eps_attr = norm_eps_attr(module)
        if eps_attr is not None:
            base_cls = cls.__mro__[1] if isinstance(module, layers.FastRMSNorm) else cls
            if base_cls not in norm_offsets:
                norm_offsets[base_cls] = probe_norm_offset(module, eps_attr, family.norm_offset)
            offset = norm_offsets[base_cls]
            if offset is None:
                report.skipped[cls.__name__] = "norm formula not recognised"
                continue
            module._fastft_eps_attr, module._fastft_offset = eps_attr, offset
            layers.swap_class(module, layers.FastRMSNorm)
            report.norms += 1
            continue

        if isinstance(module, layers.FastGatedMLP):
            report.mlps += 1
            continue
        if isinstance(module, layers.FastAttention):
            report.attentions += 1
            continue
        layout = mlp_layout(module)
        if layout is not None:
            if cls not in mlp_layouts:
                mlp_layouts[cls] = layout if probe_mlp(module, layout, config.hidden_size, dtype) else None
            if mlp_layouts[cls] is None:
                report.skipped[cls.__name__] = "MLP wiring not recognised"
                continue
            module._fastft_layout = layout
            layers.swap_class(module, layers.FastGatedMLP)
            report.mlps += 1
            continue

        att = attention_layout(module)
        if att is not None:
            home = rotary_function_home(cls)
            if cls not in rope_ok:
                rot = rotary_dim(config, module.head_dim)
                rope_ok[cls] = home is not None and probe_rope(
                    home.apply_rotary_pos_emb, module.head_dim, rot, dtype, device
                )
            if not rope_ok[cls]:
                report.skipped[cls.__name__] = "rotary embedding not recognised"
                continue
            layers.install_rope_dispatcher(home)
            module._fastft_layout = att
            layers.swap_class(module, layers.FastAttention)
            report.attentions += 1

    if fused_loss and family.fused_loss and callable(getattr(root, "get_output_embeddings", None)):
        head = root.get_output_embeddings()
        if head is not None and layers.head_linear(head) is not None:
            layers.swap_class(root, layers.FastCausalLM)
            report.fused_loss = True
        else:
            report.skipped["lm_head"] = "output head is not a plain linear layer"
    elif fused_loss and not family.fused_loss:
        report.skipped["loss"] = f"logit transform of {model_type!r} not in fastft's family table"
    if isinstance(root, layers.FastCausalLM) and not report.fused_loss:
        root.fastft_return_logits = True
    if report.fused_loss:
        # TRL's trainers score tokens through their own chunked head: route it to fastft's for this model
        # (and a reference model TRL reloads from the same path). Lazy: the trainer glue sits above this layer.
        from fastft.rl import trl_integration

        trl_integration.remember_source(root, fused_loss)
        trl_integration.install()

    if report.norms + report.mlps + report.attentions == 0:
        logger.warning("fastft: %s has no block fastft recognises; it runs unpatched (correct, not faster)", model_type)
    logger.info(report.summary())
    model.fastft_report = report
    return model
