"""``fastft.patch(model)``: make an existing transformers (or PEFT-wrapped) causal LM fast, in place.

The walk over the model recognises blocks by structure (:mod:`fastft.models.recognize`), confirms each kind
with a probe of its own forward, and swaps the instance's class (:mod:`fastft.models.layers`). Nothing a probe
or a swap does can break a model that plain transformers runs: any exception, and any block whose forward
takes arguments the fast class does not, leaves that block as it was and is reported with the reason. The
blocks of the decoder layers that stay on transformers' code are named in one log line and in
``model.fastft_report``. Patching is idempotent: a second call changes nothing and returns the same report.

Composite (multimodal) models patch their language model with the text config, then their vision tower (and
any other tower) with the vision config, by the same recognisers and probes (``report.vision``). The fused loss is decided per model by probing its own head-and-loss path
(:func:`fastft.models.recognize.probe_head`), not by its name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from fastft.models import experts, layers, rotary
from fastft.models.families import family_of
from fastft.models.recognize import (
    HeadTransform,
    attention_layout,
    attention_rope_dims,
    forward_takes_hidden_states,
    forward_takes_one_tensor,
    is_gated_norm,
    is_layer_norm,
    mlp_layout,
    norm_eps_attr,
    probe_gated_norm,
    probe_head,
    probe_layer_norm,
    probe_mlp,
    probe_norm_offset,
    probe_ungated_mlp,
    ungated_mlp_layout,
)

logger = logging.getLogger("fastft")

_FAST_KINDS = (
    layers.FastRMSNorm,
    layers.FastRMSNormGated,
    layers.FastLayerNorm,
    layers.FastGatedMLP,
    layers.FastUngatedMLP,
    layers.FastAttention,
)


@dataclass
class PatchReport:
    """What :func:`patch` did: counts per kind, the head's transform, and every block kind it left on
    transformers' code with the reason (``skipped``: class name -> reason)."""

    model_type: str
    norms: int = 0
    mlps: int = 0
    attentions: int = 0
    experts: int = 0
    fused_loss: bool = False
    tables: int = 0  # multimodal rotary embeddings whose cos/sin tables come from fastft.kernels.mrope
    head: HeadTransform | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    vision: PatchReport | None = None  # the vision (and other non-language) towers of a composite model

    def summary(self) -> str:
        done = (
            f"fastft: patched {self.model_type}: {self.norms} norms, {self.mlps} MLP, "
            f"{self.attentions} attention (fused LoRA projections, fastft RoPE), "
            + (f"{self.experts} experts (grouped kernel), " if self.experts else "")
            + f"fused loss {'on' if self.fused_loss else 'off'}"
        )
        if self.tables:
            done = f"{done}, {self.tables} M-RoPE tables"
        if self.skipped:
            left = "; ".join(f"{kind} ({reason})" for kind, reason in sorted(self.skipped.items()))
            done = f"{done}; left on transformers' code: {left}"
        if self.vision is not None:
            v = self.vision
            done = f"{done}; vision tower: {v.norms} norms, {v.mlps} MLP, {v.attentions} attention"
            done = f"{done}, {v.tables} rotary tables" if v.tables else done
            if v.skipped:
                left = "; ".join(f"{kind} ({reason})" for kind, reason in sorted(v.skipped.items()))
                done = f"{done}, left on transformers' code: {left}"
        return done


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def text_config(config: object) -> object:
    """The language model's config of a composite (multimodal) config; the config itself otherwise."""
    get = getattr(config, "get_text_config", None)
    if not callable(get):
        return config
    try:
        return get(decoder=True)
    except TypeError:
        return get()


def language_model(root: nn.Module) -> nn.Module:
    """The part of ``root`` that :func:`patch` walks: the language model of a composite model (its vision and
    audio towers are left alone), the whole causal LM otherwise."""
    if text_config(root.config) is root.config:
        return root
    get_decoder = getattr(root, "get_decoder", None)
    try:
        decoder = get_decoder() if callable(get_decoder) else None
    except Exception:  # noqa: BLE001 - a model without a usable get_decoder: walk all of it
        decoder = None
    return decoder if isinstance(decoder, nn.Module) else root


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


