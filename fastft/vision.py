"""Batches of chat samples with images for vision-language fine-tuning: :class:`VisionDataCollator`.

A sample is a dict in TRL's vision format or Unsloth's::

    {"images": [img], "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]},
                                   {"role": "assistant", "content": [{"type": "text", "text": "..."}]}]}
    {"messages": [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "..."}]},
                  ...]}

An image is a ``PIL.Image`` or a path to an image file (opened and converted to RGB); ``"image": img`` (one) works
in place of ``"images"``. Each ``{"type": "image"}`` entry of the messages is where one image goes, in order;
string contents with top-level images get the images in front of the first user message (TRL's convention).

The collator renders every sample with the processor's chat template, lets the processor tokenise the texts and
turn the images into pixel values (and whatever else the model takes: ``image_grid_thw``, ``mm_token_type_ids``,
...), pads, and builds ``labels``: the input ids with -100 on padding and on the image tokens (the model never has
to predict a placeholder) and, with ``train_on_responses_only=True``, on everything but the assistant's answers.

It works as the ``data_collator`` of TRL 1.16's ``SFTTrainer`` (``SFTConfig(remove_unused_columns=False,
dataset_kwargs={"skip_prepare_dataset": True})``, as for Unsloth's collator), and in a plain loop. Samples it cannot
use (no messages, an image missing or unreadable, an image the processor rejects, a text-only sample in a vision
batch, a sample longer than ``max_seq_length``) raise a ``ValueError`` naming the sample.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

IGNORE_INDEX = -100

# Processor attributes holding the text of an image-related special token (the placeholder, begin/end of image,
# Idefics3's tokens around an image) in the transformers processors that have them.
_PROCESSOR_IMAGE_TOKENS = (
    "image_token", "video_token", "boi_token", "eoi_token", "fake_image_token", "global_image_token",
    "image_start_token", "image_end_token", "vision_start_token", "vision_end_token", "start_of_image_token",
    "end_of_image_token", "image_break_token",
)  # fmt: skip
_TRL_HINT = (
    "with TRL's SFTTrainer pass SFTConfig(remove_unused_columns=False, dataset_kwargs={'skip_prepare_dataset': True}) "
    "so the samples reach the collator as they are"
)


def _config_image_token_ids(config: Any) -> set[int]:
    """Ids the config names for image tokens: ``image_token_id``, ``image_token_index``, ``vision_start_token_id``,
    ``boi_token_id``, ... (root and text config)."""
    ids = set()
    configs = [config]
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        configs.append(get_text())
    for cfg in configs:
        for name, value in vars(cfg).items():
            words = ("image", "vision", "video", "boi", "eoi", "img")
            if (
                name.endswith(("_token_id", "_token_index"))
                and any(w in name for w in words)
                and isinstance(value, int)
            ):
                ids.add(value)
    return ids


def _open_image(image: Any, sample: int, index: int) -> Any:
    """``image`` as the processor takes it: a path opened as an RGB ``PIL.Image``, a PIL image made RGB."""
    from PIL import Image, UnidentifiedImageError

    if image is None:
        raise ValueError(f"sample {sample}: image {index} is None; give a PIL image or a path to an image file")
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as opened:
                image = opened.convert("RGB")
        except (FileNotFoundError, IsADirectoryError, UnidentifiedImageError, OSError) as err:
            raise ValueError(
                f"sample {sample}: image {index} ({os.fspath(image)!r}) cannot be read as an image: {err}"
            ) from err
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"sample {sample}: image {index} is empty ({image.width} x {image.height} pixels)")
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, (torch.Tensor,)) or type(image).__module__.startswith("numpy"):
        return image  # arrays: the processor checks their layout itself
    raise ValueError(
        f"sample {sample}: image {index} is a {type(image).__name__}, not an image; give a PIL image or a path"
    )


def _describe(image: Any) -> str:
    """``"W x H RGB"`` for a PIL image, ``"array of shape (...)"`` otherwise."""
    if hasattr(image, "mode") and isinstance(getattr(image, "size", None), tuple):
        return f"{image.size[0]} x {image.size[1]} {image.mode}"
    return f"array of shape {tuple(getattr(image, 'shape', ()))}"


def _split_images(example: dict, sample: int) -> tuple[list[dict], list[Any]]:
    """The sample's messages with every image entry reduced to ``{"type": "image"}``, and its images in order."""
    if not isinstance(example, dict) or not isinstance(example.get("messages"), list) or not example["messages"]:
        keys = sorted(example) if isinstance(example, dict) else type(example).__name__
        raise ValueError(
            f"sample {sample} has no 'messages' (a list of chat turns); it has {keys}. Give each sample "
            f"{{'messages': [...], 'images': [...]}}; {_TRL_HINT}"
        )
    given = example.get("images")
    if given is None and "image" in example:
        given = [example["image"]]
    if given is not None and not isinstance(given, (list, tuple)):
        given = [given]
    given = list(given or [])
    messages, images, open_slots = [], [], []
    for turn, message in enumerate(example["messages"]):
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError(f"sample {sample}: message {turn} is not a dict with a 'role' and a 'content'")
        content = message.get("content")
        if isinstance(content, list):
            entries = []
            for entry in content:
                if isinstance(entry, dict) and entry.get("type") == "image":
                    inline = next((entry[k] for k in ("image", "path", "url") if entry.get(k) is not None), None)
                    if inline is None:
                        open_slots.append(len(images))
                    images.append(inline)
                    entries.append({"type": "image"})
                else:
                    entries.append(entry)
            message = {**message, "content": entries}
        messages.append(message)
    if not images and given:  # string contents: the images go in front of the first user message (TRL's rule)
        first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
        if first_user is None:
            raise ValueError(f"sample {sample} has {len(given)} image(s) but no user message to put them in")
        message = messages[first_user]
        text = message.get("content")
        text_entries = [{"type": "text", "text": text}] if isinstance(text, str) else list(text or [])
        messages[first_user] = {**message, "content": [*({"type": "image"} for _ in given), *text_entries]}
        return messages, given
    if len(open_slots) != len(given):
        raise ValueError(
            f"sample {sample}: its messages have {len(open_slots)} image entr{'y' if len(open_slots) == 1 else 'ies'} "
            f"without an image ({{'type': 'image'}}) but the sample carries {len(given)} image(s) in 'images'; each "
            "image entry needs exactly one image (inline as {'type': 'image', 'image': img}, or in 'images' in order)"
        )
    for slot, image in zip(open_slots, given):
        images[slot] = image
    return messages, images


