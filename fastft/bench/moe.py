"""Mixture-of-experts benchmark: the same MoE model trained with each experts implementation, side by side.

``fastft bench --preset qwen3-30b-a3b --layers 2`` (or ``gpt-oss-20b``; any preset whose config has routed experts)
runs this instead of the dense comparison. Contenders (:data:`CONTENDERS`), each from the same seed:

- ``eager``, ``grouped_mm``, ``batched_mm``: plain transformers (+ PEFT) with ``experts_implementation`` set to that
  implementation of ``transformers.integrations.moe`` (the loop over experts; ``torch._grouped_mm`` over
  expert-sorted rows; one batched matmul per (token, expert) pair). A contender transformers cannot run here (say
  grouped_mm on an old torch) is reported with its error, never a crash;
- ``liger``: transformers eager with Liger Kernel's ``apply_liger_kernel_to_<model type>`` (CUDA only, when
  installed and when Liger has that model type);
- ``fastft``: :func:`fastft.patch` (routed experts through :func:`fastft.kernels.moe_experts`).

``mode``: ``lora`` (r=16, alpha 16, on q/k/v/o, dense MLP projections, and the routed experts' 3-D ``gate_up_proj``
/ ``down_proj`` through PEFT's ``target_parameters``) or ``full`` (every parameter trained). Every step is forward +
backward + AdamW. Measured per contender (:func:`train_contender`): loss per step, tokens/s (steps after the first),
the bytes autograd saves for backward in the first step (parameters excluded) and, on CUDA, the peak allocated;
and (:func:`moe_layer_saved`) the saved-for-backward bytes of one MoE layer alone (its router, experts and shared
experts, on random hidden states requiring grad) with every saved tensor listed. On a CPU fastft runs its torch
path (the same hand-written backward as the Triton kernels), as the dense bench does.
"""

from __future__ import annotations

import copy
import gc
import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

CONTENDERS = ("eager", "grouped_mm", "batched_mm", "liger", "fastft")
LABELS = {
    "eager": "transformers eager experts",
    "grouped_mm": "transformers grouped_mm experts",
    "batched_mm": "transformers batched_mm experts",
    "liger": "transformers + Liger Kernel",
    "fastft": "fastft",
}
MODES = ("lora", "full")
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")
_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts")


def is_moe(config: Any) -> bool:
    """Whether ``config`` (or its text config) describes a model with routed experts."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return any(isinstance(getattr(text, a, None), int) and getattr(text, a) > 1 for a in _EXPERT_COUNTS)


def liger_unavailable(model_type: str, device: torch.device) -> str | None:
    """Why Liger Kernel cannot be a contender for ``model_type`` on ``device`` (None when it can)."""
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed"
    if device.type != "cuda":
        return "Liger Kernel's kernels are Triton-only: they need a CUDA device"
    import liger_kernel.transformers as liger

    if not hasattr(liger, f"apply_liger_kernel_to_{model_type}"):
        return f"Liger Kernel has no apply_liger_kernel_to_{model_type}"
    return None


def build(
    config: Any,
    contender: str,
    *,
    mode: str = "lora",
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | None = None,
    seed: int = 0,
    rank: int = 16,
) -> tuple[nn.Module, str]:
    """The model of ``contender`` on ``config`` (random weights from ``seed``) in training mode, and a note."""
    from transformers import AutoModelForCausalLM

    if contender not in CONTENDERS:
        raise ValueError(f"contender={contender!r} is not one of {', '.join(CONTENDERS)}")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {', '.join(MODES)}")
    device = device or torch.device("cpu")
    config = copy.deepcopy(config)
    config.use_cache = False
    implementation = contender if contender in ("grouped_mm", "batched_mm") else "eager"
    for part in {id(c): c for c in (config, config.get_text_config())}.values():
        part._experts_implementation = implementation
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    note = ""
    if contender == "liger":
        reason = liger_unavailable(config.model_type, device)
        if reason:
            raise RuntimeError(reason)
        import liger_kernel.transformers as liger

        apply = getattr(liger, f"apply_liger_kernel_to_{config.model_type}")
        apply(model=model)
        note = f"liger: {apply.__name__}(model=...)"
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        modules = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        params = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.dim() == 3}
        lora = LoraConfig(
            r=rank,
            lora_alpha=rank,
            lora_dropout=0.0,
            target_modules=[t for t in ATTENTION_TARGETS if t in modules],
            target_parameters=[p for p in EXPERT_PARAMETERS if p in params] or None,
            task_type="CAUSAL_LM",
        )
        torch.manual_seed(seed + 1)
        model = get_peft_model(model, lora)
    if contender == "fastft":
        import fastft

        fastft.patch(model)
        note = model.fastft_report.summary()
    return model.train(), note


def random_batch(vocab: int, tokens: int, batch_size: int = 1, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch_size, tokens), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@dataclass
class LayerSaved:
    """What autograd keeps for backward in one MoE layer's forward: total bytes (each storage once) and tensors."""

    total_bytes: int
    tensors: list[dict[str, Any]]