@dataclass
class _Walk:
    """What one :func:`patch` call learns on the way (probes run once per module class)."""

    report: PatchReport
    hidden_size: int | None
    text: object
    norm_offset: float
    dtype: torch.dtype
    device: torch.device
    norm_offsets: dict[type, float | None] = field(default_factory=dict)
    gated_flags: dict[type, dict | None] = field(default_factory=dict)
    layer_norms: dict[type, object] = field(default_factory=dict)
    ungated: dict[type, object] = field(default_factory=dict)
    mlp_layouts: dict[type, object] = field(default_factory=dict)
    ropes: dict[type, dict[str, rotary.Convention | None]] = field(default_factory=dict)
    tables: dict[type, rotary.TableLayout | None] = field(default_factory=dict)
    experts_specs: dict[type, tuple[experts.ExpertsSpec | None, str]] = field(default_factory=dict)
    dispatched: list[nn.Module] = field(default_factory=list)  # experts switched through ExpertsInterface

    def skip(self, module: nn.Module, reason: str) -> None:
        self.report.skipped.setdefault(type(module).__name__, reason)


def _patch_norm(module: nn.Module, eps_attr: str, walk: _Walk) -> None:
    cls = type(module)
    if isinstance(module, layers.FastRMSNormGated):
        walk.report.norms += 1
        return
    if is_gated_norm(module):
        if cls not in walk.gated_flags:
            walk.gated_flags[cls] = probe_gated_norm(module, eps_attr)
        if walk.gated_flags[cls] is None:
            walk.skip(module, "gated norm formula not recognised")
            return
        module._fastft_eps_attr, module._fastft_flags = eps_attr, walk.gated_flags[cls]
        layers.swap_class(module, layers.FastRMSNormGated)
        walk.report.norms += 1
        return
    if not forward_takes_one_tensor(cls):
        walk.skip(module, "its forward takes more than the input")
        return
    base_cls = cls.__mro__[1] if isinstance(module, layers.FastRMSNorm) else cls
    if base_cls not in walk.norm_offsets:
        walk.norm_offsets[base_cls] = probe_norm_offset(module, eps_attr, walk.norm_offset)
    offset = walk.norm_offsets[base_cls]
    if offset is None:
        walk.skip(module, "norm formula not recognised")
        return
    module._fastft_eps_attr, module._fastft_offset = eps_attr, offset
    layers.swap_class(module, layers.FastRMSNorm)
    walk.report.norms += 1


def _patch_layer_norm(module: nn.Module, walk: _Walk) -> None:
    cls = type(module)
    if cls not in walk.layer_norms:
        walk.layer_norms[cls] = probe_layer_norm(module)
    spec = walk.layer_norms[cls]
    if spec is None:
        walk.skip(module, "LayerNorm formula not recognised")
        return
    module._fastft_spec = spec
    layers.swap_class(module, layers.FastLayerNorm)
    walk.report.norms += 1


def _input_width(module: nn.Module, name: str | None, walk: _Walk) -> int | None:
    """The input width of an MLP: its first projection's (a vision tower's MLP is narrower than the text model's),
    else the walk's hidden size."""
    projection = getattr(module, name, None) if name else None
    width = getattr(projection, "in_features", None)  # nn.Linear, PEFT's and bitsandbytes' layers (packed weights)
    return width if isinstance(width, int) and width > 0 else walk.hidden_size


def _patch_mlp(module: nn.Module, layout: object, walk: _Walk) -> None:
    cls = type(module)
    if not forward_takes_one_tensor(cls):
        walk.skip(module, "its forward takes more than the input")
        return
    width = _input_width(module, layout.gate_up or layout.gate, walk)
    if width is None:
        walk.skip(module, "the config has no hidden_size to probe the MLP with")
        return
    if cls not in walk.mlp_layouts:
        walk.mlp_layouts[cls] = probe_mlp(module, layout, width, walk.dtype)
    if walk.mlp_layouts[cls] is None:
        walk.skip(module, "MLP wiring not recognised")
        return
    module._fastft_layout = walk.mlp_layouts[cls]
    layers.swap_class(module, layers.FastGatedMLP)
    walk.report.mlps += 1


