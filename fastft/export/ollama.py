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

_ROLES = ("system", "user", "assistant")
_MARK = "\x00{}\x00"


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


def chat_format(tokenizer: Any) -> ChatFormat | None:
    """The concatenative form of ``tokenizer.chat_template``, or ``None`` when it is not one (see module doc)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marks = {role: _MARK.format(role.upper()) for role in _ROLES}
    try:
        full = _render(tokenizer, [{"role": r, "content": marks[r]} for r in _ROLES], True)
        bare = _render(tokenizer, [{"role": "user", "content": marks["user"]}], False)
        pieces = _split(full, [marks[r] for r in _ROLES])
        if pieces is None:
            return None
        before_sys, between_sys_user, between_user_asst, after_asst = pieces
        # the assistant's suffix and the generation prompt: render user + assistant + user, then the reply prompt
        two = _render(
            tokenizer,
            [{"role": "system", "content": marks["system"]}, {"role": "user", "content": marks["user"]},
             {"role": "assistant", "content": marks["assistant"]}, {"role": "user", "content": marks["user"]}],
            True,
        )
        tail = two.split(marks["assistant"], 1)[1]
        asst_suffix_and_user_prefix, after_user2 = tail.split(marks["user"], 1)
        no_gen = _render(tokenizer, [{"role": "system", "content": marks["system"]},
                                     {"role": "user", "content": marks["user"]}], False)
        user_suffix = no_gen.split(marks["user"], 1)[1]
        generation = after_user2[len(user_suffix):] if after_user2.startswith(user_suffix) else None
        if generation is None:
            return None
        user_prefix = None
        # between the system content and the user content: system suffix + user prefix; the user prefix is what
        # follows the assistant's suffix before the second user message, so find the common split
        for cut in range(len(asst_suffix_and_user_prefix) + 1):
            candidate = asst_suffix_and_user_prefix[cut:]
            if between_sys_user.endswith(candidate):
                user_prefix, asst_suffix = candidate, asst_suffix_and_user_prefix[:cut]
                break
        if user_prefix is None:
            return None
        sys_suffix = between_sys_user[: len(between_sys_user) - len(user_prefix)]
        asst_prefix = between_user_asst[len(user_suffix):] if between_user_asst.startswith(user_suffix) else None
        if asst_prefix is None or after_asst != asst_suffix + generation:
            return None
        # the system prefix, and what comes before it (a BOS): the bare render starts the same way
        start, sys_prefix = "", before_sys
        bare_head = bare.split(marks["user"], 1)[0]
        default_system = None
        if not bare_head.endswith(user_prefix):
            return None
        head = bare_head[: len(bare_head) - len(user_prefix)]
        if head and head.startswith(before_sys) is False and before_sys.startswith(head):
            start, sys_prefix = head, before_sys[len(head):]
        elif head.startswith(before_sys) and head.endswith(sys_suffix) and len(head) > len(before_sys) + len(sys_suffix):
            default_system = head[len(before_sys): len(head) - len(sys_suffix)]
        elif head != "" and head != before_sys:
            for cut in range(len(before_sys) + 1):
                if head == before_sys[:cut]:
                    start, sys_prefix = head, before_sys[cut:]
                    break
            else:
                return None
        elif head == before_sys and before_sys:
            # the template writes the same thing before any first message: it belongs to the start
            start, sys_prefix = head, ""
        fmt = ChatFormat(
            start=start,
            prefix={"system": sys_prefix, "user": user_prefix, "assistant": asst_prefix},
            suffix={"system": sys_suffix, "user": user_suffix, "assistant": asst_suffix},
            generation=generation,
            default_system=default_system,
        )
    except Exception:  # a template that cannot render sentinel messages: no derived TEMPLATE
        return None
    return fmt if _reproduces(tokenizer, fmt) else None


def _split(text: str, marks: list[str]) -> list[str] | None:
    pieces = []
    for mark in marks:
        if text.count(mark) != 1:
            return None
        head, text = text.split(mark, 1)
        pieces.append(head)
    pieces.append(text)
    return pieces


def _reproduces(tokenizer: Any, fmt: ChatFormat) -> bool:
    conversations = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
         {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}],
    ]
    for messages in conversations:
        for generation in (True, False):
            if messages[-1]["role"] == "assistant" and generation:
                continue
            try:
                if _render(tokenizer, messages, generation) != fmt.render(messages, generation):
                    return False
            except Exception:
                return False
    return True


def _go_literal(text: str) -> str:
    """Literal text inside a Go template: ``{{`` would open an action, so it is written as an action."""
    return text.replace("{{", '{{ "{{" }}')


def ollama_template(fmt: ChatFormat, bos_token: str | None = None) -> str:
    """A Go template for Ollama's ``.Messages`` equivalent to ``fmt`` (llama.cpp adds the BOS itself)."""
    start = fmt.start
    if bos_token and start.startswith(bos_token):
        start = start[len(bos_token):]
    lit = {k: {r: _go_literal(v) for r, v in getattr(fmt, k).items()} for k in ("prefix", "suffix")}
    parts = [_go_literal(start)]
    if fmt.default_system is not None:
        parts.append('{{- if not (and .Messages (eq (index .Messages 0).Role "system")) }}'
                     + lit["prefix"]["system"] + "{{ .System }}" + lit["suffix"]["system"] + "{{ end }}")
    parts.append("{{- range .Messages }}")
    for i, role in enumerate(_ROLES):
        keyword = "if" if i == 0 else "else if"
        parts.append(f'{{{{- {keyword} eq .Role "{role}" }}}}' + lit["prefix"][role] + "{{ .Content }}"
                     + lit["suffix"][role])
    parts.append("{{- end }}{{- end }}" + _go_literal(fmt.generation))
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
