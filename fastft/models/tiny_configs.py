"""Tiny configs of any transformers model type: the default config of the type with every size shrunk.

The coverage command (:mod:`fastft.models.coverage`) builds every causal LM that transformers ships from such
a config, so nothing is downloaded. :func:`tiny_config` takes the default config's ``to_dict()``, shrinks it and
builds the config class again from the result, as it would read a checkpoint's ``config.json``: whatever the
class derives (MLA's head_dim, a default layer pattern, a property such as ``layers_block_type``) follows the new
values, and its validators check them. Shrinking is generic, on the root and on every sub-config:

- Layers. A layer's kind is its entry in every per-layer list (``layer_types``, ``mlp_layer_types``,
  ``no_rope_layers``, a pattern string such as ``hybrid_override_pattern``), its membership in every list of
  layer indices (``mlp_only_layers``, ``moe_layers``), its ``per_layer_config`` overrides and whether it reuses
  another layer's keys and values (``num_kv_shared_layers``, ``kv_source_layers``). The tiny model keeps the
  first layer of every kind (at least ``LAYERS``), so a hybrid keeps one attention and one linear-attention or
  mamba layer, one dense and one MoE layer; every per-layer list is cut to those layers and every index list
  renumbered. A repeated pattern shorter than the model (``block_types``) keeps each kind once.
- Sizes. Every attribute named in ``SIZES`` takes its small value (counts in ``_NEVER_GROW`` never grow: a
  multi-query model keeps one key head); sizes left at None that the model needs (head_dim, key-value heads,
  top-k) are set; sizes outside ``SIZES`` equal to a width of the default model (or twice it) follow the tiny
  width; a layer in ``per_layer_config`` keeps its ratio to the others. Relations between sizes are kept where
  the default has them: MLA's head_dim (the rotary part, or nope + rope), one key head per query head under MLA,
  mamba heads x head width = the mixer's inner width, rotary scaling's original context over its factor.
- Token ids stay inside the tiny vocabulary; encoders used as causal LMs are made decoders (``is_decoder``).

``OVERRIDES`` holds what a type needs beyond that, one row per type with only the values the generic pass gets
wrong; ``UNBUILDABLE`` lists the types whose causal LM cannot be trained on ``input_ids`` alone, with the reason.
"""

from __future__ import annotations

import copy
import itertools
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
    "shared_experts_intermediate_size": 32,
    "moe_shared_expert_intermediate_size": 32,
    "intermediate_size_mlp": 96,
    "first_dense_intermediate_size": 96,
    "mlp_only_intermediate_size": 96,
    "encoder_ffn_dim": 96,
    "decoder_ffn_dim": 96,
    "d_ff": 96,
    "dff": 96,
    "dim_ff": 96,
    "mlp_dim": 96,
    "d_inner": 96,
    "expert_ffn_hidden_size": 32,
    "projector_hidden_size": HIDDEN,
    "embedding_size": HIDDEN,
    "embedding_dim": HIDDEN,
    "emb_dim": HIDDEN,
    "input_embedding_size": HIDDEN,
    "output_embedding_size": HIDDEN,
    "lru_width": HIDDEN,
    "hidden_size_global": HIDDEN,
    "encoder_hash_byte_group_vocab": VOCAB,
    # attention
    "num_attention_heads": HEADS,
    "num_attention_heads_per_layer": HEADS,
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
    "swa_num_attention_heads": HEADS,
    "swa_num_key_value_heads": KV_HEADS,
    "attention_head_size": HEAD_DIM,
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
    "index_num_heads": 2,
    "o_lora_rank": 32,
    "hc_lowrank": 16,
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
    "mamba_d_ssm": 2 * HIDDEN,
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
    "output_channels": HIDDEN,
    "nemo_conv_channels": HIDDEN,
    "depthwise_separable_out_channel": HIDDEN,
    "ext_pw_out_channel": HIDDEN,
}

# Attributes that count the layers a per-layer list refers to (the first one a config has is used).
_LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "depth", "num_blocks")

