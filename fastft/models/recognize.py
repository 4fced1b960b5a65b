"""Recognise the blocks fastft can make fast, and check each guess numerically before trusting it.

Recognition is structural (attribute names that transformers uses across decoder families); a guess is then
confirmed by a *probe*: the module's own forward is run once on a few random rows and compared with the
formula fastft would run in its place. A module whose probe disagrees is left as it is, so a family with an
unexpected variant (another norm formula, an MLP that is wired differently, a rotary convention that is not
rotate-half) stays correct, just not faster. Probes run once per module class (the formula is a property of
the code, not of the weights), on the module's device, under ``torch.no_grad``.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastft.kernels.rms_norm import rms_norm_reference
from fastft.kernels.rope import rope_reference

_EPS_ATTRS = ("variance_epsilon", "eps")
_ACT_ATTRS = ("act_fn", "activation_fn", "act")
_ACTIVATIONS = {
    "swiglu": lambda x: F.silu(x),
    "geglu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "geglu": lambda x: F.gelu(x),
}


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal up to a couple of roundings in the probe's dtype (the formulas are the same, the op order may not be)."""
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return False
    tol = 4 * torch.finfo(actual.dtype).eps
    return bool(torch.allclose(actual.float(), expected.float(), rtol=tol, atol=tol))


def _is_module(parent: nn.Module, name: str) -> bool:
    return isinstance(getattr(parent, name, None), nn.Module)


def _on_real_device(*tensors: torch.Tensor) -> bool:
    return all(not t.is_meta for t in tensors)


# ------------------------------------------------------------------------------------------------ RMSNorm


def norm_eps_attr(module: nn.Module) -> str | None:
    """The attribute holding an RMSNorm-like module's epsilon, or None when the module is not RMSNorm-like.

    RMSNorm-like: a 1-D ``weight`` parameter, no bias, a float epsilon, and "RMSNorm" in the class name (which
    keeps LayerNorm and friends, whose probe would fail anyway, from being probed at all).
    """
    if "rmsnorm" not in type(module).__name__.lower():
        return None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or getattr(module, "bias", None) is not None:
        return None
    for attr in _EPS_ATTRS:
        if isinstance(getattr(module, attr, None), float):
            return attr
    return None


def probe_norm_offset(module: nn.Module, eps_attr: str, expected_offset: float) -> float | None:
    """Which of ``y = norm(x) * (offset + w)`` (offset 0: Llama, 1: Gemma) the module computes, or None."""
    weight = module.weight
    if not _on_real_device(weight):
        return expected_offset
    gen = _generator()
    x = (torch.randn(3, weight.shape[0], generator=gen) * 3).to(weight.device, weight.dtype)
    w = torch.randn(weight.shape[0], generator=gen).to(weight.device, weight.dtype)
    eps = getattr(module, eps_attr)
    with torch.no_grad():
        y = torch.func.functional_call(module, {"weight": w}, (x,))
        for offset in (expected_offset, 1.0 - expected_offset):
            if _close(y, rms_norm_reference(x, w, eps, offset)):
                return offset
    return None


# ------------------------------------------------------------------------------------------------ gated MLP


@dataclass(frozen=True)
class MLPLayout:
    """Attribute names of a gated MLP: ``down(act(gate(x)) * up(x))`` or, fused, ``gate, up = gate_up(x).chunk(2)``."""

    down: str
    act: str
    activation: str
    gate: str | None = None
    up: str | None = None
    gate_up: str | None = None


def probe_activation(act: object) -> str | None:
    """Name of the gated-MLP kernel whose activation ``act`` computes ("swiglu", "geglu_tanh", "geglu")."""
    if not callable(act):
        return None
    x = torch.linspace(-8.0, 8.0, 257)
    with torch.no_grad():
        try:
            y = act(x)
        except (TypeError, RuntimeError):
            return None
        for name, formula in _ACTIVATIONS.items():
            if isinstance(y, torch.Tensor) and _close(y, formula(x)):
                return name
    return None


def mlp_layout(module: nn.Module) -> MLPLayout | None:
    """The gated-MLP layout of ``module`` if it has one fastft's kernels implement, else None."""
    act_attr = next((a for a in _ACT_ATTRS if hasattr(module, a)), None)
    if act_attr is None or not _is_module(module, "down_proj"):
        return None
    activation = probe_activation(getattr(module, act_attr))
    if activation is None:
        return None
    if _is_module(module, "gate_proj") and _is_module(module, "up_proj"):
        return MLPLayout(down="down_proj", act=act_attr, activation=activation, gate="gate_proj", up="up_proj")
    if _is_module(module, "gate_up_proj"):
        return MLPLayout(down="down_proj", act=act_attr, activation=activation, gate_up="gate_up_proj")
    return None


def run_layout(module: nn.Module, layout: MLPLayout, x: torch.Tensor) -> torch.Tensor:
    """The gated-MLP formula of ``layout`` run through the module's own submodules (the probe's expectation)."""
    act = getattr(module, layout.act)
    if layout.gate_up is not None:
        gate, up = getattr(module, layout.gate_up)(x).chunk(2, dim=-1)
    else:
        gate, up = getattr(module, layout.gate)(x), getattr(module, layout.up)(x)
    return getattr(module, layout.down)(act(gate) * up)


