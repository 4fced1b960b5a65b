"""fastft.vision.VisionDataCollator: batches equal to TRL's own VLM collation, labels (-100 on padding, image tokens,
prompts), every sample format (TRL's, Unsloth's inline images, paths, string contents), and clear errors naming the
sample for bad input."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from fastft.bench import vision_assets as va
from fastft.vision import VisionDataCollator

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KINDS = {"qwen2_vl": (va.tiny_qwen2_vl_processor, va.tiny_qwen2_vl), "llava": (va.tiny_llava_processor, va.tiny_llava)}


@pytest.fixture(scope="module", params=sorted(KINDS))
def vlm(request):
    make_processor, make_model = KINDS[request.param]
    processor = make_processor()
    return make_model(0, processor), processor


@pytest.fixture(scope="module")
def qwen():
    processor = va.tiny_qwen2_vl_processor()
    return va.tiny_qwen2_vl(0, processor), processor


def _examples(n=3, seed=0):
    examples = va.image_examples(n, seed=seed)
    # a second exchange in one sample: both answers are learned, the second question is not
    examples[1]["messages"] += [
        {"role": "user", "content": [{"type": "text", "text": "Anything else?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "nothing else"}]},
    ]
    return examples


def _learned(processor, batch):
    return [
        processor.tokenizer.decode([t for t, lab in zip(ids, labels) if lab != -100])
        for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist())
    ]


def test_batch_equals_trl_collation_except_image_token_labels(vlm):
    model, processor = vlm
    ours = VisionDataCollator(model, processor)(_examples())
    theirs = DataCollatorForVisionLanguageModeling(processor)(copy.deepcopy(_examples()))
    assert set(ours) == set(theirs)
    for key in theirs:
        if key != "labels":
            assert torch.equal(ours[key], theirs[key]), key
    image_ids = VisionDataCollator(model, processor).image_token_ids
    is_image = torch.isin(ours["input_ids"], image_ids)
    assert is_image.any()
    assert (ours["labels"][is_image] == -100).all()
    assert torch.equal(ours["labels"][~is_image], theirs["labels"][~is_image])
    assert (ours["labels"][ours["attention_mask"] == 0] == -100).all()
    assert (ours["attention_mask"] == 0).any()  # padding exists and is masked


def test_train_on_responses_only_learns_every_answer_and_nothing_else(vlm):
    model, processor = vlm
    collator = VisionDataCollator(model, processor, train_on_responses_only=True)
    assert collator.response_part == "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert collator.instruction_part == "<|start_header_id|>user<|end_header_id|>\n\n"
    examples = _examples()
    learned = _learned(processor, collator(examples))
    answers = [[m["content"][0]["text"] for m in e["messages"] if m["role"] == "assistant"] for e in examples]
    assert learned == ["".join(a + "<|eot_id|>" for a in row) for row in answers]


def test_explicit_markers_are_used_as_given(qwen):
    model, processor = qwen
    collator = VisionDataCollator(
        model, processor, train_on_responses_only=True, instruction_part="<|start_header_id|>user",
        response_part="<|start_header_id|>assistant<|end_header_id|>",
    )  # fmt: skip
    learned = _learned(processor, collator(va.image_examples(1)))
    assert learned[0].startswith("\n\na ") and learned[0].endswith("<|eot_id|>")


def test_every_sample_format_gives_the_same_batch(qwen, tmp_path):
    model, processor = qwen
    collator = VisionDataCollator(model, processor)
    examples = va.image_examples(2, seed=3)
    reference = collator(copy.deepcopy(examples))
    # Unsloth's format: the image inside the message content, given as a path for one of the two
    inline = []
    for i, example in enumerate(copy.deepcopy(examples)):
        image = example.pop("images")[0]
        if i == 1:
            image.save(tmp_path / "shape.png")
            image = str(tmp_path / "shape.png")
        example["messages"][0]["content"][0] = {"type": "image", "image": image}
        inline.append(example)
    # string contents and one top-level "image": it goes in front of the first user message
    strings = [
        {
            "image": e["images"][0],
            "messages": [{"role": m["role"], "content": m["content"][-1]["text"]} for m in e["messages"]],
        }
        for e in copy.deepcopy(examples)
    ]
    for batch in (collator(inline), collator(strings)):
        assert set(batch) == set(reference)
        for key in reference:
            assert torch.equal(batch[key], reference[key]), key


def test_model_trains_on_the_batch(qwen):
    model, processor = qwen
    batch = VisionDataCollator(model, processor, train_on_responses_only=True)(_examples())
    loss = copy.deepcopy(model)(**batch).loss
    assert torch.isfinite(loss)


# ------------------------------------------------------------------------------------------------ bad input


def test_sample_without_its_image_is_named(qwen):
    model, processor = qwen
    examples = _examples()
    examples[2]["images"] = []
    with pytest.raises(ValueError, match=r"sample 2: its messages have 1 image entry without an image .* carries 0"):
        VisionDataCollator(model, processor)(examples)
    examples[2]["images"] = [va.make_image("red", "dot")] * 2
    with pytest.raises(ValueError, match=r"sample 2: .* carries 2 image"):
        VisionDataCollator(model, processor)(examples)


def test_image_the_processor_rejects_is_named(qwen):
    model, processor = qwen
    examples = _examples()
    examples[1]["images"] = [Image.new("RGB", (400, 1))]  # Qwen2-VL refuses aspect ratios above 200
    with pytest.raises(
        ValueError, match=r"sample 1: the ImageQwen2VLProcessor rejected it \(its images: 400 x 1 RGB\)"
    ):
        VisionDataCollator(model, processor)(examples)
    examples[1]["images"] = [np.zeros((16, 16, 5), dtype=np.uint8)]  # five channels
    with pytest.raises(
        ValueError,
        match=r"sample 1: the ImageQwen2VLProcessor rejected it \(its images: array of shape \(16, 16, 5\)\)",
    ):
        VisionDataCollator(model, processor)(examples)


def test_unreadable_images_are_named(qwen, tmp_path):
    model, processor = qwen
    collator = VisionDataCollator(model, processor)
    examples = _examples()
    examples[0]["images"] = [str(tmp_path / "missing.png")]
    with pytest.raises(ValueError, match=r"sample 0: image 0 \('.*missing.png'\) cannot be read as an image"):
        collator(examples)
    (tmp_path / "text.png").write_text("not an image")
    examples[0]["images"] = [str(tmp_path / "text.png")]
    with pytest.raises(ValueError, match=r"sample 0: image 0 .* cannot be read as an image"):
        collator(examples)
    examples[0]["images"] = [42]
    with pytest.raises(ValueError, match="sample 0: image 0 is a int, not an image"):
        collator(examples)
    examples[0]["images"] = [Image.new("RGB", (0, 5))]
    with pytest.raises(ValueError, match=r"sample 0: image 0 is empty \(0 x 5 pixels\)"):
        collator(examples)


def test_text_only_sample_in_a_vision_batch(qwen):
    model, processor = qwen
    examples = _examples()
    examples[1] = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "hello"}]}
    with pytest.raises(ValueError, match="sample 1 is text-only in a batch where 2 other sample"):
        VisionDataCollator(model, processor)(examples)
    batch = VisionDataCollator(model, processor, allow_text_only=True)(examples)
    assert batch["image_grid_thw"].shape[0] == 2  # the two images of the other samples


def test_samples_without_messages_point_at_trl_settings(qwen):
    model, processor = qwen
    with pytest.raises(ValueError, match=r"sample 0 has no 'messages'.*remove_unused_columns=False"):
        VisionDataCollator(model, processor)([{"images": [va.make_image("red", "dot")]}])


def test_too_long_and_answerless_samples_are_named(qwen):
    model, processor = qwen
    examples = _examples()
    with pytest.raises(
        ValueError, match=r"sample 1 is \d+ tokens \(image tokens included\), longer than max_seq_length=30"
    ):
        VisionDataCollator(model, processor, max_seq_length=30)(examples)
    examples[2]["messages"] = examples[2]["messages"][:1]
    with pytest.raises(ValueError, match="sample 2: train_on_responses_only=True but it has no assistant answer"):
        VisionDataCollator(model, processor, train_on_responses_only=True)(examples)


def test_a_tokenizer_is_not_a_processor(qwen):
    model, processor = qwen
    with pytest.raises(TypeError, match="needs the model's processor"):
        VisionDataCollator(model, processor.tokenizer)
