"""An Ollama ``Modelfile`` for an exported GGUF: ``FROM``, a ``TEMPLATE`` derived from the chat template, stops.

Ollama's templates are Go templates, the tokenizer's chat template is Jinja, and no translator between the
two exists; but chat templates of the formats people fine-tune with are *concatenative*: each message is
``prefix(role) + content + suffix(role)``, optionally after a default system message, and the generation
prompt is a fixed string. :func:`chat_format` recovers those pieces by rendering the template itself on
sentinel messages, then checks that the pieces reproduce the template's own output on other conversations;
a template for which they do not (one that branches on content, numbers turns, ...) gets no ``TEMPLATE``
(Ollama then uses the one stored in the GGUF file's metadata, which it reads for known formats) and a note
in the Modelfile instead of a wrong one.

Stop tokens: the end-of-sequence token and every special token that ends a turn in the recovered format.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

_ROLES = ("system", "user", "assistant")
# What rendering a chat template raises on messages it refuses (raise_exception, a missing key, a bad type).
_TEMPLATE_ERRORS = (TemplateError, ValueError, TypeError, KeyError, IndexError, AttributeError)
_MARK = "\x00MESSAGE{}\x00"


@dataclass(frozen=True)
class ChatFormat:
    """``prefix[role] + content + suffix[role]`` per message, then ``generation`` for the reply."""

    start: str  # before the first message (a BOS the template writes)
    prefix: dict[str, str]
    suffix: dict[str, str]
    generation: str
    default_system: str | None

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        out = [self.start]
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            out.append(self.prefix["system"] + self.default_system + self.suffix["system"])
        for message in messages:
            out.append(self.prefix[message["role"]] + message["content"] + self.suffix[message["role"]])
        if add_generation_prompt:
            out.append(self.generation)
        return "".join(out)


def _render(tokenizer: Any, messages: list[dict[str, str]], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _after(text: str, mark: str) -> str | None:
    return text.split(mark, 1)[1] if text.count(mark) == 1 else None


def _derive(tokenizer: Any, with_system: bool) -> ChatFormat | None:
    roles = (["system"] if with_system else []) + ["user", "assistant", "user"]
    messages = [{"role": role, "content": _MARK.format(i)} for i, role in enumerate(roles)]
    suffix: dict[str, str] = {}
    for k in range(1, len(messages) + 1):  # what follows the last message is its role's suffix
        tail = _after(_render(tokenizer, messages[:k], False), messages[k - 1]["content"])
        if tail is None or suffix.setdefault(roles[k - 1], tail) != tail:
            return None
    full = _render(tokenizer, messages, True)
    pieces = []
    for message in messages:
        if full.count(message["content"]) != 1:
            return None
        head, full = full.split(message["content"], 1)
        pieces.append(head)
    prefix: dict[str, str] = {}
    for i in range(1, len(messages)):  # between two messages: the first one's suffix, then the next one's prefix
        before = suffix[roles[i - 1]]
        if (
            not pieces[i].startswith(before)
            or prefix.setdefault(roles[i], pieces[i][len(before) :]) != pieces[i][len(before) :]
        ):
            return None
    if not full.startswith(suffix[roles[-1]]):
        return None
    generation = full[len(suffix[roles[-1]]) :]
    # before the first message: what the template writes first (a BOS), then the first role's prefix
    first = roles[0]
    bos = getattr(tokenizer, "bos_token", None) or ""
    head = pieces[0]
    if first in prefix:
        if not head.endswith(prefix[first]):
            return None
        start = head[: len(head) - len(prefix[first])]
    else:
        start = bos if bos and head.startswith(bos) else ""
        prefix[first] = head[len(start) :]
    if not with_system:
        prefix["system"], suffix["system"] = prefix["user"], suffix["user"]  # never used: no system turns
    # a default system message: what a conversation without one gets between the start and the first user turn
    default_system = None
    lone = _render(tokenizer, [{"role": "user", "content": _MARK.format(0)}], False).split(_MARK.format(0), 1)[0]
    if with_system and lone != start + prefix["user"]:
        inner = lone[len(start) : len(lone) - len(prefix["user"])]
        if not (
            lone.startswith(start)
            and lone.endswith(prefix["user"])
            and inner.startswith(prefix["system"])
            and inner.endswith(suffix["system"])
        ):
            return None
        default_system = inner[len(prefix["system"]) : len(inner) - len(suffix["system"])]
    return ChatFormat(start, prefix, suffix, generation, default_system)


def chat_format(tokenizer: Any) -> ChatFormat | None:
    """The concatenative form of ``tokenizer.chat_template``, or ``None`` when it is not one (see module doc).

    Templates that refuse a system message (Gemma's raise) are derived from user and assistant turns only.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    for with_system in (True, False):
        try:
            fmt = _derive(tokenizer, with_system)
        except _TEMPLATE_ERRORS:  # a template that raises on these messages (e.g. no system role): try without
            fmt = None
        if fmt is not None and _reproduces(tokenizer, fmt, with_system):
            return fmt
    return None


def _reproduces(tokenizer: Any, fmt: ChatFormat, with_system: bool) -> bool:
    conversations = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
        [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "u2"},
            {"role": "assistant", "content": "a2"},
        ],
    ]
    for messages in conversations:
        if not with_system and messages[0]["role"] == "system":
            continue
        for generation in (True, False):
            if messages[-1]["role"] == "assistant" and generation:
                continue
            try:
                if _render(tokenizer, messages, generation) != fmt.render(messages, generation):
                    return False
            except _TEMPLATE_ERRORS:
                return False
    return True