def probe_mlp(module: nn.Module, layout: MLPLayout, hidden_size: int, dtype: torch.dtype) -> bool:
    """True when ``module(x)`` computes ``layout``'s formula (checked on two random rows)."""
    params = list(module.parameters())
    device = params[0].device if params else torch.device("cpu")
    if device.type == "meta":
        return True
    # x requires grad so the probe is a training-style call: bitsandbytes repacks 4-bit CPU weights in place on
    # its first no-grad eval call, and a probe must not change the model it looks at.
    x = torch.randn(2, hidden_size, generator=_generator()).to(device, dtype).requires_grad_()
    try:
        with torch.enable_grad():
            return _close(module(x).detach(), run_layout(module, layout, x).detach())
    except (RuntimeError, TypeError, ValueError):
        return False


# ------------------------------------------------------------------------------------------------ attention


@dataclass(frozen=True)
class AttentionLayout:
    """Projection names of an attention block and the rotary function its code calls."""

    o: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None


def attention_layout(module: nn.Module) -> AttentionLayout | None:
    """Projection layout of an attention module (separate q/k/v or Phi-3's fused qkv), or None."""
    if not _is_module(module, "o_proj") or not isinstance(getattr(module, "head_dim", None), int):
        return None
    if all(_is_module(module, n) for n in ("q_proj", "k_proj", "v_proj")):
        return AttentionLayout(o="o_proj", q="q_proj", k="k_proj", v="v_proj")
    if _is_module(module, "qkv_proj"):
        return AttentionLayout(o="o_proj", qkv="qkv_proj")
    return None


def rotary_function_home(attention_class: type) -> object | None:
    """The module whose global ``apply_rotary_pos_emb`` the attention's forward calls, if it has one."""
    home = sys.modules.get(attention_class.__module__)
    return home if callable(getattr(home, "apply_rotary_pos_emb", None)) else None


