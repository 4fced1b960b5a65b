"""One vision-language LoRA training step (an image and text): what autograd keeps for backward, and its speed.

The model is Qwen2.5-VL with random weights, at the real dimensions of Qwen2.5-VL-7B (:data:`QWEN25_VL_7B`: text
hidden 3584, MLP 18944, 28 query / 4 key-value heads of 128, vocabulary 152064; vision tower width 1280, MLP 3420,
16 heads, patch 14, 2 x 2 merge, window attention of 112 pixels) with a few layers, or scaled down for a CPU
(:data:`QWEN25_VL_SCALED`: every width / 4, the same structure). One sample: one image of ``image_tokens`` visual
tokens (a square grid of 14-pixel patches, 4 patches merged into one token) inside ``text_tokens`` of text; labels
are -100 on the image tokens and on the prompt before them, as a collator writes them. LoRA (rank 16) on every
attention and MLP projection of the vision tower, the projector and the language model
(``FastVisionModel.get_peft_model``'s defaults); plain gets the same regex from PEFT directly.

Contenders: ``plain`` (transformers + PEFT), ``fastft`` (:func:`fastft.patch` on the same PEFT model) and
``fastft+offload`` (plus offloaded checkpointing of every decoder layer and vision block). :func:`measure_saved`
counts the bytes saved for backward (each storage once, parameters excluded: :class:`fastft.bench.step.
ActivationMeter`) and lists them by shape; :func:`part_vlm_step` is the GPU suite's ``vlm_step`` part (tokens/s and
peak memory per contender).

    python -m fastft.bench.vlm [--layers N] [--image-tokens N] [--text-tokens N]   # the CPU table (scaled model)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

CONTENDERS = ("plain", "fastft", "fastft+offload")


@dataclass(frozen=True)
class VlmDims:
    """A Qwen2.5-VL's sizes and one training sample's shape."""

    layers: int = 4
    hidden: int = 3584
    intermediate: int = 18944
    heads: int = 28
    kv_heads: int = 4
    vocab: int = 152064
    vision_layers: int = 4
    vision_hidden: int = 1280
    vision_intermediate: int = 3420
    vision_heads: int = 16
    image_tokens: int = 1024  # after the 2 x 2 merge: 4096 patches of 14 x 14 pixels (a 896 x 896 image)
    text_tokens: int = 512
    rank: int = 16
    steps: int = 4  # the first compiles and allocates; tokens/s counts the others

    @property
    def seq_len(self) -> int:
        return self.image_tokens + self.text_tokens

    def config(self) -> Any:
        """The transformers ``Qwen2_5_VLConfig`` (M-RoPE sections 16/24/24 of the 64 rotary pairs of 128-wide heads,
        as Qwen2.5-VL-7B; the last vision block attends to the whole image, the others in windows)."""
        from transformers import Qwen2_5_VLConfig

        head_dim = self.hidden // self.heads
        half = head_dim // 2
        sections = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
        text = {
            "hidden_size": self.hidden, "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab,
            "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
            "bos_token_id": self.vocab - 6, "eos_token_id": self.vocab - 5, "pad_token_id": self.vocab - 7,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": sections},
        }  # fmt: skip
        vision = {
            "depth": self.vision_layers, "hidden_size": self.vision_hidden,
            "intermediate_size": self.vision_intermediate, "num_heads": self.vision_heads, "patch_size": 14,
            "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112, "out_hidden_size": self.hidden,
            "fullatt_block_indexes": [self.vision_layers - 1],
        }  # fmt: skip
        special = {"image_token_id": self.vocab - 1, "video_token_id": self.vocab - 2,
                   "vision_start_token_id": self.vocab - 3, "vision_end_token_id": self.vocab - 4}  # fmt: skip
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **special)
        config.use_cache = False
        return config


QWEN25_VL_7B = VlmDims()
QWEN25_VL_SCALED = VlmDims(
    layers=2, hidden=896, intermediate=4736, heads=7, kv_heads=1, vocab=32000, vision_layers=2, vision_hidden=320,
    vision_intermediate=855, vision_heads=4, image_tokens=256, text_tokens=256,
)  # fmt: skip
TINY = VlmDims(
    layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=512, vision_layers=2, vision_hidden=32,
    vision_intermediate=64, vision_heads=2, image_tokens=16, text_tokens=32, rank=8, steps=2,
)  # fmt: skip


def sample(dims: VlmDims, device: torch.device | str = "cpu", seed: int = 1) -> dict[str, torch.Tensor]:
    """One training sample: 16 prompt tokens, the image (between vision start/end tokens), the rest text; labels
    -100 on the prompt and the image."""
    side = 2 * math.isqrt(dims.image_tokens)  # patches per side
    if (side // 2) ** 2 != dims.image_tokens:
        raise ValueError(f"image_tokens={dims.image_tokens} is not a square number (a square image's token grid)")
    g = torch.Generator().manual_seed(seed)
    prompt, rest = 16, dims.text_tokens - 16 - 2
    text = torch.randint(0, dims.vocab - 16, (dims.text_tokens,), generator=g)
    image = torch.full((dims.image_tokens,), dims.vocab - 1)
    ids = torch.cat([text[:prompt], torch.tensor([dims.vocab - 3]), image, torch.tensor([dims.vocab - 4]),
                     text[prompt : prompt + rest]])[None]  # fmt: skip
    labels = ids.clone()
    labels[:, : prompt + 1 + dims.image_tokens + 1] = -100
    pixels = torch.randn(side * side, 3 * 2 * 14 * 14, generator=g)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "mm_token_type_ids": (ids == dims.vocab - 1).long().to(device),
        "pixel_values": pixels.to(device),
        "image_grid_thw": torch.tensor([[1, side, side]]).to(device),
        "labels": labels.to(device),
    }


def build(
    contender: str, dims: VlmDims, *, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
    seed: int = 0,
) -> nn.Module:  # fmt: skip
    """The PEFT LoRA model of ``contender`` in training mode, on a random base drawn from ``seed`` (the same base for
    every contender: it is built on ``device`` from the same generator state)."""
    import peft
    from transformers import Qwen2_5_VLForConditionalGeneration

    from fastft.models.vision_model import FastVisionModel, lora_layers, lora_target_regex

    if contender not in CONTENDERS:
        raise ValueError(f"contender={contender!r} is not one of {CONTENDERS}")
    config = dims.config()
    config._attn_implementation = "sdpa"
    devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(seed)
        base = Qwen2_5_VLForConditionalGeneration(config).to(dtype)
    if contender == "plain":
        regex = lora_target_regex(base, lora_layers(base))
        lora = peft.LoraConfig(r=dims.rank, lora_alpha=dims.rank, target_modules=regex, task_type="CAUSAL_LM")
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(3407)  # FastVisionModel's default random_state: the same adapters
            model = peft.get_peft_model(base, lora)
    else:
        mode = "unsloth" if contender == "fastft+offload" else False
        model = FastVisionModel.get_peft_model(base, r=dims.rank, lora_alpha=dims.rank, use_gradient_checkpointing=mode)
    return model.train()


@dataclass
class SavedResult:
    """Bytes one step saves for backward (parameters excluded), with the tensors grouped by dtype and shape."""

    contender: str
    saved_bytes: int
    tensors: list[tuple[str, int, int]]  # ("dtype shape", count, bytes), largest first
    loss: float


def measure_saved(contender: str, dims: VlmDims = QWEN25_VL_SCALED, dtype: torch.dtype = torch.bfloat16) -> SavedResult:
    """Run one forward + backward of ``contender`` on :func:`sample` (CPU) and count what autograd saved.

    Offloaded checkpointing's layer inputs stay in host memory on a GPU; on the CPU (no device to leave) they are
    counted like everything else, so ``fastft+offload`` here shows what checkpointing keeps, not the device split.
    """
    from fastft.bench.step import ActivationMeter

    model = build(contender, dims, dtype=dtype)
    batch = sample(dims)
    with ActivationMeter.for_model(model) as meter:
        loss = model(**batch).loss
    loss.backward()
    seen, groups = set(), Counter()
    sizes: dict[str, int] = {}
    for key, saved in zip(meter.keys, meter.saved):
        if key in seen:
            continue
        seen.add(key)
        name = f"{str(saved.dtype).removeprefix('torch.')} {tuple(saved.shape)}"
        groups[name] += 1
        sizes[name] = sizes.get(name, 0) + saved.storage_bytes
    tensors = sorted(((n, groups[n], sizes[n]) for n in groups), key=lambda t: -t[2])
    return SavedResult(contender, meter.total_bytes, tensors, float(loss.detach()))


def saved_table(results: list[SavedResult], top: int = 12) -> str:
    """A markdown table per contender: total saved bytes and its ``top`` largest groups of tensors."""
    plain = next((r.saved_bytes for r in results if r.contender == "plain"), None)
    lines = ["| contender | saved for backward | of plain | loss |", "|---|---:|---:|---:|"]
    for r in results:
        ratio = f"{r.saved_bytes / plain:.3f}" if plain else "-"
        lines.append(f"| {r.contender} | {r.saved_bytes / 2**20:.1f} MiB | {ratio} | {r.loss:.4f} |")
    for r in results:
        lines += ["", f"{r.contender}: the {top} largest groups of saved tensors (dtype shape, count, MiB)", ""]
        lines += [f"- `{name}` x {count}: {nbytes / 2**20:.2f}" for name, count, nbytes in r.tensors[:top]]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the GPU part


def part_vlm_step(spec: dict, emit: Callable[[dict], None]) -> dict:
    """The GPU suite's ``vlm_step``: each contender at Qwen2.5-VL-7B's dimensions (:data:`QWEN25_VL_7B`, a few
    layers; TINY on the dry run), ``dims.steps`` AdamW steps on one image + text sample: tokens/s (steps after the
    first), peak memory (``max_memory_allocated``, weights included), losses. Contenders share one random base."""
    from fastft.bench import step

    cuda = not spec["dry_run"]
    device = torch.device("cuda" if cuda else "cpu")
    dims = TINY if spec["dry_run"] else QWEN25_VL_7B
    results: dict[str, Any] = {"model": dataclasses.asdict(dims), "rows": []}
    batch = sample(dims, device)
    for contender in CONTENDERS:
        row: dict[str, Any] = {"contender": contender}
        if spec["deadline"] - time.time() < (5 if spec["dry_run"] else 20):
            row.update(status="skipped", reason="time budget")
            results["rows"].append(row)
            continue
        try:
            model = build(contender, dims, device=device)
            stats = step.train(model, [batch] * dims.steps, device=device, tokens_in=lambda b: b["input_ids"].numel())
            row.update(
                status="ok",
                tokens_per_s=stats.tokens_per_s,
                step_s=statistics.median(stats.step_seconds[1:] or stats.step_seconds),
                peak_bytes=stats.peak_bytes,
                losses=stats.losses,
            )
        except torch.cuda.OutOfMemoryError as e:
            row.update(status="OOM", reason=str(e).split("\n")[0][:200])
        finally:
            model = None
            if cuda:
                torch.cuda.empty_cache()
        results["rows"].append(row)
        emit({"results": results})
    plain = next((r for r in results["rows"] if r["contender"] == "plain" and r.get("tokens_per_s")), None)
    for row in results["rows"]:
        if plain and row.get("tokens_per_s"):
            row["x_plain"] = row["tokens_per_s"] / plain["tokens_per_s"]
            if row.get("peak_bytes") and plain.get("peak_bytes"):
                row["memory_of_plain"] = row["peak_bytes"] / plain["peak_bytes"]
    return {"results": results}


def main(argv: list[str] | None = None) -> int:
    """``python -m fastft.bench.vlm``: the saved-for-backward table of the scaled model on this CPU."""
    parser = argparse.ArgumentParser(prog="python -m fastft.bench.vlm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=QWEN25_VL_SCALED.layers)
    parser.add_argument("--image-tokens", type=int, default=QWEN25_VL_SCALED.image_tokens)
    parser.add_argument("--text-tokens", type=int, default=QWEN25_VL_SCALED.text_tokens)
    args = parser.parse_args(argv)
    dims = dataclasses.replace(
        QWEN25_VL_SCALED, layers=args.layers, image_tokens=args.image_tokens, text_tokens=args.text_tokens
    )
    print(saved_table([measure_saved(c, dims) for c in CONTENDERS]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
