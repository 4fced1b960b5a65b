"""Chat templates and conversation data helpers, under the names Unsloth's notebooks import.

``from fastft.chat_templates import get_chat_template, standardize_sharegpt, train_on_responses_only`` ports a
notebook that imported them from ``unsloth.chat_templates``:

- :func:`get_chat_template` gives a tokenizer one of the named Jinja templates below (``"llama-3.1"``,
  ``"chatml"``, ``"qwen-2.5"``, ``"gemma-3"``, ...; written for fastft, they render what each model family's own
  template renders for plain user/assistant/system turns), optionally reading ShareGPT keys (``from``/``value``,
  ``human``/``gpt``) through ``mapping``, and makes the template's end-of-turn token the tokenizer's eos;
- :func:`standardize_sharegpt` and :func:`standardize_data_formats` rewrite a dataset's conversations to the
  ``{"role", "content"}`` form ``apply_chat_template`` reads;
- :func:`train_on_responses_only` sets the labels of every token outside the assistant's replies to -100 in a
  TRL ``SFTTrainer``'s prepared datasets (one or many turns, packed or not), so the loss is taken on replies only.

Markers are found in the text, not as token ids: :func:`train_on_responses_only` matches ``response_part`` and
``instruction_part`` in the concatenation of the tokenizer's own token strings, so a marker is found even where the
tokenizer splits it differently in context than alone, and with a template whose header tokens are not special
tokens of this vocabulary (the Llama-3 template on a ChatML model).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CHAT_TEMPLATES",
    "apply_chat_template",
    "get_chat_template",
    "standardize_data_formats",
    "standardize_sharegpt",
    "to_sharegpt",
    "train_on_responses_only",
]


@dataclass(frozen=True)
class ChatTemplate:
    """A named template: its Jinja text, the token that ends a reply, and the markers of a user and a reply turn."""

    jinja: str
    stop_token: str | None  # None: the tokenizer's own eos ends a reply
    instruction_part: str
    response_part: str


# Every template renders the roles user / assistant / system; an unknown role raises, naming it (where the template
# names roles itself). Strings in Jinja
# literals use Jinja's escapes ('\n' is a newline), as Hugging Face's and llama.cpp's template engines both read.

_CHATML = r"""{%- for message in messages %}
{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"""

_QWEN25 = r"""{%- if messages[0]['role'] != 'system' %}
{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"""

_QWEN3 = r"""{%- for message in messages %}
{%- set content = message['content'] %}
{%- if message['role'] == 'assistant' and '</think>' in content %}
{%- set content = content.split('</think>')[-1].lstrip('\n') %}
{%- endif %}
{{- '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}
{%- endif %}"""

_LLAMA3 = r"""{{- bos_token }}
{%- for message in messages %}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"""

_LLAMA31 = r"""{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
{%- set system_message = messages[0]['content'] | trim %}
{%- set loop_messages = messages[1:] %}
{%- else %}
{%- set system_message = '' %}
{%- set loop_messages = messages %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 July 2024\n\n' }}
{{- system_message + '<|eot_id|>' }}
{%- for message in loop_messages %}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"""

# Gemma has no system turn: a system message opens the first user turn. Gemma-3 notebooks pass content as a list of
# {"type": "text", "text": ...} parts; their texts are joined.
_GEMMA3 = r"""{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
{%- set first_prefix = messages[0]['content'] + '\n\n' %}
{%- set loop_messages = messages[1:] %}
{%- else %}
{%- set first_prefix = '' %}
{%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
{%- if message['content'] is string %}
{%- set content = message['content'] %}
{%- else %}
{%- set content = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}
{%- endif %}
{%- if message['role'] == 'user' %}{%- set role = 'user' %}
{%- elif message['role'] == 'assistant' %}{%- set role = 'model' %}
{%- else %}{{- raise_exception('unexpected role ' + message['role'] + ': expected user, assistant or system') }}{%- endif %}
{{- '<start_of_turn>' + role + '\n' + (first_prefix if loop.first else '') + content | trim + '<end_of_turn>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<start_of_turn>model\n' }}{%- endif %}"""

_MISTRAL = r"""{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
{%- set first_prefix = messages[0]['content'] + '\n\n' %}
{%- set loop_messages = messages[1:] %}
{%- else %}
{%- set first_prefix = '' %}
{%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
{%- if message['role'] == 'user' %}
{{- '[INST] ' + (first_prefix if loop.first else '') + message['content'] + ' [/INST]' }}
{%- elif message['role'] == 'assistant' %}
{{- message['content'] + eos_token }}
{%- else %}{{- raise_exception('unexpected role ' + message['role'] + ': expected user, assistant or system') }}{%- endif %}
{%- endfor %}"""

_PHI3 = r"""{%- for message in messages %}
{{- '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- endif %}"""

_PHI4 = r"""{%- for message in messages %}
{{- '<|im_start|>' + message['role'] + '<|im_sep|>' + message['content'] + '<|im_end|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant<|im_sep|>' }}{%- endif %}"""

_ZEPHYR = r"""{%- for message in messages %}
{{- '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- endif %}"""

_VICUNA = r"""{%- if messages[0]['role'] == 'system' %}
{{- messages[0]['content'] + ' ' }}
{%- set loop_messages = messages[1:] %}
{%- else %}
{{- 'A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user\'s questions. ' }}
{%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
{%- if message['role'] == 'user' %}{{- 'USER: ' + message['content'] + ' ' }}
{%- elif message['role'] == 'assistant' %}{{- 'ASSISTANT: ' + message['content'] + eos_token }}
{%- else %}{{- raise_exception('unexpected role ' + message['role'] + ': expected user, assistant or system') }}{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- 'ASSISTANT:' }}{%- endif %}"""

_ALPACA = r"""{%- if messages[0]['role'] == 'system' %}
{{- messages[0]['content'] + '\n\n' }}
{%- set loop_messages = messages[1:] %}
{%- else %}
{{- 'Below are some instructions that describe some tasks. Write responses that appropriately complete each request.\n\n' }}
{%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
{%- if message['role'] == 'user' %}{{- '### Instruction:\n' + message['content'] + '\n\n' }}
{%- elif message['role'] == 'assistant' %}{{- '### Response:\n' + message['content'] + eos_token + '\n\n' }}
{%- else %}{{- raise_exception('unexpected role ' + message['role'] + ': expected user, assistant or system') }}{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '### Response:\n' }}{%- endif %}"""

_LLAMA3_PARTS = ("<|start_header_id|>user<|end_header_id|>\n\n", "<|start_header_id|>assistant<|end_header_id|>\n\n")
_CHATML_PARTS = ("<|im_start|>user\n", "<|im_start|>assistant\n")

_TEMPLATES = {
    "chatml": ChatTemplate(_CHATML, "<|im_end|>", *_CHATML_PARTS),
    "qwen-2.5": ChatTemplate(_QWEN25, "<|im_end|>", *_CHATML_PARTS),
    "qwen3": ChatTemplate(_QWEN3, "<|im_end|>", *_CHATML_PARTS),
    "llama-3": ChatTemplate(_LLAMA3, "<|eot_id|>", *_LLAMA3_PARTS),
    "llama-3.1": ChatTemplate(_LLAMA31, "<|eot_id|>", *_LLAMA3_PARTS),
    "gemma-3": ChatTemplate(_GEMMA3, "<end_of_turn>", "<start_of_turn>user\n", "<start_of_turn>model\n"),
    "mistral": ChatTemplate(_MISTRAL, None, "[INST] ", " [/INST]"),
    "phi-3": ChatTemplate(_PHI3, "<|end|>", "<|user|>\n", "<|assistant|>\n"),
    "phi-4": ChatTemplate(_PHI4, "<|im_end|>", "<|im_start|>user<|im_sep|>", "<|im_start|>assistant<|im_sep|>"),
    "zephyr": ChatTemplate(_ZEPHYR, None, "<|user|>\n", "<|assistant|>\n"),
    "vicuna": ChatTemplate(_VICUNA, None, "USER: ", "ASSISTANT: "),
    "alpaca": ChatTemplate(_ALPACA, None, "### Instruction:\n", "### Response:\n"),
}
# The other spellings Unsloth's notebooks use for the same templates.
_ALIASES = {
    "unsloth/chatml": "chatml",
    "qwen2.5": "qwen-2.5",
    "qwen-25": "qwen-2.5",
    "qwen25": "qwen-2.5",
    "qwen-3": "qwen3",
    "llama3": "llama-3",
    "llama-31": "llama-3.1",
    "llama3.1": "llama-3.1",
    "llama-3.2": "llama-3.1",
    "llama-32": "llama-3.1",
    "llama-3.3": "llama-3.1",
    "llama-33": "llama-3.1",
    "gemma3": "gemma-3",
    "gemma-3n": "gemma-3",
    "gemma": "gemma-3",
    "gemma2": "gemma-3",
    "gemma-2": "gemma-3",
    "phi-35": "phi-3",
    "phi-3.5": "phi-3",
    "phi3": "phi-3",
    "phi4": "phi-4",
    "mistral-7b": "mistral",
}
CHAT_TEMPLATES: tuple[str, ...] = tuple(sorted([*_TEMPLATES, *_ALIASES]))
"""Every name :func:`get_chat_template` accepts."""

_DEFAULT_MAPPING = {"role": "role", "content": "content", "user": "user", "assistant": "assistant"}


def _template(name: str) -> ChatTemplate:
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in _TEMPLATES:
        raise ValueError(
            f"chat_template={name!r} is not a template fastft knows; valid names: {', '.join(CHAT_TEMPLATES)}; or pass "
            "(jinja_text, stop_token) for a template of your own"
        )
    return _TEMPLATES[key]


def _with_mapping(jinja: str, mapping: dict[str, str]) -> str:
    """``jinja`` preceded by a rewrite of ``messages`` from the mapped keys and role names to role/content."""
    unknown = sorted(set(mapping) - {"role", "content", "user", "assistant", "system"})
    if unknown:
        raise ValueError(
            f"mapping has keys {unknown}; its keys are role, content, user, assistant (and system): e.g. "
            "{'role': 'from', 'content': 'value', 'user': 'human', 'assistant': 'gpt'}"
        )
    full = {**_DEFAULT_MAPPING, "system": "system", **mapping}
    if full == {**_DEFAULT_MAPPING, "system": "system"}:
        return jinja
    roles = {full["user"]: "user", full["assistant"]: "assistant", full["system"]: "system"}
    prelude = (
        "{%- set ns = namespace(messages=[]) %}\n"
        "{%- for m in messages %}\n"
        f"{{%- set ns.messages = ns.messages + [{{'role': {roles!r}.get(m[{full['role']!r}], m[{full['role']!r}]), "
        f"'content': m[{full['content']!r}]}}] %}}\n"
        "{%- endfor %}\n"
        "{%- set messages = ns.messages %}\n"
    )
    return prelude + jinja


def get_chat_template(
    tokenizer: Any,
    chat_template: str | tuple[str, str] = "chatml",
    mapping: dict[str, str] | None = None,
    map_eos_token: bool = True,
    system_message: str | None = None,
) -> Any:
    """Give ``tokenizer`` a named chat template (see :data:`CHAT_TEMPLATES`) and return it (changed in place).

    ``chat_template`` is a name (``"llama-3.1"``, ``"chatml"``, ``"qwen-2.5"``, ``"gemma-3"``, ``"phi-4"``,
    ``"alpaca"``, ...) or a pair ``(jinja_text, stop_token)``. ``mapping`` says which keys and role names the
    conversations use, e.g. ShareGPT's ``{"role": "from", "content": "value", "user": "human", "assistant":
    "gpt"}``; the template then reads them directly. ``map_eos_token=True`` makes the token that ends a reply
    in this template (``<|eot_id|>``, ``<|im_end|>``, ...) the tokenizer's eos, so generation stops there; a
    template whose tokens are not in the vocabulary (the Llama-3 template on a ChatML model) still works, its
    header tokens tokenized as text, and is warned about. ``system_message`` replaces the template's default
    system prompt where it has one (alpaca, vicuna, qwen-2.5).
    """
    if isinstance(chat_template, tuple):
        if len(chat_template) != 2 or not all(isinstance(x, str) for x in chat_template):
            raise ValueError("chat_template as a tuple is (jinja_text, stop_token), two strings")
        jinja, stop_token = chat_template
        name = None
    elif isinstance(chat_template, str):
        template = _template(chat_template)
        jinja, stop_token, name = template.jinja, template.stop_token, chat_template
    else:
        raise TypeError(f"chat_template must be a template name or (jinja_text, stop_token), got {chat_template!r}")
    if system_message is not None:
        defaults = (
            "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
            (
                "Below are some instructions that describe some tasks. Write responses that appropriately complete "
                "each request."
            ),
            (
                "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                "helpful, detailed, and polite answers to the user\\'s questions."
            ),
        )
        found = [d for d in defaults if d in jinja]
        if not found:
            raise ValueError(
                f"system_message: the {chat_template!r} template has no default system prompt to replace; pass a "
                "system message in the conversation instead"
            )
        jinja = jinja.replace(found[0], system_message.replace("\\", "\\\\").replace("'", "\\'"))
    tokenizer.chat_template = _with_mapping(jinja, dict(mapping or {}))
    vocab = tokenizer.get_vocab()
    missing = [t for t in _template_tokens(jinja) if t not in vocab]
    if missing:
        warnings.warn(
            f"chat_template={name or 'custom'!r}: {missing} are not tokens of this tokenizer's vocabulary; they are "
            "tokenized as plain text (training still learns them, but they cost several tokens each). A template of "
            "the model's own family avoids that",
            UserWarning,
            stacklevel=2,
        )
    if map_eos_token and stop_token is not None:
        if stop_token in vocab:
            tokenizer.eos_token = stop_token
        else:
            warnings.warn(
                f"map_eos_token: {stop_token!r}, which ends a reply in this template, is not a token of this "
                f"vocabulary, so eos stays {tokenizer.eos_token!r}; generation will not stop at the end of a reply "
                "by itself (pass stop_strings to generate, or use the model family's template)",
                UserWarning,
                stacklevel=2,
            )
    tokenizer._fastft_chat_template = name and _ALIASES.get(name.lower(), name.lower())
    return tokenizer


def _template_tokens(jinja: str) -> list[str]:
    """The special-token-like pieces (``<|...|>``, ``<start_of_turn>``, ``[INST]``) a template writes literally."""
    import re

    pieces = re.findall(r"<\|[a-z_]+\|>|<(?:start|end)_of_turn>", jinja)
    return list(dict.fromkeys(pieces))


# ------------------------------------------------------------------------------------------------ datasets


_SYSTEM_ALIASES = ("system",)
_USER_ALIASES = ("user", "human", "input")
_ASSISTANT_ALIASES = ("gpt", "assistant", "output", "model", "bot")
_CONVERSATION_COLUMNS = ("conversations", "messages", "conversation", "chat", "dialog")


def _role_table(system: Iterable[str], user: Iterable[str], assistant: Iterable[str]) -> dict[str, str]:
    table = {}
    for role, aliases in (("system", system), ("user", user), ("assistant", assistant)):
        for alias in aliases:
            table[alias] = role
    return table


def _conversation_column(columns: list[str], rows: dict[str, list]) -> str | None:
    for name in [*_CONVERSATION_COLUMNS, *columns]:
        values = rows.get(name)
        if values and isinstance(values[0], list) and values[0] and isinstance(values[0][0], dict):
            return name
    return None


def _standard_turns(turns: list[dict], roles: dict[str, str], where: str) -> list[dict[str, str]]:
    out = []
    for turn in turns:
        role_key = "role" if "role" in turn else "from" if "from" in turn else None
        content_key = "content" if "content" in turn else "value" if "value" in turn else None
        if role_key is None or content_key is None:
            raise ValueError(
                f"{where}: a turn {sorted(turn)} has neither role/content nor from/value keys (ShareGPT's); "
                "rename its keys to one of those pairs"
            )
        role = turn[role_key]
        if role not in roles:
            raise ValueError(
                f"{where}: role {role!r} is not a known alias of system/user/assistant ({sorted(roles)}); pass it "
                "in aliases_for_user / aliases_for_assistant / aliases_for_system"
            )
        out.append({"role": roles[role], "content": turn[content_key]})
    return out


def _map_dataset(dataset: Any, function: Callable[[dict], dict], remove: list[str] | None, num_proc: int | None):
    """``dataset.map(function, batched=True)`` for a ``datasets`` Dataset / DatasetDict / IterableDataset."""
    if hasattr(dataset, "map"):
        kwargs = {"batched": True, "remove_columns": remove}
        if num_proc is not None:
            kwargs["num_proc"] = num_proc
        return dataset.map(function, **kwargs)
    raise TypeError(f"expected a datasets Dataset, DatasetDict or IterableDataset, got {type(dataset).__name__}")


def _columns(dataset: Any) -> list[str]:
    names = dataset.column_names
    if isinstance(names, dict):  # DatasetDict: the columns of its first split
        names = next(iter(names.values()))
    return list(names or [])


def standardize_sharegpt(
    dataset: Any,
    aliases_for_system: Iterable[str] = _SYSTEM_ALIASES,
    aliases_for_user: Iterable[str] = _USER_ALIASES,
    aliases_for_assistant: Iterable[str] = _ASSISTANT_ALIASES,
    num_proc: int | None = None,
) -> Any:
    """Rewrite ShareGPT conversations (``{"from": "human", "value": ...}``) as ``{"role": "user", "content": ...}``.

    The conversation column (``conversations``, ``messages``, ... or the first column holding lists of dicts) keeps
    its name; role names are mapped through the aliases (human/user/input -> user, gpt/assistant/output/model ->
    assistant, system). Turns already in role/content form pass through. Returns a new dataset.
    """
    roles = _role_table(aliases_for_system, aliases_for_user, aliases_for_assistant)
    columns = _columns(dataset)
    column = _conversation_column(columns, _first_rows(dataset))
    if column is None:
        raise ValueError(
            f"standardize_sharegpt: no column of {columns} holds conversations (lists of turns with from/value or "
            "role/content keys); for instruction/output columns use standardize_data_formats"
        )

    def convert(batch: dict) -> dict:
        return {column: [_standard_turns(turns, roles, f"column {column!r}") for turns in batch[column]]}

    return _map_dataset(dataset, convert, None, num_proc)


def _first_split(dataset: Any) -> Any:
    if hasattr(dataset, "keys") and not hasattr(dataset, "column_names"):
        return None
    if isinstance(dataset.column_names, dict):
        return dataset[next(iter(dataset.keys()))]
    return dataset


def _first_rows(dataset: Any) -> dict[str, list]:
    split = _first_split(dataset)
    if split is None:
        return {}
    if hasattr(split, "take") and not hasattr(split, "__len__"):  # IterableDataset
        rows = list(split.take(1))
        return {k: [r[k] for r in rows] for k in (rows[0] if rows else {})}
    return split[:1]


_INSTRUCTION_COLUMNS = ("instruction", "prompt", "question", "query", "problem")
_INPUT_COLUMNS = ("input", "context")
_OUTPUT_COLUMNS = ("output", "response", "completion", "answer", "solution")


def standardize_data_formats(
    dataset: Any,
    tokenizer: Any = None,
    aliases_for_system: Iterable[str] = _SYSTEM_ALIASES,
    aliases_for_user: Iterable[str] = _USER_ALIASES,
    aliases_for_assistant: Iterable[str] = _ASSISTANT_ALIASES,
    num_proc: int | None = None,
) -> Any:
    """Bring a dataset to one ``conversations`` column of role/content turns, whatever common form it is in.

    ShareGPT or role/content conversations (any conversation column) are standardized as by
    :func:`standardize_sharegpt`, under the name ``conversations``; instruction data (``instruction`` [+ ``input``]
    + ``output`` columns, or ``prompt``/``completion``, ``question``/``answer``) become a user turn (instruction, a
    blank line, input) and an assistant turn. Other columns are kept. ``tokenizer`` is accepted for Unsloth's
    signature and not needed.
    """
    del tokenizer
    roles = _role_table(aliases_for_system, aliases_for_user, aliases_for_assistant)
    columns = _columns(dataset)
    rows = _first_rows(dataset)
    column = _conversation_column(columns, rows)
    if column is not None:

        def convert(batch: dict) -> dict:
            return {"conversations": [_standard_turns(t, roles, f"column {column!r}") for t in batch[column]]}

        return _map_dataset(dataset, convert, [column] if column != "conversations" else None, num_proc)
    instruction = next((c for c in _INSTRUCTION_COLUMNS if c in columns), None)
    output = next((c for c in _OUTPUT_COLUMNS if c in columns), None)
    extra = next((c for c in _INPUT_COLUMNS if c in columns), None)
    if instruction is None or output is None:
        raise ValueError(
            f"standardize_data_formats: the columns {columns} are neither conversations (lists of from/value or "
            f"role/content turns) nor instruction data (one of {_INSTRUCTION_COLUMNS} and one of {_OUTPUT_COLUMNS})"
        )

    def convert_instruction(batch: dict) -> dict:
        conversations = []
        for i, prompt in enumerate(batch[instruction]):
            text = prompt if not extra or not batch[extra][i] else f"{prompt}\n\n{batch[extra][i]}"
            conversations.append(
                [{"role": "user", "content": text}, {"role": "assistant", "content": batch[output][i]}]
            )
        return {"conversations": conversations}

    return _map_dataset(dataset, convert_instruction, None, num_proc)


def _fill(template: str, row: dict, where: str) -> str:
    """``template`` with ``{column}`` replaced by the row's value; a ``[[...]]`` part is dropped if a column in it is
    empty (None or blank)."""
    import re

    def value(name: str) -> str:
        if name not in row:
            raise ValueError(f"{where}: {{{name}}} names no column; the columns are {sorted(row)}")
        return "" if row[name] is None else str(row[name])

    def optional(match: re.Match) -> str:
        names = re.findall(r"\{(\w+)\}", match.group(1))
        if any(not value(name).strip() for name in names):
            return ""
        return re.sub(r"\{(\w+)\}", lambda m: value(m.group(1)), match.group(1))

    text = re.sub(r"\[\[(.*?)\]\]", optional, template, flags=re.DOTALL)
    return re.sub(r"\{(\w+)\}", lambda m: value(m.group(1)), text)


def to_sharegpt(
    dataset: Any,
    merged_prompt: str = "",
    merged_column_name: str = "instruction",
    output_column_name: str = "output",
    remove_unused_columns: bool = True,
    conversation_extension: int = 1,
    random_state: int = 3407,
) -> Any:
    """Turn instruction data into ShareGPT ``conversations`` (human, gpt turns), as Unsloth's function of the name.

    ``merged_prompt`` builds the human turn from columns: ``"{instruction}[[\\nYour input is:\\n{input}]]"``
    writes the ``instruction`` column, then the part in ``[[...]]`` only where ``input`` is not empty. Without it
    the ``merged_column_name`` column is the human turn; the ``output_column_name`` column is the reply.
    ``conversation_extension=n`` appends the exchanges of n - 1 other rows, drawn with ``random_state``, so each
    conversation has n exchanges. ``remove_unused_columns`` keeps only ``conversations``. Returns a new dataset.
    """
    import random

    from datasets import Dataset

    if not isinstance(conversation_extension, int) or conversation_extension < 1:
        raise ValueError(f"conversation_extension must be a positive int, got {conversation_extension!r}")
    rows = dataset.to_list() if hasattr(dataset, "to_list") else list(dataset)
    if rows and output_column_name not in rows[0]:
        raise ValueError(f"output_column_name={output_column_name!r} is not a column of {sorted(rows[0])}")
    prompt = merged_prompt or "{" + merged_column_name + "}"
    exchanges = [
        [{"from": "human", "value": _fill(prompt, row, "to_sharegpt merged_prompt")},
         {"from": "gpt", "value": str(row[output_column_name])}]
        for row in rows
    ]  # fmt: skip
    rng = random.Random(random_state)
    out = []
    for i, row in enumerate(rows):
        turns = list(exchanges[i])
        for _ in range(conversation_extension - 1):  # another row's exchange (itself only in a one-row dataset)
            j = rng.randrange(len(rows) - 1) if len(rows) > 1 else 0
            turns += exchanges[j + (j >= i) if len(rows) > 1 else 0]
        out.append({"conversations": turns} if remove_unused_columns else {**row, "conversations": turns})
    return Dataset.from_list(out)


def _template_from_text(chat_template: str, default_system_message: str | None) -> str:
    """A Jinja chat template from Unsloth's text form with ``{INPUT}``, ``{OUTPUT}`` and optionally ``{SYSTEM}``.

    The text before ``{INPUT}`` is a preamble written once (up to the line holding ``{SYSTEM}``, or else up to the
    last blank line, which is then the default system message a system turn replaces) and a header that opens every
    user turn (the rest), the text between ``{INPUT}`` and ``{OUTPUT}`` follows every user turn (so a prompt ends
    ready for the reply), and a reply ends with the text after ``{OUTPUT}`` and eos; exchanges are separated by a
    blank line.
    """
    if chat_template.count("{INPUT}") != 1 or chat_template.count("{OUTPUT}") != 1:
        raise ValueError(
            "chat_template must hold {INPUT} and {OUTPUT} once each (and optionally {SYSTEM}), e.g. "
            "'### Instruction:\\n{INPUT}\\n\\n### Response:\\n{OUTPUT}'"
        )
    before, rest = chat_template.split("{INPUT}")
    between, after = rest.split("{OUTPUT}")
    if "{SYSTEM}" in between or "{SYSTEM}" in after:
        raise ValueError("chat_template: {SYSTEM} must come before {INPUT}")
    if "{SYSTEM}" in before:  # the preamble ends with the line that holds {SYSTEM} (and blank lines after it)
        end = before.find("\n", before.index("{SYSTEM}"))
        end = len(before) if end == -1 else len(before) - len(before[end:].lstrip("\n"))
    else:  # the preamble is all before the last blank line
        cut = before.rfind("\n\n")
        end = 0 if cut == -1 else cut + 2
    preamble, user_header = before[:end], before[end:]
    if "{SYSTEM}" in preamble:
        system_head, system_tail = preamble.split("{SYSTEM}")
        system = default_system_message or ""
    else:  # the preamble itself is the default system message; a system turn replaces it
        system_head, system = "", preamble.rstrip("\n")
        system_tail = preamble[len(system) :] or "\n\n"
        system = default_system_message if default_system_message is not None else system
    return (
        "{%- if messages and messages[0]['role'] == 'system' %}\n"
        "{%- set system_message = messages[0]['content'] %}\n{%- set loop_messages = messages[1:] %}\n"
        f"{{%- else %}}\n{{%- set system_message = {system!r} %}}\n{{%- set loop_messages = messages %}}\n"
        "{%- endif %}\n"
        f"{{%- if system_message %}}{{{{- {system_head!r} + system_message + {system_tail!r} }}}}{{%- endif %}}\n"
        "{%- for message in loop_messages %}\n"
        f"{{%- if message['role'] == 'user' %}}{{{{- {user_header!r} + message['content'] + {between!r} }}}}\n"
        f"{{%- elif message['role'] == 'assistant' %}}{{{{- message['content'] + {after!r} + eos_token"
        " + ('\\n\\n' if not loop.last else '') }}\n"
        "{%- else %}{{- raise_exception('unexpected role ' + message['role'] + ': expected user, assistant or "
        "system') }}{%- endif %}\n"
        "{%- endfor %}"
    )


def apply_chat_template(
    dataset: Any,
    tokenizer: Any = None,
    chat_template: str = "",
    default_system_message: str | None = None,
    num_proc: int | None = None,
) -> Any:
    """Give ``tokenizer`` the template written in ``chat_template``'s text form and render ``dataset`` with it.

    ``chat_template`` is plain text with ``{INPUT}`` (a user turn), ``{OUTPUT}`` (a reply) and optionally
    ``{SYSTEM}`` (the system message, else ``default_system_message``), as in Unsloth's Ollama notebook; a
    multi-turn conversation repeats the turn part. The tokenizer's ``chat_template`` becomes the equivalent Jinja
    template (so ``tokenizer.apply_chat_template`` and a GGUF / Ollama export use it), and a ``text`` column with
    every conversation rendered (each reply ending with eos) is added to the dataset (standardized conversations:
    see :func:`standardize_sharegpt`). Returns the new dataset.
    """
    if tokenizer is None:
        raise ValueError("apply_chat_template needs tokenizer=...")
    tokenizer.chat_template = _template_from_text(chat_template, default_system_message)
    tokenizer._fastft_chat_template = None
    column = _conversation_column(_columns(dataset), _first_rows(dataset))
    if column is None:
        raise ValueError("apply_chat_template: the dataset has no conversations column; use to_sharegpt first")

    def render(batch: dict) -> dict:
        return {"text": [tokenizer.apply_chat_template(c, tokenize=False) for c in batch[column]]}

    return _map_dataset(dataset, render, None, num_proc)


# ------------------------------------------------------------------------------------------------ responses only


def _token_texts(tokenizer: Any, ids: list[int]) -> list[str]:
    """The tokenizer's own string of each token (byte-level 'Ġ'/'Ċ', SentencePiece '▁', '<0x0A>', specials)."""
    return tokenizer.convert_ids_to_tokens(ids)


def _marker_text(tokenizer: Any, marker: str) -> str:
    """``marker`` as the concatenation of its token strings; a SentencePiece word-start mark it gains alone dropped."""
    ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
    text = "".join(_token_texts(tokenizer, ids))
    if text.startswith("\u2581") and not marker.startswith(" "):  # SentencePiece's dummy prefix, absent in context
        text = text[1:]
    return text


def _find_all(haystack: str, needle: str) -> list[int]:
    found, start = [], haystack.find(needle)
    while start != -1:
        found.append(start)
        start = haystack.find(needle, start + 1)
    return found


def _response_mask(texts: list[str], instruction: str, response: str) -> list[bool]:
    """Per token: does it lie in a reply, from after a ``response`` marker to the start of the next ``instruction``?

    Positions are characters of ``"".join(texts)``. A token is in a reply when it ends after the response marker's
    end and starts before the next instruction marker's start, so a token the tokenizer merged across the marker's
    end (a reply's first characters) counts as reply.
    """
    joined = "".join(texts)
    starts, position = [], 0
    for text in texts:
        starts.append(position)
        position += len(text)
    ends = starts[1:] + [position]
    responses = [p + len(response) for p in _find_all(joined, response)]
    instructions = _find_all(joined, instruction)
    spans = []
    for begin in responses:
        if spans and begin < spans[-1][1]:
            continue  # a response marker inside a reply: the reply already runs to the next instruction
        end = next((p for p in instructions if p >= begin), position)
        spans.append((begin, end))
    mask = []
    for start, end in zip(starts, ends, strict=True):
        mask.append(any(end > b and start < e for b, e in spans))
    return mask


def _relabel(example: dict, tokenizer: Any, instruction: str, response: str) -> dict:
    ids = example["input_ids"]
    labels = example["labels"] if example.get("labels") is not None else list(ids)
    lengths = example.get("seq_lengths") or [len(ids)]  # a packed row: each document its own conversation
    out, offset = [], 0
    for length in lengths:
        mask = _response_mask(_token_texts(tokenizer, ids[offset : offset + length]), instruction, response)
        out.extend(label if keep else -100 for label, keep in zip(labels[offset : offset + length], mask, strict=True))
        offset += length
    out.extend([-100] * (len(ids) - offset))
    return {"labels": out}


def train_on_responses_only(
    trainer: Any,
    instruction_part: str | None = None,
    response_part: str | None = None,
    num_proc: int | None = None,
    tokenizer: Any = None,
) -> Any:
    """Take the loss on the assistant's replies only: labels outside them become -100 in ``trainer``'s datasets.

    ``trainer`` is a TRL ``SFTTrainer`` (or any ``transformers.Trainer`` whose datasets hold ``input_ids``):
    its prepared train and eval datasets get a ``labels`` column in which each token from the end of a
    ``response_part`` (e.g. ``"<|start_header_id|>assistant<|end_header_id|>\\n\\n"``) up to the start of the next
    ``instruction_part`` (``"<|start_header_id|>user<|end_header_id|>\\n\\n"``) or the end of the conversation keeps
    its label, every other token gets -100; labels already -100 (TRL's completion or assistant masks) stay so. Every
    turn of a multi-turn conversation counts. Packed rows (``SFTConfig(packing=True)``, the default ``"bfd"``
    strategy) are relabelled conversation by conversation from their ``seq_lengths``; the ``"wrapped"`` and
    ``"bfd_split"`` strategies cut conversations, so a reply's start may lie in another row, and are refused. The
    parts default to those of the template :func:`get_chat_template` gave the tokenizer. A dataset in which no
    response marker occurs is an error (the markers do not match the template). Returns ``trainer``.
    """
    tokenizer = tokenizer or getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor's text tokenizer
    if tokenizer is None:
        raise ValueError("train_on_responses_only: the trainer has no processing_class; pass tokenizer=...")
    if instruction_part is None or response_part is None:
        name = getattr(tokenizer, "_fastft_chat_template", None)
        if name is None:
            raise ValueError(
                "train_on_responses_only: pass instruction_part and response_part, the text that opens a user turn "
                "and a reply in your chat template (e.g. '<|im_start|>user\\n' and '<|im_start|>assistant\\n'); "
                "they are found by themselves only for templates set by get_chat_template"
            )
        template = _TEMPLATES[name]
        instruction_part = instruction_part or template.instruction_part
        response_part = response_part or template.response_part
    args = getattr(trainer, "args", None)
    if getattr(args, "packing", False) and getattr(args, "packing_strategy", "bfd") != "bfd":
        raise ValueError(
            f"train_on_responses_only: packing_strategy={args.packing_strategy!r} cuts conversations across rows, so a "
            "reply's start can lie in another row; use SFTConfig(packing=True, packing_strategy='bfd') (the default) "
            "or packing=False"
        )
    instruction = _marker_text(tokenizer, instruction_part)
    response = _marker_text(tokenizer, response_part)

    def relabel(dataset: Any, name: str) -> Any:
        columns = _columns(dataset)
        if "input_ids" not in columns:
            raise ValueError(
                f"train_on_responses_only: the trainer's {name} dataset has no input_ids (columns {columns}); build "
                "the trainer first (SFTTrainer tokenizes its datasets), then call train_on_responses_only(trainer)"
            )
        kwargs = {"fn_kwargs": {"tokenizer": tokenizer, "instruction": instruction, "response": response}}
        if num_proc is not None:
            kwargs["num_proc"] = num_proc
        relabelled = dataset.map(_relabel, **kwargs)
        countable = hasattr(relabelled, "__len__") and len(relabelled) and not hasattr(relabelled, "keys")
        if countable and all(all(x == -100 for x in row) for row in relabelled["labels"]):
            raise ValueError(
                f"train_on_responses_only: response_part={response_part!r} occurs in no row of the {name} "
                "dataset, so every label would be -100; pass the text your chat template writes before a reply "
                "(see tokenizer.apply_chat_template of one conversation)"
            )
        return relabelled

    if getattr(trainer, "train_dataset", None) is not None:
        trainer.train_dataset = relabel(trainer.train_dataset, "train")
    eval_dataset = getattr(trainer, "eval_dataset", None)
    if isinstance(eval_dataset, dict):
        trainer.eval_dataset = {k: relabel(v, f"eval {k!r}") for k, v in eval_dataset.items()}
    elif eval_dataset is not None:
        trainer.eval_dataset = relabel(eval_dataset, "eval")
    return trainer
