"""The fast versions of recognised modules, installed by swapping one instance's class to a subclass.

A swapped module keeps its ``__name__`` (FSDP wrap policies and ``_no_split_modules`` match class names), its
parameters and state dict, and ``isinstance`` against the original class; only ``forward`` changes. Nothing is
changed at class level in transformers or PEFT, so other models in the process are untouched. The one
exception is the rotary function that attention code calls as a module global: it is wrapped once per
modeling module by a dispatcher that runs fastft's kernel only inside the forward of an attention instance
fastft patched (a context variable says so) and calls the original everywhere else (:mod:`fastft.models.rotary`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastft.kernels.activation import XIELU, activation
from fastft.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from fastft.kernels.geglu import geglu
from fastft.kernels.layer_norm import layer_norm
from fastft.kernels.lora import lora_linear, lora_mlp, lora_qkv
from fastft.kernels.lora_ungated_mlp import lora_ungated_mlp
from fastft.kernels.mrope import mrope_tables
from fastft.kernels.normed_qkv import normed_lora_qkv
from fastft.kernels.rms_norm import rms_norm
from fastft.kernels.rms_norm_gated import rms_norm_gated
from fastft.kernels.swiglu import swiglu
from fastft.kernels.tiled_mlp import tiled_lora_mlp
from fastft.models.projections import read_projection
from fastft.models.recognize import AttentionLayout, LayerNormSpec, MLPLayout, UngatedLayout, apply_dropout
from fastft.models.rotary import ACTIVE as _ROPE_ACTIVE
from fastft.models.rotary import TableLayout, table_positions
from fastft.models.zero3 import gathered_head

_SUBCLASSES: dict[tuple[type, type], type] = {}


def swap_class(module: nn.Module, mixin: type) -> bool:
    """Make ``module`` an instance of ``(mixin, type(module))``; False if it already is one."""
    cls = type(module)
    if issubclass(cls, mixin):
        return False
    sub = _SUBCLASSES.get((cls, mixin))
    if sub is None:

        def forward(self, *args, **kwargs):
            return mixin.forward(self, *args, **kwargs)

        # The original signature and docstring (``inspect.signature`` follows ``__wrapped__``): the HF Trainer
        # keeps only the dataset columns that the model's forward names, so ``(*args, **kwargs)`` would drop all.
        functools.update_wrapper(forward, cls.forward)
        namespace = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "forward": forward}
        namespace["_fastft_swapped"] = True
        sub = type(cls.__name__, (mixin, cls), namespace)
        _SUBCLASSES[(cls, mixin)] = sub
    module.__class__ = sub
    return True


# ------------------------------------------------------------------------------------------------ RMSNorm


class FastRMSNorm:
    """RMSNorm through :func:`fastft.kernels.rms_norm` (saves x and one fp32 number per row)."""

    _fastft_eps_attr: str
    _fastft_offset: float

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if _has_values(args, kwargs):  # a call the probe did not see (an optional argument used): the original
            return super().forward(hidden_states, *args, **kwargs)
        y = rms_norm(hidden_states, self.weight, getattr(self, self._fastft_eps_attr), self._fastft_offset)
        if self.__dict__.get("_fastft_tag_output"):  # set_long_context: the next q/k/v or tiled MLP may fuse it
            y._fastft_normed = (hidden_states, self, y._version, hidden_states._version)
        return y


def normed_source(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, float] | None:
    """``(x, weight, eps, offset)`` when ``y`` is, unchanged, the output of a tagged :class:`FastRMSNorm` applied
    to ``x`` (and x is unchanged too) outside autocast: its consumer may then keep x instead of y and recompute y
    in backward. None otherwise (no tag, a value modified in place since, autocast on)."""
    tag = getattr(y, "_fastft_normed", None)
    if tag is None or torch.is_autocast_enabled(y.device.type):
        return None
    x, module, y_version, x_version = tag
    if y._version != y_version or x._version != x_version:
        return None
    return x, module.weight, float(getattr(module, module._fastft_eps_attr)), float(module._fastft_offset)


class FastLayerNorm:
    """LayerNorm through :func:`fastft.kernels.layer_norm` (saves x and an fp32 mean and rstd per row). Under
    ``torch.autocast`` the module's own forward runs (autocast computes LayerNorm in fp32 and returns fp32)."""

    _fastft_spec: LayerNormSpec

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if _has_values(args, kwargs) or torch.is_autocast_enabled(hidden_states.device.type):
            return super().forward(hidden_states, *args, **kwargs)
        spec = self._fastft_spec
        weight, bias = getattr(self, "weight", None), getattr(self, "bias", None)
        return layer_norm(hidden_states, weight, bias, spec.eps, spec.offset)