# Counts that keep a smaller default (multi-query attention's one key head, top-1 routing).
_NEVER_GROW = (
    "num_key_value_heads",
    "n_kv_heads",
    "num_kv_heads",
    "multi_query_group_num",
    "num_experts_per_tok",
    "num_experts_per_token",
    "moe_topk",
    "moe_k",
    "top_k",
    "n_shared_experts",
    "num_shared_experts",
)

# Sizes that some configs leave at None (derived later from the old sizes) but must follow the new ones.
_FILL_NONE = ("head_dim", "num_key_value_heads", "num_experts_per_tok", "n_routed_experts", "n_shared_experts")

# Token ids that must stay inside the tiny vocabulary.
_TOKEN_IDS = (
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "cls_token_id",
    "mask_token_id",
)

# Qwen4-Exp builds a QSA indexer on its indexed-attention layers but leaves its sizes unset by default.
_QSA = {
    "indexer_n_heads": 2,
    "indexer_kv_heads": 1,
    "indexer_head_dim": HEAD_DIM,
    "indexer_budget": 8,
    "indexer_compress_ratio": 4,
}

_INKLING2 = ["hybrid_sliding", "hybrid", "hybrid_sliding", "hybrid"]

# What a model type needs beyond the generic pass (only values the generic pass gets wrong). A dict value under
# a sub-config key (``"text_config"``) or a dict-valued attribute (``rope_parameters``) is merged into it.
OVERRIDES: dict[str, dict[str, Any]] = {
    # Default configs without the attention (or convolution) layers the released checkpoints have.
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    "lfm2": {"layer_types": ["conv", "full_attention"], "full_attn_idxs": [1]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    # Dory's to_dict writes each layer as an (attention, mlp) pair and doubles the counts; one input, recurrent and
    # output layer here.
    "dory": {
        "layer_types": ["sliding_attention", "mlp", "full_attention", "mlp", "sliding_attention", "mlp"],
        "num_hidden_layers": 6,
        "n_input_layers": 2,
        "n_recurrent_layers": 2,
        "n_output_layers": 2,
    },
    # Zamba ties its shared attention block across hybrid layers: two of them, so there is something to tie.
    "zamba": {"layers_block_type": ["linear_attention", "hybrid", "hybrid"], "num_hidden_layers": 3},
    # HRM runs its stack of layers H_cycles x (L_cycles + 1) times; num_hidden_layers counts the runs (2 x 2 x 4).
    "hrm_text": {"num_layers_per_stack": 2, "num_hidden_layers": 16},
    # Reformer trains only on sequences the axial position shape multiplies to and its chunks divide: plain
    # position embeddings and chunks of 4 tokens.
    "reformer": {"axial_pos_embds": False, "local_attn_chunk_length": 4, "lsh_attn_chunk_length": 4},
    # xLSTM rounds its query/key width up to a multiple of 64 in the config but not in the layer: keep them equal.
    "xlstm": {"qk_dim_factor": 1.0},
    "xmod": {"default_language": "en_XX"},  # which language adapter to run; the default config names none
    # Inkling-2 starts a block of attention residuals every n_layers_per_attn_res_block layers, and a block start
    # after the first layer takes one more input: with blocks of 2 layers, layer 2 is such a sliding layer.
    "inkling2_text": {"layer_types": _INKLING2, "num_hidden_layers": 4, "n_layers_per_attn_res_block": 2},
    # The loop variant runs a middle span of layers several times: two more layers, looped.
    "inkling2_loop_text": {
        "layer_types": _INKLING2 + _INKLING2[:2],
        "num_hidden_layers": 6,
        "n_layers_per_attn_res_block": 2,
        "loop_layer_index_start": 4,
        "loop_layer_index_end": 6,
    },
    # Jamba places attention (and experts) by period and offset: mamba + MLP, mamba + experts, attention + MLP.
    "jamba": {
        "num_hidden_layers": 4,
        "attn_layer_period": 4,
        "attn_layer_offset": 2,
        "expert_layer_period": 2,
        "expert_layer_offset": 1,
    },
    # Llama-4 Maverick alternates dense and MoE layers (Scout, the default, has experts in every layer).
    "llama4": {"text_config": {"moe_layers": [1]}},
    "llama4_text": {"moe_layers": [1]},
    # Default configs that do not build in this transformers release.
    "qwen4_exp": {"text_config": _QSA},
    "qwen4_exp_text": _QSA,
    "blt": {"use_cache": False},  # its cache reads config.num_hidden_layers, which BltConfig does not have
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},  # its attention reads both from attn_config
}

