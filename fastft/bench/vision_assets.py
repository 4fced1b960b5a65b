"""The embedded tiny vision-language models: random weights, processors built offline, generated image data.

Nothing is downloaded. Both processors are the embedded byte-level BPE tokenizer (:func:`fastft.bench.assets.
default_tokenizer`) with the family's image tokens added and a chat template (Llama-3's turns) that renders image
entries; their image processors are transformers' PIL ones, so torchvision is not needed.

- :func:`tiny_llava` / :func:`tiny_llava_processor`: a LLaVA (CLIP vision tower, GELU projector, Llama language
  model), what :func:`write_tiny_vlm` writes and ``notebooks/vision.ipynb`` trains: ``AutoProcessor`` and
  ``FastVisionModel.from_pretrained`` read its folder as they read a hub checkpoint. A 16 x 16 image is 16 tokens.
- :func:`tiny_qwen2_vl` / :func:`tiny_qwen2_vl_processor`: a Qwen2-VL (M-RoPE, ``image_grid_thw``), built in code
  for the tests (its processor needs torchvision to be loaded from a folder). A 16 x 16 image is 4 tokens.

:func:`image_examples` generates chat samples from coloured shapes ("What is in the picture?" -> "a red square"),
so a fine-tuning run visibly learns to read the image.
"""

from __future__ import annotations

import os
import random
from typing import Any

import torch

# Qwen2-VL's own spellings of its image tokens (its processor and config look them up by these names); LLaVA's.
QWEN_IMAGE_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
QWEN_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
LLAVA_IMAGE_TOKEN = "<image>"


def chat_template(image_placeholder: str) -> str:
    """Llama-3's turn layout (the embedded tokenizer's) with an image entry rendered as ``image_placeholder``; the
    assistant's text sits inside ``{% generation %}`` so TRL's ``assistant_only_loss`` can find it."""
    return (
        "{{- bos_token }}"
        "{%- for message in messages %}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        "{%- if message['role'] == 'assistant' %}{% generation %}"
        "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
        "{%- for item in message['content'] %}{%- if item['type'] == 'text' %}{{- item['text'] }}{%- endif %}"
        "{%- endfor %}{%- endif %}{{- '<|eot_id|>' }}{% endgeneration %}"
        "{%- else %}"
        "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
        "{%- for item in message['content'] %}"
        "{%- if item['type'] == 'image' %}{{- '" + image_placeholder + "' }}"
        "{%- elif item['type'] == 'text' %}{{- item['text'] }}{%- endif %}"
        "{%- endfor %}{%- endif %}{{- '<|eot_id|>' }}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
    )


PATCH, MERGE, IMAGE_SIDE = 4, 2, 16
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220), "yellow": (235, 215, 40)}
SHAPES = ("square", "stripe", "dot")
QUESTIONS = ("What is in the picture?", "Describe the image.", "What do you see?")

_TEXT = {  # the language model of both tiny VLMs (Llama-like; GQA 4:2)
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}


def _tokenizer(special: tuple[str, ...]) -> Any:
    from fastft.bench.assets import default_tokenizer

    tokenizer = default_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(special)})
    return tokenizer


def _token_ids(tokenizer: Any) -> dict:
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def tiny_llava_processor() -> Any:
    """A ``LlavaProcessor`` built offline: the embedded tokenizer + ``<image>``, CLIP's PIL image processor at
    16 x 16 pixels and patch 4, so an image is 16 image tokens (CLIP's class token dropped, LLaVA's default)."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIDE}, crop_size={"height": IMAGE_SIDE, "width": IMAGE_SIDE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=_tokenizer((LLAVA_IMAGE_TOKEN,)),
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        image_token=LLAVA_IMAGE_TOKEN,
        num_additional_image_tokens=1,
        chat_template=chat_template(LLAVA_IMAGE_TOKEN),
    )


def tiny_llava(seed: int = 0, processor: Any | None = None, attn_implementation: str = "eager") -> Any:
    """A seeded random ``LlavaForConditionalGeneration``: a 2-layer CLIP vision tower (width 32, patch 4 on 16 x 16
    images), LLaVA's 2-layer GELU projector and a 2-layer Llama (hidden 64); fp32, eager attention."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    processor = processor or tiny_llava_processor()
    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=IMAGE_SIDE, patch_size=PATCH, projection_dim=32,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision,
        # Weights drawn 5x wider than Llama's 0.02: at hidden 64 a 0.02 head can move a logit by about 1, and the
        # answers could then not be learned past a loss of ~6.5 without training the head.
        text_config=LlamaConfig(**_TEXT, **_token_ids(tokenizer), initializer_range=0.1),
        image_token_index=tokenizer.convert_tokens_to_ids(LLAVA_IMAGE_TOKEN),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlavaForConditionalGeneration(config)