def _chat_markers(processor: Any) -> tuple[str, str]:
    """(instruction_part, response_part) of the processor's chat template: the text that opens a user turn and the
    text that opens an assistant answer, found by rendering small conversations and comparing them."""

    def render(messages: list[dict], generation: bool = False) -> str:
        try:
            return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        except Exception:  # noqa: BLE001 - templates that only take list contents
            listed = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in messages]
            return processor.apply_chat_template(listed, tokenize=False, add_generation_prompt=generation)

    user1, answer, user2 = "\u2460Ufirst", "\u2461Aanswer", "\u2462Usecond"
    one = [{"role": "user", "content": user1}]
    plain, with_prompt = render(one), render(one, generation=True)
    response = with_prompt[len(plain) :] if with_prompt.startswith(plain) else ""
    two = [*one, {"role": "assistant", "content": answer}]
    three = [*two, {"role": "user", "content": user2}]
    closed, reopened = render(two), render(three)
    if answer not in closed or answer not in reopened or user2 not in reopened:
        raise ValueError(
            "train_on_responses_only=True: the chat template does not render an earlier assistant answer as it was "
            "given, so the turn markers cannot be read off it; pass instruction_part=... and response_part=... (the "
            "texts that open a user turn and an assistant answer)"
        )
    between = reopened[reopened.index(answer) + len(answer) : reopened.index(user2)]
    terminator = closed[closed.index(answer) + len(answer) :]
    instruction = between[len(terminator) :] if between.startswith(terminator) and terminator else between
    return instruction, response