def moe_block(model: nn.Module) -> nn.Module:
    """The first MoE layer of ``model``: the module holding the routed ``experts``."""
    for module in model.modules():
        experts = getattr(module, "experts", None)
        if isinstance(experts, nn.Module) and module is not experts:
            return module
    raise ValueError(f"{type(model).__name__} has no module with routed `experts`")


def moe_layer_saved(model: nn.Module, tokens: int, *, seed: int = 2) -> LayerSaved:
    """Bytes saved for backward by one forward of the first MoE layer on (1, tokens, H) random hidden states that
    require grad (as inside a model), parameters and buffers excluded; every saved tensor listed."""
    from fastft.bench.step import ActivationMeter

    block = moe_block(model)
    param = next(p for p in block.parameters())
    hidden_size = model.config.get_text_config().hidden_size
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, tokens, hidden_size, generator=gen).to(param.device, param.dtype).requires_grad_()
    meter = ActivationMeter.for_model(model)
    with meter:
        out = block(x)
    out = out[0] if isinstance(out, tuple) else out
    out.float().sum().backward()
    tensors = [{"shape": list(s.shape), "dtype": str(s.dtype).removeprefix("torch."), "bytes": s.storage_bytes}
               for s in meter.saved]  # fmt: skip
    return LayerSaved(meter.total_bytes, tensors)


def train_contender(
    model: nn.Module, batch: dict[str, torch.Tensor], steps: int, *, device: torch.device, lr: float = 1e-4
) -> dict[str, Any]:
    """``steps`` AdamW steps on ``batch``: losses, tokens/s, saved-for-backward bytes, CUDA peak."""
    from fastft.bench.step import TrainingRun

    run = TrainingRun(model, device=device, lr=lr, tokens_in=lambda b: int(b["labels"].numel()))
    for _ in range(steps):
        run.step(batch)
    stats = run.stats
    return {
        "losses": stats.losses,
        "step_seconds": stats.step_seconds,
        "tokens_per_s": stats.tokens_per_s,
        "saved_bytes": stats.saved_bytes,
        "peak_bytes": stats.peak_bytes,
        "model_bytes": stats.model_bytes,
    }


