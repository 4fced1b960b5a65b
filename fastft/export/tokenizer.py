"""A Hugging Face fast tokenizer as GGUF metadata: vocabulary, merges or scores, special tokens, chat template.

llama.cpp has its own tokenizers; the file says which one to use and with what data:

- **BPE over bytes** (GPT-2, Llama-3, Qwen, SmolLM: a ``tokenizers`` BPE model without byte fallback and a
  ByteLevel decoder) becomes ``tokenizer.ggml.model = "gpt2"`` with the vocabulary and merges as they are,
  and ``tokenizer.ggml.pre`` naming llama.cpp's pre-tokenizer (the regex that splits text before BPE). The
  pre-tokenizer is recognised from the tokenizer's own ``pre_tokenizer`` (the split regex, digits, byte
  level), not guessed from the model name; one llama.cpp does not implement is refused.
- **SentencePiece BPE** (Llama-2, Mistral, Gemma: BPE with byte fallback, spaces written as ``▁``) becomes
  ``"llama"``: llama.cpp merges the adjacent pair whose merged piece has the highest *score*, so each piece's
  score is minus the rank of the merge that makes it (rank 0 first), the order transformers merges in.
  ``<0x00>``..``<0xFF>`` are byte tokens; ``add_space_prefix`` is read from the normalizer
  (``Prepend("▁")``) or a ``Metaspace`` pre-tokenizer.

Token types: special added tokens are CONTROL, other added tokens USER_DEFINED (llama.cpp matches both
whole), the unknown token UNKNOWN. Rows of the embedding beyond the tokenizer (a vocabulary padded to a
multiple of 64) become unused ``[PAD<i>]`` tokens. Whether a BOS/EOS is added is taken from what the tokenizer
actually does to a short text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp's pre-tokenizer for each split regex (applied before a byte-level step without its own regex).
_SPLIT_PRE = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}

# gguf.TokenType values (kept here so that importing this module does not need gguf).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


class UnsupportedTokenizerError(ValueError):
    """The tokenizer has no llama.cpp counterpart that this exporter writes."""


@dataclass
class GGUFVocab:
    """Everything llama.cpp needs to tokenize as the Hugging Face tokenizer does."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece BPE)
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    special_ids: dict[str, int] = field(default_factory=dict)
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None

    def write(self, writer: Any) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges is not None:
            writer.add_token_merges(self.merges)
        for kind, token_id in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def _backend_json(tokenizer: Any) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedTokenizerError(
            f"GGUF export needs a fast (tokenizers-backed) tokenizer; got {type(tokenizer).__name__}. Load it with "
            "AutoTokenizer.from_pretrained(..., use_fast=True)."
        )
    return json.loads(backend.to_str())


def _flatten(component: dict | None) -> list[dict]:
    if not component:
        return []
    if component.get("type") == "Sequence":
        items = component.get("pretokenizers") or component.get("normalizers") or component.get("decoders") or []
        return [leaf for item in items for leaf in _flatten(item)]
    return [component]


def _regex_of(split: dict) -> str | None:
    pattern = split.get("pattern", {})
    return pattern.get("Regex") if isinstance(pattern, dict) else None


def _bpe_pre(pre_tokenizer: dict | None) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE, or an error naming what was found."""
    steps = _flatten(pre_tokenizer)
    kinds = [step.get("type") for step in steps]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    if byte_level and byte_level[-1].get("add_prefix_space"):
        raise UnsupportedTokenizerError("a ByteLevel pre-tokenizer with add_prefix_space=True has no llama.cpp form.")
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = _regex_of(steps[0])
        if regex in _SPLIT_PRE and steps[0].get("behavior") == "Isolated":
            return _SPLIT_PRE[regex]
    raise UnsupportedTokenizerError(
        f"the tokenizer's pre-tokenizer {json.dumps(pre_tokenizer)[:300]} is not one llama.cpp implements that fastft "
        "recognises (GPT-2's byte level, SmolLM's digits + byte level, Llama-3's or Qwen-2's split regex)."
    )


def _merges(model: dict) -> list[tuple[str, str]]:
    merges = model.get("merges") or []
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in merges]


def _encode_merge(pair: tuple[str, str]) -> str:
    # a space inside a piece would be read as the separator: encoded as U+0120 + 256, as gguf-py does
    return " ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair)


def _space_prefix(data: dict) -> bool:
    for step in _flatten(data.get("normalizer")):
        if step.get("type") == "Prepend" and step.get("prepend") == "\u2581":
            return True
    for step in _flatten(data.get("pre_tokenizer")):
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always") != "never" and step.get("add_prefix_space", True)
    return False


def _adds(tokenizer: Any, token_id: int | None, first: bool) -> bool:
    if token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0 if first else -1] == token_id


def convert_tokenizer(tokenizer: Any, vocab_size: int) -> GGUFVocab:
    """The GGUF vocabulary of ``tokenizer`` for a model with ``vocab_size`` embedding rows (see the module doc)."""
    data = _backend_json(tokenizer)
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise UnsupportedTokenizerError(
            f"tokenizer model {model.get('type')!r} cannot be exported to GGUF by fastft: only BPE tokenizers "
            "(byte-level as Llama-3/Qwen/SmolLM, SentencePiece-style as Llama-2/Mistral/Gemma) are."
        )
    vocab: dict[str, int] = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    n = max(vocab.values()) + 1 if vocab else 0
    if n > vocab_size:
        raise UnsupportedTokenizerError(
            f"the tokenizer has {n} tokens but the model's embedding only {vocab_size} rows; resize the model "
            "(model.resize_token_embeddings(len(tokenizer))) before exporting."
        )
    tokens: list[str | None] = [None] * vocab_size
    for text, token_id in vocab.items():
        tokens[token_id] = text
    types = [NORMAL] * vocab_size
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    for token_id, token in added.items():
        types[token_id] = CONTROL if token.get("special") else USER_DEFINED
    for i, text in enumerate(tokens):
        if text is None:
            tokens[i], types[i] = f"[PAD{i}]", UNUSED

    special_ids = {}
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            special_ids[kind] = int(token_id)
    byte_fallback = bool(model.get("byte_fallback"))
    pairs = _merges(model)
    if byte_fallback:
        rank = {}
        for r, (a, b) in enumerate(pairs):
            rank.setdefault(a + b, r)
        scores = []
        for i, text in enumerate(tokens):
            if types[i] == NORMAL and _BYTE_TOKEN.match(text):
                types[i] = BYTE
            scores.append(-float(rank[text]) if text in rank else (0.0 if len(text) == 1 else -float(len(pairs) + i)))
        if "unk" in special_ids:
            types[special_ids["unk"]] = UNKNOWN
        result = GGUFVocab("llama", None, tokens, types, scores=scores, add_space_prefix=_space_prefix(data))
    else:
        decoder_kinds = [d.get("type") for d in _flatten(data.get("decoder"))]
        if "ByteLevel" not in decoder_kinds:
            raise UnsupportedTokenizerError(
                f"a BPE tokenizer without byte fallback and without a ByteLevel decoder ({decoder_kinds}) has no "
                "llama.cpp form."
            )
        result = GGUFVocab("gpt2", _bpe_pre(data.get("pre_tokenizer")), tokens, types)
        result.merges = [_encode_merge(p) for p in pairs]
    result.special_ids = special_ids
    result.add_bos = _adds(tokenizer, special_ids.get("bos"), first=True)
    result.add_eos = _adds(tokenizer, special_ids.get("eos"), first=False)
    template = getattr(tokenizer, "chat_template", None)
    result.chat_template = template if isinstance(template, str) else None
    return result