def _patch_ungated_mlp(module: nn.Module, layout: object, walk: _Walk) -> None:
    cls = type(module)
    width = _input_width(module, layout.up, walk)
    if not forward_takes_one_tensor(cls) or width is None:
        walk.skip(module, "its forward takes more than the input")
        return
    if cls not in walk.ungated:
        walk.ungated[cls] = layout if probe_ungated_mlp(module, layout, width, walk.dtype) else None
    if walk.ungated[cls] is None:
        walk.skip(module, "MLP wiring not recognised")
        return
    module._fastft_layout = layout
    layers.swap_class(module, layers.FastUngatedMLP)
    walk.report.mlps += 1


def _patch_attention(module: nn.Module, att: object, walk: _Walk) -> None:
    """Attention keeps transformers' forward; its rotary function (each one its modeling module defines) runs
    fastft's kernel for the convention the probe recognised, and q/k/v/o run the fused LoRA Functions."""
    cls = type(module)
    if not forward_takes_hidden_states(cls):
        walk.skip(module, "its forward does not take the hidden states first")
        return
    if cls not in walk.ropes:
        head_dim, rot = attention_rope_dims(module, walk.text)
        # The function sees whole heads (partial rotary inside it), or only the rotated part (Phi and StableLM
        # slice the heads themselves before calling it).
        shapes = dict.fromkeys([(head_dim, rot), (rot, rot)])
        walk.ropes[cls] = {
            name: next((c for d, r in shapes if (c := rotary.recognise(function, d, r, walk.dtype, walk.device))), None)
            for name, function in rotary.rotary_functions(cls).items()
        }
    ropes = walk.ropes[cls]
    unknown = [name for name, convention in ropes.items() if convention is None]
    if unknown:
        walk.report.skipped.setdefault(f"{cls.__name__}.{unknown[0]}", "rotary convention not recognised")
    for name, convention in ropes.items():
        if convention is not None:
            rotary.install(cls, name, convention)
    module._fastft_layout = att
    layers.swap_class(module, layers.FastAttention)
    walk.report.attentions += 1


def _patch_table(module: nn.Module, layout: rotary.TableLayout, walk: _Walk) -> None:
    cls = type(module)
    if cls not in walk.tables:
        walk.tables[cls] = rotary.probe_table(module, layout, layers.rotary_tables)
    if walk.tables[cls] is None:
        walk.skip(module, "rotary table layout not recognised")
        return
    module._fastft_table = walk.tables[cls]
    layers.swap_class(module, layers.FastRotaryTable)
    walk.report.tables += 1


def _patch_experts(module: nn.Module, walk: _Walk) -> None:
    """Routed experts: probed once per class; through transformers' ``ExpertsInterface`` where the class
    dispatches there (switched for the whole model after the walk), else the instance's class is swapped."""
    cls = type(module)
    if experts.is_patched(module):
        walk.report.experts += 1
        if experts.uses_interface(module):
            walk.dispatched.append(module)
        return
    if experts.uses_interface(module):  # what a block the probe rejects keeps running
        module.__dict__.setdefault("_fastft_previous", module.config._experts_implementation)
    if cls not in walk.experts_specs:
        walk.experts_specs[cls] = experts.probe_safely(module, walk.dtype)
    spec, reason = walk.experts_specs[cls]
    if spec is None:
        module.__dict__["_fastft_experts"] = None
        walk.skip(module, reason)
        return
    module.__dict__["_fastft_experts"] = spec
    if experts.uses_interface(module):
        walk.dispatched.append(module)
    else:
        layers.swap_class(module, experts.FastExperts)
    walk.report.experts += 1


def _patch_input_scaled(module: nn.Module, base: nn.Module, walk: _Walk) -> None:
    """A Llama-4-style MoE block (router-scaled inputs, experts without routing): the block's class is swapped
    so that only the top-k pairs run, through the grouped experts (see :class:`experts.FastInputScaledMoE`)."""
    if isinstance(module, experts.FastInputScaledMoE):
        walk.report.experts += 1
        return
    if walk.hidden_size is None or not forward_takes_one_tensor(type(module)):
        walk.skip(module, "routed experts: its forward takes more than the input")
        return
    reason = experts.probe_input_scaled(module, base, walk.hidden_size, walk.dtype)
    if reason:
        walk.skip(module, reason)
        return
    walk.report.experts += 1