def run_contender(
    config: Any,
    contender: str,
    *,
    mode: str,
    tokens: int,
    batch_size: int,
    steps: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
    layer_tokens: int | None = None,
) -> dict[str, Any]:
    """One contender, built, measured and freed: a row (``status`` ok / failed / skipped with the ``reason``)."""
    row: dict[str, Any] = {"contender": contender, "label": LABELS[contender], "mode": mode, "status": "ok"}
    if contender == "liger" and (reason := liger_unavailable(config.model_type, device)):
        return {**row, "status": "skipped", "reason": reason}
    model = None
    try:
        t0 = time.perf_counter()
        model, row["note"] = build(config, contender, mode=mode, dtype=dtype, device=device, seed=seed)
        row["build_s"] = time.perf_counter() - t0
        saved = moe_layer_saved(model, layer_tokens or tokens)
        row["layer_saved_bytes"], row["layer_saved_tensors"] = saved.total_bytes, saved.tensors
        model.zero_grad(set_to_none=True)
        vocab = model.get_output_embeddings().weight.shape[0]
        row.update(train_contender(model, random_batch(vocab, tokens, batch_size), steps, device=device))
    except Exception as exc:  # noqa: BLE001 - one contender's failure is its result; the others still run
        oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
        row.update(
            status="OOM" if oom else "failed", reason=f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        )
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def compare(
    config: Any,
    *,
    modes: tuple[str, ...] = ("lora",),
    contenders: tuple[str, ...] = CONTENDERS,
    tokens: int = 128,
    batch_size: int = 1,
    steps: int = 3,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | None = None,
    seed: int = 0,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Every contender in every mode, one after another (Liger last: it patches transformers' functions for the
    whole process); rows with ratios to eager and grouped_mm of the same mode filled in."""
    device = device or torch.device("cpu")
    order = [c for c in contenders if c != "liger"] + [c for c in contenders if c == "liger"]
    rows = []
    for mode in modes:
        for contender in order:
            row = run_contender(
                config, contender, mode=mode, tokens=tokens, batch_size=batch_size, steps=steps, dtype=dtype,
                device=device, seed=seed,
            )  # fmt: skip
            rows.append(row)
            if on_row is not None:
                on_row(row)
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """``layer_saved_of_<base>`` and ``speed_of_<base>`` for base in eager / grouped_mm, per mode."""
    for row in rows:
        for base in ("eager", "grouped_mm"):
            ref = next((r for r in rows if r["contender"] == base and r["mode"] == row["mode"]), None)
            if ref is None or ref.get("status") != "ok" or row.get("status") != "ok":
                continue
            if ref.get("layer_saved_bytes"):
                row[f"layer_saved_of_{base}"] = row["layer_saved_bytes"] / ref["layer_saved_bytes"]
            if ref.get("tokens_per_s"):
                row[f"speed_of_{base}"] = row["tokens_per_s"] / ref["tokens_per_s"]


def _mib(n: int | None) -> str:
    return "" if n is None else f"{n / 2**20:.1f}"


def _x(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}x"


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The side-by-side table, then the tensors one MoE layer saves per contender."""
    lines = [
        f"# fastft MoE bench: {meta['model']}",
        "",
        (
            f"{meta['device']}, {meta['dtype']}, {meta['batch_size']} x {meta['tokens']} tokens, {meta['steps']} steps "
            f"(AdamW); saved = bytes autograd keeps for backward (parameters excluded); one MoE layer on "
            f"{meta['tokens']} tokens."
        ),
        "",
        (
            "| mode | contender | status | loss first → last | tokens/s | saved MiB (step) | saved MiB (one MoE layer) "
            "| layer saved of eager | of grouped_mm | peak MiB |"
        ),
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ok = r.get("status") == "ok"
        loss = f"{r['losses'][0]:.4f} → {r['losses'][-1]:.4f}" if ok and r.get("losses") else ""
        status = r["status"] if ok else f"{r['status']}: {r.get('reason', '')}"
        speed = f"{r['tokens_per_s']:.1f}" if ok and r.get("tokens_per_s") else ""
        lines.append(
            f"| {r['mode']} | {r['label']} | {status.replace('|', '/')} | {loss} | {speed} | "
            f"{_mib(r.get('saved_bytes'))} | "
            f"{_mib(r.get('layer_saved_bytes'))} | {_x(r.get('layer_saved_of_eager'))} | "
            f"{_x(r.get('layer_saved_of_grouped_mm'))} | {_mib(r.get('peak_bytes'))} |"
        )
    for r in rows:
        if r.get("layer_saved_tensors"):
            shapes: dict[str, int] = {}
            for t in r["layer_saved_tensors"]:
                key = f"{tuple(t['shape'])} {t['dtype']}"
                shapes[key] = shapes.get(key, 0) + 1
            listed = ", ".join(f"{k}" + (f" ×{n}" if n > 1 else "") for k, n in shapes.items())
            lines += ["", f"{r['mode']} / {r['label']}: one MoE layer saves {listed}"]
    return "\n".join(lines) + "\n"


def run_cli(args: Any, plan: Any, argv: list[str]) -> int:
    """``fastft bench --preset <MoE preset>``: every contender one after another on the preset's config, written
    to ``bench.json`` / ``bench.md`` in the output folder; exit status 1 when a contender failed or ran out of memory."""
    import json
    import sys

    from fastft.bench import harness
    from fastft.kernels._dispatch import force_backend

    unsupported = [
        flag
        for flag, used in (
            ("--max-context", args.max_context is not None),
            ("--load-in-4bit", args.load_in_4bit),
            ("--gradient-checkpointing", args.gradient_checkpointing != "none"),
        )
        if used
    ]
    if unsupported:
        raise ValueError(
            f"{', '.join(unsupported)}: not part of the MoE comparison of --preset {args.preset}; drop "
            f"{'it' if len(unsupported) == 1 else 'them'} (transformers keeps 3-D expert weights unquantised, "
            "see the README's MoE section)."
        )
    env = harness.environment(plan.device)
    meta = {
        "model": plan.described,
        "device": env["device"],
        "dtype": str(plan.dtype).removeprefix("torch."),
        "batch_size": args.batch_size,
        "tokens": args.seq_len,
        "steps": args.steps,
        "modes": list(MODES if args.mode == "both" else (args.mode,)),
        "command": ["fastft", "bench", *argv],
        "date": env["date"],
    }
    print(f"fastft bench (MoE): {plan.described} on {meta['device']}; writing to {plan.out}", file=sys.stderr)

    def progress(row: dict[str, Any]) -> None:
        speed = f"{row['tokens_per_s']:.1f} tokens/s" if row.get("tokens_per_s") else row.get("reason", "")
        print(f"  {row['mode']:>4} {row['label']:>34}: {row['status']} {speed}", file=sys.stderr)

    backend = force_backend("torch") if plan.device.type == "cpu" else _nullcontext()
    start = time.perf_counter()
    with backend:
        rows = compare(
            plan.source,
            modes=tuple(meta["modes"]),
            tokens=args.seq_len,
            batch_size=args.batch_size,
            steps=args.steps,
            dtype=plan.dtype,
            device=plan.device,
            seed=args.seed,
            on_row=progress,
        )
    meta["seconds"] = time.perf_counter() - start
    report = markdown(meta, rows)
    (plan.out / "bench.md").write_text(report)
    (plan.out / "bench.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1, default=str))
    print(report)
    print(f"fastft bench: wrote {plan.out / 'bench.json'}, bench.md")
    return 1 if any(r["status"] in ("failed", "OOM") for r in rows) else 0


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()
