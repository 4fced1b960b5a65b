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
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from fastft.kernels.layer_norm import layer_norm_reference
from fastft.kernels.rms_norm import rms_norm_reference
from fastft.kernels.rms_norm_gated import rms_norm_gated_reference

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


# ------------------------------------------------------------------------------------------------ output dropout


def output_dropout(module: nn.Module) -> str | None:
    """The attribute holding an MLP's output dropout: an ``nn.Dropout`` child (GPT-2's ``dropout``) or a float
    probability (Seed-OSS's ``residual_dropout``, applied with ``F.dropout``), when the module has exactly one."""
    found = [n for n, c in module.named_children() if isinstance(c, nn.Dropout)]
    found += [n for n, v in vars(module).items() if "dropout" in n.lower() and isinstance(v, float)]
    return found[0] if len(found) == 1 else None


def apply_dropout(module: nn.Module, name: str | None, y: torch.Tensor) -> torch.Tensor:
    """``y`` through the module's output dropout ``name`` (as its own forward applies it)."""
    if name is None:
        return y
    dropout = getattr(module, name)
    return dropout(y) if isinstance(dropout, nn.Module) else F.dropout(y, p=dropout, training=module.training)


class _TrainingProbe:
    """The module in training mode with its output dropout switched off, for the duration of a probe: any other
    randomness in training then shows as a mismatch (a block fastft would otherwise run without it)."""

    def __init__(self, module: nn.Module, dropout: str | None):
        self.module, self.dropout = module, dropout

    def __enter__(self):
        self.flags = [(m, m.training) for m in self.module.modules()]
        self.module.train()
        if self.dropout is not None:
            holder = getattr(self.module, self.dropout)
            self.p = holder.p if isinstance(holder, nn.Module) else holder
            if isinstance(holder, nn.Module):
                holder.p = 0.0
            else:
                setattr(self.module, self.dropout, 0.0)
        return self

    def __exit__(self, *exc):
        if self.dropout is not None:
            holder = getattr(self.module, self.dropout)
            if isinstance(holder, nn.Module):
                holder.p = self.p
            else:
                setattr(self.module, self.dropout, self.p)
        for m, training in self.flags:
            m.training = training
        return False


# ------------------------------------------------------------------------------------------------ gated MLP


@dataclass(frozen=True)
class MLPLayout:
    """Attribute names of a gated MLP: ``down(act(gate(x)) * up(x))`` or, fused, ``gate, up = gate_up(x).chunk(2)``."""

    down: str
    act: str | None  # None: the activation is in the module's code (LFM2), named by ``activation``
    activation: str
    gate: str | None = None
    up: str | None = None
    gate_up: str | None = None
    dropout: str | None = None  # output dropout (see output_dropout)


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
    if all(_is_module(module, n) for n in ("w1", "w2", "w3")) and not any(hasattr(module, a) for a in _ACT_ATTRS):
        # LFM2: w2(silu(w1(x)) * w3(x)) with the activation in its code; the probe tries each one fastft has.
        return MLPLayout(down="w2", act=None, activation="swiglu", gate="w1", up="w3", dropout=output_dropout(module))
    act_attr = next((a for a in _ACT_ATTRS if hasattr(module, a)), None)
    if act_attr is None or not _is_module(module, "down_proj"):
        return None
    activation = probe_activation(getattr(module, act_attr))
    if activation is None:
        return None
    dropout = output_dropout(module)
    if _is_module(module, "gate_proj") and _is_module(module, "up_proj"):
        return MLPLayout("down_proj", act_attr, activation, gate="gate_proj", up="up_proj", dropout=dropout)
    if _is_module(module, "gate_up_proj"):
        return MLPLayout("down_proj", act_attr, activation, gate_up="gate_up_proj", dropout=dropout)
    return None


def run_layout(module: nn.Module, layout: MLPLayout, x: torch.Tensor) -> torch.Tensor:
    """The gated-MLP formula of ``layout`` run through the module's own submodules (the probe's expectation)."""
    act = getattr(module, layout.act) if layout.act is not None else _ACTIVATIONS[layout.activation]
    if layout.gate_up is not None:
        gate, up = getattr(module, layout.gate_up)(x).chunk(2, dim=-1)
    else:
        gate, up = getattr(module, layout.gate)(x), getattr(module, layout.up)(x)
    return getattr(module, layout.down)(act(gate) * up)


