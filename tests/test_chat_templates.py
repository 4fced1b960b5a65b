"""fastft.chat_templates: the named templates, the dataset helpers and train_on_responses_only with TRL's SFTTrainer.

The tokenizer is fastft's embedded byte-level BPE one (Llama-3's special tokens, 2048 ids, no download); the trainer
is TRL 1.16's unmodified ``SFTTrainer`` on the embedded tiny Llama. train_on_responses_only is checked against an
oracle written independently of it: the reply spans of the rendered text, located in the *decoded* token prefixes
(fastft itself matches the tokenizer's internal token strings).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import trl
from datasets import Dataset

from fastft.bench.assets import default_model, default_tokenizer
from fastft.chat_templates import (
    CHAT_TEMPLATES,
    apply_chat_template,
    get_chat_template,
    standardize_data_formats,
    standardize_sharegpt,
    to_sharegpt,
    train_on_responses_only,
)

USER = "<|start_header_id|>user<|end_header_id|>\n\n"
ASSISTANT = "<|start_header_id|>assistant<|end_header_id|>\n\n"
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Green, and\n\nred."},
    ],
    [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": " hi  there "}],
    [{"role": "user", "content": "Count: 1 2 3"}, {"role": "assistant", "content": "4 5 6\n"}],
]


def _quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


@pytest.fixture
def tokenizer():
    return get_chat_template(default_tokenizer(), chat_template="llama-3.1")


def _expected_labels(tokenizer, ids: list[int], instruction: str, response: str) -> list[int]:
    """The oracle: a token keeps its label iff its characters in the decoded text overlap a reply span."""
    text = tokenizer.decode(ids)
    spans, position = [], 0
    while (found := text.find(response, position)) != -1:
        begin = found + len(response)
        end = text.find(instruction, begin)
        spans.append((begin, len(text) if end == -1 else end))
        position = begin
    labels = []
    for i, token in enumerate(ids):
        start, end = len(tokenizer.decode(ids[:i])), len(tokenizer.decode(ids[: i + 1]))
        labels.append(token if any(end > b and start < e for b, e in spans) else -100)
    return labels


def _trainer(tokenizer, tmp_path, dataset, **config) -> trl.SFTTrainer:
    config = {"max_length": 256, **config}
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
        report_to="none", use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
        dataloader_num_workers=0, bf16=False, **config,
    )  # fmt: skip
    return trl.SFTTrainer(model=default_model(seed=0), args=args, train_dataset=dataset, processing_class=tokenizer)


def _text_dataset(tokenizer) -> Dataset:
    """Unsloth's notebook flow: conversations rendered to a ``text`` column by the chat template."""
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in CONVERSATIONS]
    return Dataset.from_dict({"text": texts})


def test_every_named_template_renders_turns_and_generation_prompt():
    conversation = CONVERSATIONS[1]
    for name in CHAT_TEMPLATES:
        tokenizer = _quiet(get_chat_template, default_tokenizer(), chat_template=name)
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
        prompt = tokenizer.apply_chat_template(conversation[:2], tokenize=False, add_generation_prompt=True)
        for turn in conversation:
            assert turn["content"].strip() in text, (name, text)
        # the generation prompt ends where a reply's text begins: rendering the reply after it continues the prompt
        with_reply = tokenizer.apply_chat_template(conversation[:3], tokenize=False)
        assert with_reply.startswith(prompt), (name, prompt, with_reply)


def test_known_renderings(tokenizer):
    text = tokenizer.apply_chat_template(CONVERSATIONS[0], tokenize=False)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 July 2024\n\n<|eot_id|>" + USER + "What is 2+2?<|eot_id|>" + ASSISTANT + "It is 4.<|eot_id|>"
    )
    chatml = _quiet(get_chat_template, default_tokenizer(), "chatml")
    assert chatml.apply_chat_template(CONVERSATIONS[0], tokenize=False, add_generation_prompt=False) == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\nIt is 4.<|im_end|>\n"
    )
    alpaca = get_chat_template(default_tokenizer(), "alpaca", system_message="Be kind.")
    assert alpaca.apply_chat_template(CONVERSATIONS[0], tokenize=False) == (
        "Be kind.\n\n### Instruction:\nWhat is 2+2?\n\n### Response:\nIt is 4.<|eot_id|>\n\n"
    )
    gemma = _quiet(get_chat_template, default_tokenizer(), "gemma-3")
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    assert gemma.apply_chat_template(parts, tokenize=False, add_generation_prompt=True) == (
        "<|begin_of_text|><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    )


def test_mapping_reads_sharegpt_turns_and_eos_is_mapped():
    sharegpt = [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "It is 4."}]
    tokenizer = _quiet(default_tokenizer)
    tokenizer.eos_token = "<|end_of_text|>"
    mapping = {"role": "from", "content": "value", "user": "human", "assistant": "gpt"}
    tokenizer = get_chat_template(tokenizer, chat_template="llama-3", mapping=mapping)
    reference = get_chat_template(default_tokenizer(), chat_template="llama-3")
    assert tokenizer.apply_chat_template(sharegpt, tokenize=False) == reference.apply_chat_template(
        CONVERSATIONS[0], tokenize=False
    )
    assert tokenizer.eos_token == "<|eot_id|>"  # the token that ends a reply in this template