def tiny_qwen2_vl_processor() -> Any:
    """A Qwen2-VL processor built offline for images only: the embedded tokenizer + Qwen2-VL's image tokens and
    Qwen2-VL's PIL image processor at patch 4 / merge 2 (16 x 16 images are 4 x 4 patches, merged into 4 tokens).
    Its tokenizer adds no bos token by itself (as Qwen's), only the chat template does.

    transformers builds ``Qwen2VLProcessor`` with a video processor, which needs torchvision; this subclass has
    none (videos are not supported by it), so it also works where torchvision is not installed. It is built in
    code, not loaded: ``AutoProcessor`` would look for the video processor again.
    """
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class ImageQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    side = PATCH * MERGE
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2, min_pixels=side * side, max_pixels=(4 * side) ** 2
    )
    tokenizer = _tokenizer(QWEN_IMAGE_TOKENS)
    # Like Qwen's own tokenizers, it adds no bos of its own (the chat template writes it): TRL's GRPOTrainer tokenises
    # image prompts twice, once with and once without special tokens, and needs both to be the same length.
    tokenizer.add_bos_token = False
    return ImageQwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=chat_template(QWEN_PLACEHOLDER),
    )


def tiny_qwen2_vl(seed: int = 0, processor: Any | None = None, attn_implementation: str = "eager") -> Any:
    """A seeded random ``Qwen2VLForConditionalGeneration``: a 2-block vision tower (width 32, patch 4, 2 x 2 merge)
    and a 2-layer language model (hidden 64, M-RoPE sections 2/3/3); fp32, eager attention."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    processor = processor or tiny_qwen2_vl_processor()
    tokenizer = processor.tokenizer
    ids = dict(zip(QWEN_IMAGE_TOKENS, tokenizer.convert_tokens_to_ids(list(QWEN_IMAGE_TOKENS))))
    text = {
        **_TEXT,
        **_token_ids(tokenizer),
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    }
    vision = {
        "depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2,
        "patch_size": PATCH, "spatial_merge_size": MERGE, "temporal_patch_size": 2,
    }  # fmt: skip
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Qwen2VLForConditionalGeneration(config)


def write_tiny_vlm(path: str | os.PathLike, seed: int = 0) -> str:
    """Write the tiny LLaVA and its processor into ``path`` (a checkpoint folder, safetensors); returns the path."""
    path = os.fspath(path)
    processor = tiny_llava_processor()
    tiny_llava(seed, processor).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def make_image(colour: str, shape: str, side: int = IMAGE_SIDE) -> Any:
    """A ``side`` x ``side`` RGB PIL image: a ``colour`` ``shape`` (square, stripe or dot) on white."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (side, side), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    fill, q = COLOURS[colour], side // 4
    if shape == "square":
        draw.rectangle([q, q, side - q - 1, side - q - 1], fill=fill)
    elif shape == "stripe":
        draw.rectangle([0, side // 2 - 2, side - 1, side // 2 + 1], fill=fill)
    else:
        draw.ellipse([q, q, side - q - 1, side - q - 1], fill=fill)
    return image


def image_examples(n: int, seed: int = 0, side: int = IMAGE_SIDE) -> list[dict[str, Any]]:
    """``n`` chat samples in TRL's vision format: ``{"images": [PIL image], "messages": [user: image + question,
    assistant: "a <colour> <shape>"]}``, drawn (seeded) from 4 colours x 3 shapes and 3 questions."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": rng.choice(QUESTIONS)}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"a {colour} {shape}"}]},
        ]
        examples.append({"images": [make_image(colour, shape, side)], "messages": messages})
    return examples
