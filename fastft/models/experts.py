"""Routed experts of mixture-of-experts models on fastft's grouped experts kernel.

transformers (5.x) gives every 3-D experts module (``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I), or the
transposed gpt-oss layout with biases) one extension point: ``@use_experts_implementation`` makes its forward
look up ``config._experts_implementation`` in ``ExpertsInterface``. fastft registers its forward there under the
name ``"fastft"`` (importing this module registers it; it changes no model), so

- :func:`fastft.patch` switches a model with ``model.set_experts_implementation("fastft")`` and the config keeps
  saying what runs (``model.set_experts_implementation("grouped_mm")`` switches back, and a model saved and
  reloaded with ``experts_implementation="fastft"`` runs it again);
- an experts class without the decorator but of the same structure is patched per instance (its class swapped
  to :class:`FastExperts`, as every other fastft block).

Each experts class is probed once before it is switched: its own eager forward against fastft's on random
routing (an unused expert, a token routed twice to one expert's neighbours); a formula fastft does not have
(an activation of its own, a post-expert norm, expert parallelism) or any exception leaves the block on
transformers' code, reported with the reason. A block left that way keeps running the implementation it ran
before, even when the config says ``"fastft"``.

Routers stay transformers' own (softmax or sigmoid top-k, grouped top-k, router biases, ``norm_topk_prob``), so
the auxiliary load-balancing loss, computed from the router logits, is unchanged.

LoRA: PEFT's ``target_parameters=["gate_up_proj", "down_proj"]`` wraps the experts module in ``ParamWrapper``
layers that, for the duration of the forward, parametrize the 3-D weight as ``W + scaling * lhs @ rhs``
(``_LoraFactorsProxy``, one adapter) or ``W + delta`` (several adapters, fp8 weights). fastft reads the
parametrization and hands the base weight and the low-rank factors to the kernel, so ``W + delta`` is never
formed and only the factors (hence PEFT's ``lora_A`` / ``lora_B``) receive gradients; a dense delta is used as
PEFT forms it. ``disable_adapter()`` removes the parametrization, and the base weight alone runs.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch
from torch import nn

from fastft.kernels.moe_experts import MoELoRA, moe_experts

logger = logging.getLogger("fastft")

IMPLEMENTATION = "fastft"
_WEIGHTS = ("gate_up_proj", "down_proj")
_BIASES = ("gate_up_proj_bias", "down_proj_bias")
_ACTIVATIONS = ("silu", "gelu_tanh", "gelu")


@dataclass(frozen=True)
class ExpertsSpec:
    """What the kernel needs to know about one experts class (what structure cannot say, the probe decides).

    ``activation``: "silu", "gelu_tanh", "gelu" (``act(gate) * up``) or "gpt_oss" (``(clamp(up) + 1) * g *
    sigmoid(alpha * g)`` with ``g = clamp(gate, max=limit)``); ``limit``: gate and up clamped first (gpt-oss,
    DeepSeek-V4's clamped SwiGLU); ``interleaved``: gate and up alternate along the
    output (gpt-oss) instead of two halves; ``transposed``: weights stored (E, in, out) instead of (E, out, in).
    """

    activation: str
    interleaved: bool = False
    transposed: bool = False
    has_bias: bool = False
    alpha: float = 1.702
    limit: float | None = None


@dataclass
class ExpertWeight:
    """One 3-D expert weight as the forward sees it: the base tensor and, under a PEFT LoRA adapter, either its
    low-rank factors (``base + scaling * lhs @ rhs``, same layout as ``base``) or the dense delta PEFT formed."""

    base: torch.Tensor
    lhs: torch.Tensor | None = None
    rhs: torch.Tensor | None = None
    scaling: float = 1.0
    dense: torch.Tensor | None = None  # the parametrized weight, when PEFT did not keep factors


# ------------------------------------------------------------------------------------------------ registration


def register() -> bool:
    """Register fastft's experts forward in transformers' ``ExpertsInterface`` under ``"fastft"``; False when
    the installed transformers has no such interface (then :func:`fastft.patch` patches instances)."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        return False
    ExpertsInterface.register(IMPLEMENTATION, experts_forward)
    return True


def _eager_forward(cls: type):
    """The experts class's own (eager) forward under transformers' dispatching wrapper, or its forward."""
    for klass in cls.__mro__:
        forward = vars(klass).get("forward")
        if forward is not None and not vars(klass).get("_fastft_swapped") and klass is not FastExperts:
            return getattr(forward, "__wrapped__", forward)
    return cls.forward


def uses_interface(module: nn.Module) -> bool:
    """Whether the module's class dispatches through ``ExpertsInterface`` (``@use_experts_implementation``)."""
    forward = type(module).forward
    return (
        HAS_INTERFACE
        and hasattr(forward, "__wrapped__")
        and hasattr(module, "config")
        and hasattr(module, "has_gate")
        and not isinstance(module, FastExperts)
    )


# ------------------------------------------------------------------------------------------------ recognition


def _parameter(module: nn.Module, name: str) -> torch.Tensor | None:
    """The stored tensor ``name`` of ``module`` (the original under a parametrization), without computing it."""
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is not None and name in parametrizations:
        return parametrizations[name].original
    value = module._parameters.get(name)
    return value if isinstance(value, torch.Tensor) else None


def experts_structure(module: nn.Module) -> tuple[int, int, int, bool] | None:
    """(experts, hidden, intermediate, transposed) of a module holding 3-D ``gate_up_proj`` and ``down_proj``
    weights that is called as ``experts(hidden_states, top_k_index, top_k_weights)``, or None."""
    gate_up, down = (_parameter(module, n) for n in _WEIGHTS)
    if gate_up is None or down is None or gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[0] != down.shape[0]:
        return None
    if getattr(module, "has_gate", True) is False or getattr(module, "has_post_expert_norm", False):
        return None
    if getattr(module, "_is_expert_parallel", False):
        return None
    experts = gate_up.shape[0]
    transposed = bool(getattr(module, "is_transposed", False))
    if transposed:
        (hidden, two_i), (inter, hidden_out) = gate_up.shape[1:], down.shape[1:]
    else:
        (two_i, hidden), (hidden_out, inter) = gate_up.shape[1:], down.shape[1:]
    if hidden != hidden_out or two_i != 2 * inter:
        return None
    if not _takes_routing(type(module)):
        return None
    return experts, hidden, inter, transposed


def _takes_routing(cls: type) -> bool:
    try:
        params = list(inspect.signature(_eager_forward(cls)).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)


def _candidates(module: nn.Module, transposed: bool) -> list[ExpertsSpec]:
    has_bias = _parameter(module, "gate_up_proj_bias") is not None and _parameter(module, "down_proj_bias") is not None
    specs = [ExpertsSpec(a, transposed=transposed, has_bias=has_bias) for a in _ACTIVATIONS]
    alpha, limit = getattr(module, "alpha", None), getattr(module, "limit", None)
    if isinstance(limit, (int, float)) and not isinstance(limit, bool):
        specs[:0] = [ExpertsSpec(a, False, transposed, has_bias, limit=float(limit)) for a in _ACTIVATIONS]
        if isinstance(alpha, (int, float)):
            specs[:0] = [
                ExpertsSpec("gpt_oss", interleaved, transposed, has_bias, float(alpha), float(limit))
                for interleaved in (True, False)
            ]
    return specs


def _probe_routing(tokens: int, experts: int, top_k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random top-k routing of ``tokens`` rows in which the last expert receives no token."""
    usable = max(1, experts - 1)
    scores = torch.rand(tokens, usable, generator=gen)
    k = min(top_k, usable)
    index = scores.topk(k, dim=-1).indices
    weights = torch.rand(tokens, k, generator=gen) + 0.1
    return index, weights / weights.sum(-1, keepdim=True)


def probe_experts(module: nn.Module, dtype: torch.dtype) -> tuple[ExpertsSpec | None, str]:
    """The spec under which fastft's forward equals the module's own eager forward on random routing, or
    (None, reason). The probe runs on the module's weights with gradients on, and changes nothing."""
    structure = experts_structure(module)
    if structure is None:
        return None, "routed experts: layout not recognised"
    experts, hidden, _, transposed = structure
    weight = _parameter(module, "gate_up_proj")
    if weight.is_meta:
        return None, "routed experts: weights on the meta device"
    if not weight.is_floating_point():
        return None, f"routed experts: {weight.dtype} weights (quantised), no fastft kernel"
    gen = torch.Generator().manual_seed(1234)
    top_k = min(2, experts)
    index, weights = _probe_routing(7, experts, top_k, gen)
    x = torch.randn(7, hidden, generator=gen).to(weight.device, dtype)
    index, weights = index.to(weight.device), weights.to(weight.device, dtype)
    eager = _eager_forward(type(module))
    with torch.enable_grad():
        x = x.requires_grad_()
        expected = eager(module, x, index, weights).detach()
        for spec in _candidates(module, transposed):
            actual = _compute(module, spec, x, index, weights).detach()
            if actual.shape == expected.shape and _close(actual, expected):
                return spec, ""
    return None, "routed experts: formula not recognised (activation, gating or layout)"


def _close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal up to the roundings of a reordered sum of H products in the probe's dtype."""
    tol = 32 * torch.finfo(actual.dtype).eps
    scale = expected.abs().max().clamp_min(1e-6)
    return bool(((actual.float() - expected.float()).abs().max() <= tol * scale).item())


# ------------------------------------------------------------------------------------------------ forward


def read_weight(module: nn.Module, name: str) -> ExpertWeight | None:
    """``name`` of an experts module as :class:`ExpertWeight` (base weight and PEFT LoRA factors), None if absent."""
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is None or name not in parametrizations:
        value = getattr(module, name, None)
        return ExpertWeight(value) if isinstance(value, torch.Tensor) else None
    chain = parametrizations[name]
    proxy = chain[0] if len(chain) == 1 else None
    lhs, rhs, scaling = (getattr(proxy, a, None) for a in ("lhs", "rhs", "scaling"))
    if isinstance(lhs, torch.Tensor) and isinstance(rhs, torch.Tensor) and isinstance(scaling, (int, float)):
        return ExpertWeight(chain.original, lhs, rhs, float(scaling))
    return ExpertWeight(chain.original, dense=getattr(module, name))


def experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """fastft's experts forward, as registered in ``ExpertsInterface`` (``self`` is the experts module).

    A module fastft probed runs the grouped kernel; one whose probe failed runs the implementation it ran before
    patching; one never patched (``experts_implementation="fastft"`` chosen at load) is probed on first use."""
    spec = self.__dict__.get("_fastft_experts", _UNPROBED)
    if spec is _UNPROBED:
        spec, reason = probe_safely(self, hidden_states.dtype)
        self.__dict__["_fastft_experts"] = spec
        if spec is None:
            logger.warning("fastft: %s stays on transformers' experts code (%s)", type(self).__name__, reason)
    if spec is None:
        return _previous_forward(self)(self, hidden_states, top_k_index, top_k_weights)
    return _compute(self, spec, hidden_states, top_k_index, top_k_weights)


_UNPROBED = object()


def probe_safely(module: nn.Module, dtype: torch.dtype) -> tuple[ExpertsSpec | None, str]:
    """:func:`probe_experts`, with any exception turned into (None, reason)."""
    try:
        return probe_experts(module, dtype)
    except Exception as exc:  # noqa: BLE001 - a block the probe cannot run stays on transformers' code
        return None, f"routed experts: probe failed ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})"


def _previous_forward(module: nn.Module):
    """The implementation a block left on transformers' code runs: the one it ran before patching."""
    name = module.__dict__.get("_fastft_previous") or "grouped_mm"
    if name not in (None, "eager", IMPLEMENTATION):
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        if name in ALL_EXPERTS_FUNCTIONS:
            return ALL_EXPERTS_FUNCTIONS[name]
    return _eager_forward(type(module))


def _compute(
    module: nn.Module, spec: ExpertsSpec, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The grouped experts computation of ``module`` with its current weights (and LoRA factors)."""
    gate_up, down = read_weight(module, "gate_up_proj"), read_weight(module, "down_proj")
    biases = (module.gate_up_proj_bias, module.down_proj_bias) if spec.has_bias else (None, None)
    return grouped_experts(hidden, top_k_index, top_k_weights, gate_up, down, *biases, spec)


def _factors(weight: ExpertWeight, transposed: bool) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
    """PEFT's ``(lhs, rhs)`` (``delta = lhs @ rhs`` in the stored layout) as the kernel's ``(A (E, r, in), B (E,
    out, r))`` of the logical (out, in) matrix: ``(rhs, lhs)`` for (E, out, in) storage, ``(lhs^T, rhs^T)`` for
    the transposed (E, in, out) one. Views: gradients reach PEFT's lora_A / lora_B through them."""
    if weight.lhs is None or weight.dense is not None:
        return None, None, 1.0
    if transposed:
        return weight.lhs.transpose(1, 2), weight.rhs.transpose(1, 2), weight.scaling
    return weight.rhs, weight.lhs, weight.scaling


def grouped_experts(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: ExpertWeight,
    down: ExpertWeight,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    spec: ExpertsSpec,
) -> torch.Tensor:
    """``sum_k w[t,k] * down_e(gate(gate_up_e(x_t)))`` for ``e = index[t,k]``: :func:`fastft.kernels.moe_experts`
    with the module's weights, biases and LoRA factors (a dense PEFT delta is passed as the weight)."""
    gu_A, gu_B, gu_s = _factors(gate_up, spec.transposed)
    d_A, d_B, d_s = _factors(down, spec.transposed)
    lora = None
    if gu_A is not None or d_A is not None:
        lora = MoELoRA(gu_A, gu_B, gu_s, d_A, d_B, d_s)
    return moe_experts(
        hidden,
        top_k_index,
        top_k_weights,
        gate_up.dense if gate_up.dense is not None else gate_up.base,
        down.dense if down.dense is not None else down.base,
        gate_up_bias,
        down_bias,
        act=spec.activation,
        transposed=spec.transposed,
        interleaved=spec.interleaved,
        alpha=spec.alpha,
        limit=spec.limit,
        lora=lora,
    )


# ------------------------------------------------------------------------------------------------ instance patch


class FastExperts:
    """An experts module without transformers' dispatch, running fastft's experts forward (class swapped per
    instance by :func:`fastft.patch`). Called without routing (Llama 4's experts, by its own block), it runs its
    own forward."""

    _fastft_experts: ExpertsSpec

    def forward(self, hidden_states, *args, **kwargs):
        spec = self.__dict__.get("_fastft_experts")
        if len(args) != 2 or kwargs or spec is None:
            return super().forward(hidden_states, *args, **kwargs)
        return _compute(self, spec, hidden_states, *args)


# ------------------------------------------------------------------------------------------------ Llama 4


def _base_layer(module: nn.Module) -> nn.Module:
    """The module under PEFT's wrappers (``ParamWrapper`` nests one per adapted parameter)."""
    get_base = getattr(module, "get_base_layer", None)
    return get_base() if callable(get_base) else module


def input_scaled_structure(module: nn.Module) -> nn.Module | None:
    """The experts module of a Llama-4-style MoE block, or None.

    Such a block scales each token's input by its router score (sigmoid of the top-k logits, 0 elsewhere) and runs
    every token through every expert (``experts(x * s)`` on (E * tokens, H) rows), so the experts take no routing.
    Recognised by structure: a ``router`` with ``top_k``, a ``shared_expert``, and ``experts`` holding 3-D
    ``gate_up_proj`` (E, H, 2I) and ``down_proj`` (E, I, H) whose forward takes the hidden states alone."""
    router, shared = getattr(module, "router", None), getattr(module, "shared_expert", None)
    wrapped = getattr(module, "experts", None)
    if not all(isinstance(m, nn.Module) for m in (router, shared, wrapped)) or not isinstance(
        getattr(router, "top_k", None), int
    ):
        return None
    base = _base_layer(wrapped)
    gate_up, down = (_parameter(base, n) for n in _WEIGHTS)
    if gate_up is None or down is None or gate_up.dim() != 3 or down.dim() != 3:
        return None
    (experts, hidden, two_i), (experts_d, inter, hidden_d) = gate_up.shape, down.shape
    if experts != experts_d or hidden != hidden_d or two_i != 2 * inter or _takes_routing(type(base)):
        return None
    return base


class FastInputScaledMoE:
    """A Llama-4-style MoE block whose routed part runs only the top-k (token, expert) pairs through fastft's
    grouped experts: ``sum_k expert_{i_k}(s_k * x)``. The experts it skips see a zero input (their router score
    is sigmoid(-inf) = 0) and, with no biases and ``act(0) = 0``, add exactly zero in transformers' code too.
    The router (its scores, logits and their gradients) and the shared expert are the block's own."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if args or kwargs:
            return super().forward(hidden_states, *args, **kwargs)
        width = hidden_states.shape[-1]
        hidden = hidden_states.reshape(-1, width)
        router_scores, router_logits = self.router(hidden)
        index = router_logits.topk(self.router.top_k, dim=1).indices  # the router's own top-k, recomputed
        scores = router_scores.gather(1, index)
        routed_in = (hidden.unsqueeze(1) * scores.unsqueeze(-1).to(hidden.dtype)).reshape(-1, width)
        pairs = index.reshape(-1, 1)
        routed = self.experts(routed_in, pairs, torch.ones(pairs.shape, dtype=hidden.dtype, device=hidden.device))
        out = self.shared_expert(hidden)
        return out + routed.view(hidden.shape[0], -1, width).sum(1), router_logits


def probe_input_scaled(block: nn.Module, base: nn.Module, hidden_size: int, dtype: torch.dtype) -> str:
    """Try each activation on ``block`` (class not yet swapped): "" and the spec set on ``base`` when fastft's
    block forward equals the block's own, else the reason (the block and its experts are left unchanged)."""
    from fastft.models.layers import swap_class

    gen = torch.Generator().manual_seed(1234)
    weight = _parameter(base, "gate_up_proj")
    x = torch.randn(1, 7, hidden_size, generator=gen).to(weight.device, dtype)
    original_cls, original_base_cls = type(block), type(base)
    with torch.enable_grad():
        expected = block(x)[0].detach()
        try:
            for spec in (ExpertsSpec(a, transposed=True) for a in _ACTIVATIONS):
                base.__dict__["_fastft_experts"] = spec
                swap_class(base, FastExperts)
                swap_class(block, FastInputScaledMoE)
                actual = block(x)[0].detach()
                if actual.shape == expected.shape and _close(actual, expected):
                    return ""
                block.__class__, base.__class__ = original_cls, original_base_cls
        except Exception as exc:  # noqa: BLE001 - any failure leaves the block as it was
            block.__class__, base.__class__ = original_cls, original_base_cls
            base.__dict__.pop("_fastft_experts", None)
            return f"routed experts: probe failed ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})"
    base.__dict__.pop("_fastft_experts", None)
    return "routed experts: formula not recognised (activation, gating or layout)"


def is_patched(module: nn.Module) -> bool:
    """Whether ``module`` is an experts block running fastft's kernel."""
    return isinstance(module.__dict__.get("_fastft_experts"), ExpertsSpec)


# Registered at import (adds a name; no model changes until it is selected).
HAS_INTERFACE = register()

__all__ = [
    "IMPLEMENTATION",
    "ExpertWeight",
    "ExpertsSpec",
    "FastExperts",
    "FastInputScaledMoE",
    "experts_forward",
    "experts_structure",
    "grouped_experts",
    "input_scaled_structure",
    "is_patched",
    "probe_experts",
    "probe_input_scaled",
    "read_weight",
    "register",
    "uses_interface",
]
