"""Real model dimensions with random weights: ``fastft bench --preset NAME [--layers N]``.

A preset is the published ``config.json`` of a model, written down here (no download, no weights): the widths,
head counts, vocabulary, RoPE base, norm epsilon and each family's quirks (Qwen-3's q/k norms come with its model
type; Gemma-2's tanh-GELU, attention and final-logit softcaps, query scaling and alternating sliding window; the
mixture-of-experts presets' expert counts, top-k and expert widths, gpt-oss's YaRN RoPE, biases and clamped
SwiGLU). A preset with routed experts runs the MoE comparison (:mod:`fastft.bench.moe`). The
benchmark initialises the weights randomly from a seed, so memory and speed are those of the real model while
nothing is downloaded. ``--layers N`` keeps the first ``N`` decoder layers: memory and time per layer are the real
ones, and a CPU or a small GPU can still build the model (the embedding and head alone of Llama-3-8B are 1 GiB
each in bf16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import AutoConfig, PretrainedConfig


@dataclass(frozen=True)
class Preset:
    """A published model's architecture: ``model_type`` and the config fields that differ from its defaults."""

    name: str
    source: str  # the Hub model whose config.json these numbers are
    model_type: str
    fields: dict[str, Any]

    @property
    def layers(self) -> int:
        return self.fields["num_hidden_layers"]


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            "llama3-8b",
            "meta-llama/Meta-Llama-3-8B",
            "llama",
            {
                "hidden_size": 4096,
                "intermediate_size": 14336,
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "vocab_size": 128256,
                "max_position_embeddings": 8192,
                "rms_norm_eps": 1e-5,
                "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
                "tie_word_embeddings": False,
                "bos_token_id": 128000,
                "eos_token_id": 128001,
            },
        ),
        Preset(
            "qwen3-8b",
            "Qwen/Qwen3-8B",
            "qwen3",
            {
                "hidden_size": 4096,
                "intermediate_size": 12288,
                "num_hidden_layers": 36,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "head_dim": 128,
                "vocab_size": 151936,
                "max_position_embeddings": 40960,
                "rms_norm_eps": 1e-6,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
                "tie_word_embeddings": False,
                "bos_token_id": 151643,
                "eos_token_id": 151645,
            },
        ),
        Preset(
            "gemma2-9b",
            "google/gemma-2-9b",
            "gemma2",
            {
                "hidden_size": 3584,
                "intermediate_size": 14336,
                "num_hidden_layers": 42,
                "num_attention_heads": 16,
                "num_key_value_heads": 8,
                "head_dim": 256,
                "vocab_size": 256000,
                "max_position_embeddings": 8192,
                "rms_norm_eps": 1e-6,
                "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
                "hidden_activation": "gelu_pytorch_tanh",
                "query_pre_attn_scalar": 256,
                "sliding_window": 4096,
                "attn_logit_softcapping": 50.0,
                "final_logit_softcapping": 30.0,
                "tie_word_embeddings": True,
                "pad_token_id": 0,
                "bos_token_id": 2,
                "eos_token_id": 1,
            },
        ),
        Preset(
            "qwen3-30b-a3b",
            "Qwen/Qwen3-30B-A3B",
            "qwen3_moe",
            {
                "hidden_size": 2048,
                "intermediate_size": 6144,
                "moe_intermediate_size": 768,
                "num_experts": 128,
                "num_experts_per_tok": 8,
                "norm_topk_prob": True,
                "decoder_sparse_step": 1,
                "mlp_only_layers": [],
                "num_hidden_layers": 48,
                "num_attention_heads": 32,
                "num_key_value_heads": 4,
                "head_dim": 128,
                "vocab_size": 151936,
                "max_position_embeddings": 40960,
                "rms_norm_eps": 1e-6,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
                "router_aux_loss_coef": 0.001,
                "tie_word_embeddings": False,
                "bos_token_id": 151643,
                "eos_token_id": 151645,
            },
        ),
        Preset(
            "gpt-oss-20b",
            "openai/gpt-oss-20b",
            "gpt_oss",
            {
                "hidden_size": 2880,
                "intermediate_size": 2880,
                "num_local_experts": 32,
                "num_experts_per_tok": 4,
                "num_hidden_layers": 24,
                "num_attention_heads": 64,
                "num_key_value_heads": 8,
                "head_dim": 64,
                "vocab_size": 201088,
                "max_position_embeddings": 131072,
                "rms_norm_eps": 1e-5,
                "sliding_window": 128,
                "attention_bias": True,
                "swiglu_limit": 7.0,
                "rope_parameters": {
                    "rope_type": "yarn",
                    "rope_theta": 150000.0,
                    "factor": 32.0,
                    "beta_fast": 32.0,
                    "beta_slow": 1.0,
                    "original_max_position_embeddings": 4096,
                    "truncate": False,
                },
                "router_aux_loss_coef": 0.9,
                "tie_word_embeddings": False,
                "pad_token_id": 199999,
                "eos_token_id": 200002,
            },
        ),
    )
}


def preset_config(name: str, layers: int | None = None) -> PretrainedConfig:
    """The transformers config of preset ``name`` (a key of :data:`PRESETS`), cut to ``layers`` decoder layers.

    ``use_cache`` is off (training). Raises ``ValueError`` naming the choices for an unknown preset, and for a
    ``layers`` outside 1 .. the model's real depth.
    """
    if name not in PRESETS:
        raise ValueError(f"--preset {name!r} does not exist; choose one of: {', '.join(PRESETS)}.")
    preset = PRESETS[name]
    fields = dict(preset.fields, use_cache=False)
    if layers is not None:
        if not 1 <= layers <= preset.layers:
            raise ValueError(
                f"--layers {layers}: {name} has {preset.layers} decoder layers; pass a number from 1 to "
                f"{preset.layers} (fewer layers keep each layer's real size and cut the depth)."
            )
        fields["num_hidden_layers"] = layers  # Gemma-2's config derives its per-layer attention types from it
    return AutoConfig.for_model(preset.model_type, **fields)