class FastRMSNormGated:
    """Gated RMSNorm ``norm(x, gate)`` through :func:`fastft.kernels.rms_norm_gated` with the flags its probe
    found (saves x, the gate and one fp32 number per row and group). A call without a gate (the Mamba-2 family's
    plain-norm use of the same module) runs the module's own forward."""

    _fastft_eps_attr: str
    _fastft_flags: dict

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        if gate is None or _has_values(args, kwargs) or gate.shape != hidden_states.shape:
            return super().forward(hidden_states, gate, *args, **kwargs)
        return rms_norm_gated(
            hidden_states, gate, self.weight, getattr(self, self._fastft_eps_attr), **self._fastft_flags
        )


def _has_values(args: tuple, kwargs: dict) -> bool:
    """Whether a call passes anything besides the input (optional arguments left at None do not count)."""
    return any(a is not None for a in args) or any(v is not None for v in kwargs.values())


# ------------------------------------------------------------------------------------------------ gated MLP


def _activation(name: str, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if name == "swiglu":
        return swiglu(gate, up)
    return geglu(gate, up, approximate="tanh" if name == "geglu_tanh" else "none")


class FastGatedMLP:
    """``down(act(gate(x)) * up(x))`` as one fused LoRA Function when every projection allows it."""

    _fastft_layout: MLPLayout

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if _has_values(args, kwargs):
            return super().forward(x, *args, **kwargs)
        layout = self._fastft_layout
        names = (layout.gate_up, layout.down) if layout.gate_up else (layout.gate, layout.up, layout.down)
        projections = [read_projection(getattr(self, n)) for n in names]
        if all(p is not None for p in projections):
            gate, up, down = (projections[0], None, projections[1]) if layout.gate_up else projections
            tile = self.__dict__.get("_fastft_mlp_tile")  # set by fastft.models.long_context.set_long_context
            if tile is not None:  # 0: the tile size follows free memory
                # The output of a FastRMSNorm: tiles normalise its input themselves, so the normalised rows
                # are not kept for backward (tiled_lora_mlp's ``norm``).
                source, norm = normed_source(x), None
                if source is not None:
                    x, norm = source[0], source[1:]
                y = tiled_lora_mlp(x, gate, up, down, layout.activation, tile_tokens=tile or None, norm=norm)
            else:
                y = lora_mlp(x, gate, up, down, layout.activation)
            return apply_dropout(self, layout.dropout, y)
        # Fallback (8-bit or DoRA layers, several active adapters, ...): the modules themselves, fused activation.
        if layout.gate_up:
            gate, up = getattr(self, layout.gate_up)(x).chunk(2, dim=-1)
        else:
            gate, up = getattr(self, layout.gate)(x), getattr(self, layout.up)(x)
        return apply_dropout(self, layout.dropout, getattr(self, layout.down)(_activation(layout.activation, gate, up)))


class FastUngatedMLP:
    """``down(act(up(x)))`` as one fused LoRA Function (GELU, tanh-GELU, ReLU², xIELU with its trainable alphas)
    when both projections allow it; otherwise the modules themselves with the fused activation kernel."""

    _fastft_layout: UngatedLayout

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if _has_values(args, kwargs):
            return super().forward(x, *args, **kwargs)
        layout = self._fastft_layout
        act = getattr(self, layout.act)
        kind = XIELU.from_module(act) if layout.activation == "xielu" else layout.activation
        up, down = read_projection(getattr(self, layout.up)), read_projection(getattr(self, layout.down))
        if up is not None and down is not None:
            y = lora_ungated_mlp(x, up, down, kind)
        else:
            y = getattr(self, layout.down)(activation(getattr(self, layout.up)(x), kind))
        return apply_dropout(self, layout.dropout, y)


# ------------------------------------------------------------------------------------------------ attention


class FastProjection:
    """A projection that returns an output its attention block already computed (fused q/k/v), or runs the
    fused single-projection LoRA Function, or falls back to its own forward."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        pending = self.__dict__.pop("_fastft_pending", None)
        if pending is not None and pending[0] is x and not args and not kwargs:
            return pending[1]
        proj = None if args or kwargs else read_projection(self)
        if proj is None:
            return super().forward(x, *args, **kwargs)
        return lora_linear(x, proj)


class FastAttention:
    """Transformers' own attention forward, with fastft's RoPE and (when q, k, v allow) one fused q/k/v Function
    computed up front and handed to the projections as they are called."""

    _fastft_layout: AttentionLayout

    def forward(self, *args, **kwargs):
        hidden_states = args[0] if args else kwargs.get("hidden_states")
        token = _ROPE_ACTIVE.set(True)
        names = ()
        try:
            names = self._precompute_qkv(hidden_states)
            return super().forward(*args, **kwargs)
        finally:
            _ROPE_ACTIVE.reset(token)
            for n in names:  # outputs the forward did not ask for: never leave references behind, and stop
                if getattr(self, n).__dict__.pop("_fastft_pending", None) is not None:  # computing them up front
                    self.__dict__["_fastft_qkv_unused"] = True

    def _precompute_qkv(self, x: object) -> tuple[str, ...]:
        layout = self._fastft_layout
        for name in layout.single:  # MLA's low-rank projections (PEFT may have replaced them since patching)
            swap_class(getattr(self, name), FastProjection)
        if layout.q is None or not isinstance(x, torch.Tensor) or self.__dict__.get("_fastft_qkv_unused"):
            swap_class(getattr(self, layout.qkv or layout.o), FastProjection)
            swap_class(getattr(self, layout.o), FastProjection)
            return ()
        names = (layout.q, layout.k, layout.v)
        modules = [getattr(self, n) for n in names]
        for module in (*modules, getattr(self, layout.o)):
            swap_class(module, FastProjection)  # PEFT may have replaced the projections since patching
        projections = [read_projection(m) for m in modules]
        if any(p is None for p in projections):
            return ()
        source = normed_source(x)  # the output of a tagged norm: keep its input, not x (fastft.kernels.normed_qkv)
        outputs = lora_qkv(x, *projections) if source is None else normed_lora_qkv(x, *source, *projections)
        for module, out in zip(modules, outputs):
            module.__dict__["_fastft_pending"] = (x, out)
        return names


# ------------------------------------------------------------------------------------------------ rotary tables


def rotary_tables(module: nn.Module, layout: TableLayout, x: torch.Tensor, position_ids: torch.Tensor):
    """The cos/sin tables of a multimodal rotary embedding module through :func:`fastft.kernels.mrope_tables`, or
    None for a call its layout does not describe."""
    found = table_positions(layout, position_ids)
    if found is None:
        return None
    positions, lead = found
    inv_freq = module.inv_freq.detach()
    freq = inv_freq[layout.freq_index.to(inv_freq.device)].to(torch.float32)
    scale = float(getattr(module, "attention_scaling", 1.0) or 1.0)
    dtype = x.dtype if layout.cast else torch.float32
    cos, sin = mrope_tables(positions, layout.axis.to(inv_freq.device), freq, scale, dtype)
    return cos.view(*lead, -1), sin.view(*lead, -1)


class FastRotaryTable:
    """A Qwen-VL-style rotary embedding (the language model's M-RoPE sections, the vision tower's 2-D axes) whose
    cos/sin tables come from one kernel launch over the integer positions."""

    _fastft_table: TableLayout

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, *args, **kwargs):
        tables = None if _has_values(args, kwargs) else rotary_tables(self, self._fastft_table, x, position_ids)
        return super().forward(x, position_ids, *args, **kwargs) if tables is None else tables


# ------------------------------------------------------------------------------------------------ causal-LM loss


@dataclass
class _Capture:
    head: nn.Module
    hidden: torch.Tensor | None = None


_CAPTURE: contextvars.ContextVar[_Capture | None] = contextvars.ContextVar("fastft_head_capture", default=None)


class FastLMHead:
    """An output head that, while its causal LM computes a fused loss, hands over its input instead of logits."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        capture = _CAPTURE.get()
        if capture is not None and capture.head is self:
            capture.hidden = hidden_states
            return hidden_states.new_empty(*hidden_states.shape[:-1], 0)
        return super().forward(hidden_states, *args, **kwargs)


@contextlib.contextmanager
def _capturing(head: nn.Module) -> Iterator[_Capture]:
    capture = _Capture(head)
    token = _CAPTURE.set(capture)
    try:
        yield capture
    finally:
        _CAPTURE.reset(token)


def head_linear(head: nn.Module) -> nn.Linear | None:
    """The ``nn.Linear`` an output head computes right now (through PEFT's ``modules_to_save`` wrapper), or None."""
    if hasattr(head, "modules_to_save") and hasattr(head, "original_module"):
        active = getattr(head, "active_adapters", None) or [getattr(head, "active_adapter", None)]
        if getattr(head, "disable_adapters", False) or len(active) != 1 or active[0] not in head.modules_to_save:
            head = head.original_module
        else:
            head = head.modules_to_save[active[0]]
    if (
        isinstance(head, nn.Linear)
        and _runs_linear_forward(type(head))
        and {n for n, _ in head.named_parameters(recurse=False)} <= {"weight", "bias"}
        and next(head.children(), None) is None
        and head.weight.is_floating_point()
    ):
        return head
    return None


def _runs_linear_forward(cls: type) -> bool:
    """Whether ``cls`` computes ``nn.Linear``'s forward (fastft's own head subclass aside): a subclass with a
    forward of its own (a learned logit scale inside the head, say) is not a plain linear head."""
    for klass in cls.__mro__:
        if klass is nn.Linear:
            return True
        if "forward" in vars(klass) and klass is not FastLMHead and not vars(klass).get("_fastft_swapped"):
            return False
    return False


def _router_loss_on(model: nn.Module, kwargs: dict) -> bool:
    """Whether this call adds a mixture-of-experts router loss (``output_router_logits``, per call or config)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return bool(kwargs.get("output_router_logits", getattr(config, "output_router_logits", False)))


def _without_labels(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k != "labels"}


class FastCausalLM:
    """A causal LM whose training loss comes from :func:`fused_linear_cross_entropy` on the hidden states.

    ``_fastft_head_transform`` (set by :func:`fastft.patch`, a :class:`~fastft.models.recognize.HeadTransform`) says how
    the model turns its head's output into logits and a loss: scale, softcap, router auxiliary loss.

    With ``labels`` in training mode no (batch, seq, vocab) logits tensor is created and ``logits`` is None in
    the output; without labels, in eval mode, or with ``fastft_return_logits = True`` on the model, the
    model's own forward runs and returns logits as usual.
    """

    fastft_return_logits: bool = False

    def get_output_embeddings(self):
        """The model's output head, as transformers returns it; its weight is tagged as a fastft head.

        The tag (``weight._fastft_head``) is how TRL's chunked log-prob call, which only sees the weight, is
        routed to fastft's kernel for this model and no other (:mod:`fastft.rl.trl_integration`). Tagging here
        rather than once at patch time keeps it true after ``resize_token_embeddings`` or ``copy.deepcopy``.
        """
        head = super().get_output_embeddings()
        linear = head_linear(head) if head is not None else None
        if linear is not None:
            linear.weight._fastft_head = True
        return head

    def forward(self, *args, **kwargs):
        labels = kwargs.get("labels")
        head = self.get_output_embeddings()
        linear = head_linear(head) if head is not None else None
        if (
            labels is None
            or not self.training
            or self.fastft_return_logits
            or linear is None
            or len(args) > 1
            or kwargs.get("logits_to_keep", 0) not in (0, None)
            or getattr(self, "_fastft_head_transform", None) is None
            or (_router_loss_on(self, kwargs) and self._fastft_head_transform.aux_loss_coef is None)
        ):
            return super().forward(*args, **kwargs)
        return_dict = kwargs.pop("return_dict", None)
        kwargs["labels"] = None
        swap_class(head, FastLMHead)
        with _capturing(head) as capture:
            out = super().forward(*args, return_dict=True, **kwargs)
        if capture.hidden is None:
            raise RuntimeError(
                f"fastft: {type(self).__name__}.forward did not call its output head; patch it with fused_loss=False"
            )
        hidden = capture.hidden
        shift_labels = kwargs.get("shift_labels")
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=kwargs.get("ignore_index", -100))[..., 1:]
        transform = self._fastft_head_transform
        aux_loss = out.get("aux_loss")
        if aux_loss is not None and transform.aux_loss_coef is None:
            # A router loss the probe did not see added (output_router_logits switched on after patching):
            # transformers' own forward knows how it enters the loss.
            return super().forward(*args, return_dict=return_dict, labels=labels, **_without_labels(kwargs))
        with gathered_head(linear.weight, linear.bias):  # DeepSpeed ZeRO-3 partitions the head between uses
            loss = fused_linear_cross_entropy(
                hidden,
                linear.weight,
                shift_labels.to(hidden.device),
                bias=linear.bias,
                ignore_index=kwargs.get("ignore_index", -100),
                softcap=transform.softcap,
                logit_scale=transform.logit_scale,
                num_items_in_batch=kwargs.get("num_items_in_batch"),
            )
        if aux_loss is not None and transform.aux_loss_coef:
            loss = loss + transform.aux_loss_coef * aux_loss.to(loss.device)
        fields = {k: v for k, v in out.items() if k not in ("logits", "loss")}
        out = type(out)(loss=loss, **fields)
        return out.to_tuple() if return_dict is False else out