def _switch_experts_implementation(root: nn.Module, walk: _Walk) -> None:
    """``set_experts_implementation("fastft")`` on the model; an experts block whose config did not take it
    (a submodel transformers does not switch) has its class swapped instead."""
    if not walk.dispatched:
        return
    setter = getattr(root, "set_experts_implementation", None)
    if callable(setter):
        try:
            setter(experts.IMPLEMENTATION)
        except (ValueError, KeyError, RuntimeError) as exc:
            logger.info("fastft: set_experts_implementation failed (%s); patching the experts instances", exc)
    for module in walk.dispatched:
        if getattr(module.config, "_experts_implementation", None) != experts.IMPLEMENTATION:
            layers.swap_class(module, experts.FastExperts)


def _patch_module(module: nn.Module, walk: _Walk) -> None:
    """Recognise, probe and swap one module (or leave it, with the reason, if any step disagrees)."""
    if experts.experts_structure(module) is not None:
        _patch_experts(module, walk)
        return
    scaled = experts.input_scaled_structure(module)
    if scaled is not None:
        _patch_input_scaled(module, scaled, walk)
        return
    if isinstance(module, layers.FastRotaryTable):
        walk.report.tables += 1
        return
    table = rotary.table_layout(module)
    if table is not None:
        _patch_table(module, table, walk)
        return
    if isinstance(module, (layers.FastGatedMLP, layers.FastUngatedMLP)):
        walk.report.mlps += 1
        return
    if isinstance(module, layers.FastAttention):
        walk.report.attentions += 1
        return
    if isinstance(module, layers.FastLayerNorm):
        walk.report.norms += 1
        return
    eps_attr = norm_eps_attr(module)
    if eps_attr is not None:
        _patch_norm(module, eps_attr, walk)
        return
    if is_layer_norm(module):
        _patch_layer_norm(module, walk)
        return
    layout = mlp_layout(module)
    if layout is not None:
        _patch_mlp(module, layout, walk)
        return
    ungated = ungated_mlp_layout(module)
    if ungated is not None:
        _patch_ungated_mlp(module, ungated, walk)
        return
    att = attention_layout(module)
    if att is not None:
        _patch_attention(module, att, walk)


def _patch_head(root: nn.Module, walk: _Walk) -> None:
    report = walk.report
    head = root.get_output_embeddings() if callable(getattr(root, "get_output_embeddings", None)) else None
    if head is None or layers.head_linear(head) is None:
        report.skipped["lm_head"] = "output head is not a plain linear layer"
        return
    transform, reason = probe_head(root, head, walk.text)
    if transform is None:
        report.skipped["loss"] = reason
        return
    root._fastft_head_transform = transform
    layers.swap_class(root, layers.FastCausalLM)
    report.fused_loss, report.head = True, transform


def _decoder_layers(walk_root: nn.Module) -> list[nn.Module]:
    """The decoder layers: the entries of the longest ``nn.ModuleList`` of the language model (every one: hybrid
    models build attention and mixer layers from one class)."""
    lists = [m for m in walk_root.modules() if isinstance(m, nn.ModuleList) and len(m)]
    return list(max(lists, key=len)) if lists else []


def other_towers(root: nn.Module, walk_root: nn.Module) -> list[nn.Module]:
    """The largest submodules of ``root`` outside its language model ``walk_root`` (a composite model's vision
    tower, projector, audio tower, output head); none when the language model is the whole model."""
    if walk_root is root:
        return []
    inside = {id(m) for m in walk_root.modules()}
    towers: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if id(child) in inside:
                continue
            if any(id(m) in inside for m in child.modules()):
                visit(child)
            else:
                towers.append(child)

    visit(root)
    return towers


