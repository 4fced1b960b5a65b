"""Per-token log-probs of a causal LM from its hidden states, through fastft's log-prob head.

The building block of fastft's own trainers (PPO, ORPO, CPO) and of the TRL integration: run the model's
backbone (the decoder stack, with whatever fastft patched into it, LoRA adapters included), then score the
next tokens with :func:`fastft.kernels.logprob_head.linear_log_probs` on the output head's weight, so no
batch x seq x vocab logits tensor is ever created.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from fastft.kernels.logprob_head import LogProbs, linear_log_probs
from fastft.models.layers import head_linear
from fastft.models.patch import causal_lm
from fastft.models.zero3 import gathered_head

# The root method fastft.distributed.shard registers with FSDP2 (register_fsdp_forward_method) for run_in_root.
LOG_PROBS_METHOD = "_fastft_log_probs_forward"


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside PEFT (or accelerate/DDP) wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP, accelerate
        model = model.module
    return causal_lm(model)


def head_transform(config: object, model: nn.Module | None = None) -> tuple[float | None, float | None]:
    """(softcap, logit_scale) of the model's logits: what :func:`fastft.patch` found by probing ``model``'s own
    head when it did, else read from its config as TRL's fused head reads them.

    Gemma 2/3: ``final_logit_softcapping``; Cohere: ``logit_scale``; Granite/MiniCPM3: ``1 / logits_scaling``;
    Falcon-H1: ``lm_head_multiplier``. None where the config has none (no transform).
    """
    probed = getattr(model, "_fastft_head_transform", None) if model is not None else None
    if probed is not None:
        return probed.softcap, probed.logit_scale
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text, "final_logit_softcapping", None)
    scale = getattr(text, "logit_scale", None)
    if scale is None:
        scale = getattr(text, "output_multiplier", None)
    if scale is None:
        scale = getattr(text, "lm_head_multiplier", None)
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scale = text.logits_scaling if getattr(text, "model_type", "") == "hyperclovax" else 1 / text.logits_scaling
    return (None if softcap is None else float(softcap)), (None if scale is None else float(scale))


def output_linear(model: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` the model's output head computes right now (through PEFT's ``modules_to_save``)."""
    head = _causal_lm(model).get_output_embeddings()
    linear = head_linear(head) if head is not None else None
    if linear is None:
        raise NotImplementedError(
            f"fastft.rl: the model's output head is a {type(head).__name__}, not a plain linear layer (a LoRA "
            "adapter on lm_head?); the log-prob head reads its weight directly and would ignore the adapter. Leave "
            "lm_head out of target_modules (modules_to_save=['lm_head'] trains it fully and works)."
        )
    return linear


def backbone(model: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM (``model.model`` for Llama), which returns ``last_hidden_state``."""
    lm = _causal_lm(model)
    inner = getattr(lm, getattr(lm, "base_model_prefix", "model"), None)
    if not isinstance(inner, nn.Module) or inner is lm:
        raise TypeError(
            f"fastft.rl: {type(lm).__name__} has no decoder stack under `{getattr(lm, 'base_model_prefix', None)}`; "
            "pass a transformers *ForCausalLM model (or a PEFT model around one)"
        )
    return inner


def backbone_hidden_states(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
) -> torch.Tensor:
    """(batch, seq, hidden) last hidden states of the model's backbone (no head, no logits)."""
    kwargs.setdefault("use_cache", False)
    out = backbone(model)(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def head_log_probs(
    model: nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    entropy: bool = False,
    stats: bool = False,
) -> LogProbs:
    """Log-probs of ``labels`` (already aligned with ``hidden``; -100 = skip) under the model's output head."""
    lm = _causal_lm(model)
    linear = output_linear(model)
    weight, bias = linear.weight, linear.bias
    if isinstance(weight, DTensor):
        raise NotImplementedError(
            "fastft.rl: the model is sharded with FSDP2 and its head weight was read outside the model's forward, "
            "where it is still a shard. Run the backbone and the head together inside "
            "fastft.rl.heads.run_in_root(model, compute, *tensors) (as causal_log_probs and fastft.rl's "
            "PPO/ORPO/CPO trainers do), which runs them under the root unit's all-gather."
        )
    softcap, logit_scale = head_transform(lm.config, lm)
    with gathered_head(weight, bias):  # DeepSpeed ZeRO-3 partitions the head between uses
        return linear_log_probs(
            hidden.to(weight.device),
            weight,
            labels.to(weight.device),
            bias,
            temperature=temperature,
            softcap=softcap,
            logit_scale=logit_scale,
            entropy=entropy,
            stats=stats,
        )


def run_in_root(model: nn.Module, compute: Callable[..., tuple], *tensors: torch.Tensor | None) -> tuple:
    """``compute(*tensors)`` (a tuple of tensors or None), under the root unit's FSDP2 hooks if the model is sharded.

    Code that calls the backbone and reads the head's weight itself (not inside one module's ``forward``) must
    do both in one ``compute``. On a model sharded by :func:`fastft.distributed.shard` it runs through the root's
    registered forward method (``_fastft_log_probs_forward``): FSDP2 all-gathers the root's parameters
    (embeddings, final norm, head) first and reduce-scatters their gradients in backward. Any other model runs
    ``compute`` directly. Modules called inside ``compute`` that FSDP2 shards on their own (the decoder layers)
    gather themselves as usual; parameters FSDP2 does not manage (PPO's value head) get no gradient reduction.
    """
    sharded_forward = getattr(model, LOG_PROBS_METHOD, None)
    if sharded_forward is None:
        return tuple(compute(*tensors))

    # FSDP2 hooks the outputs for its backward and warns about views (an in-place op would drop the hook):
    # hand it copies of views (the (batch, seq - 1) slices of the head's outputs: a few bytes per token).
    def compute_owned(*args: torch.Tensor | None) -> tuple:
        return tuple(t.clone() if isinstance(t, torch.Tensor) and t._base is not None else t for t in compute(*args))

    return tuple(sharded_forward(compute_owned, *tensors))


def causal_log_probs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    entropy: bool = False,
    stats: bool = False,
    **model_kwargs,
) -> LogProbs:
    """Next-token log-probs of a causal LM: entry ``[b, t]`` scores ``labels[b, t + 1]`` given the prefix.

    ``labels`` defaults to ``input_ids`` with padding (``attention_mask == 0``) set to -100; positions labelled
    -100 are skipped and get 0. Outputs are (batch, seq - 1), fp32.
    """
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, -100)

    def compute(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor) -> tuple:
        hidden = backbone_hidden_states(model, input_ids, attention_mask, **model_kwargs)
        out = head_log_probs(
            model, hidden[:, :-1], labels[:, 1:], temperature=temperature, entropy=entropy, stats=stats
        )
        return tuple(getattr(out, f.name) for f in dataclasses.fields(out))

    # The backbone and the head's weight are read outside any module forward: on an FSDP2-sharded model they
    # must run under the root unit's hooks (run_in_root).
    return LogProbs(*run_in_root(model, compute, input_ids, attention_mask, labels))
