"""How each transformers model type becomes a llama.cpp architecture: one row per family, only the differences.

Tensor names come from ``gguf``'s own maps (:func:`gguf.get_tensor_name_map`), hyperparameters from the
config. A row holds what neither can tell, each fact stated against llama.cpp's graph for that architecture:

- ``permute_qk``: llama.cpp's LLAMA graph rotates *adjacent* pairs of a head (GPT-J style) where
  transformers rotates the two *halves*; the rows of q and k are reordered inside each head so that the pair
  (i, i + d/2) of transformers lands on (2i, 2i + 1). The other rows below use NeoX (half) rotation as
  transformers does and need nothing.
- ``norm_offset``: Gemma's RMSNorm multiplies by ``1 + w``; llama.cpp multiplies by the stored weight, so
  ``1 + w`` is stored (every ``*norm.weight``, the q/k norms included).
- ``query_scale``: Gemma-2/3 scale scores by ``query_pre_attn_scalar ** -0.5``; llama.cpp uses
  ``head_dim ** -0.5`` (``hidden / heads`` for the 27B models, known by their layer count). A different
  value is folded exactly into the query projection (Gemma-2) or the query norm (Gemma-3): rotation is
  linear, so scaling q before it scales the score.
- ``keys``: hyperparameters of that architecture beyond the common ones (softcaps, sliding windows, the
  sliding layers' rope base, Granite's multipliers), and checks that a layer pattern is llama.cpp's fixed one.

An architecture transformers has and llama.cpp does not (or a feature of one, such as a rope scaling the
file cannot express) raises :class:`UnsupportedModelError` before any file is opened.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


class UnsupportedModelError(NotImplementedError):
    """The model (or one of its features) has no llama.cpp counterpart that this exporter writes."""


@dataclass(frozen=True)
class Architecture:
    """One row: the llama.cpp architecture name for a transformers ``model_type`` and its differences."""

    gguf_arch: str
    permute_qk: bool = False
    norm_offset: float = 0.0
    query_scale: str | None = None  # "q_proj" or "q_norm": where a score scale llama.cpp lacks is folded
    big_model_layers: int | None = None  # the layer count of the model llama.cpp scales by hidden / heads
    keys: Callable[[Any, Any], None] | None = None  # (config, writer) -> extra metadata


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_parameters(config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """The rope parameters of ``config`` (transformers 5: ``rope_parameters``, per layer type for Gemma-3)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])
    elif params and all(isinstance(v, dict) for v in params.values()):
        params = dict(params.get("full_attention") or next(iter(params.values())))
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def rope_frequency_factors(config: Any, dim: int) -> np.ndarray | None:
    """Per-frequency divisors for a rope that only rescales frequencies (Llama-3.1): llama.cpp's ``rope_freqs``.

    Computed from transformers' own rope initialisation, so the factors are exactly the ratio of the default
    inverse frequencies to the scaled ones. ``None`` for the default rope.
    """
    params = rope_parameters(config)
    kind = params["rope_type"]
    if kind == "default":
        return None
    if kind != "llama3":
        raise UnsupportedModelError(
            f"rope scaling {kind!r} ({params}) is not written to GGUF by fastft; only the default rope, 'linear' "
            "and 'llama3' are. Export a model without rope scaling or convert with llama.cpp's convert_hf_to_gguf.py."
        )
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, attention_scaling = ROPE_INIT_FUNCTIONS[kind](config, "cpu")
    if attention_scaling != 1.0:
        raise UnsupportedModelError(f"rope {kind!r} scales attention by {attention_scaling}; GGUF export cannot.")
    base = float(params["rope_theta"])
    default = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    return (default / scaled.double().numpy()).astype(np.float32)


def _rope_keys(config: Any, writer: Any, arch: Architecture) -> None:
    """Rope base and scaling; Llama-3 scaling is a tensor (``rope_freqs``) added by the exporter."""
    params = rope_parameters(config)
    writer.add_rope_freq_base(float(params["rope_theta"]))
    kind = params["rope_type"]
    if kind == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    elif kind == "llama3" and arch.gguf_arch != "llama":
        raise UnsupportedModelError(f"{arch.gguf_arch}: llama.cpp reads Llama-3 rope scaling only for llama models.")
    elif kind not in ("default", "linear", "llama3"):
        rope_frequency_factors(config, head_dim(config))  # raises with the explanation


def _sliding_window(config: Any) -> int | None:
    return getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None


def _gemma2_keys(config: Any, writer: Any) -> None:
    writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping or 0.0))
    writer.add_final_logit_softcapping(float(config.final_logit_softcapping or 0.0))
    writer.add_sliding_window(int(config.sliding_window))
    _check_layer_types(config, 2, "gemma2")


def _gemma3_keys(config: Any, writer: Any) -> None:
    if config.final_logit_softcapping:
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    if getattr(config, "attn_logit_softcapping", None):
        raise UnsupportedModelError(
            "gemma3 with attn_logit_softcapping: llama.cpp's Gemma-3 graph has no attention softcap."
        )
    writer.add_sliding_window(int(config.sliding_window))
    writer.add_rope_freq_base_swa(float(rope_parameters(config, "sliding_attention")["rope_theta"]))
    if rope_parameters(config, "sliding_attention")["rope_type"] != "default":
        raise UnsupportedModelError("gemma3: a scaled rope on the sliding layers cannot be written to GGUF.")
    _check_layer_types(config, 6, "gemma3")


