"""What ``fastft bench`` writes: the terminal table, ``bench.json``, ``bench.md`` and ``bench.png``.

The report is one JSON-ready dict: ``meta`` (date, device, versions, the full configuration), ``results`` (one row
per contender: status, per-step losses, step seconds, tokens, tokens/s, saved-for-backward bytes, peak memory,
the largest loss difference from plain, and the ``--max-context`` search when asked) and ``ratios`` (each
contender over plain). Every writer reads only that dict, so ``bench.json`` alone can redraw the rest.
matplotlib is optional (``pip install 'fastft[plot]'``): without it :func:`write_png` returns the message that says
how to get the plot, and the other files are written as usual.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

Report = dict[str, Any]

PLOT_MISSING = "matplotlib is not installed, so bench.png was not drawn: pip install 'fastft[plot]' (or matplotlib)"


def human_bytes(n: float | None) -> str:
    """``n`` bytes as GiB/MiB/KiB text; ``"-"`` for None."""
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def summarize(results: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Fill in each row's ``max_loss_diff`` (largest per-step |loss - plain's loss|) and return the ratios of every
    other contender to plain: ``{"fastft/plain": {"tokens_per_s": .., "saved_bytes": .., "peak_bytes": ..,
    "max_context": ..}}`` (``None`` where either side has no number)."""
    plain = next((r for r in results if r["contender"] == "plain" and r["status"] == "ok"), None)
    ratios: dict[str, dict[str, float | None]] = {}
    for row in results:
        row["max_loss_diff"] = None
        if plain is None or row["status"] != "ok":
            continue
        pairs = list(zip(row["losses"], plain["losses"]))
        row["max_loss_diff"] = max(abs(a - b) for a, b in pairs) if pairs else None
        if row is plain:
            continue
        ratio = {}
        for key in ("tokens_per_s", "saved_bytes", "peak_bytes", "max_context"):
            mine, base = _number(row, key), _number(plain, key)
            ratio[key] = mine / base if mine is not None and base else None
        ratios[f"{row['contender']}/plain"] = ratio
    return ratios


def _number(row: dict[str, Any], key: str) -> float | None:
    if key == "max_context":
        search = row.get("max_context")
        return search["longest"] if search else None
    return row.get(key)


def _ratio_text(value: float | None) -> str:
    return "" if value is None else f" ({value:.2f}x)"


def _rows(report: Report) -> tuple[list[str], list[list[str]]]:
    """The table's header and cells, shared by the terminal and markdown renderings."""
    cuda = report["meta"]["device_type"] == "cuda"
    has_context = any(r.get("max_context") for r in report["results"])
    header = [
        "contender",
        "checkpointing",
        "loss first -> last",
        "max loss diff vs plain",
        "tokens/s",
        "saved for backward",
    ]
    header.append("peak memory" if cuda else "peak memory (CPU: saved)")
    if has_context:
        header.append("max context")
    cells = []
    for row in report["results"]:
        ratios = report["ratios"].get(f"{row['contender']}/plain", {})
        if row["status"] != "ok":  # the reason is a note under the table
            cells.append([row["label"], row["checkpointing"], row["status"], *["-"] * (len(header) - 3)])
            continue
        line = [
            row["label"],
            row["checkpointing"] + (" *" if row["checkpointing_note"] else ""),  # the note says why
            f"{row['losses'][0]:.4f} -> {row['losses'][-1]:.4f}",
            "-" if row["max_loss_diff"] is None or row["contender"] == "plain" else f"{row['max_loss_diff']:.2e}",
            f"{row['tokens_per_s']:,.0f}{_ratio_text(ratios.get('tokens_per_s'))}",
            f"{human_bytes(row['saved_bytes'])}{_ratio_text(ratios.get('saved_bytes'))}",
            f"{human_bytes(row['peak_bytes'])}{_ratio_text(ratios.get('peak_bytes'))}",
        ]
        if has_context:
            search = row.get("max_context")
            line.append("-" if not search else f"{search['longest'] or 'none'}{_ratio_text(ratios.get('max_context'))}")
        cells.append(line)
    return header, cells


