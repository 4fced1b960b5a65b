"""Markdown of the GPU suite's results: the results file's report and the README's GPU table."""

from __future__ import annotations

import json
from pathlib import Path

from fastft.bench import gpu_moe

MARKERS = ("<!-- gpu-results:start -->", "<!-- gpu-results:end -->")
DEFAULT_RESULTS = Path("benchmarks/results")


def _fmt(x: float | None, spec: str = ".3g", scale: float | None = None) -> str:
    return "-" if x is None else format(x / scale if scale else x, spec)


def _gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _status(row: dict) -> str:
    return row["status"] if row["status"] == "ok" else f"{row['status']}: {row['reason']}".replace("|", "/")


def _kernel_rows(results: dict, compact: bool) -> list[str]:
    rows = results.get("rows") or []
    if compact:
        lines = [
            "| kernel | fastft fwd / bwd ms | of copy bandwidth | vs PyTorch | vs torch.compile | vs Liger |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for kernel in dict.fromkeys(r["kernel"] for r in rows):
            by = {r["contender"]: r for r in rows if r["kernel"] == kernel}
            ours = by.get("fastft", {})

            def vs(c: str, by: dict = by) -> str:
                r = by.get(c)
                if r is None:
                    return "-"
                return f"{r['speedup']['fwdbwd']:.2f}x" if r.get("speedup", {}).get("fwdbwd") else r["status"]

            frac = (ours.get("copy_fraction") or {}).get("fwdbwd")
            lines.append(
                f"| {kernel} | {_fmt(ours.get('fwd_ms'), '.3f')} / {_fmt(ours.get('bwd_ms'), '.3f')} | "
                f"{_fmt(frac, '.0%') if frac else _fmt(ours.get('tflops'), '.0f') + ' TFLOP/s'} | "
                f"{vs('pytorch')} | {vs('torch.compile')} | {vs('liger')} |"
            )
        return lines
    lines = [
        "| kernel | contender | fwd ms | bwd ms | fwd+bwd GB/s | of copy bw | TFLOP/s | fastft speedup | max err | status |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        speed = (r.get("speedup") or {}).get("fwdbwd")
        err = max(r["errors"].values()) if r.get("errors") else None
        lines.append(
            f"| {r['kernel']} | {r['contender']} | {_fmt(r['fwd_ms'], '.3f')} | {_fmt(r['bwd_ms'], '.3f')} | "
            f"{_fmt(r['gbps'].get('fwdbwd'), '.0f')} | {_fmt(r['copy_fraction'].get('fwdbwd'), '.0%')} | "
            f"{_fmt(r['tflops'])} | {'' if r['contender'] == 'fastft' else _fmt(speed, '.2f')} | "
            f"{_fmt(err, '.1e')} | {_status(r)} |"
        )
    return lines


def _lora_rows(results: dict) -> list[str]:
    lines = [
        "| quant | contender | checkpointing | tokens/s | x plain | MFU | peak memory | % of plain | first loss | status |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results.get("rows") or []:
        lines.append(
            f"| {r['quant']} | {r['contender']} | {r['checkpointing']} | {_fmt(r.get('tokens_per_s'), ',.0f')} | "
            f"{_fmt(r.get('x_plain'), '.2f')} | {_fmt(r.get('mfu'), '.1%')} | {_gb(memory_bytes(r))} | "
            f"{_fmt(r.get('memory_of_plain'), '.0%')} | "
            f"{_fmt(r['losses'][0], '.4f') if r.get('losses') else '-'} | {_status(r)} |"
        )
    return lines


def memory_bytes(row: dict) -> int | None:
    """A LoRA row's memory: peak on CUDA; on a CPU (dry run) the bytes saved for backward stand in for it."""
    return row.get("peak_bytes") if row.get("peak_bytes") is not None else row.get("saved_bytes")


def _context_rows(results: dict) -> list[str]:
    lines = [
        "| contender | checkpointing | longest that fits (tokens) | GPU peak there | host peak there | stopped by | status |",
        "| --- | --- | ---: | ---: | ---: | --- | --- |",
    ]
    for r in results.get("rows") or []:
        fits = [p for p in r.get("probes") or [] if p["fits"]]
        best = max(fits, key=lambda p: p["seq_len"]) if fits else {}
        lines.append(
            f"| {r['contender']} | {r['checkpointing']} | {_fmt(r.get('longest'), ',d')} | {_gb(best.get('bytes'))} | "
            f"{_gb(best.get('host_bytes'))} | {r.get('stopped') or '-'} | {_status(r)} |"
        )
    return lines


def _err(row: dict, key: str) -> str:
    return _fmt((row.get("errors") or {}).get(key), ".1e")


def _logprob_rows(results: dict) -> list[str]:
    lines = [
        "| contender | fwd ms | bwd ms | fwd+bwd ms | vs fastft | peak memory | max err log-probs / entropy | status |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results.get("rows") or []:
        peak = r.get("peak_mb")
        lines.append(
            f"| {r['contender']} | {_fmt(r.get('fwd_ms'), '.3f')} | {_fmt(r.get('bwd_ms'), '.3f')} | "
            f"{_fmt(r.get('total_ms'), '.3f')} | {_fmt(r.get('vs_fastft'), '.2f')} | "
            f"{_gb(None if peak is None else peak * 2**20)} | {_err(r, 'log_probs')} / {_err(r, 'entropy')} | "
            f"{_status(r)} |"
        )
    return lines


def _grpo_rows(results: dict) -> list[str]:
    lines = [
        "| contender | step ms (fwd + bwd) | vs fastft | peak memory | loss | status |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results.get("rows") or []:
        peak = r.get("peak_mb")
        step = f"{r['step_ms']:.3f} ({r['fwd_ms']:.3f} + {r['bwd_ms']:.3f})" if r.get("step_ms") else "-"
        lines.append(
            f"| {r['contender']} | {step} | {_fmt(r.get('vs_fastft'), '.2f')} | "
            f"{_gb(None if peak is None else peak * 2**20)} | {_fmt(r.get('loss'), '.5f')} | {_status(r)} |"
        )
    return lines


def _rl_sections(parts: dict) -> list[str]:
    head, grpo = (parts.get(p, {}).get("results") or {} for p in ("logprob_head", "grpo_loss_step"))
    dims = head.get("dims") or grpo.get("dims") or {}
    shape = f"{dims.get('tokens')} tokens, hidden {dims.get('hidden')}, vocabulary {dims.get('vocab')}, bf16"
    return [
        "",
        "## Log-prob head",
        "",
        (
            f"Per-token log-probs + entropy of a frozen head, {shape}; backward from the log-probs; vs fastft = "
            "contender time / fastft time (> 1: fastft is faster); peak memory beyond the inputs; max err vs float64 "
            "(first 256 rows)."
        ),
        "",
        *_logprob_rows(head),
        "",
        "## GRPO loss step",
        "",
        (
            f"Policy log-probs (grad) + reference log-probs (no_grad) + clipped surrogate and KL + backward, {shape}, "
            f"{dims.get('completions')} completions x {dims.get('completion_len')} tokens."
        ),
        "",
        *_grpo_rows(grpo),
    ]


def _vlm_section(parts: dict) -> list[str]:
    results = parts.get("vlm_step", {}).get("results") or {}
    dims = results.get("model") or {}
    lines = [
        "",
        "## Vision-language LoRA step",
        "",
        (
            f"Qwen2.5-VL, random weights: {dims.get('layers')} decoder layers (hidden {dims.get('hidden')}, "
            f"vocabulary {dims.get('vocab')}), {dims.get('vision_layers')} vision blocks (width "
            f"{dims.get('vision_hidden')}); one image of {dims.get('image_tokens')} visual tokens + "
            f"{dims.get('text_tokens')} text tokens; LoRA r={dims.get('rank')} on vision and language layers, AdamW, "
            f"{dims.get('steps')} steps (tokens/s over all but the first); peak memory with the weights."
        ),
        "",
        "| contender | tokens/s | x plain | peak memory | of plain | status |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results.get("rows") or []:
        lines.append(
            f"| {r['contender']} | {_fmt(r.get('tokens_per_s'), '.4g')} | {_fmt(r.get('x_plain'), '.2f')} | "
            f"{_gb(r.get('peak_bytes'))} | {_fmt(r.get('memory_of_plain'), '.2f')} | {_status(r)} |"
        )
    return lines


def _context_parallel_section(parts: dict) -> list[str]:
    results = parts.get("context_parallel", {}).get("results") or {}
    shape, kernels, balance = (results.get(k) or {} for k in ("shape", "kernels", "balance"))
    lines = [
        "",
        "## Context parallelism's attention blocks",
        "",
        (
            f"One rank's attention over the gathered K/V (`fastft.distributed.context_parallel`), as with "
            f"{shape.get('ranks')} ranks of {shape.get('tokens_per_rank')} tokens ({shape.get('tokens')} in all), "
            f"{shape.get('heads')}/{shape.get('kv_heads')} heads, head dim {shape.get('head_dim')}, "
            f"{shape.get('dtype')}; forward + backward. Peak memory beyond the inputs of the last rank's block: "
            f"{_gb(kernels.get('peak_extra_bytes'))}, against {_gb(kernels.get('materialised_mask_bytes'))} for a "
            f"materialised mask and {_gb(kernels.get('math_scores_bytes'))} for the math path's scores (a peak far "
            "below both means flash / memory-efficient kernels ran with the mask left implicit)."
        ),
        "",
        "| rank | layout | fwd ms | bwd ms | fwd+bwd ms | of the contiguous slowest |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    slowest = balance.get("contiguous_slowest_ms")
    for rank, layout, key in (
        ("last (slowest)", "contiguous", "contiguous_slowest_ms"),
        ("0", "contiguous", "contiguous_rank0_ms"),
        ("0", "head-tail", "head_tail_rank0_ms"),
        ("last", "head-tail", "head_tail_last_ms"),
    ):
        ms, own = balance.get(key), key == "contiguous_slowest_ms"
        lines.append(
            f"| {rank} | {layout} | {_fmt(kernels.get('fwd_ms') if own else None, '.3f')} | "
            f"{_fmt(kernels.get('bwd_ms') if own else None, '.3f')} | {_fmt(ms, '.3f')} | "
            f"{_fmt(ms / slowest if ms and slowest else None, '.2f')} |"
        )
    skipped = [f"{k}: {v['skipped']}" for k, v in results.items() if isinstance(v, dict) and "skipped" in v]
    lines += ["", f"Skipped: {'; '.join(skipped)}."] if skipped else []
    lines += [
        "",
        (
            "Max abs error against float64 attention over the whole sequence (every rank's blocks; dk, dv summed "
            "over the ranks, as the reduce-scatter forms them), small shape:"
        ),
        "",
        "| dtype | layout | out | dq | dk | dv | head-tail order exact |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    measured = results.get("errors") or {}
    for dtype, errors in ({} if "skipped" in measured else measured).items():
        for layout in ("contiguous", "head_tail"):
            lines.append(
                f"| {dtype} | {layout.replace('_', '-')} | "
                + " | ".join(_fmt(errors.get(f"{layout}_{g}"), ".1e") for g in ("out", "dq", "dk", "dv"))
                + f" | {errors.get('head_tail_order_exact', '-') if layout == 'head_tail' else ''} |"
            )
    return lines


def _header(meta: dict, device: dict) -> list[str]:
    return [
        (
            f"- device: {device.get('name') or meta['device']}; {meta['date']}; fastft {meta['fastft']} "
            f"({meta['fastft_commit'] or 'no git'}); total {meta.get('seconds', 0):.0f} s"
        ),
        (
            f"- torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, transformers {meta['transformers']}, "
            f"peft {meta['peft']}, bitsandbytes {meta['bitsandbytes']}, liger_kernel {meta['liger_kernel']}, "
            f"trl {meta.get('trl', '-')}"
        ),
        (
            f"- measured copy bandwidth {_fmt(device.get('copy_bytes_per_s'), '.4g', 1e9)} GB/s "
            f"({device.get('copy_note', '-')}); bf16 matmul {_fmt(device.get('matmul_flops_per_s'), '.4g', 1e12)} "
            f"TFLOP/s ({device.get('matmul_note', '-')})"
        ),
    ]


def markdown(record: dict) -> str:
    """The results file's markdown: where the numbers come from, each part's status, then one table per part."""
    meta, parts = record["meta"], record["parts"]
    device = parts["device"].get("results") or {}
    lines = ["# fastft GPU suite" + (" (dry run on a CPU: tiny shapes, not GPU numbers)" if meta["dry_run"] else "")]
    lines += ["", *_header(meta, device), "", "| part | status | seconds | budget s |", "| --- | --- | ---: | ---: |"]
    for name, part in parts.items():
        lines.append(f"| {name} | {_status(part)} | {_fmt(part.get('seconds'), '.0f')} | {part['budget_s']:.0f} |")
    kernels, lora, context = (parts[p].get("results") or {} for p in ("kernels", "lora_step", "max_context"))
    model = lora.get("model") or context.get("model") or {}
    lines += [
        "",
        "## Kernels",
        "",
        (
            "Forward / backward of one training step at the audit shapes; GB/s = the kernel's bytes model / time; "
            "speedup = contender time / fastft time (> 1: fastft is faster); max err = largest |error| vs float64."
        ),
        "",
        *_kernel_rows(kernels, compact=False),
        "",
        "## LoRA training step",
        "",
        (
            f"Llama-3.1 architecture, random weights: {_describe(model)}; batch {model.get('batch_size')} x "
            f"{model.get('seq_len')} random tokens, {model.get('steps')} steps (tokens/s over all but the first); MFU = "
            "(4 N + 6 N_lora + 6 L Hq D S) FLOPs per token x tokens/s / measured bf16 matmul rate."
        ),
        "",
        *_lora_rows(lora),
        "",
        "## Max context",
        "",
        f"Longest sequence (batch 1) one training step fits in under {_gb(context.get('cap_bytes'))}, bf16.",
        "",
        *_context_rows(context),
        *_rl_sections(parts),
        *gpu_moe.markdown_rows(parts.get("moe_step", {}).get("results") or {}),
        *_vlm_section(parts),
        *_context_parallel_section(parts),
    ]
    return "\n".join(lines) + "\n"


def _describe(model: dict) -> str:
    if not model:
        return "-"
    return (
        f"{model['layers']} layers, hidden {model['hidden']}, intermediate {model['intermediate']}, "
        f"{model['heads']}/{model['kv_heads']} heads, vocabulary {model['vocab']}, LoRA r={model['rank']}"
    )


def _newest(results_dir: Path) -> tuple[Path, dict] | None:
    """The newest GPU result (by its recorded date; dry runs and CPU runs are not GPU results) in ``results_dir``."""
    found = []
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        meta = record.get("meta") if isinstance(record, dict) else None
        gpu_run = isinstance(meta, dict) and meta.get("device_type") == "cuda" and not meta.get("dry_run")
        if gpu_run and meta.get("suite") == "fastft GPU suite":
            found.append((meta["date"], path, record))
    if not found:
        return None
    _, path, record = max(found, key=lambda x: x[0])
    return path, record


def readme_table(results_dir: Path | str = DEFAULT_RESULTS) -> str:
    """The README's GPU table: the newest GPU result in ``results_dir``, with its device and date, or a line saying
    that no GPU run has happened yet."""
    newest = _newest(Path(results_dir))
    if newest is None:
        return (
            "No GPU run has happened yet: this README claims no GPU speed. A session with a GPU runs "
            f"`python -m fastft.bench gpu --out {DEFAULT_RESULTS}` (see `fastft/bench/gpu.py`).\n"
        )
    path, record = newest
    meta, parts = record["meta"], record["parts"]
    device = parts["device"].get("results") or {}
    lora, context = parts["lora_step"].get("results") or {}, parts["max_context"].get("results") or {}
    model = lora.get("model") or {}
    lines = [
        (
            f"GPU results: **{device.get('name') or meta['device']}**, {meta['date'][:10]} "
            f"([`{path.name[:-5]}.md`]({Path(results_dir).as_posix()}/{path.name[:-5]}.md), generated from its JSON)."
        ),
        "",
        *_header(meta, device)[1:],
    ]
    failed = [f"{n}: {_status(p)}" for n, p in parts.items() if p["status"] != "ok"]
    lines += [f"- parts not completed: {'; '.join(failed)}"] if failed else []
    lines += [
        "",
        (
            "Kernels at the audit shapes (Llama-3-8B, 8192 tokens, bf16): fastft's forward / backward; of copy "
            "bandwidth = its bytes model over its forward + backward time, against the measured copy bandwidth; "
            "vs X = X's forward + backward time / fastft's (> 1: fastft is faster)."
        ),
        "",
        *_kernel_rows(parts["kernels"].get("results") or {}, compact=True),
    ]
    lines += ["", f"LoRA step, {_describe(model)}, batch {model.get('batch_size')} x {model.get('seq_len')}:", ""]
    lines += _lora_rows(lora)
    lines += ["", f"Max context under {_gb(context.get('cap_bytes'))}:", "", *_context_rows(context)]
    lines += [line.replace("## ", "") + (":" if line.startswith("## ") else "") for line in _rl_sections(parts)]
    return "\n".join(lines) + "\n"


def update_readme(readme: Path, results_dir: Path = DEFAULT_RESULTS) -> None:
    """Replace the text between the :data:`MARKERS` of ``readme`` by :func:`readme_table` of ``results_dir``."""
    text = Path(readme).read_text()
    start, end = text.find(MARKERS[0]), text.find(MARKERS[1])
    if start < 0 or end < start:
        raise ValueError(
            f"--update-readme {readme}: it has no '{MARKERS[0]}' ... '{MARKERS[1]}' pair; add the two markers "
            "(on lines of their own) where the GPU table belongs."
        )
    body = readme_table(results_dir)
    Path(readme).write_text(text[: start + len(MARKERS[0])] + "\n" + body + text[end:])
