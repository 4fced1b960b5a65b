"""Tiny decoder models of every family fastft patches, built from configs (no download), and PEFT twins.

Sizes are the smallest that still exercise the structure: 2 layers, hidden 64, 4 query / 2 key-value heads
(GQA), head_dim 16, a vocabulary of 128. Each family row carries its quirk: Llama-3 rope scaling, Gemma's
``1 + weight`` norms and tanh-GELU, Gemma-2's attention and final-logit softcaps, Gemma-3's sliding
window, Qwen-3's q/k norms, Phi-3's fused qkv/gate_up projections with partial rotary.
"""

from __future__ import annotations

import copy

import peft
import torch
import transformers

COMMON = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
    "rope_theta": 500000.0,
}

FAMILIES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": _LLAMA3_ROPE}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"head_dim": 16}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16, "hidden_act": "gelu_pytorch_tanh"}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {"head_dim": 16, "final_logit_softcapping": 5.0, "attn_logit_softcapping": 20.0, "sliding_window": 4},
    ),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "sliding_window": 4}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"partial_rotary_factor": 0.5}),
}

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PHI3_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def tiny_model(
    family: str, dtype: torch.dtype = torch.float32, seed: int = 0, attn_implementation: str = "eager", **overrides
) -> torch.nn.Module:
    """A randomly initialised (seeded) tiny causal LM of ``family`` (eager attention unless told otherwise)."""
    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**COMMON, **extra, **overrides})
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).to(dtype)
    with torch.no_grad():  # Gemma initialises norm weights to 0 (and Llama to 1): make every weight matter
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(-0.5, 0.5) if family.startswith("gemma") else param.uniform_(0.5, 1.5)
    return model


def lora_config(family: str, r: int = 4, **kwargs) -> peft.LoraConfig:
    """LoRA on all seven projections (Phi-3: its four fused ones), random non-zero A and B."""
    targets = PHI3_TARGETS if family == "phi3" else LORA_TARGETS
    return peft.LoraConfig(r=r, lora_alpha=8, target_modules=targets, init_lora_weights=False, **kwargs)


def twins(
    family: str, dtype: torch.dtype = torch.float32, lora: bool = True, model_kwargs: dict | None = None, **lora_kwargs
):
    """(plain, other): two identical models — PEFT-wrapped with the same random adapters when ``lora``.

    ``model_kwargs`` go to :func:`tiny_model` (config overrides, ``attn_implementation``).
    """
    plain = tiny_model(family, dtype, **(model_kwargs or {}))
    other = copy.deepcopy(plain)
    if lora:
        config = lora_config(family, **lora_kwargs)
        torch.manual_seed(1)
        plain = peft.get_peft_model(plain, config)
        other = peft.get_peft_model(other, copy.deepcopy(config))
        other.load_state_dict(plain.state_dict())
    return plain, other


def batch(vocab: int = 128, seed: int = 5) -> dict[str, torch.Tensor]:
    """Two rows of 11 tokens: the second left-padded by 3, the first with its 4-token prompt ignored."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (2, 11), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    input_ids[1, :3] = 0
    labels = input_ids.clone()
    labels[0, :4] = -100
    labels[1, :3] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def text_batches(n_batches: int, rows: int) -> list[dict[str, torch.Tensor]]:
    """``n_batches`` distinct batches of real text: the instruction data shipped in ``fastft/bench/assets``
    (arithmetic with worked answers, rewriting, made-up facts), tokenised with the BPE tokenizer shipped next to it
    (vocabulary 2048, bos 0, eos 4, pad 5: pass ``TEXT_VOCAB`` as the model's config).

    One example per row: ``<bos> prompt response <eos>``, right-padded to the batch's longest row; labels are
    -100 on the prompt and on the padding, so the loss covers the responses only (as SFT trains).
    """
    from fastft.bench.assets import default_examples, default_tokenizer

    tokenizer = default_tokenizer()
    examples = default_examples()
    if n_batches * rows > len(examples):
        raise ValueError(f"text_batches: {n_batches} x {rows} rows, but the corpus has {len(examples)} examples")
    batches = []
    for start in range(0, n_batches * rows, rows):
        prompts, labelled = [], []
        for example in examples[start : start + rows]:
            prompt = tokenizer(example["prompt"])["input_ids"]
            response = tokenizer(" " + example["response"], add_special_tokens=False)["input_ids"]
            prompts.append(len(prompt))
            labelled.append(prompt + response + [tokenizer.eos_token_id])
        width = max(len(ids) for ids in labelled)
        input_ids = torch.full((rows, width), tokenizer.pad_token_id)
        attention_mask = torch.zeros(rows, width, dtype=torch.long)
        labels = torch.full((rows, width), -100)
        for i, (ids, n_prompt) in enumerate(zip(labelled, prompts)):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention_mask[i, : len(ids)] = 1
            labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return batches


# The token ids of the tokenizer behind :func:`text_batches` (config overrides for a model that reads them).
TEXT_VOCAB = {"vocab_size": 2048, "bos_token_id": 0, "eos_token_id": 4, "pad_token_id": 5}
