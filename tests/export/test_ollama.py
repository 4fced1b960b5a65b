"""The Ollama Modelfile: the chat template's fixed pieces recovered by rendering it, and the Go template built
from them. A derived format must reproduce the Jinja template on conversations it was not derived from."""

from __future__ import annotations

import pytest

from fastft.export.ollama import chat_format, ollama_template, stop_tokens, write_modelfile
from tests.export.tokenizers_local import CHATML, GEMMA, byte_level, sentencepiece

SMOLLM = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris"},
    {"role": "user", "content": "And of Italy?"},
]


def _with_template(template: str, kind: str = "byte"):
    tokenizer = byte_level() if kind == "byte" else sentencepiece(kind)
    tokenizer.chat_template = template
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


@pytest.mark.parametrize("name", ["llama3", "chatml", "smollm", "gemma"])
def test_chat_format_reproduces_the_template(name):
    if name == "llama3":
        tokenizer = byte_level()  # the shipped tokenizer's Llama-3 template, which writes the BOS itself
    elif name == "gemma":
        tokenizer = sentencepiece("gemma")
        tokenizer.chat_template = GEMMA.replace("message['content'] | trim", "message['content']")
    else:
        tokenizer = _with_template(CHATML if name == "chatml" else SMOLLM)
    fmt = chat_format(tokenizer)
    assert fmt is not None, name
    for n in range(1, len(CONVERSATION) + 1):
        messages = CONVERSATION[:n] if n > 1 else CONVERSATION[1:2]
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert fmt.render(messages) == expected, name
    if name == "smollm":
        assert fmt.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    if name == "llama3":
        assert fmt.start == tokenizer.bos_token and fmt.suffix["assistant"] == "<|eot_id|>"


def test_template_with_content_branches_gets_no_wrong_template(tmp_path):
    tokenizer = _with_template(
        "{% for m in messages %}{% if m['content'] | length > 3 %}LONG{% endif %}{{ m['role'] }}: {{ m['content'] }}\n"
        "{% endfor %}"
    )
    assert chat_format(tokenizer) is None
    text = write_modelfile(tmp_path / "Modelfile", "x.gguf", tokenizer).read_text()
    assert "TEMPLATE" not in text and "metadata" in text and text.startswith("FROM ./x.gguf\n")


def test_modelfile_for_chatml(tmp_path):
    tokenizer = _with_template(CHATML)
    text = write_modelfile(tmp_path / "Modelfile", "m.Q8_0.gguf", tokenizer).read_text()
    fmt = chat_format(tokenizer)
    template = ollama_template(fmt, tokenizer.bos_token)
    assert text == (
        "FROM ./m.Q8_0.gguf\n\n"
        f'TEMPLATE """{template}"""\n'
        'PARAMETER stop """<|eot_id|>"""\n'
        'PARAMETER stop """<|im_end|>"""\n'
    )
    assert template == (
        '{{ range .Messages }}{{ if eq .Role "system" }}<|im_start|>system\n{{ .Content }}<|im_end|>\n'
        '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
        '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}<|im_end|>\n'
        "{{ end }}{{ end }}<|im_start|>assistant\n"
    )
    assert stop_tokens(tokenizer, fmt) == ["<|eot_id|>", "<|im_end|>"]


def _go_parse(tokens: list[str], i: int = 0) -> tuple[list, int, str | None]:
    """Parse the Go-template subset ``ollama_template`` emits into (nodes, next index, terminating action)."""
    nodes: list = []
    while i < len(tokens):
        token, i = tokens[i], i + 1
        if not token.startswith("{{"):
            nodes.append(("text", token))
            continue
        action = token[2:-2].strip()
        if action == "end" or action.startswith("else if "):
            return nodes, i, action
        if action == "range .Messages":
            body, i, end = _go_parse(tokens, i)
            assert end == "end"
            nodes.append(("range", body))
        elif action.startswith("if "):
            branches, condition = [], action[3:]
            while True:
                body, i, end = _go_parse(tokens, i)
                branches.append((condition, body))
                if end == "end":
                    break
                condition = end[len("else if ") :]
            nodes.append(("if", branches))
        else:
            assert action in (".Content", ".System"), action
            nodes.append(("var", action))
    return nodes, i, None


def _go_eval(nodes: list, messages: list[dict[str, str]], system: str, message: dict | None = None) -> str:
    out = []
    for kind, value in nodes:
        if kind == "text":
            out.append(value)
        elif kind == "var":
            out.append(message["content"] if value == ".Content" else system)
        elif kind == "range":
            out.extend(_go_eval(value, messages, system, m) for m in messages)
        else:
            for condition, body in value:
                if condition.startswith("eq .Role"):
                    holds = message["role"] == condition.split('"')[1]
                else:
                    assert condition == 'not (and .Messages (eq (index .Messages 0).Role "system"))', condition
                    holds = not (messages and messages[0]["role"] == "system")
                if holds:
                    out.append(_go_eval(body, messages, system, message))
                    break
    return "".join(out)


@pytest.mark.parametrize("name", ["llama3", "chatml", "smollm", "gemma"])
def test_ollama_template_renders_as_the_chat_template(name):
    """The Go template, evaluated with Go's rules (text verbatim, no trimming), gives what the Jinja template gives
    after the BOS that llama.cpp adds itself (and with the default system prompt Ollama passes as .System)."""
    import re

    if name == "llama3":
        tokenizer = byte_level()
    elif name == "gemma":
        tokenizer = sentencepiece("gemma")
    else:
        tokenizer = _with_template(CHATML if name == "chatml" else SMOLLM)
    fmt = chat_format(tokenizer)
    nodes, _, end = _go_parse(re.split(r"(\{\{.*?\}\})", ollama_template(fmt, tokenizer.bos_token)))
    assert end is None
    for n in range(1, len(CONVERSATION) + 1):
        messages = CONVERSATION[:n] if n > 1 else CONVERSATION[1:2]
        if name == "gemma" and messages[0]["role"] == "system":
            continue  # Gemma's template has no system turn
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if tokenizer.bos_token and expected.startswith(tokenizer.bos_token):
            expected = expected[len(tokenizer.bos_token) :]
        assert _go_eval(nodes, messages, fmt.default_system or "") == expected, (name, messages)