def _go_literal(text: str) -> str:
    """Literal text inside a Go template: ``{{`` would open an action, so it is written as an action."""
    return text.replace("{{", '{{ "{{" }}')


def ollama_template(fmt: ChatFormat, bos_token: str | None = None) -> str:
    """A Go template for Ollama's ``.Messages`` equivalent to ``fmt`` (llama.cpp adds the BOS itself).

    No action trims whitespace (``{{-``): the literal pieces are exact, their newlines included.
    """
    start = fmt.start
    if bos_token and start.startswith(bos_token):
        start = start[len(bos_token) :]
    lit = {k: {r: _go_literal(v) for r, v in getattr(fmt, k).items()} for k in ("prefix", "suffix")}
    parts = [_go_literal(start)]
    if fmt.default_system is not None:
        parts.append(
            '{{ if not (and .Messages (eq (index .Messages 0).Role "system")) }}'
            + lit["prefix"]["system"]
            + "{{ .System }}"
            + lit["suffix"]["system"]
            + "{{ end }}"
        )
    parts.append("{{ range .Messages }}")
    for i, role in enumerate(_ROLES):
        keyword = "if" if i == 0 else "else if"
        parts.append(
            f'{{{{ {keyword} eq .Role "{role}" }}}}' + lit["prefix"][role] + "{{ .Content }}" + lit["suffix"][role]
        )
    parts.append("{{ end }}{{ end }}" + _go_literal(fmt.generation))
    return "".join(parts)


def _quote(text: str) -> str:
    return '"""' + text.replace('"""', '\\"\\"\\"') + '"""'


def stop_tokens(tokenizer: Any, fmt: ChatFormat | None) -> list[str]:
    """The end-of-sequence token and the special tokens that close a turn in ``fmt``."""
    stops = []
    eos = getattr(tokenizer, "eos_token", None)
    if eos:
        stops.append(eos)
    if fmt is not None:
        specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if t]
        specials += [t for t in getattr(tokenizer, "get_added_vocab", dict)() if t not in specials]
        for token in specials:
            if token in fmt.suffix["assistant"] and token not in stops:
                stops.append(token)
    return stops


def write_modelfile(path: str | os.PathLike, gguf_name: str, tokenizer: Any) -> Path:
    """Write an Ollama Modelfile at ``path`` for the GGUF file ``gguf_name`` (relative: it sits beside it)."""
    fmt = chat_format(tokenizer)
    lines = [f"FROM ./{gguf_name}", ""]
    if fmt is not None:
        lines.append(f"TEMPLATE {_quote(ollama_template(fmt, getattr(tokenizer, 'bos_token', None)))}")
        if fmt.default_system is not None:
            lines.append(f"SYSTEM {_quote(fmt.default_system)}")
    elif getattr(tokenizer, "chat_template", None):
        lines.append("# The chat template is not a fixed prefix/suffix format that fastft can translate to Ollama's")
        lines.append("# Go template; Ollama reads the chat template stored in the GGUF file's metadata instead.")
    for stop in stop_tokens(tokenizer, fmt):
        lines.append(f"PARAMETER stop {_quote(stop)}")
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(partial, path)
    return path