def _notes(report: Report) -> list[str]:
    meta, config = report["meta"], report["meta"]["config"]
    notes = []
    for row in report["results"]:
        if row["checkpointing_note"] and row["status"] == "ok":
            notes.append(f"* {row['label']}: {row['checkpointing_note']}")
    for row in report["results"]:
        if row["status"] != "ok":
            notes.append(f"{row['label']}: {row['status']}: {row['reason']}")
        if row["note"]:
            notes.append(row["note"])
    notes.append(
        f"{config['model']}; {config['dtype']}{', 4-bit NF4' if config['load_in_4bit'] else ''}; LoRA r="
        f"{config['lora_rank']} alpha={config['lora_alpha']} on {', '.join(config['lora_targets'])}; AdamW lr "
        f"{config['lr']:g}; {config['steps']} steps of {config['batch_size']} x {config['seq_len']} tokens; "
        f"seed {config['seed']}; {meta['device']}"
    )
    skip = "every step but the first (compilation, optimizer states)" if config["steps"] > 1 else "the one step"
    notes.append(f"tokens/s: real (not padding) tokens per second over {skip}.")
    notes.append(
        "saved for backward: bytes autograd keeps in the first step, each storage once, parameters excluded. "
        + (
            "peak memory: torch.cuda.max_memory_allocated over all steps (weights included)."
            if meta["device_type"] == "cuda"
            else "peak memory: a CPU has no allocator peak counter; the saved-for-backward bytes stand in."
        )
    )
    if config.get("max_context_gb"):
        notes.append(
            f"max context: the longest sequence (batch {config['batch_size']}) whose training step fits in "
            f"{config['max_context_gb']:g} GB, "
            + (
                "by torch.cuda.max_memory_allocated under a per-process memory cap, OOM caught."
                if meta["device_type"] == "cuda"
                else "counting parameters and buffers plus the step's allocation peak (torch.profiler's "
                "allocator events; fresh AdamW states included)."
            )
        )
    return notes


def table(report: Report) -> str:
    """The plain-text table printed on the terminal, followed by the ratios and notes."""
    header, cells = _rows(report)
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    lines.append("")
    lines += [_ratio_line(name, ratio) for name, ratio in report["ratios"].items()]
    lines += _notes(report)
    return "\n".join(lines)


def _ratio_line(name: str, ratio: dict[str, float | None]) -> str:
    parts = []
    for key, what in (
        ("tokens_per_s", "tokens/s"),
        ("saved_bytes", "saved for backward"),
        ("peak_bytes", "peak memory"),
        ("max_context", "max context"),
    ):
        if ratio.get(key) is not None:
            parts.append(f"{ratio[key]:.2f}x {what}")
    return f"{name}: {', '.join(parts)}"


def markdown(report: Report, png: str | None) -> str:
    """The markdown summary: where the numbers come from, the table, the ratios, the notes and the plot."""
    meta = report["meta"]
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v)
    header, cells = _rows(report)
    lines = [
        "# fastft bench",
        "",
        f"{meta['date']} on {meta['device']}; {versions}; {meta['seconds']:.0f} s.",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" if i < 2 else "---:" for i in range(len(header))) + " |",
    ]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in line) + " |" for line in cells]
    lines.append("")
    lines += [f"- {_ratio_line(name, ratio)}" for name, ratio in report["ratios"].items()]
    lines += [f"- {note.removeprefix('* ')}" for note in _notes(report)]
    if png:
        lines += ["", f"![loss curves and memory]({png})"]
    return "\n".join(lines) + "\n"


def write_json(report: Report, path: Path) -> None:
    path.write_text(json.dumps(report, indent=1))


def write_png(report: Report, path: Path) -> str | None:
    """Draw the loss curves and the memory bars into ``path``; returns :data:`PLOT_MISSING` (writing nothing) when
    matplotlib is not installed, else ``None``."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return PLOT_MISSING
    rows = [r for r in report["results"] if r["status"] == "ok"]
    fig, (losses, memory) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"plain": {"linewidth": 3, "alpha": 0.5}, "fastft": {"linestyle": "--"}, "liger": {"linestyle": ":"}}
    for row in rows:  # plain wide and pale, the others dashed on top: curves that coincide stay visible
        steps = range(1, len(row["losses"]) + 1)
        losses.plot(steps, row["losses"], label=row["label"], **styles.get(row["contender"], {}))
    losses.set(xlabel="step", ylabel="training loss", title="loss per step (same seed, same data)")
    losses.legend()
    cuda = report["meta"]["device_type"] == "cuda"
    series = [("saved for backward", "saved_bytes")] + ([("peak memory", "peak_bytes")] if cuda else [])
    width = 0.8 / len(series)
    for i, (name, key) in enumerate(series):
        xs = [j + i * width for j in range(len(rows))]
        bars = memory.bar(xs, [(r[key] or 0) / 2**20 for r in rows], width, label=name)
        memory.bar_label(bars, labels=[human_bytes(r[key]) for r in rows], fontsize=8)
    memory.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(rows))], [r["label"] for r in rows])
    memory.tick_params(axis="x", labelsize=8)
    memory.set(ylabel="MiB", title="memory" + ("" if cuda else " (CPU: saved for backward)"))
    memory.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