def probe_mlp(module: nn.Module, layout: MLPLayout, hidden_size: int, dtype: torch.dtype) -> MLPLayout | None:
    """``layout`` when ``module(x)`` computes its formula (checked on two random rows), else None; a layout whose
    activation is in the module's code is tried with each activation fastft has."""
    params = list(module.parameters())
    device = params[0].device if params else torch.device("cpu")
    if device.type == "meta":
        return layout
    candidates = [layout] if layout.act is not None else [replace(layout, activation=a) for a in _ACTIVATIONS]
    # x requires grad so the probe is a training-style call: bitsandbytes repacks 4-bit CPU weights in place on
    # its first no-grad eval call, and a probe must not change the model it looks at.
    x = torch.randn(2, hidden_size, generator=_generator()).to(device, dtype).requires_grad_()
    try:
        with torch.enable_grad(), _TrainingProbe(module, layout.dropout):
            y = module(x).detach()
            return next((c for c in candidates if _close(y, run_layout(module, c, x).detach())), None)
    except (RuntimeError, TypeError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------ attention


@dataclass(frozen=True)
class AttentionLayout:
    """Projection names of an attention block and the rotary function its code calls."""

    o: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    single: tuple[str, ...] = ()  # further projections run one by one through the fused LoRA Function (MLA's)


_MLA_PROJECTIONS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")


def attention_layout(module: nn.Module) -> AttentionLayout | None:
    """Projection layout of an attention module: separate q/k/v, Phi-3's fused qkv, or MLA's (DeepSeek-V2/V3,
    Kimi, GLM-4-MoE-lite: low-rank q and kv projections, each run through the fused LoRA Function), or None."""
    if (
        _is_module(module, "c_attn")
        and _is_module(module, "c_proj")
        and isinstance(getattr(module, "head_dim", None), int)
    ):
        return AttentionLayout(o="c_proj", qkv="c_attn")  # GPT-2, GPT-BigCode: one fused q/k/v projection
    if _is_module(module, "qkv") and _is_module(module, "proj") and isinstance(getattr(module, "head_dim", None), int):
        return AttentionLayout(o="proj", qkv="qkv")  # ViT-style vision towers (Qwen2-VL / 2.5-VL / 3-VL, GLM-4V)
    o = next((n for n in ("o_proj", "dense", "out_proj") if _is_module(module, n)), None)  # Phi: dense
    if o is None:
        return None
    if isinstance(getattr(module, "qk_rope_head_dim", None), int) and _is_module(module, "kv_b_proj"):
        return AttentionLayout(o=o, single=tuple(n for n in _MLA_PROJECTIONS if _is_module(module, n)))
    if not isinstance(getattr(module, "head_dim", None), int):
        return None
    if all(_is_module(module, n) for n in ("q_proj", "k_proj", "v_proj")):
        return AttentionLayout(o=o, q="q_proj", k="k_proj", v="v_proj")
    if _is_module(module, "qkv_proj"):
        return AttentionLayout(o=o, qkv="qkv_proj")
    return None


def attention_rope_dims(module: nn.Module, config: object) -> tuple[int, int]:
    """(head width, rotated width) of the q/k tensors an attention block passes to its rotary function: the
    rope part of MLA (``qk_rope_head_dim``, all rotated), else ``head_dim`` with the partial rotary factor."""
    mla = getattr(module, "qk_rope_head_dim", None)
    if isinstance(mla, int):
        return mla, mla
    head_dim = module.head_dim
    return head_dim, rotary_dim(config, head_dim)


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


def forward_takes_hidden_states(cls: type) -> bool:
    """True when ``cls.forward`` takes the hidden states as its first parameter (how attention is called)."""
    try:
        params = list(inspect.signature(cls.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    return bool(params) and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD)


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
    (the router loss of a mixture-of-experts when the model adds it; 0 when it returns one it does not add)."""

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
    numbers = {
        name.lower(): float(value)
        for name, value in values.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value
    }
    # final_logit_softcapping (Gemma 2/3), logits_soft_cap (RecurrentGemma); attention caps are tried too (a
    # probe tells them apart), the declared final cap first.
    caps = sorted(
        (v for n, v in numbers.items() if "softcap" in n or "soft_cap" in n),
        key=lambda v: v != numbers.get("final_logit_softcapping"),
    )
    scales = []
    for lowered, value in numbers.items():
        if "softcap" in lowered or "soft_cap" in lowered:
            continue
        if "logit" in lowered or "lm_head" in lowered or "output_mult" in lowered:
            scales += [value, 1.0 / value]
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
    # No router loss (None); one the model returns but does not add (0: training never re-runs for it); or one
    # added with the config's coefficient. The nearest that fits wins: a small coefficient times the router loss
    # (Qwen3-MoE's 0.001 x ~2) is inside the tolerance of the probe's large cross-entropy.
    coefs: list[float | None] = [None]
    if isinstance(aux, torch.Tensor):  # the config's coefficient, and the one the model copied at init
        declared = (coef, getattr(model, "router_aux_loss_coef", None))
        coefs = [0.0] + [float(c) for c in declared if isinstance(c, (int, float)) and not isinstance(c, bool)]

    def total(c: float | None) -> torch.Tensor:
        return ce if not c else ce + c * aux.float()

    fits = [c for c in coefs if torch.allclose(loss.float(), total(c), rtol=1e-4, atol=1e-5)]
    if not fits:
        return None, "the loss is not the cross-entropy of the logits"
    best = min(fits, key=lambda c: float((loss.float() - total(c)).abs()))
    return (found if best is None else replace(found, aux_loss_coef=best)), ""


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------------ gated RMSNorm


def _gated_norm_candidates(module: nn.Module, width: int) -> list[dict]:
    """Flag sets of :func:`fastft.kernels.rms_norm_gated` to try: gate first or last, SiLU or sigmoid, the two
    rounding families, and the module's own group size (``group_size``, or ``H // n_groups``) or none."""
    groups = [None]
    if isinstance(getattr(module, "group_size", None), int):
        groups.insert(0, module.group_size)
    n_groups = getattr(module, "n_groups", None)
    if isinstance(n_groups, int) and n_groups > 0 and width % n_groups == 0:
        groups.insert(0, width // n_groups)
    return [
        {"norm_before_gate": before, "activation": act, "weight_in_fp32": fp32, "group_size": group}
        for group in dict.fromkeys(groups)
        for before in (True, False)
        for act in ("silu", "sigmoid")
        for fp32 in (False, True)
    ]


def probe_gated_norm(module: nn.Module, eps_attr: str) -> dict | None:
    """The keyword flags of :func:`fastft.kernels.rms_norm_gated` that ``module(x, gate)`` computes, or None.

    Checked twice on random rows: in fp32 (the formula: order, activation, groups) and in bf16 (where the two
    rounding families differ), each against the reference in the same dtype, bit-close (a few roundings)."""
    weight = module.weight
    if not _on_real_device(weight):
        return None
    width, eps = weight.shape[0], getattr(module, eps_attr)
    gen = _generator()
    x = torch.randn(3, width, generator=gen) * 3
    gate = torch.randn(3, width, generator=gen) * 3
    w = torch.randn(width, generator=gen)
    remaining = _gated_norm_candidates(module, width)
    for dtype in (torch.float32, torch.bfloat16):
        args = [t.to(weight.device, dtype) for t in (x, gate, w)]
        with torch.no_grad():
            try:
                y = torch.func.functional_call(module, {"weight": args[2]}, (args[0], args[1]))
            except Exception:  # noqa: BLE001 - a module that cannot be called so is not this kind
                return None
            kept = []
            for flags in remaining:
                try:
                    expected = rms_norm_gated_reference(*args, eps, **flags)
                except ValueError:
                    continue
                if isinstance(y, torch.Tensor) and _close(y, expected):
                    kept.append(flags)
        remaining = kept
        if not remaining:
            return None
    return remaining[0]


# ------------------------------------------------------------------------------------------------ LayerNorm


@dataclass(frozen=True)
class LayerNormSpec:
    """How a LayerNorm-like module computes: :func:`fastft.kernels.layer_norm` with these arguments (the weight
    and bias are the module's own, when it has them)."""

    eps: float
    offset: float = 0.0


def is_layer_norm(module: nn.Module) -> bool:
    """``nn.LayerNorm`` or a module called "...LayerNorm" whose weight and bias (if any) are 1-D."""
    if not (isinstance(module, nn.LayerNorm) or "layernorm" in type(module).__name__.lower()):
        return False
    for name in ("weight", "bias"):
        value = getattr(module, name, None)
        if value is not None and (not isinstance(value, torch.Tensor) or value.dim() != 1):
            return False
    return True


def probe_layer_norm(module: nn.Module) -> LayerNormSpec | None:
    """Which ``layer_norm(x, weight, bias, eps, offset)`` the module computes (eps from its attribute, or the
    usual 1e-5 / 1e-6 for modules that hard-code it; offset 0 or Nemotron's 1), or None."""
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    params = [t for t in (weight, bias) if isinstance(t, torch.Tensor)]
    if not forward_takes_one_tensor(type(module)) or any(t.is_meta for t in params):
        return None
    width = params[0].shape[0] if params else 64
    device = params[0].device if params else torch.device("cpu")
    dtype = params[0].dtype if params else torch.float32
    eps_values = [getattr(module, a) for a in _EPS_ATTRS if isinstance(getattr(module, a, None), float)]
    eps_values = [*eps_values, 1e-5, 1e-6]
    gen = _generator()
    x = (torch.randn(3, width, generator=gen) * 3 + 1).to(device, dtype)
    replaced = {
        n: torch.randn(t.shape, generator=gen).to(t.device, t.dtype)
        for n, t in (("weight", weight), ("bias", bias))
        if isinstance(t, torch.Tensor)
    }
    with torch.no_grad():
        try:
            y = torch.func.functional_call(module, replaced, (x,))
        except Exception:  # noqa: BLE001 - not callable on one tensor: not this kind
            return None
        for eps in dict.fromkeys(eps_values):
            for offset in (0.0, 1.0):
                expected = layer_norm_reference(x, replaced.get("weight"), replaced.get("bias"), eps, offset)
                if isinstance(y, torch.Tensor) and _close(y, expected):
                    return LayerNormSpec(float(eps), offset)
    return None


# ------------------------------------------------------------------------------------------------ non-gated MLP

# (up, down) projection names of the non-gated MLPs transformers ships: GPT-2 / StarCoder2 / GPT-BigCode, Phi and the
# CLIP / SigLIP vision towers, Nemotron / Apertus, GPT-NeoX / Falcon, Qwen3-VL's vision tower.
_UNGATED_NAMES = (
    ("c_fc", "c_proj"),
    ("fc1", "fc2"),
    ("up_proj", "down_proj"),
    ("dense_h_to_4h", "dense_4h_to_h"),
    ("linear_fc1", "linear_fc2"),  # Qwen3-VL's vision tower
)


@dataclass(frozen=True)
class UngatedLayout:
    """Attribute names of a non-gated MLP ``down(act(up(x)))`` and the activation fastft's kernel computes."""

    up: str
    down: str
    act: str
    activation: str
    dropout: str | None = None  # output dropout (see output_dropout)


def ungated_mlp_layout(module: nn.Module) -> UngatedLayout | None:
    """The non-gated MLP layout of ``module`` when its activation is one fastft's kernel computes, else None."""
    from fastft.kernels.activation import activation_name

    if _is_module(module, "gate_proj") or _is_module(module, "gate_up_proj"):
        return None
    act_attr = next((a for a in (*_ACT_ATTRS, "activation") if callable(getattr(module, a, None))), None)
    names = next(((u, d) for u, d in _UNGATED_NAMES if _is_module(module, u) and _is_module(module, d)), None)
    if act_attr is None or names is None:
        return None
    # An MLP holds its projections, activation and dropout and nothing else (a decoder layer with fc1/fc2 is not one).
    own = {*names, act_attr}
    if any(n not in own and not isinstance(c, nn.Dropout) for n, c in module.named_children()):
        return None
    name = activation_name(getattr(module, act_attr))
    return None if name is None else UngatedLayout(names[0], names[1], act_attr, name, output_dropout(module))


def probe_ungated_mlp(module: nn.Module, layout: UngatedLayout, hidden_size: int, dtype: torch.dtype) -> bool:
    """True when ``module(x)`` computes ``down(act(up(x)))`` with its own submodules (two random rows)."""
    params = list(module.parameters())
    device = params[0].device if params else torch.device("cpu")
    if device.type == "meta":
        return True
    x = torch.randn(2, hidden_size, generator=_generator()).to(device, dtype).requires_grad_()
    try:
        with torch.enable_grad(), _TrainingProbe(module, layout.dropout):
            expected = getattr(module, layout.down)(getattr(module, layout.act)(getattr(module, layout.up)(x)))
            return _close(module(x).detach(), expected.detach())
    except (RuntimeError, TypeError, ValueError):
        return False