def _check_layer_types(config: Any, period: int, name: str) -> None:
    """llama.cpp places sliding layers by a fixed pattern: every ``period``-th layer is global, the rest slide."""
    layer_types = getattr(config, "layer_types", None)
    if not layer_types:
        return
    expected = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(len(layer_types))]
    if list(layer_types) != expected:
        raise UnsupportedModelError(
            f"{name}: layer_types {list(layer_types)} differ from llama.cpp's fixed pattern (one global layer in "
            f"{period}: {expected}); such a model cannot be written to GGUF."
        )


def _qwen_keys(config: Any, writer: Any) -> None:
    window = _sliding_window(config)
    if getattr(config, "use_sliding_window", False) and window:
        raise UnsupportedModelError("qwen with use_sliding_window=True: llama.cpp's Qwen graphs attend to all tokens.")


def _phi3_keys(config: Any, writer: Any) -> None:
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(int(config.sliding_window))


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", permute_qk=True),
    "mistral": Architecture("llama", permute_qk=True, keys=lambda c, w: _mistral_keys(c, w)),
    "qwen2": Architecture("qwen2", keys=_qwen_keys),
    "qwen3": Architecture("qwen3", keys=_qwen_keys),
    "gemma": Architecture("gemma", norm_offset=1.0),
    "gemma2": Architecture("gemma2", norm_offset=1.0, query_scale="q_proj", big_model_layers=46, keys=_gemma2_keys),
    "gemma3_text": Architecture(
        "gemma3", norm_offset=1.0, query_scale="q_norm", big_model_layers=62, keys=_gemma3_keys
    ),
    "phi3": Architecture("phi3", keys=_phi3_keys),
    "olmo2": Architecture("olmo2"),
    "granite": Architecture("granite", permute_qk=True, keys=lambda c, w: _granite_keys(c, w)),
    "smollm3": Architecture("smollm3", permute_qk=True, keys=lambda c, w: _smollm3_keys(c, w)),
}


def _granite_keys(config: Any, writer: Any) -> None:
    writer.add_attention_scale(float(config.attention_multiplier))
    writer.add_embedding_scale(float(config.embedding_multiplier))
    writer.add_residual_scale(float(config.residual_multiplier))
    writer.add_logit_scale(float(config.logits_scaling))


def _smollm3_keys(config: Any, writer: Any) -> None:
    """llama.cpp skips rope on every 4th layer (3, 7, ...), SmolLM-3's default ``no_rope_layers``."""
    flags = list(getattr(config, "no_rope_layers", None) or [])
    expected = [int((i + 1) % 4 != 0) for i in range(config.num_hidden_layers)]
    if flags and [int(bool(f)) for f in flags] != expected:
        raise UnsupportedModelError(
            f"smollm3: no_rope_layers {flags} differ from llama.cpp's fixed pattern (no rope on every 4th layer)."
        )


def _mistral_keys(config: Any, writer: Any) -> None:
    window = getattr(config, "sliding_window", None)
    if window and window < config.max_position_embeddings:
        import warnings

        warnings.warn(
            f"mistral with sliding_window={window}: llama.cpp's llama graph attends to all tokens, so the GGUF model "
            f"equals this one for contexts up to {window} tokens only (as every Mistral v0.1 GGUF does).",
            stacklevel=3,
        )


def architecture_of(config: Any) -> tuple[str, Architecture]:
    """The row for ``config.model_type``, or :class:`UnsupportedModelError` naming the supported types."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF export does not support model type {model_type!r}: llama.cpp has no matching architecture that "
            f"fastft writes. Supported: {', '.join(sorted(ARCHITECTURES))}. Save the merged model with "
            "save_pretrained and convert it with llama.cpp's convert_hf_to_gguf.py if llama.cpp supports it."
        )
    return model_type, ARCHITECTURES[model_type]


def query_scale_factor(config: Any, arch: Architecture) -> float:
    """The factor q must be multiplied by so that llama.cpp's score scale equals transformers'."""
    if arch.query_scale is None:
        return 1.0
    wanted = float(getattr(config, "query_pre_attn_scalar", None) or head_dim(config))
    if config.num_hidden_layers == arch.big_model_layers:
        used = config.hidden_size / config.num_attention_heads
    else:
        used = float(head_dim(config))
    return math.sqrt(used / wanted)


def write_hyperparameters(config: Any, writer: Any, arch: Architecture, vocab_size: int) -> None:
    """The hyperparameters every architecture here shares, then the row's own keys."""
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    dim = head_dim(config)
    writer.add_key_length(dim)
    writer.add_value_length(dim)
    rotary = int(
        dim
        * float(
            rope_parameters(config).get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
        )
    )
    writer.add_rope_dimension_count(rotary)
    writer.add_vocab_size(vocab_size)
    _rope_keys(config, writer, arch)
    if getattr(config, "attention_bias", False) and arch.gguf_arch in ("gemma", "gemma2", "gemma3"):
        raise UnsupportedModelError(f"{arch.gguf_arch} with attention_bias=True: llama.cpp's graph has no q/k/v bias.")
    if arch.keys is not None:
        arch.keys(config, writer)