def test_template_errors_and_warnings():
    with pytest.raises(ValueError, match="valid names: .*chatml"):
        get_chat_template(default_tokenizer(), chat_template="llama-9")
    with pytest.raises(ValueError, match="its keys are role, content"):
        get_chat_template(default_tokenizer(), chat_template="chatml", mapping={"speaker": "from"})
    with pytest.warns(UserWarning, match="not tokens of this tokenizer's vocabulary"):
        get_chat_template(default_tokenizer(), chat_template="chatml")
    tokenizer = get_chat_template(default_tokenizer(), chat_template=("{{ messages[0]['content'] }}", "<|eot_id|>"))
    assert tokenizer.apply_chat_template(CONVERSATIONS[0], tokenize=False) == "What is 2+2?"
    tokenizer = get_chat_template(default_tokenizer(), "llama-3")
    with pytest.raises(Exception, match="unexpected role tool"):
        _quiet(get_chat_template, tokenizer, "alpaca").apply_chat_template(
            [{"role": "tool", "content": "x"}], tokenize=False
        )


def test_standardize_sharegpt_and_data_formats():
    sharegpt = Dataset.from_list(
        [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}], "source": "a"}]
    )
    standard = standardize_sharegpt(sharegpt)
    expected = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert standard[0]["conversations"] == expected and standard[0]["source"] == "a"
    assert standardize_data_formats(sharegpt)[0]["conversations"] == expected
    messages = Dataset.from_list([{"messages": expected}])
    assert standardize_data_formats(messages).column_names == ["conversations"]
    alpaca = Dataset.from_list([{"instruction": "Add", "input": "2 and 2", "output": "4"}])
    converted = standardize_data_formats(alpaca)[0]["conversations"]
    assert converted == [{"role": "user", "content": "Add\n\n2 and 2"}, {"role": "assistant", "content": "4"}]
    with pytest.raises(ValueError, match="aliases_for_user"):
        standardize_sharegpt(Dataset.from_list([{"conversations": [{"from": "narrator", "value": "x"}]}]))
    with pytest.raises(ValueError, match="no column"):
        standardize_sharegpt(Dataset.from_list([{"text": "plain"}]))


@pytest.mark.parametrize("form", ["text", "messages"])
def test_labels_outside_replies_are_masked(tokenizer, tmp_path, form):
    dataset = (
        _text_dataset(tokenizer) if form == "text" else Dataset.from_dict({"messages": CONVERSATIONS})
    )  # TRL renders a "messages" column with the tokenizer's chat template itself
    trainer = _trainer(tokenizer, tmp_path, dataset)
    before = [list(row) for row in trainer.train_dataset["labels"]]
    assert all(any(x == -100 for x in row) is False for row in before)  # TRL trains on every token by default
    trainer = train_on_responses_only(trainer, instruction_part=USER, response_part=ASSISTANT)
    for row in trainer.train_dataset:
        assert row["labels"] == _expected_labels(tokenizer, row["input_ids"], USER, ASSISTANT)
    kept = [[t for t in row["labels"] if t != -100] for row in trainer.train_dataset]
    replies = [tokenizer.decode(ids) for ids in kept]
    assert replies[1] == "Blue.<|eot_id|>Green, and\n\nred.<|eot_id|>"  # both turns, each with its end token
    assert replies[0] == "It is 4.<|eot_id|>"
    # The collated batch carries those labels (padding -100) and a training step runs on them.
    batch = next(iter(trainer.get_train_dataloader()))
    assert ((batch["labels"] == -100) | (batch["labels"] == batch["input_ids"])).all()
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()
    trainer.train()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)


def test_parts_default_to_the_template_and_markers_must_occur(tokenizer, tmp_path):
    trainer = train_on_responses_only(_trainer(tokenizer, tmp_path, _text_dataset(tokenizer)))
    for row in trainer.train_dataset:
        assert row["labels"] == _expected_labels(tokenizer, row["input_ids"], USER, ASSISTANT)
    trainer = _trainer(tokenizer, tmp_path, _text_dataset(tokenizer))
    with pytest.raises(ValueError, match="occurs in no row"):
        train_on_responses_only(trainer, instruction_part="<|im_start|>user\n", response_part="<|im_start|>assistant\n")


def test_packed_rows_are_relabelled_per_conversation(tokenizer, tmp_path):
    plain = _trainer(tokenizer, tmp_path, _text_dataset(tokenizer))
    plain = train_on_responses_only(plain, instruction_part=USER, response_part=ASSISTANT)
    expected = {tuple(row["input_ids"]): row["labels"] for row in plain.train_dataset}
    packed = _trainer(tokenizer, tmp_path, _text_dataset(tokenizer), packing=True, max_length=160)
    packed = train_on_responses_only(packed, instruction_part=USER, response_part=ASSISTANT)
    documents = 0
    for row in packed.train_dataset:
        offset = 0
        assert len(row["seq_lengths"]) >= 1
        for length in row["seq_lengths"]:
            ids = tuple(row["input_ids"][offset : offset + length])
            assert row["labels"][offset : offset + length] == expected[ids]
            offset, documents = offset + length, documents + 1
    assert documents == len(CONVERSATIONS)
    assert any(len(row["seq_lengths"]) > 1 for row in packed.train_dataset)  # some row does hold two conversations
    packed.train()  # padding-free batches (TRL's bfd packing) train on those labels


