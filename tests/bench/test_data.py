"""make_batches and tokens_in: formatting, masking, padding, truncation, the seeded order, and the errors."""

from __future__ import annotations

import pytest
import torch

from fastft.bench import assets
from fastft.bench.data import IGNORE_INDEX, make_batches, tokens_in

HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"


@pytest.fixture(scope="module")
def tokenizer():
    return assets.default_tokenizer()


@pytest.fixture(scope="module")
def examples():
    return assets.default_examples()


def test_shapes_and_dtypes(tokenizer, examples):
    batches = make_batches(tokenizer, examples, seq_len=128, batch_size=3, steps=5, seed=0)
    assert len(batches) == 5
    for batch in batches:
        assert set(batch) == {"input_ids", "attention_mask", "labels"}
        assert all(t.shape == (3, 128) and t.dtype == torch.long for t in batch.values())


def test_labels_are_the_response_and_padding_is_masked(tokenizer, examples):
    batches = make_batches(tokenizer, examples, seq_len=128, batch_size=4, steps=3, seed=1)
    responses = {e["response"] for e in examples}
    for batch in batches:
        for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
            length = int(mask.sum())
            assert torch.all(mask[:length] == 1) and torch.all(mask[length:] == 0)  # right padding
            assert torch.all(ids[length:] == tokenizer.pad_token_id) and torch.all(labels[length:] == IGNORE_INDEX)
            kept = labels != IGNORE_INDEX
            assert torch.equal(labels[kept], ids[kept])  # unshifted: the model shifts
            start = int(kept.nonzero()[0])  # the labelled part is one contiguous run, starting after the prompt
            assert int(kept.sum()) == length - start
            assert tokenizer.decode(ids[:start]).endswith(HEADER)
            response = tokenizer.decode(ids[start:length])
            assert response.endswith("<|eot_id|>") and response.removesuffix("<|eot_id|>") in responses


def test_tokens_in_counts_the_real_tokens(tokenizer, examples):
    (batch,) = make_batches(tokenizer, examples, seq_len=128, batch_size=6, steps=1, seed=0)
    unpadded = sum(int((row != tokenizer.pad_token_id).sum()) for row in batch["input_ids"])
    assert tokens_in(batch) == unpadded
    assert 0 < tokens_in(batch) < 6 * 128


def test_order_is_seeded_and_cycles_through_every_example(tokenizer, examples):
    few = examples[:10]
    first = make_batches(tokenizer, few, seq_len=128, batch_size=5, steps=4, seed=7)
    again = make_batches(tokenizer, few, seq_len=128, batch_size=5, steps=4, seed=7)
    other = make_batches(tokenizer, few, seq_len=128, batch_size=5, steps=4, seed=8)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, again))
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, other))
    rows = [tuple(row.tolist()) for batch in first for row in batch["input_ids"]]
    assert len(set(rows[:10])) == 10 and set(rows[10:]) == set(rows[:10])  # two whole passes of the ten


def test_long_examples_are_cut_and_prompts_that_fill_seq_len_left_out(tokenizer):
    examples = [
        {"prompt": "short", "response": "word " * 100},
        {"prompt": "long " * 100, "response": "never seen"},
    ]
    batches = make_batches(tokenizer, examples, seq_len=32, batch_size=2, steps=2, seed=0)
    for batch in batches:
        assert torch.all(batch["attention_mask"] == 1)  # both rows are the first example, cut at 32
        assert "never" not in tokenizer.decode(batch["input_ids"].flatten())
        assert int((batch["labels"] != IGNORE_INDEX).sum()) > 0
    with pytest.raises(ValueError, match="seq_len=32 leaves no room"):
        make_batches(tokenizer, examples[1:], seq_len=32, batch_size=1, steps=1)


def test_plain_format_without_a_chat_template(tokenizer):
    plain = assets.default_tokenizer()
    plain.chat_template = None
    (batch,) = make_batches(plain, [{"prompt": "Say hi.", "response": "Hi!"}], seq_len=16, batch_size=1, steps=1)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    length = tokens_in(batch)
    assert plain.decode(ids[:length]) == "<|begin_of_text|>Say hi.\nHi!<|eot_id|>"
    assert plain.decode(labels[labels != IGNORE_INDEX]) == "Hi!<|eot_id|>"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"seq_len": 1}, ValueError, "seq_len=1 must be at least 2"),
        ({"batch_size": 0}, ValueError, "batch_size=0"),
        ({"steps": 2.5}, TypeError, "steps must be an int"),
        ({"examples": []}, ValueError, "examples is empty"),
        ({"examples": [{"prompt": "p"}]}, ValueError, r"examples\[0\]"),
        ({"examples": [{"prompt": "p", "response": 3}]}, TypeError, "must be strings"),
    ],
)
def test_bad_arguments_say_what_to_do(tokenizer, kwargs, error, match):
    arguments = {"examples": [{"prompt": "p", "response": "r"}], "seq_len": 16, "batch_size": 1, "steps": 1, **kwargs}
    with pytest.raises(error, match=match):
        make_batches(tokenizer, arguments.pop("examples"), **arguments)


def test_a_tokenizer_without_pad_is_refused(examples):
    no_pad = assets.default_tokenizer()
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="pad_token = tokenizer.eos_token"):
        make_batches(no_pad, examples, seq_len=64, batch_size=1, steps=1)
