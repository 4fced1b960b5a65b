"""Tiny configs of any transformers model type: the default config of the type with every size shrunk.

The coverage command (:mod:`fastft.models.coverage`) builds every causal LM that transformers ships from such
a config, so nothing is downloaded. Shrinking is generic: every attribute that names a size the decoders of
transformers share (widths, head counts, layer counts, expert counts, state sizes) is set to a small value
that keeps the usual divisibility rules (hidden = heads x head_dim, heads divisible by key-value heads), on the
config and on each of its sub-configs (``text_config``, ``vision_config``, ...). Per-layer lists
(``layer_types``, ``mlp_only_layers``, ...) are cut to the new layer count. ``OVERRIDES`` holds the few
values a model type needs beyond that, one row per type.
"""

from __future__ import annotations

from typing import Any

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, LAYERS, VOCAB = 64, 4, 2, 16, 2, 256

# Sizes set wherever the config has the attribute (on the root and every sub-config).
SIZES: dict[str, int] = {
    # widths
    "hidden_size": HIDDEN,
    "n_embd": HIDDEN,
    "d_model": HIDDEN,
    "embed_dim": HIDDEN,
    "dim": HIDDEN,
    "word_embed_proj_dim": HIDDEN,
    "intermediate_size": 96,
    "ffn_dim": 96,
    "ffn_hidden_size": 96,
    "n_inner": 96,
    "dense_intermediate_size": 96,
    "shared_intermediate_size": 96,
    "moe_intermediate_size": 32,
    "expert_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "moe_shared_expert_intermediate_size": 32,
    "intermediate_size_mlp": 96,
    "first_dense_intermediate_size": 96,
    "encoder_ffn_dim": 96,
    "decoder_ffn_dim": 96,
    "d_ff": 96,
    "dff": 96,
    "dim_ff": 96,
    "mlp_dim": 96,
    "expert_ffn_hidden_size": 32,
    "projector_hidden_size": HIDDEN,
    "embedding_size": HIDDEN,
    "embedding_dim": HIDDEN,
    "emb_dim": HIDDEN,
    "input_embedding_size": HIDDEN,
    "output_embedding_size": HIDDEN,
    "lru_width": HIDDEN,
    # attention
    "num_attention_heads": HEADS,
    "n_head": HEADS,
    "n_heads": HEADS,
    "num_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "n_kv_heads": KV_HEADS,
    "num_kv_heads": KV_HEADS,
    "multi_query_group_num": KV_HEADS,
    "head_dim": HEAD_DIM,
    "kv_channels": HEAD_DIM,
    "attention_head_dim": HEAD_DIM,
    "global_head_dim": HEAD_DIM,
    "swa_head_dim": HEAD_DIM,
    "dim_head": HEAD_DIM,
    "num_global_key_value_heads": KV_HEADS,
    "encoder_attention_heads": HEADS,
    "decoder_attention_heads": HEADS,
    "d_head": HEAD_DIM,
    "rotary_dim": HEAD_DIM // 2,
    # MLA (DeepSeek-V2/V3, Kimi, GLM-4-MoE-lite)
    "q_lora_rank": 32,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "qk_head_dim": 16,
    "v_head_dim": HEAD_DIM,
    "index_head_dim": 16,
    "index_n_heads": 2,
    "o_lora_rank": 32,
    # layers
    "num_hidden_layers": LAYERS,
    "n_layer": LAYERS,
    "n_layers": LAYERS,
    "num_layers": LAYERS,
    "decoder_layers": LAYERS,
    "encoder_layers": LAYERS,
    "num_decoder_layers": LAYERS,
    "first_k_dense_replace": 1,
    "num_dense_layers": 1,
    "num_nextn_predict_layers": 0,
    # experts
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "num_experts_per_token": 2,
    "num_expert_group": 1,
    "moe_topk": 2,
    "moe_k": 2,
    "top_k": 2,
    "n_group": 1,
    "topk_group": 1,
    "n_shared_experts": 1,
    "num_shared_experts": 1,
    # linear attention and state-space layers
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 4,
    "linear_num_heads": 4,
    "linear_head_dim": 16,
    "mamba_n_heads": 4,
    "mamba_d_head": 32,
    "mamba_d_state": 16,
    "mamba_d_conv": 4,
    "mamba_n_groups": 1,
    "mamba_chunk_size": 16,
    "mamba_headdim": 32,
    "mamba_num_heads": 4,
    "mamba_head_dim": 32,
    "mamba_dt_rank": 8,
    "ssm_state_size": 16,
    "state_size": 16,
    "n_groups": 1,
    "chunk_size": 16,
    "conv_kernel": 4,
    "time_step_rank": 8,
    # vocabulary and positions
    "vocab_size": VOCAB,
    "decoder_vocab_size": VOCAB,
    "unpadded_vocab_size": VOCAB,
    "vocab_size_per_layer_input": VOCAB,
    "shape_vocab_size": VOCAB,
    "pronunciation_vocab_size": VOCAB,
    "shape_embed_dim": 32,
    "pronunciation_embed_dim": 32,
    "hidden_size_per_layer_input": 16,
    "max_position_embeddings": 512,
    "n_positions": 512,
    "n_ctx": 512,
    "max_seq_len": 512,
    "sliding_window": 8,
    # vision and audio towers of composite models (left unpatched; only need to be small)
    "image_size": 32,
    "patch_size": 8,
    "num_channels": 3,
    "vision_hidden_size": HIDDEN,
    "out_hidden_size": HIDDEN,
    "depth": LAYERS,
    "num_mel_bins": 16,
}