# Types whose causal LM cannot be built and trained here, with the reason.
UNBUILDABLE: dict[str, str] = {
    "gemma3n": "its vision tower is a TimmWrapperModel, which needs the timm package (not installed)",
    "musicgen": "its causal LM takes the decoder's config and labels of shape (batch, seq, codebooks)",
    "musicgen_melody": "its causal LM takes the decoder's config and labels of shape (batch, seq, codebooks)",
    "git": "a captioning model: its loss drops the image tokens in front of the text, so it needs pixel_values",
    "gemma4_assistant": "a speculative-decoding drafter: its forward needs the target model's embeddings and shared KV",
    "gemma4_unified_assistant": "a speculative-decoding drafter: its forward needs the target model's shared KV",
}


def _is_index_list(name: str, value: Any, layers: int) -> bool:
    """A list of layer indices (``mlp_only_layers``, ``moe_layers``): increasing ints below the layer count."""
    if not (isinstance(value, list) and value and all(type(v) is int for v in value)):
        return False
    named = any(word in name for word in ("layer", "idx", "indices", "ids"))
    return named and all(0 <= a < b for a, b in itertools.pairwise(value)) and 0 <= value[0] and value[-1] < layers


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


def _is_layer_refs(name: str, value: Any, layers: int) -> bool:
    """Per layer, the index of another layer it reads from (Kolibri's ``kv_source_layers``)."""
    return "source" in name and _is_per_layer(name, value, layers) and all(type(v) is int for v in value)


def _choose_layers(d: dict[str, Any], layers: int) -> list[int]:
    """Indices of the layers to keep: the first layer of every kind, then the earliest others up to ``LAYERS``.

    A layer's kind is its entry in every per-layer list together with its membership in every index list, so the
    tiny model keeps one layer of each combination the full model has (attention and linear attention, dense and
    MoE, rope and no-rope)."""
    index_lists = [set(v) for k, v in d.items() if _is_index_list(k, v, layers)]
    refs = [v for k, v in d.items() if _is_layer_refs(k, v, layers)]
    per_layer = [v for k, v in d.items() if _is_per_layer(k, v, layers) and not _is_index_list(k, v, layers)]
    per_layer = [v for v in per_layer if not any(v is r for r in refs)] + [
        [v[i] == i for i in range(layers)] for v in refs
    ]
    overrides = {int(k): repr(sorted(v.items())) for k, v in (d.get("per_layer_config") or {}).items()}
    shared_from = layers - (d.get("num_kv_shared_layers") or 0)  # the last layers reuse earlier layers' keys/values
    first: dict[tuple, int] = {}
    for i in range(layers):
        kind = (
            tuple(v[i] for v in per_layer) + tuple(i in s for s in index_lists) + (overrides.get(i), i >= shared_from)
        )
        first.setdefault(kind, i)
    chosen = set(first.values())
    for i in range(layers):
        if len(chosen) >= LAYERS:
            break
        chosen.add(i)
    return sorted(chosen | {v[i] for v in refs for i in chosen})  # with the layers they read from


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
        elif _is_layer_refs(name, value, layers):
            d[name] = [new_index[value[i]] for i in chosen]
        elif _is_per_layer(name, value, layers):
            picked = [value[i] for i in chosen]
            d[name] = "".join(picked) if isinstance(value, str) else type(value)(picked)
        elif _is_cycle(name, value, layers):
            d[name] = list(dict.fromkeys(value))  # each kind once, so the first layers hold them all
            count = max(count, len(d[name]))
    if isinstance(d.get("per_layer_config"), dict):  # heterogeneous layers: {"05": {"head_dim": 512}, ...}
        d["per_layer_config"] = {
            str(new_index[int(k)]).zfill(len(k)): v for k, v in d["per_layer_config"].items() if int(k) in new_index
        }
    if type(d.get("num_kv_shared_layers")) is int and d["num_kv_shared_layers"] > 0:
        d["num_kv_shared_layers"] = sum(i >= layers - d["num_kv_shared_layers"] for i in chosen)
    counted = {name for name in _LAYER_COUNTS if type(d.get(name)) is int and d[name] == layers}
    for name in counted:
        d[name] = count
    return counted


