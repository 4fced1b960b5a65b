"""``fastft.models.tiny_configs``: tiny configs of representative model types build, train, and keep their layer kinds.

One type per shape of config the generic shrinking has to handle: a dense decoder (Llama), a hybrid that mixes
linear and full attention with experts (Qwen3-Next), one that mixes mamba, attention, MLP and experts by period
and offset (Jamba), multi-head latent attention (DeepSeek-V3), and a composite multimodal root whose text model
sits in a sub-config (Gemma-3). The coverage command runs all of them; these keep the rules honest in seconds.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from fastft.models.tiny_configs import OVERRIDES, UNBUILDABLE, tiny_config

TYPES = ("llama", "qwen3_next", "jamba", "deepseek_v3", "gemma3")


def _build(model_type: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(tiny_config(model_type))


def _layer_children(model: torch.nn.Module) -> list[set[str]]:
    """For each decoder layer, the class names of its direct children (attention, mixer, MLP or experts)."""
    layers = model.get_decoder().layers
    return [{type(child).__name__ for child in layer.children()} for layer in layers]


@pytest.mark.parametrize("model_type", TYPES)
def test_builds_small_and_trains(model_type: str) -> None:
    model = _build(model_type)
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_hybrid_keeps_linear_and_full_attention() -> None:
    config = tiny_config("qwen3_next")
    assert set(config.layer_types) == {"linear_attention", "full_attention"}
    children = set().union(*_layer_children(_build("qwen3_next")))
    assert {"Qwen3NextGatedDeltaNet", "Qwen3NextAttention", "Qwen3NextSparseMoeBlock"} <= children


def test_period_hybrid_keeps_every_combination() -> None:
    """Jamba: mamba + MLP, mamba + experts and attention + MLP all appear in the tiny model, as in the full one."""
    kinds = {frozenset(c) for c in _layer_children(_build("jamba"))}
    assert any({"JambaMambaMixer", "JambaMLP"} <= k for k in kinds)
    assert any({"JambaMambaMixer", "JambaSparseMoeBlock"} <= k for k in kinds)
    assert any({"JambaAttention", "JambaMLP"} <= k for k in kinds)


def test_mla_head_dim_is_the_rotary_part_and_keys_are_not_grouped() -> None:
    config = tiny_config("deepseek_v3")
    assert config.head_dim == config.qk_rope_head_dim
    assert config.num_key_value_heads == config.num_attention_heads
    assert config.first_k_dense_replace == 1 < config.num_hidden_layers  # one dense layer, then MoE


def test_composite_root_shrinks_its_sub_configs() -> None:
    config = tiny_config("gemma3")
    assert config.text_config.hidden_size == 64 and config.text_config.vocab_size == 256
    assert config.vision_config.hidden_size == 64 and config.vision_config.num_hidden_layers == 2
    assert set(config.text_config.layer_types) == {"sliding_attention", "full_attention"}


def test_tables_name_causal_lm_types() -> None:
    """Every row names a causal LM type (the tables were written on transformers 5.25; an older one lacks some)."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version("5.25"):
        pytest.skip(f"the tables name types of transformers 5.25; this is {transformers.__version__}")
    assert set(OVERRIDES) <= set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    assert set(UNBUILDABLE) <= set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    assert all(reason.strip() for reason in UNBUILDABLE.values())