def probe_rope(function: object, head_dim: int, rotary_dim: int, dtype: torch.dtype, device: torch.device) -> bool:
    """True when ``function(q, k, cos, sin)`` is rotate-half RoPE (as :func:`fastft.kernels.rope`)."""
    gen = _generator()
    q = torch.randn(2, 3, 5, head_dim, generator=gen).to(device, dtype)
    k = torch.randn(2, 1, 5, head_dim, generator=gen).to(device, dtype)
    angles = torch.rand(2, 5, rotary_dim // 2, generator=gen) * 6.28
    cos = torch.cat((angles.cos(), angles.cos()), -1).to(device, dtype)
    sin = torch.cat((angles.sin(), angles.sin()), -1).to(device, dtype)
    with torch.no_grad():
        try:
            got = function(q, k, cos, sin)
        except (RuntimeError, TypeError, ValueError):
            return False
        want = rope_reference(q, k, cos, sin)
    return isinstance(got, tuple) and len(got) == 2 and all(_close(a, b) for a, b in zip(got, want))


def rotary_dim(config: object, head_dim: int) -> int:
    """Width of the rotated part of each head (Phi-style ``partial_rotary_factor``; the whole head otherwise)."""
    rope_parameters = getattr(config, "rope_parameters", None) or {}
    factor = rope_parameters.get("partial_rotary_factor", None) if isinstance(rope_parameters, dict) else None
    factor = factor if factor is not None else getattr(config, "partial_rotary_factor", 1.0)
    return int(head_dim * (factor or 1.0))


# ------------------------------------------------------------------------------------------------ signatures


def forward_takes_one_tensor(cls: type) -> bool:
    """True when ``cls.forward`` can be called with the one tensor a patched block passes (every other
    parameter has a default); a block whose forward needs more (a gated norm's ``gate``) is another kind."""
    try:
        params = list(inspect.signature(cls.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not positional and not any(p.kind == p.VAR_POSITIONAL for p in params):
        return False
    return all(p.default is not p.empty for p in positional[1:]) and all(
        p.default is not p.empty for p in params if p.kind == p.KEYWORD_ONLY
    )


def is_gated_norm(module: nn.Module) -> bool:
    """A norm whose forward multiplies by an activation of a second input (``norm(x, gate)``): Mamba-2's and
    Qwen3-Next's ``*RMSNormGated``."""
    name = type(module).__name__.lower()
    if "norm" not in name:
        return False
    try:
        params = inspect.signature(type(module).forward).parameters
    except (TypeError, ValueError):
        return False
    return "gated" in name or "gate" in params


# ------------------------------------------------------------------------------------------------ causal-LM head


@dataclass(frozen=True)
class HeadTransform:
    """How a causal LM turns its head's output ``z = lm_head(h)`` into logits and a loss: ``logits =
    softcap(z * logit_scale)`` (each optional) and ``loss = cross_entropy(logits) + aux_loss_coef * aux_loss``
    (the router loss of a mixture-of-experts, when the model adds it)."""

    logit_scale: float | None = None
    softcap: float | None = None
    aux_loss_coef: float | None = None

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        z = z if self.logit_scale is None else z * self.logit_scale
        return z if self.softcap is None else torch.tanh(z / self.softcap) * self.softcap


def _head_candidates(config: object) -> list[HeadTransform]:
    """Transforms to try, the config's declared ones first: no transform; ``final_logit_softcapping``; every
    number of the config whose name speaks of logits or of the head (Granite's ``logits_scaling``, Cohere's
    ``logit_scale``, Falcon-H1's ``lm_head_multiplier``), as a factor and as a divisor, with and without the cap."""
    values = config.to_dict() if hasattr(config, "to_dict") else {}
    softcap = values.get("final_logit_softcapping")
    caps = [float(softcap)] if isinstance(softcap, (int, float)) and not isinstance(softcap, bool) and softcap else []
    scales = []
    for name, value in values.items():
        lowered = name.lower()
        if "softcap" in lowered or isinstance(value, bool) or not isinstance(value, (int, float)) or not value:
            continue
        if "logit" in lowered or "lm_head" in lowered or "output_mult" in lowered:
            scales += [float(value), 1.0 / float(value)]
    out = [HeadTransform(softcap=c) for c in caps] + [HeadTransform()]
    out += [HeadTransform(logit_scale=s, softcap=c) for s in scales for c in (*caps, None)]
    return out


def _probe_logits(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Head outputs spread over [-40, 40]: every transform of a real model (a cap at 30, a scale of 1/8 or
    16) moves them by far more than a rounding, so each candidate is told apart whatever the weights."""
    gen = _generator()
    return (torch.rand(shape, generator=gen) * 80 - 40).to(device, dtype)


def probe_head(model: nn.Module, head: nn.Module, config: object) -> tuple[HeadTransform | None, str]:
    """Which :class:`HeadTransform` ``model`` computes, found by running its own forward once (six tokens of
    input and labels, training mode, no grad) with the head's output replaced by known values; (None, reason) when
    the logits or the loss are anything else, so the model keeps transformers' head and loss."""
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.is_meta:
        return None, "the output head has no materialised weight to probe"
    vocab = weight.shape[0]
    ids = (torch.arange(6, device=weight.device) * 7 + 3).remainder(vocab).unsqueeze(0)
    replaced: dict[str, torch.Tensor] = {}

    def replace_output(module, args, output):
        if not isinstance(output, torch.Tensor):
            return None
        replaced.setdefault("z", _probe_logits(output.shape, output.dtype, output.device))
        return replaced["z"] if replaced["z"].shape == output.shape else output

    # In training mode, where the fused loss serves: dropout only moves the hidden states, which the probe
    # replaces anyway, and bitsandbytes repacks 4-bit CPU weights in place on an eval-mode no-grad call (a probe
    # must not change the model). A model fastft patched before runs its own head for the probe.
    flags = [(m, m.training) for m in model.modules()]
    returned = model.__dict__.get("fastft_return_logits")
    model.__dict__["fastft_return_logits"] = True
    handle = head.register_forward_hook(replace_output)
    try:
        model.train()
        with torch.no_grad():
            out = model(input_ids=ids, labels=ids)
    except Exception as exc:  # noqa: BLE001 - any failure means: keep the model's own head
        return None, f"probing the head failed ({type(exc).__name__}: {_short(exc)})"
    finally:
        handle.remove()
        for module, training in flags:
            module.training = training
        if returned is None:
            del model.__dict__["fastft_return_logits"]
        else:
            model.__dict__["fastft_return_logits"] = returned
    z, logits, loss = replaced.get("z"), getattr(out, "logits", None), getattr(out, "loss", None)
    if z is None or not isinstance(logits, torch.Tensor) or logits.shape != z.shape or loss is None:
        return None, "the logits are not the output head's output"
    # Compared in fp32 at the head dtype's resolution: the model may transform in bf16 and upcast, or the reverse.
    tol = 8 * torch.finfo(z.dtype).eps
    candidates = _head_candidates(config)
    found = next(
        (t for t in candidates if torch.allclose(logits.float(), t.apply(z.float()), rtol=tol, atol=tol)), None
    )
    if found is None:
        return None, "the logits are the head's output transformed in a way fastft does not know"
    flat = logits[:, :-1].reshape(-1, vocab).float()
    ce = F.cross_entropy(flat, ids[:, 1:].reshape(-1))
    aux, coef = getattr(out, "aux_loss", None), getattr(config, "router_aux_loss_coef", None)
    if torch.allclose(loss.float(), ce, rtol=1e-4, atol=1e-5):
        return found, ""
    with_aux = isinstance(aux, torch.Tensor) and isinstance(coef, (int, float))
    if with_aux and torch.allclose(loss.float(), ce + coef * aux.float(), rtol=1e-4, atol=1e-5):
        return HeadTransform(found.logit_scale, found.softcap, float(coef)), ""
    return None, "the loss is not the cross-entropy of the logits"


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
