"""Tiny image-text-to-text models and processor-free inputs for them, for tests that compare fastft with plain
transformers on images and text (fp32, a fraction of a second each on a CPU).

:func:`tiny_vision_config` starts from :func:`fastft.models.tiny_configs.tiny_config` (every size shrunk) and sets
what a multimodal model needs on top: image token ids inside the tiny vocabulary, rotary sections that add up to
the tiny head width, vision-tower layer indices that exist in a two-layer tower, a pooled token count that divides
the tiny patch grid. :func:`vision_inputs` builds what the model's processor would return for ``batch`` rows of
text with one 32 x 32 image each (``pixel_values`` in the tower's layout, grids, masks and ``input_ids`` holding as
many image tokens as the tower yields), with labels ``-100`` on image tokens, on the prompt before them and on
padding (row 1 is left-padded by two tokens). :func:`tiny_vision_model` builds a seeded model of a type and
returns it with such inputs.

Nothing here needs a processor, a tokenizer or the network. Each row of ``VISION_TYPES`` names the
transformers model type; the builder for its inputs follows the model's own ``get_image_features``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fastft.models.tiny_configs import VOCAB, tiny_config

IMAGE = 32  # image side in pixels: 4 x 4 patches of 8 pixels
PATCH = 8
# Special tokens of the tiny models, at the top of the 256-token vocabulary (random text stays below them).
IMAGE_TOKEN, VIDEO_TOKEN, START_TOKEN, END_TOKEN, PAD_TOKEN = VOCAB - 6, VOCAB - 5, VOCAB - 4, VOCAB - 3, 0
TEXT_TOKENS = (1, VOCAB - 16)  # the range random text is drawn from

_QWEN_IDS = {
    "image_token_id": IMAGE_TOKEN,
    "video_token_id": VIDEO_TOKEN,
    "vision_start_token_id": START_TOKEN,
    "vision_end_token_id": END_TOKEN,
}
_SIGLIP = {"image_size": IMAGE, "patch_size": PATCH}

# Per type: values merged into the tiny config's dict (as in tiny_configs.OVERRIDES).
OVERRIDES: dict[str, dict[str, Any]] = {
    # head_dim 16: rotary half-width 8, split into temporal/height/width sections.
    "qwen2_vl": {
        **_QWEN_IDS,
        "text_config": {"rope_parameters": {"mrope_section": [2, 3, 3]}, "pad_token_id": PAD_TOKEN},
    },
    "qwen2_5_vl": {
        **_QWEN_IDS,
        "text_config": {"rope_parameters": {"mrope_section": [2, 3, 3]}, "pad_token_id": PAD_TOKEN},
        # windows of 2 x 2 merged tokens (32 pixels) so that window attention has more than one window; block 1
        # attends to the whole image
        "vision_config": {"window_size": 32, "fullatt_block_indexes": [1]},
    },
    "qwen3_vl": {
        **_QWEN_IDS,
        "text_config": {"rope_parameters": {"mrope_section": [4, 2, 2], "mrope_interleaved": True}},
        "vision_config": {"deepstack_visual_indexes": [0], "num_position_embeddings": 64},
    },
    "gemma3": {
        "image_token_index": IMAGE_TOKEN,
        "boi_token_index": START_TOKEN,
        "eoi_token_index": END_TOKEN,
        "mm_tokens_per_image": 4,
        "vision_config": _SIGLIP,
    },
    "gemma4": {
        "image_token_id": IMAGE_TOKEN,
        "boi_token_id": START_TOKEN,
        "eoi_token_id": END_TOKEN,
        "video_token_id": VIDEO_TOKEN,
        "audio_token_id": VOCAB - 7,
        "boa_token_id": VOCAB - 8,
        "eoa_token_index": VOCAB - 9,
        "audio_config": None,
        "vision_config": {
            "model_type": "gemma4_vision",
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "head_dim": 16,
            "patch_size": PATCH,
            "pooling_kernel_size": 2,
            "position_embedding_size": 64,
        },
    },
    "mllama": {
        "image_token_index": IMAGE_TOKEN,
        # the tower's output is its last hidden state beside the intermediate layers' (1 + 1 layers of 64)
        "vision_config": {
            "attention_heads": 4,
            "num_global_layers": 1,
            "intermediate_layers_indices": [0],
            "vision_output_dim": 128,
            "max_num_tiles": 2,
            "supported_aspect_ratios": [[1, 1], [1, 2], [2, 1]],
        },
    },
    "mistral3": {"image_token_index": IMAGE_TOKEN, "vision_config": _SIGLIP},
    "lfm2_vl": {"image_token_id": IMAGE_TOKEN, "vision_config": {"patch_size": PATCH, "num_patches": 16}},
    "idefics3": {"image_token_id": IMAGE_TOKEN, "pad_token_id": PAD_TOKEN, "vision_config": _SIGLIP},
    "smolvlm": {"image_token_id": IMAGE_TOKEN, "pad_token_id": PAD_TOKEN, "vision_config": _SIGLIP},
    "llava": {"image_token_index": IMAGE_TOKEN, "image_seq_length": 16, "vision_config": _SIGLIP},
}

VISION_TYPES: tuple[str, ...] = tuple(OVERRIDES)


def _merge(d: dict[str, Any], overrides: dict[str, Any]) -> None:
    for name, value in overrides.items():
        if isinstance(value, dict) and isinstance(d.get(name), dict):
            _merge(d[name], value)
        else:
            d[name] = value


def tiny_vision_config(model_type: str) -> Any:
    """The tiny config of an image-text-to-text ``model_type`` (one of ``VISION_TYPES``), eager attention."""
    if model_type not in OVERRIDES:
        raise ValueError(f"no tiny vision config for model type {model_type!r}; the known types are {VISION_TYPES}")
    config = tiny_config(model_type)
    d = config.to_dict()
    _merge(d, OVERRIDES[model_type])
    config = type(config).from_dict(d)
    config._attn_implementation = "eager"
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "_attn_implementation"):
            sub._attn_implementation = "eager"
    return config


# ---------------------------------------------------------------------------------------------------------------
# Inputs: what each model's processor returns, built from random pixels.
# ---------------------------------------------------------------------------------------------------------------


def _qwen(config: Any, batch: int, gen: torch.Generator) -> tuple[dict[str, torch.Tensor], int]:
    """Qwen2/2.5/3-VL: patches flattened to rows of ``C x temporal x p x p``; one (t, h, w) grid per image."""
    v = config.vision_config
    p, tp, merge = v.patch_size, v.temporal_patch_size, v.spatial_merge_size
    side = IMAGE // p
    grid = torch.tensor([[1, side, side]] * batch)
    pixels = torch.rand(batch * side * side, v.in_channels * tp * p * p, generator=gen)
    return {"pixel_values": pixels, "image_grid_thw": grid}, side * side // merge**2


def _gemma3(config: Any, batch: int, gen: torch.Generator) -> tuple[dict[str, torch.Tensor], int]:
    return {"pixel_values": torch.rand(batch, 3, IMAGE, IMAGE, generator=gen)}, config.mm_tokens_per_image


def _gemma4(config: Any, batch: int, gen: torch.Generator) -> tuple[dict[str, torch.Tensor], int]:
    """Gemma 4: patches flattened to rows of ``3 p p`` with their (x, y) positions; pooled k x k."""
    v = config.vision_config
    side = IMAGE // v.patch_size
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    positions = torch.stack([xs.flatten(), ys.flatten()], -1).expand(batch, -1, -1).contiguous()
    pixels = torch.rand(batch, side * side, 3 * v.patch_size**2, generator=gen)
    return {"pixel_values": pixels, "image_position_ids": positions}, side * side // v.pooling_kernel_size**2


def _mllama(config: Any, batch: int, gen: torch.Generator) -> tuple[dict[str, torch.Tensor], int]:
    """Llama 3.2 Vision: one image of one tile per row (aspect ratio id 1 = [1, 1]); no image tokens in the text
    beyond one ``<|image|>``: the text reads the image through cross-attention."""
    tiles = config.vision_config.max_num_tiles
    pixels = torch.zeros(batch, 1, tiles, 3, IMAGE, IMAGE)
    pixels[:, :, 0] = torch.rand(batch, 1, 3, IMAGE, IMAGE, generator=gen)
    mask = torch.zeros(batch, 1, tiles, dtype=torch.long)
    mask[:, :, 0] = 1
    ids = torch.ones(batch, 1, dtype=torch.long)
    return {"pixel_values": pixels, "aspect_ratio_ids": ids, "aspect_ratio_mask": mask}, 1


def _pixtral(config: Any, batch: int, gen: torch.Generator) -> tuple[dict[str, torch.Tensor], int]:
    """Mistral 3 (Pixtral tower): whole images with their sizes; tokens merged ``spatial_merge_size``^2 to one."""
    side = IMAGE // config.vision_config.patch_size // config.spatial_merge_size
    pixels = torch.rand(batch, 3, IMAGE, IMAGE, generator=gen)
    return {"pixel_values": pixels, "image_sizes": torch.tensor([[IMAGE, IMAGE]] * batch)}, side * side


def _lfm2_vl(config: Any, batch: int, gen: torch.Generator) -> tuple[dict[str, torch.Tensor], int]:
    """LFM2-VL (SigLIP2 tower): patches flattened to rows of ``p p 3`` with a patch mask and the patch grid."""
    p = config.vision_config.patch_size
    side = IMAGE // p
    pixels = torch.rand(batch, side * side, 3 * p * p, generator=gen)
    return {
        "pixel_values": pixels,
        "pixel_attention_mask": torch.ones(batch, side * side, dtype=torch.long),
        "spatial_shapes": torch.tensor([[side, side]] * batch),
    }, side * side // config.downsample_factor**2


def _idefics3(config: Any, batch: int, gen: torch.Generator) -> tuple[dict[str, torch.Tensor], int]:
    """Idefics3 / SmolVLM: one image per row, ``(batch, images, 3, H, W)``; pixel shuffle by ``scale_factor``."""
    side = IMAGE // config.vision_config.patch_size
    return {"pixel_values": torch.rand(batch, 1, 3, IMAGE, IMAGE, generator=gen)}, side * side // config.scale_factor**2


def _llava(config: Any, batch: int, gen: torch.Generator) -> tuple[dict[str, torch.Tensor], int]:
    """LLaVA (CLIP tower): whole images; every patch one token (the class token dropped)."""
    side = IMAGE // config.vision_config.patch_size
    return {"pixel_values": torch.rand(batch, 3, IMAGE, IMAGE, generator=gen)}, side * side


_PIXELS: dict[str, Callable[[Any, int, torch.Generator], tuple[dict[str, torch.Tensor], int]]] = {
    "qwen2_vl": _qwen,
    "qwen2_5_vl": _qwen,
    "qwen3_vl": _qwen,
    "gemma3": _gemma3,
    "gemma4": _gemma4,
    "mllama": _mllama,
    "mistral3": _pixtral,
    "lfm2_vl": _lfm2_vl,
    "idefics3": _idefics3,
    "smolvlm": _idefics3,
    "llava": _llava,
}


def vision_inputs(
    config: Any, batch: int = 2, prompt: int = 3, answer: int = 6, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Inputs of ``batch`` rows for the model of ``config``: ``prompt`` text tokens, the image (between start/end
    tokens where the family has them), ``answer`` text tokens; row 1 is left-padded by two tokens. ``labels`` are
    the answer tokens (``-100`` on padding, prompt and image positions), as a vision collator would mask them."""
    model_type = config.model_type
    if model_type not in _PIXELS:
        raise ValueError(f"no tiny vision inputs for model type {model_type!r}; the known types are {VISION_TYPES}")
    gen = torch.Generator().manual_seed(seed)
    pixels, n_image = _PIXELS[model_type](config, batch, gen)
    qwen = model_type.startswith("qwen")
    image = [START_TOKEN] * qwen + [IMAGE_TOKEN] * n_image + [END_TOKEN] * qwen
    pad = 2 if batch > 1 else 0
    rows, labels, masks = [], [], []
    for b in range(batch):
        text = torch.randint(*TEXT_TOKENS, (prompt + answer,), generator=gen).tolist()
        left = pad if b == 1 else 0
        ids = text[:prompt] + image + text[prompt:]
        rows.append([PAD_TOKEN] * left + ids + [PAD_TOKEN] * (pad - left))
        labels.append([-100] * (left + prompt + len(image)) + text[prompt:] + [-100] * (pad - left))
        masks.append([0] * left + [1] * len(ids) + [0] * (pad - left))
    input_ids, attention_mask = torch.tensor(rows), torch.tensor(masks)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": torch.tensor(labels), **pixels}
    is_image = input_ids == IMAGE_TOKEN
    if qwen:
        inputs["mm_token_type_ids"] = is_image.long()
    if model_type == "gemma3":
        inputs["token_type_ids"] = is_image.long()
    if model_type == "gemma4":
        inputs["mm_token_type_ids"] = is_image.long()
    if model_type == "mllama":
        # every text token after the image token reads the image's first tile
        tiles = config.vision_config.max_num_tiles
        cross = torch.zeros(batch, input_ids.shape[1], 1, tiles, dtype=torch.long)
        after = is_image.long().cumsum(-1) > 0
        cross[..., 0, 0] = after.long()
        inputs["cross_attention_mask"] = cross
    return inputs


def tiny_vision_model(model_type: str, seed: int = 0, **input_kwargs: Any) -> tuple[torch.nn.Module, dict]:
    """A seeded fp32 ``AutoModelForImageTextToText`` of ``model_type`` and :func:`vision_inputs` for it.

    Weights a family initialises to zero so that a fresh model ignores the image (Gemma 3's projection, Llama 3.2
    Vision's tanh gates) are drawn at random instead: the image must reach the loss for a test of the vision
    tower's gradients to test anything."""
    from transformers import AutoModelForImageTextToText

    config = tiny_vision_config(model_type)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.any() and (param.dim() >= 2 or "gate" in name.rsplit(".", 1)[-1]):
                param.normal_(0.0, 0.5 if param.dim() < 2 else 0.05)
    return model, vision_inputs(model.config, seed=seed, **input_kwargs)
