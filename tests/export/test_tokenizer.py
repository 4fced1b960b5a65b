"""llama.cpp tokenizes exported vocabularies as the Hugging Face tokenizer does, for every pre-tokenizer fastft
recognises: the byte-level BPE's split rules (Llama-3's regex, Qwen-2's single digits, GPT-2's byte level,
SmolLM's digits + byte level) are given to the same merges, and the texts exercise what they split differently
(digit runs, contractions, punctuation, newlines, repeated spaces, non-Latin letters, emoji)."""

from __future__ import annotations

import pytest
from tokenizers import Regex, pre_tokenizers

from fastft.export import save_pretrained_gguf
from fastft.export.tokenizer import _QWEN2_SPLIT, convert_tokenizer
from tests.export.client import llama_cpp
from tests.export.tokenizers_local import byte_level
from tests.models.tiny import TEXT_VOCAB, tiny_model

TEXTS = [
    "In 2024, 1234567 people didn't say they'd go.",
    "x=3.14159; y = x**2  # comment\n\n\tindented\r\nwindows",
    "Ünïcödé naïve café — 東京 Москва 😀👍🏽 done!!!",
    "   leading spaces and trailing   ",
]
PRE = {
    "llama-bpe": None,  # the shipped tokenizer's own pre-tokenizer
    "qwen2": pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    ),
    "gpt-2": pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "smollm": pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    ),
}


@pytest.mark.parametrize("pre", sorted(PRE))
def test_llama_cpp_tokenizes_as_transformers(pre, tmp_path):
    tokenizer = byte_level()
    if PRE[pre] is not None:
        tokenizer.backend_tokenizer.pre_tokenizer = PRE[pre]
    model = tiny_model("llama", **TEXT_VOCAB)
    assert convert_tokenizer(tokenizer, 2048).pre == pre
    path = save_pretrained_gguf(model, tokenizer, tmp_path, "f16", modelfile=False, progress=False)[0]
    llm = llama_cpp.Llama(path, vocab_only=True, verbose=False)
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids, (pre, text)
        assert llm.detokenize(ids[1:]).decode() == text
    llm.close()


@pytest.mark.parametrize("kind", ["llama", "gemma", "phi3"])
def test_llama_cpp_tokenizes_sentencepiece_as_transformers(kind, tmp_path):
    """SentencePiece-style vocabularies (scores from merge ranks, byte fallback, the space prefix) on the same texts.

    One known difference is left out: a text that already starts with a space under a ``Metaspace`` pre-tokenizer
    with ``prepend_scheme="first"`` (transformers' own Llama tokenizer class): ``tokenizers`` adds no prefix ``▁``
    then, llama.cpp always adds one (Llama-2's and Mistral's published ``tokenizer.json`` prepend with a
    normalizer, which always adds it, as llama.cpp does)."""
    from tests.export.tokenizers_local import sentencepiece

    tokenizer = sentencepiece(kind)
    model = tiny_model("llama", vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=0)
    path = save_pretrained_gguf(model, tokenizer, tmp_path, "f16", modelfile=False, progress=False)[0]
    llm = llama_cpp.Llama(path, vocab_only=True, verbose=False)
    for text in TEXTS:
        if kind != "gemma" and text.startswith(" "):
            continue
        ids = tokenizer(text)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids, (kind, text)
    llm.close()