# Attributes that count the layers a per-layer list refers to (the first one a config has is used).
_LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "depth")

# Sizes that some configs leave at None (derived later from the old sizes) but must follow the new ones.
_FILL_NONE = ("head_dim", "num_key_value_heads", "num_experts_per_tok")

# Token ids that must stay inside the tiny vocabulary.
_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id")

# What a model type needs beyond the generic pass (only values the generic pass gets wrong). A dict value under
# a sub-config key (``"text_config"``) or a dict-valued attribute (``rope_parameters``) is merged into it.
OVERRIDES: dict[str, dict[str, Any]] = {
    # Default configs without the attention (or convolution) layers the released checkpoints have.
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    "lfm2": {"layer_types": ["conv", "full_attention"], "full_attn_idxs": [1]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    # Default configs that do not build in this transformers release.
    "blt": {"use_cache": False},  # its cache reads config.num_hidden_layers, which BltConfig does not have
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    "dbrx": {"attn_config": {"rope_theta": 10000.0}},  # DbrxAttention reads rope_theta from attn_config
}

# Types whose causal LM cannot be built and trained here, with the reason.
UNBUILDABLE: dict[str, str] = {}


def _is_index_list(name: str, value: Any, layers: int) -> bool:
    """A list of layer indices (``mlp_only_layers``, ``moe_layers``): increasing ints below the layer count."""
    if not (isinstance(value, list) and value and all(type(v) is int for v in value)):
        return False
    named = any(word in name for word in ("layer", "idx", "indices", "ids"))
    return named and all(0 <= a < b for a, b in zip(value, value[1:])) and 0 <= value[0] and value[-1] < layers


def _is_per_layer(name: str, value: Any, layers: int) -> bool:
    """One entry per layer: a list of scalars as long as the model is deep, or a pattern string (``"M-M*"``)."""
    if isinstance(value, str):
        return len(value) == layers and "pattern" in name
    scalar = (str, int, float, bool, type(None))
    return (
        isinstance(value, (list, tuple))
        and len(value) == layers
        and all(isinstance(v, scalar) for v in value)
        and not name.endswith(("token_id", "token_ids"))
    )


def _choose_layers(d: dict[str, Any], layers: int) -> list[int]:
    """Indices of the layers to keep: the first layer of every kind, then the earliest others up to ``LAYERS``.

    A layer's kind is its entry in every per-layer list together with its membership in every index list, so the
    tiny model keeps one layer of each combination the full model has (attention and linear attention, dense and
    MoE, rope and no-rope)."""
    index_lists = [set(v) for k, v in d.items() if _is_index_list(k, v, layers)]
    per_layer = [v for k, v in d.items() if _is_per_layer(k, v, layers) and not _is_index_list(k, v, layers)]
    first: dict[tuple, int] = {}
    for i in range(layers):
        first.setdefault(tuple(v[i] for v in per_layer) + tuple(i in s for s in index_lists), i)
    chosen = set(first.values())
    for i in range(layers):
        if len(chosen) >= LAYERS:
            break
        chosen.add(i)
    return sorted(chosen)


def _is_cycle(name: str, value: Any, layers: int) -> bool:
    """A pattern of layer kinds repeated over the depth (Recurrent-Gemma's ``block_types``)."""
    return (
        "types" in name
        and isinstance(value, (list, tuple))
        and 1 < len(value) < layers
        and all(isinstance(v, str) for v in value)
    )


def _shrink_layers(d: dict[str, Any]) -> set[str]:
    """Keep a few layers, one of every kind (see :func:`_choose_layers`); returns the layer counts it set."""
    count_name = next((n for n in _LAYER_COUNTS if type(d.get(n)) is int and d[n] > 0), None)
    if count_name is None:
        return set()
    layers = d[count_name]
    chosen = _choose_layers(d, layers)
    new_index = {old: new for new, old in enumerate(chosen)}
    count = len(chosen)
    for name, value in list(d.items()):
        if _is_index_list(name, value, layers):
            d[name] = [new_index[i] for i in value if i in new_index]
        elif _is_per_layer(name, value, layers):
            picked = [value[i] for i in chosen]
            d[name] = "".join(picked) if isinstance(value, str) else type(value)(picked)
        elif _is_cycle(name, value, layers):
            d[name] = list(dict.fromkeys(value))  # each kind once, so the first layers hold them all
            count = max(count, len(d[name]))
    for name, value in list(d.items()):
        # Kinds given by a period (Jamba: attention where i % attn_layer_period == attn_layer_offset).
        if name.endswith("_period") and type(value) is int and value > count:
            d[name] = count
            offset = name.replace("_period", "_offset")
            if type(d.get(offset)) is int:
                d[offset] %= count
    counted = {name for name in _LAYER_COUNTS if type(d.get(name)) is int and d[name] == layers}
    for name in counted:
        d[name] = count
    return counted


def _shrink(d: dict[str, Any], sub_configs: dict[str, Any]) -> None:
    """Shrink the config dict ``d`` in place (and the dicts of its sub-configs)."""
    for key, sub_class in sub_configs.items():
        if isinstance(d.get(key), dict):
            _shrink(d[key], getattr(sub_class, "sub_configs", {}) or {})
    counted = _shrink_layers(d)
    for name, size in SIZES.items():
        value = d.get(name)
        if name in counted:
            continue  # set above, to the number of layers kept
        if type(value) is int and value > 0:
            d[name] = size
        elif isinstance(value, list) and value and all(type(v) is int for v in value):
            d[name] = [size] * len(value)  # per-layer sizes (Gemma-3n's intermediate_size)
    for name in _FILL_NONE:
        if name in d and d[name] is None:
            d[name] = SIZES[name]
    if type(d.get("qk_rope_head_dim")) is int and "head_dim" in d:
        d["head_dim"] = d["qk_rope_head_dim"]  # MLA: the rotary embedding is built from head_dim
    if "kv_lora_rank" in d and type(d.get("num_key_value_heads")) is int:
        d["num_key_value_heads"] = d["num_attention_heads"]  # MLA expands keys to every query head: no groups
    for name in _TOKEN_IDS:
        value = d.get(name)
        if type(value) is int and value >= VOCAB:
            d[name] = VOCAB - 1 - _TOKEN_IDS.index(name)
        elif isinstance(value, list):
            d[name] = [i if i < VOCAB else VOCAB - 1 for i in value]


def _merge(d: dict[str, Any], overrides: dict[str, Any]) -> None:
    for name, value in overrides.items():
        if isinstance(value, dict) and isinstance(d.get(name), dict):
            _merge(d[name], value)
        else:
            d[name] = value


def tiny_config(model_type: str) -> Any:
    """The default config of ``model_type`` with every size shrunk (see the module docstring).

    The config is rebuilt from the shrunk values, so whatever the config class derives from them (MLA's head
    sizes, default layer patterns) follows the new sizes, as it would for a checkpoint's ``config.json``."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    d = config.to_dict()
    _shrink(d, getattr(config, "sub_configs", {}) or {})
    _merge(d, OVERRIDES.get(model_type, {}))
    if "is_decoder" in d:
        d["is_decoder"] = True  # encoders used as causal LMs (BERT, Reformer) attend causally only as decoders
    config = type(config).from_dict(d)
    config._attn_implementation = "eager"
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "_attn_implementation"):
            sub._attn_implementation = "eager"
    return config