def _shrink_mla(d: dict[str, Any], old: dict[str, Any]) -> None:
    """Multi-head latent attention: keep how head_dim relates to the query/key parts, and one key head per query head.

    DeepSeek's head_dim is the rotary part (its rotary embedding is built from head_dim); Dots-3's sliding layers
    use the whole query/key width (nope + rope). Applied to the root and to each heterogeneous layer's overrides."""
    layers = [(d, old, {}, {})]
    for key, overrides in (d.get("per_layer_config") or {}).items():
        layers.append((overrides, (old.get("per_layer_config") or {}).get(key, {}), d, old))
    for new_layer, old_layer, new_root, old_root in layers:

        def size(cfg: dict[str, Any], root: dict[str, Any], name: str) -> Any:
            return cfg.get(name, root.get(name))

        old_head, rope, nope = (
            size(old_layer, old_root, n) for n in ("head_dim", "qk_rope_head_dim", "qk_nope_head_dim")
        )
        if ("head_dim" in new_layer or new_layer is not d) and type(rope) is int:
            if old_head == rope:
                new_layer["head_dim"] = size(new_layer, new_root, "qk_rope_head_dim")
            elif type(nope) is int and old_head == nope + rope:
                new_layer["head_dim"] = size(new_layer, new_root, "qk_rope_head_dim") + size(
                    new_layer, new_root, "qk_nope_head_dim"
                )
        if type(new_layer.get("num_key_value_heads")) is int:  # keys are expanded to every query head: no groups
            new_layer["num_key_value_heads"] = size(new_layer, new_root, "num_attention_heads")


def _shrink_rope(d: dict[str, Any]) -> None:
    """Rotary scaling (YaRN, Llama-3) stretches an original context by ``factor``; the tiny context keeps the factor."""
    positions = d.get("max_position_embeddings")
    if type(positions) is not int:
        return
    rope = d.get("rope_parameters")
    per_type = [v for v in rope.values() if isinstance(v, dict)] if isinstance(rope, dict) else []
    for params in [rope, *per_type] if isinstance(rope, dict) else []:
        if type(params.get("original_max_position_embeddings")) is int:
            params["original_max_position_embeddings"] = max(1, int(positions / (params.get("factor") or 1)))
    if type(d.get("original_max_position_embeddings")) is int:
        d["original_max_position_embeddings"] = min(d["original_max_position_embeddings"], positions)


# (heads, head width) of the state-space layers, whose product must be the mixer's inner width.
_MAMBA_HEADS = (
    ("mamba_n_heads", "mamba_d_head"),
    ("mamba_num_heads", "mamba_head_dim"),
    ("n_mamba_heads", "mamba_headdim"),
    ("num_heads", "head_dim"),  # Mamba-2
)


def _shrink_mamba(d: dict[str, Any]) -> None:
    """State-space (Mamba-2) mixers: heads x head width = the inner width (``mamba_d_ssm``, or expand x hidden)."""
    expand = d.get("mamba_expand", d.get("expand"))
    inner = d.get("mamba_d_ssm") or (expand * d["hidden_size"] if type(expand) is int and "hidden_size" in d else None)
    if type(inner) is not int:
        return
    for heads, width in _MAMBA_HEADS:
        if type(d.get(heads)) is int and type(d.get(width)) is int:
            d[width] = inner // d[heads]
            break


