"""Tiny causal LMs and the shipped tokenizer for the RL/TRL tests (no download, no network).

The vocabulary is the embedded tokenizer's (2048 byte-level BPE tokens, Llama-3 chat template), the model a
2-layer Llama of hidden 64: small enough for several trainer steps per test on a CPU.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from fastft.bench.assets import default_examples, default_tokenizer

# The shipped Llama-3 layout with ``{% generation %}`` around assistant turns, which TRL's assistant-only loss needs.
TRAINING_CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}{%- if message['role'] == 'assistant' %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% generation %}{{- message['content'] + '<|eot_id|>' }}"
    "{% endgeneration %}{%- else %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] + '<|eot_id|>' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def tokenizer(training_template: bool = False) -> PreTrainedTokenizerBase:
    """The embedded tokenizer (pad, eos and a chat template set); optionally with generation markers."""
    tok = default_tokenizer()
    if training_template:
        tok.chat_template = TRAINING_CHAT_TEMPLATE
    return tok


def tiny_config(**overrides) -> LlamaConfig:
    tok = default_tokenizer()
    settings = {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": len(tok), "max_position_embeddings": 512, "tie_word_embeddings": False,
        "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
    }  # fmt: skip
    settings.update(overrides)
    return LlamaConfig(**settings)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A freshly initialised tiny Llama (fp32, eval/train as transformers leaves it), the same for one seed."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(**overrides))


def instruction_pairs(n: int = 16) -> list[dict[str, str]]:
    """The first ``n`` shipped instruction/response pairs as {"prompt", "completion"}."""
    return [{"prompt": e["prompt"], "completion": " " + e["response"]} for e in default_examples()[:n]]
