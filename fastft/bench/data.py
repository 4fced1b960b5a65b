"""Training batches for ``fastft bench``: instruction examples formatted, tokenised, masked and padded once.

Every contender trains on the list :func:`make_batches` returns, so all see the same tokens in the same order.
An example is rendered with the tokenizer's chat template when it has one (the embedded tokenizer's is
Llama-3-Instruct's: a user turn, then the assistant turn); a tokenizer without a template gets
``prompt + "\\n"`` (with the tokenizer's own bos, if it adds one) followed by ``response + eos``. The prompt part
(everything up to and including the assistant header) is labelled -100, so the loss is over the response and its
end-of-turn token only, as supervised fine-tuning on completions does. Rows are padded on the right to
``seq_len`` (fixed shapes: every step does the same work) and padding is labelled -100 with attention mask 0.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

IGNORE_INDEX = -100  # transformers' (and torch's cross_entropy's) ignore_index


def _positive(name: str, value: object, least: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < least:
        raise ValueError(f"{name}={value} must be at least {least}")
    return value


def _encode(tokenizer: Any, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of one example; their concatenation is the training sequence.

    The two parts are tokenised separately, so the boundary between them is exact (a merge across it cannot hide
    the first response token in the prompt's labels).
    """
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": prompt}]
        head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": response}], tokenize=False)
        if not full.startswith(head):
            raise ValueError(
                "the tokenizer's chat template renders the conversation with a different prefix than the prompt "
                "alone, so the prompt tokens cannot be masked; set tokenizer.chat_template = None to use the plain "
                "'prompt\\nresponse<eos>' format"
            )
        # The template writes bos and the turn markers as text: no special tokens added on top.
        return (
            tokenizer(head, add_special_tokens=False)["input_ids"],
            tokenizer(full[len(head) :], add_special_tokens=False)["input_ids"],
        )
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither a chat template nor an eos token; set tokenizer.eos_token")
    return (
        tokenizer(prompt + "\n")["input_ids"],  # the tokenizer's own bos, where it adds one
        tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id],
    )


def make_batches(
    tokenizer: Any,
    examples: Sequence[dict[str, str]],
    *,
    seq_len: int,
    batch_size: int,
    steps: int,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """``steps`` batches of ``batch_size`` examples, each a dict of ``input_ids``, ``attention_mask`` and
    ``labels``: int64 CPU tensors of shape ``(batch_size, seq_len)``.

    The examples are visited in a shuffled order drawn from ``seed`` (``random.Random``), reshuffled on every
    pass, as many passes as the steps need. Labels are the input ids with the prompt and the padding set to -100
    (the model shifts them itself). An example longer than ``seq_len`` is cut at ``seq_len`` (its response
    shortened); one whose prompt leaves no room for a single response token is left out. The tokenizer needs a pad
    token (``tokenizer.pad_token = tokenizer.eos_token`` gives one); examples are dicts with ``"prompt"`` and
    ``"response"`` strings, as :func:`fastft.bench.assets.default_examples` returns.
    """
    seq_len = _positive("seq_len", seq_len, least=2)
    batch_size = _positive("batch_size", batch_size)
    steps = _positive("steps", steps)
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "the tokenizer has no pad token; set one first, e.g. tokenizer.pad_token = tokenizer.eos_token"
        )
    if not examples:
        raise ValueError("examples is empty; pass dicts with 'prompt' and 'response', e.g. assets.default_examples()")
    rows: list[tuple[list[int], list[int]]] = []  # (input ids, labels), unpadded, cut at seq_len
    shortest_prompt = None
    for i, example in enumerate(examples):
        try:
            prompt, response = example["prompt"], example["response"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"examples[{i}] = {example!r:.80} is not a dict with 'prompt' and 'response'") from e
        if not (isinstance(prompt, str) and isinstance(response, str)):
            raise TypeError(f"examples[{i}]: 'prompt' and 'response' must be strings, got {example!r:.80}")
        head, tail = _encode(tokenizer, prompt, response)
        if len(head) >= seq_len:
            shortest_prompt = len(head) if shortest_prompt is None else min(shortest_prompt, len(head))
            continue
        ids = (head + tail)[:seq_len]
        rows.append((ids, [IGNORE_INDEX] * len(head) + ids[len(head) :]))
    if not rows:
        raise ValueError(
            f"seq_len={seq_len} leaves no room for a response: the shortest prompt has {shortest_prompt} tokens; "
            "pass a longer seq_len"
        )

    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:  # whole passes, each in a fresh shuffled order
        permutation = list(range(len(rows)))
        rng.shuffle(permutation)
        order += permutation

    batches = []
    for step in range(steps):
        input_ids = torch.full((batch_size, seq_len), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, seq_len), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, seq_len), dtype=torch.long)
        for row, index in enumerate(order[step * batch_size : (step + 1) * batch_size]):
            ids, targets = rows[index]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(ids)] = torch.tensor(targets)
            attention_mask[row, : len(ids)] = 1
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return batches


def tokens_in(batch: dict[str, torch.Tensor]) -> int:
    """The number of real (not padding) tokens of a batch: what a step processes usefully, for tokens/s."""
    return int(batch["attention_mask"].sum())