def _shrink(d: dict[str, Any], sub_configs: dict[str, Any]) -> None:
    """Shrink the config dict ``d`` in place (and the dicts of its sub-configs)."""
    for key, sub_class in sub_configs.items():
        if isinstance(d.get(key), dict):
            _shrink(d[key], getattr(sub_class, "sub_configs", {}) or {})
    counted = _shrink_layers(d)
    old = copy.deepcopy(d)
    for overrides in (d.get("per_layer_config") or {}).values():
        for name, value in overrides.items():
            # a layer that differs keeps its ratio to the others (Gemma-4's global layers: twice the head_dim)
            base = d.get(name)
            if name in SIZES and type(value) is int and type(base) is int and base > 0:
                overrides[name] = max(1, round(SIZES[name] * value / base))
    for name, size in SIZES.items():
        value = d.get(name)
        if name in counted:
            continue  # set above, to the number of layers kept
        if type(value) is int and value > 0:
            d[name] = min(size, value) if name in _NEVER_GROW else size
        elif isinstance(value, list) and value and all(type(v) is int for v in value):
            d[name] = [size] * len(value)  # per-layer sizes (Gemma-3n's intermediate_size)
    for name in _FILL_NONE:
        if name in d and d[name] is None:
            d[name] = SIZES[name]
    if "kv_lora_rank" in d:
        _shrink_mla(d, old)
    _shrink_mamba(d)
    _shrink_rope(d)
    for name in _TOKEN_IDS:
        value = d.get(name)
        if type(value) is int and value >= VOCAB:
            d[name] = VOCAB - 1 - _TOKEN_IDS.index(name)
        elif isinstance(value, list):
            d[name] = [i if type(i) is not int or i < VOCAB else VOCAB - 1 for i in value]


_WIDTH_NAMES = ("hidden_size", "d_model", "n_embd", "embed_dim", "dim")
_NOT_WIDTHS = ("vocab", "position", "window", "chunk", "max_", "num_", "image", "patch", "kernel", "rate", "length")


def _widths(d: dict[str, Any]) -> set[int]:
    """The model widths anywhere in the config tree (root and sub-configs)."""
    found = {d[n] for n in _WIDTH_NAMES if type(d.get(n)) is int}
    for value in d.values():
        if isinstance(value, dict):
            found |= _widths(value)
    return found


def _follow_widths(d: dict[str, Any], widths: set[int]) -> None:
    """Sizes outside ``SIZES`` that are a width of the default model, or twice it (an adapter's input, a projector's
    output, Zamba's attention over the hidden state concatenated with the embeddings) become the same multiple of
    the tiny width: the config classes check that they match."""
    for name, value in d.items():
        if isinstance(value, dict):
            _follow_widths(value, widths)
        elif (
            type(value) is int
            and (value in widths or value / 2 in widths)
            and name not in SIZES
            and any(w in name for w in ("dim", "size", "hidden"))
            and not any(w in name for w in _NOT_WIDTHS)
        ):
            d[name] = HIDDEN if value in widths else 2 * HIDDEN


def _merge(d: dict[str, Any], overrides: dict[str, Any]) -> None:
    for name, value in overrides.items():
        if isinstance(value, dict) and isinstance(d.get(name), dict):
            _merge(d[name], value)
        else:
            d[name] = value


def tiny_config(model_type: str) -> Any:
    """The default config of ``model_type`` with every size shrunk (see the module docstring).

    The config is rebuilt from the shrunk values, so whatever the config class derives from them (MLA's head
    sizes, default layer patterns) follows the new sizes, as it would for a checkpoint's ``config.json``. Attention
    is eager. For a type in ``UNBUILDABLE`` the config (or the model built from it) may fail; check that first."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    d = config.to_dict()
    widths = _widths(d)
    _shrink(d, getattr(config, "sub_configs", {}) or {})
    _follow_widths(d, widths)
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
