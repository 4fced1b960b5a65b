"""Local tokenizers for the export tests (nothing downloaded), one per kind llama.cpp reads.

- ``byte_level()``: the Llama-3-style byte-level BPE shipped in ``fastft/bench/assets`` (vocabulary 2048).
- ``sentencepiece(kind)``: a SentencePiece-style BPE (byte fallback, spaces as ``▁``) trained here on the
  shipped instruction data with ``tokenizers``, then handed to transformers' own ``LlamaTokenizer`` or
  ``GemmaTokenizer`` (vocabulary + merges), which bring Llama-2's / Gemma's normalizer, pre-tokenizer and
  decoder exactly as those models' ``tokenizer.json`` have them. Phi-3's end-of-turn tokens are added for
  ``kind="phi3"`` (llama.cpp's Phi-3 graph looks them up).
"""

from __future__ import annotations

import functools
import json

from fastft.bench.assets import default_examples, default_tokenizer

BYTES = [f"<0x{i:02X}>" for i in range(256)]


def byte_level():
    return default_tokenizer()


@functools.cache
def _trained(vocab_size: int) -> tuple[dict, list]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", *BYTES], show_progress=False
    )
    text = [e["prompt"] + " " + e["response"] for e in default_examples()]
    backend.train_from_iterator(text, trainer)
    model = json.loads(backend.to_str())["model"]
    return model["vocab"], [tuple(m) if not isinstance(m, str) else tuple(m.split(" ")) for m in model["merges"]]


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else "
    "message['role'] %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def sentencepiece(kind: str = "llama", vocab_size: int = 600):
    """A SentencePiece-style tokenizer of ``kind`` ("llama", "gemma" or "phi3") with a chat template."""
    from transformers import GemmaTokenizer, LlamaTokenizer

    vocab, merges = _trained(vocab_size)
    if kind == "gemma":
        tokenizer = GemmaTokenizer(
            vocab=dict(vocab),
            merges=list(merges),
            unk_token="<unk>",
            bos_token="<s>",
            eos_token="</s>",
            pad_token="<unk>",
            add_bos_token=True,
        )
        tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
        tokenizer.chat_template = GEMMA
    else:
        tokenizer = LlamaTokenizer(
            vocab=dict(vocab),
            merges=list(merges),
            unk_token="<unk>",
            bos_token="<s>",
            eos_token="</s>",
            add_bos_token=kind == "llama",  # Llama-2 and Mistral add BOS, Phi-3 does not
        )
        extra = (
            ["<|end|>", "<|user|>", "<|assistant|>", "<|system|>"] if kind == "phi3" else ["<|im_start|>", "<|im_end|>"]
        )
        tokenizer.add_special_tokens({"additional_special_tokens": extra})
        if kind == "phi3":  # Phi-3 pads with <|endoftext|>
            tokenizer.add_special_tokens({"pad_token": "<|endoftext|>"})
        tokenizer.chat_template = (
            CHATML
            if kind == "llama"
            else (
                "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
            )
        )
    return tokenizer