def test_wrapped_packing_is_refused(tokenizer, tmp_path):
    trainer = _trainer(
        tokenizer, tmp_path, _text_dataset(tokenizer), packing=True, packing_strategy="wrapped", max_length=64
    )
    with pytest.raises(ValueError, match="packing_strategy='bfd'"):
        train_on_responses_only(trainer, instruction_part=USER, response_part=ASSISTANT)


def test_template_tokens_not_in_vocabulary_still_match(tmp_path):
    """The ChatML template on a Llama-3 vocabulary: its markers are plain text, split differently in context."""
    tokenizer = _quiet(get_chat_template, default_tokenizer(), "chatml")
    trainer = _trainer(tokenizer, tmp_path, _text_dataset(tokenizer))
    trainer = train_on_responses_only(trainer)
    user, assistant = "<|im_start|>user\n", "<|im_start|>assistant\n"
    for row in trainer.train_dataset:
        assert row["labels"] == _expected_labels(tokenizer, row["input_ids"], user, assistant)
    kept = [t for t in trainer.train_dataset[3]["labels"] if t != -100]
    # TRL appends the tokenizer's eos (still <|eot_id|>: <|im_end|> is no token here) to text rows: it ends the reply
    assert tokenizer.decode(kept) == "4 5 6\n<|im_end|>\n<|eot_id|>"


ALPACA_TEXT = """Below are some instructions that describe some tasks. Write responses that appropriately complete each request.

### Instruction:
{INPUT}

### Response:
{OUTPUT}"""


def test_to_sharegpt_merges_columns_and_extends_conversations():
    rows = [
        {"instruction": "Add", "input": "2 and 2", "output": "4"},
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"instruction": "Name one", "input": None, "output": "Bob"},
    ]
    merged = "{instruction}[[\nYour input is:\n{input}]]"
    single = to_sharegpt(Dataset.from_list(rows), merged_prompt=merged, output_column_name="output")
    assert single.column_names == ["conversations"]
    assert [c[0]["value"] for c in single["conversations"]] == ["Add\nYour input is:\n2 and 2", "Say hi", "Name one"]
    assert single[0]["conversations"][1] == {"from": "gpt", "value": "4"}
    extended = to_sharegpt(Dataset.from_list(rows), merged_prompt=merged, conversation_extension=3)
    for i, conversation in enumerate(extended["conversations"]):
        assert len(conversation) == 6 and conversation[:2] == single[i]["conversations"]
        assert all(conversation[k : k + 2] in single["conversations"] for k in (2, 4))
        assert conversation[2:4] != conversation[:2] and conversation[4:6] != conversation[:2]  # other rows
    with pytest.raises(ValueError, match="names no column"):
        to_sharegpt(Dataset.from_list(rows), merged_prompt="{question}")


def test_apply_chat_template_from_text_form():
    tokenizer = default_tokenizer()
    conversations = to_sharegpt(Dataset.from_list([{"instruction": "Add 2 and 2", "output": "4"}]))
    conversations = standardize_sharegpt(conversations)
    two = [*conversations[0]["conversations"], {"role": "user", "content": "And 3?"}]
    two.append({"role": "assistant", "content": "7"})
    dataset = apply_chat_template(Dataset.from_dict({"conversations": [two]}), tokenizer, chat_template=ALPACA_TEXT)
    preamble = "Below are some instructions that describe some tasks. Write responses that appropriately complete "
    assert dataset[0]["text"] == (
        f"{preamble}each request.\n\n### Instruction:\nAdd 2 and 2\n\n### Response:\n4<|eot_id|>\n\n"
        "### Instruction:\nAnd 3?\n\n### Response:\n7<|eot_id|>"
    )
    prompt = tokenizer.apply_chat_template(two[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == f"{preamble}each request.\n\n### Instruction:\nAdd 2 and 2\n\n### Response:\n"
    system = apply_chat_template(
        Dataset.from_dict({"conversations": [two]}),
        default_tokenizer(),
        chat_template="{SYSTEM}\nUSER: {INPUT}\nASSISTANT: {OUTPUT}",
        default_system_message="Be kind.",
    )
    assert (
        system[0]["text"]
        == "Be kind.\nUSER: Add 2 and 2\nASSISTANT: 4<|eot_id|>\n\nUSER: And 3?\nASSISTANT: 7<|eot_id|>"
    )
    with pytest.raises(ValueError, match="{INPUT} and {OUTPUT} once each"):
        apply_chat_template(dataset, default_tokenizer(), chat_template="### Instruction:\n{INPUT}")