def _patch_towers(root: nn.Module, walk_root: nn.Module, walk: _Walk) -> None:
    """Walk the vision (and audio) towers of a composite model with the same recognisers and probes as the
    language model, with the tower's own config; counted and reported in ``report.vision``."""
    get_head = getattr(root, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    towers = [
        t for t in other_towers(root, walk_root) if t is not head and next(t.parameters(), None) is not None
    ]  # fmt: skip
    if not towers:
        return
    vision_config = getattr(root.config, "vision_config", None) or root.config
    # Qwen2-VL's vision config: embed_dim is the tower's width, hidden_size the projector's output
    width = next(
        (w for a in ("embed_dim", "hidden_size") if isinstance(w := getattr(vision_config, a, None), int)), None
    )
    report = PatchReport(f"{walk.report.model_type} vision")
    vision = _Walk(report=report, hidden_size=width, text=vision_config, norm_offset=0.0, dtype=walk.dtype,
                   device=walk.device)  # fmt: skip
    for tower in towers:
        for module in list(tower.modules()):
            try:
                _patch_module(module, vision)
            except Exception as exc:  # noqa: BLE001 - a block fastft cannot handle stays as it is
                vision.skip(module, f"probe failed ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})")
        layers_ = _tower_layers(tower)
        for layer in layers_:
            for module in _unpatched_kinds(layer):
                own = module is layer  # Llama 3.2 Vision's gated layers: tanh gates on the residuals
                vision.skip(module, "the layer's own gates (its blocks are patched)" if own else _reason(module))
        for module in _outside_layers(tower, layers_):
            vision.skip(module, "patch embedding, pooling or projector outside the encoder layers: no fastft kernel")
    walk.report.vision = report


def _tower_layers(tower: nn.Module) -> list[nn.Module]:
    """The encoder layers of a tower: the entries of every ``nn.ModuleList`` holding a block fastft patched (Llama
    3.2 Vision has a local and a global encoder)."""
    lists = [m for m in tower.modules() if isinstance(m, nn.ModuleList)]
    return [
        layer for lst in lists for layer in lst if any(isinstance(m, (*_FAST_KINDS, layers.FastRotaryTable))
                                                       for m in layer.modules())
    ]  # fmt: skip


def _outside_layers(tower: nn.Module, layers_: list[nn.Module]) -> list[nn.Module]:
    """The outermost blocks of a tower outside its encoder layers that run transformers' code (a patch embedding,
    a pooling head, a projector MLP); projections, embeddings and blocks fastft patched are not listed."""
    inside = {id(m) for layer in layers_ for m in layer.modules()}
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        if id(module) in inside or isinstance(module, (*_FAST_KINDS, layers.FastRotaryTable)):
            return
        if any(id(m) in inside for m in module.modules()) or isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            for child in module.children():
                visit(child)
        elif next(module.parameters(), None) is not None and not (
            isinstance(module, (nn.Linear, nn.Embedding)) or hasattr(module, "lora_A") or hasattr(module, "base_layer")
        ):
            found.append(module)

    visit(tower)
    return found


def _is_leaf_kind(module: nn.Module) -> bool:
    """Modules whose plain code is all there is to run: projections (linear, LoRA, quantised), embeddings,
    dropout and activations (no parameters)."""
    if isinstance(module, (nn.Linear, nn.Embedding)) or hasattr(module, "lora_A") or hasattr(module, "base_layer"):
        return True
    params = list(module.parameters())
    if not params:
        return True
    # A router: one matrix (and biases) and no children; a matmul and a top-k, nothing to fuse.
    return (
        next(module.children(), None) is None
        and sum(p.dim() == 2 for p in params) == 1
        and max(p.dim() for p in params) == 2
    )


def _is_fast(module: nn.Module) -> bool:
    return isinstance(module, (*_FAST_KINDS, experts.FastInputScaledMoE)) or experts.is_patched(module)


def _unpatched_kinds(module: nn.Module) -> list[nn.Module]:
    """The outermost blocks under ``module`` that run transformers' code although they are more than a
    projection: a block with weights of its own (experts, a conv, an SSM), or whose every part is unpatched."""
    if _is_fast(module) or _is_leaf_kind(module):
        return []
    if next(module.parameters(recurse=False), None) is not None:
        return [module]
    if not any(_is_fast(m) for m in module.modules()):
        return [module]  # a whole block on transformers' code
    return [k for child in module.children() for k in _unpatched_kinds(child)]


def _reason(module: nn.Module) -> str:
    name = type(module).__name__.lower()
    leaves = {n.rsplit(".", 1)[-1] for n, _ in module.named_parameters()}
    if any(isinstance(m, nn.Conv1d) for m in module.modules()) or {"A_log", "dt_bias"} & leaves:
        return "state-space or linear-attention mixer: no fastft kernel"
    if any("expert" in type(m).__name__.lower() or "moe" in type(m).__name__.lower() for m in module.modules()) or any(
        p.dim() == 3 for p in module.parameters()
    ):
        return "routed experts: layout not recognised"
    if "norm" in name:
        return "norm formula not recognised"
    if "attention" in name or "attn" in name:
        return "attention not recognised (projections other than q/k/v/o)"
    if "mlp" in name or "feedforward" in name or "ffn" in name:
        return "MLP not recognised (not a gated MLP with gate/up/down projections)"
    return "no fastft kernel for this block kind"


def patch(model: nn.Module, *, fused_loss: bool = True) -> nn.Module:
    """Make ``model`` (a transformers causal LM, or a PEFT model around one) use fastft's kernels, in place.

    RMSNorm-like modules run :func:`fastft.kernels.rms_norm`; gated MLPs run the fused LoRA MLP Function (or
    the modules with a fused activation where an adapter feature is not supported); attention keeps
    transformers' forward (so every attention implementation, cache and mask works) with fastft's RoPE and a
    fused q/k/v LoRA Function. When the model's logits are its ``lm_head`` output times an optional scale,
    through an optional tanh softcap (found by probing its forward, whatever the family), the training loss is
    :func:`fastft.kernels.fused_linear_cross_entropy` and TRL's trainers score tokens with
    :func:`fastft.kernels.linear_log_probs` (:mod:`fastft.rl.trl_integration`; ``fused_loss=False`` keeps
    transformers' head and TRL's). Every block left on transformers' code is reported with the reason. Returns
    ``model``; the result is logged in one line and kept as ``model.fastft_report``.
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
    text = text_config(config)
    hidden_size = getattr(text, "hidden_size", None)
    walk = _Walk(
        report=PatchReport(model_type),
        hidden_size=hidden_size if isinstance(hidden_size, int) else None,
        text=text,
        norm_offset=family.norm_offset,
        dtype=model_dtype(root),
        device=_model_device(root),
    )
    report = walk.report

    if fused_loss:
        # Probed first, on the model as it came: its own head and loss define what the fused loss must equal.
        try:
            _patch_head(root, walk)
        except Exception as exc:  # noqa: BLE001 - the model keeps its own head
            report.skipped["loss"] = f"probing the head failed ({type(exc).__name__}: {exc})"
    walk_root = language_model(root)
    for module in list(walk_root.modules()):
        try:
            _patch_module(module, walk)
        except Exception as exc:  # noqa: BLE001 - a block fastft cannot handle stays as it is
            walk.skip(module, f"probe failed ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})")
    _switch_experts_implementation(root, walk)

    for layer in _decoder_layers(walk_root):
        for module in _unpatched_kinds(layer):
            walk.skip(module, _reason(module))
    _patch_towers(root, walk_root, walk)

    if isinstance(root, layers.FastCausalLM) and not report.fused_loss:
        root.fastft_return_logits = True
    if report.fused_loss:
        # TRL's trainers score tokens through their own chunked head: route it to fastft's for this model
        # (and a reference model TRL reloads from the same path). Lazy: the trainer glue sits above this layer.
        from fastft.rl import trl_integration

        trl_integration.remember_source(root, fused_loss)
        trl_integration.install()

    if report.norms + report.mlps + report.attentions + report.experts == 0 and not report.fused_loss:
        logger.warning("fastft: %s has no block fastft recognises; it runs unpatched (correct, not faster)", model_type)
    logger.info(report.summary())
    model.fastft_report = report
    return model
