"""The GPU suite's ``moe_step`` part (:mod:`fastft.bench.gpu`): one MoE training step at real expert dimensions.

Qwen3-30B-A3B (128 experts, top-8, expert width 768, hidden 2048) and gpt-oss-20b (32 experts, top-4, width 2880,
biases, clamped interleaved SwiGLU) from :mod:`fastft.bench.presets`, cut to ``LAYERS`` decoder layers, random
weights, bf16, batch 1 x ``TOKENS`` random tokens; LoRA (r=16 on attention and on the experts through
``target_parameters``) and full fine-tuning; contenders plain transformers with its ``eager`` and ``grouped_mm``
experts, Liger Kernel (when installed and it has the model type; last, it patches transformers globally) and fastft
(:func:`fastft.bench.moe.run_contender`). Per row: tokens/s over the steps after the first, the peak allocated
(``max_memory_allocated``, weights and optimizer states included), the bytes one MoE layer saves for backward.

Everything runs in the part's own process, one configuration after another, most important first (:data:`PLAN`);
a configuration that would start with less than ``MIN_START_S`` left is recorded ``skipped`` (time budget), so the
part always ends inside its budget with what it measured. ``dry_run``: the tiny configs of the same model types on
the CPU (fastft's torch path).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

LAYERS, TOKENS, STEPS = 2, 4096, 3
DRY_TOKENS, DRY_STEPS = 32, 2
MIN_START_S = 4.0
DRY_MIN_START_S = 3.0  # a tiny configuration takes about a second; more on a loaded CI machine
MODELS = {"qwen3-30b-a3b": "qwen3_moe", "gpt-oss-20b": "gpt_oss"}  # preset -> its model type (the dry run's)
# (model, mode, contender), most important first: a budget cut drops the last.
PLAN = (
    *(("qwen3-30b-a3b", "lora", c) for c in ("fastft", "grouped_mm", "eager")),
    *(("gpt-oss-20b", "lora", c) for c in ("fastft", "grouped_mm", "eager")),
    *(("qwen3-30b-a3b", "full", c) for c in ("fastft", "grouped_mm", "eager")),
    *(("gpt-oss-20b", "full", c) for c in ("fastft", "grouped_mm", "eager")),
    ("qwen3-30b-a3b", "lora", "liger"),
    ("gpt-oss-20b", "lora", "liger"),
)


def _config(preset: str, dry_run: bool):
    if dry_run:
        from fastft.models.tiny_configs import tiny_config

        return tiny_config(MODELS[preset])
    from fastft.bench.presets import preset_config

    return preset_config(preset, LAYERS)


def part_moe_step(spec: dict, emit: Callable[[dict], None]) -> dict:
    """The ``moe_step`` part: every configuration of :data:`PLAN` that fits in the part's time."""
    from fastft.bench import moe
    from fastft.kernels._dispatch import force_backend

    dry_run = spec["dry_run"]
    device = torch.device("cpu" if dry_run else "cuda")
    dtype = torch.float32 if dry_run else torch.bfloat16
    tokens, steps = (DRY_TOKENS, DRY_STEPS) if dry_run else (TOKENS, STEPS)
    results: dict[str, Any] = {
        "tokens": tokens,
        "steps": steps,
        "layers": None if dry_run else LAYERS,
        "dtype": str(dtype).removeprefix("torch."),
        "rows": [],
    }
    configs = {name: _config(name, dry_run) for name in MODELS}
    for name, config in configs.items():
        text = config.get_text_config()
        results.setdefault("models", {})[name] = {
            "model_type": config.model_type,
            "hidden": text.hidden_size,
            "experts": next(getattr(text, a) for a in moe._EXPERT_COUNTS if hasattr(text, a)),
            "top_k": text.num_experts_per_tok,
            "expert_width": getattr(text, "moe_intermediate_size", None) or text.intermediate_size,
        }
    backend = force_backend("torch") if dry_run else _null()
    with backend:
        for name, mode, contender in PLAN:
            left = spec["deadline"] - time.time()
            if left < (DRY_MIN_START_S if dry_run else MIN_START_S):
                row = {"contender": contender, "label": moe.LABELS[contender], "mode": mode, "status": "skipped"}
                row["reason"] = f"time budget: {max(left, 0):.0f} s left"
            else:
                row = moe.run_contender(
                    configs[name], contender, mode=mode, tokens=tokens, batch_size=1, steps=steps, dtype=dtype,
                    device=device,
                )  # fmt: skip
            row["model"] = name
            row.pop("layer_saved_tensors", None)  # the CPU bench lists them; here the bytes are enough
            results["rows"].append(row)
            for model_name in MODELS:
                moe.add_ratios([r for r in results["rows"] if r["model"] == model_name])
            emit({"results": results})
    return {"results": results}


def _null():
    import contextlib

    return contextlib.nullcontext()


def markdown_rows(results: dict) -> list[str]:
    """The part's table for the suite's markdown report."""
    if not results or not results.get("rows"):
        return []
    layers = f"{results['layers']} layers, " if results.get("layers") else "tiny configs, "
    lines = [
        "",
        (
            f"## MoE training step ({layers}{results['dtype']}, 1 x {results['tokens']} tokens, "
            f"{results['steps']} AdamW steps)"
        ),
        "",
        (
            "| model | mode | contender | status | tokens/s | x grouped_mm | peak GB | one MoE layer saves MiB "
            "| of grouped_mm |"
        ),
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results["rows"]:
        ok = r.get("status") == "ok"
        status = "ok" if ok else f"{r['status']}: {r.get('reason', '')}".replace("|", "/")[:120]
        speed = f"{r['tokens_per_s']:.0f}" if ok and r.get("tokens_per_s") else ""
        x = f"{r['speed_of_grouped_mm']:.2f}" if r.get("speed_of_grouped_mm") else ""
        peak = f"{r['peak_bytes'] / 1e9:.1f}" if r.get("peak_bytes") else ""
        saved = f"{r['layer_saved_bytes'] / 2**20:.1f}" if r.get("layer_saved_bytes") else ""
        of = f"{r['layer_saved_of_grouped_mm']:.2f}" if r.get("layer_saved_of_grouped_mm") else ""
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['label']} | {status} | {speed} | {x} | {peak} | {saved} | {of} |"
        )
    return lines