def _find(row: list[int], pattern: list[int], start: int = 0) -> list[int]:
    """Start positions of ``pattern`` in ``row`` at or after ``start``."""
    n = len(pattern)
    return [i for i in range(start, len(row) - n + 1) if row[i : i + n] == pattern]


class VisionDataCollator:
    """Turn chat samples with images into a padded batch with ``labels`` for a vision-language model.

    Args:
        model: the model being trained (a transformers VLM, PEFT-wrapped or not): its config names the image
            token ids to mask, and its ``max_seq_length`` (set by ``FastVisionModel``) is the default limit.
        processor: the model's processor (``AutoProcessor``): chat template, tokenizer and image processor.
        train_on_responses_only: labels only on the assistant's answers (every assistant turn, with its
            end-of-turn token), -100 on the rest.
        instruction_part, response_part: the text that opens a user turn and an assistant answer in the chat
            template (Unsloth's names); found from the template when not given.
        max_seq_length: the longest sequence allowed (image tokens included); a longer sample is an error (cutting
            it could cut an image's tokens). Default: ``model.max_seq_length`` if set, else no limit.
        mask_image_tokens: -100 on the image placeholder tokens and their begin/end markers (default True).
        allow_text_only: accept samples without an image (by default one is an error: in a vision dataset it
            is usually a sample that lost its image).
    """

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        train_on_responses_only: bool = False,
        instruction_part: str | None = None,
        response_part: str | None = None,
        max_seq_length: int | None = None,
        mask_image_tokens: bool = True,
        allow_text_only: bool = False,
    ) -> None:
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None or not hasattr(processor, "image_processor"):
            raise TypeError(
                f"VisionDataCollator needs the model's processor (AutoProcessor: a tokenizer and an image processor), "
                f"got a {type(processor).__name__}; for a text-only model use a text collator"
            )
        if tokenizer.pad_token_id is None:
            raise ValueError(
                "the processor's tokenizer has no pad token; set processor.tokenizer.pad_token (FastVisionModel."
                "from_pretrained sets one)"
            )
        if getattr(processor, "chat_template", None) is None and getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"the {type(processor).__name__} has no chat template; set processor.chat_template")
        from fastft.models.patch import causal_lm

        root = causal_lm(model)
        self.processor, self.tokenizer = processor, tokenizer
        self.max_seq_length = max_seq_length if max_seq_length is not None else getattr(root, "max_seq_length", None)
        self.allow_text_only = allow_text_only
        self.train_on_responses_only = train_on_responses_only
        image_ids = _config_image_token_ids(root.config) if mask_image_tokens else set()
        if mask_image_tokens:
            vocab = tokenizer.get_vocab()
            for attr in _PROCESSOR_IMAGE_TOKENS:
                token = getattr(processor, attr, None)
                if isinstance(token, str) and token in vocab:
                    image_ids.add(vocab[token])
        self.image_token_ids = torch.tensor(sorted(i for i in image_ids if 0 <= i < len(tokenizer)), dtype=torch.long)
        self.instruction_ids: list[int] = []
        self.response_ids: list[int] = []
        if train_on_responses_only:
            if instruction_part is None or response_part is None:
                found_instruction, found_response = _chat_markers(processor)
                instruction_part = found_instruction if instruction_part is None else instruction_part
                response_part = found_response if response_part is None else response_part
            if not response_part:
                raise ValueError(
                    "train_on_responses_only=True: the chat template adds no assistant header with "
                    "add_generation_prompt=True, so the start of an answer is unknown; pass response_part=... (the "
                    "text that opens an assistant answer)"
                )
            self.instruction_part, self.response_part = instruction_part, response_part
            self.instruction_ids = (
                tokenizer(instruction_part, add_special_tokens=False)["input_ids"] if instruction_part else []
            )
            self.response_ids = tokenizer(response_part, add_special_tokens=False)["input_ids"]

    # ------------------------------------------------------------------------------------------------ batching

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("VisionDataCollator got an empty batch")
        texts, images = [], []
        for i, example in enumerate(examples):
            messages, sample_images = _split_images(example, i)
            images.append([_open_image(image, i, k) for k, image in enumerate(sample_images)])
            texts.append(self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False))
        if not self.allow_text_only:
            for i, sample_images in enumerate(images):
                if not sample_images:
                    others = sum(1 for imgs in images if imgs)
                    where = f"in a batch where {others} other sample(s) have images" if others else "(no image at all)"
                    raise ValueError(
                        f"sample {i} is text-only {where}: a vision dataset sample that lost its image, or one that "
                        "never had one. Give it its image, or pass allow_text_only=True to train text-only samples"
                    )
        batch = self._process(texts, images)
        lengths = batch["attention_mask"].sum(dim=1)
        if self.max_seq_length is not None and int(lengths.max()) > self.max_seq_length:
            i = int(lengths.argmax())
            raise ValueError(
                f"sample {i} is {int(lengths[i])} tokens (image tokens included), longer than max_seq_length="
                f"{self.max_seq_length}; shorten its text, use smaller images, or raise max_seq_length (cutting the "
                "sample could cut an image's tokens, so the collator does not truncate)"
            )
        batch["labels"] = self._labels(batch["input_ids"], batch["attention_mask"])
        return batch

    def _process(self, texts: list[str], images: list[list[Any]]) -> dict[str, torch.Tensor]:
        kwargs = {"padding": True, "return_tensors": "pt", "add_special_tokens": False}
        has_images = any(images)
        try:
            out = self.processor(text=texts, images=images if has_images else None, **kwargs)
        except Exception as err:
            for i, (text, sample_images) in enumerate(zip(texts, images)):
                try:
                    self.processor(text=[text], images=[sample_images] if sample_images else None, **kwargs)
                except Exception as own:
                    sizes = [_describe(image) for image in sample_images]
                    raise ValueError(
                        f"sample {i}: the {type(self.processor).__name__} rejected it "
                        f"(its images: {', '.join(sizes) or 'none'}): "
                        f"{type(own).__name__}: {own}"
                    ) from own
            raise ValueError(
                f"the {type(self.processor).__name__} rejected the batch: {type(err).__name__}: {err}"
            ) from err
        return dict(out)

    def _labels(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        labels = input_ids.clone()
        labels[attention_mask == 0] = IGNORE_INDEX
        if self.image_token_ids.numel():
            labels[torch.isin(input_ids, self.image_token_ids)] = IGNORE_INDEX
        if self.train_on_responses_only:
            keep = torch.zeros_like(labels, dtype=torch.bool)
            for i, (row, mask) in enumerate(zip(input_ids.tolist(), attention_mask.tolist())):
                real = [p for p, m in enumerate(mask) if m]
                first, last = (real[0], real[-1] + 1) if real else (0, 0)
                starts = _find(row[:last], self.response_ids, first)
                if not starts:
                    raise ValueError(
                        f"sample {i}: train_on_responses_only=True but it has no assistant answer (the tokens of "
                        f"response_part={self.response_part!r} do not occur in it); give every sample an assistant "
                        "turn, or pass the response_part your chat template uses"
                    )
                for start in starts:
                    begin = start + len(self.response_ids)
                    ends = _find(row[:last], self.instruction_ids, begin) if self.instruction_ids else []
                    keep[i, begin : ends[0] if ends else last] = True
            labels[~keep] = IGNORE_INDEX
        return labels
