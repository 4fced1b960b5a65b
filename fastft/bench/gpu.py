"""The one-shot GPU suite: ``python -m fastft.bench gpu --out DIR`` measures everything we want to know in one go.

Nine parts, run in this order, each in its own Python process with its own time budget (the process group is
killed when the budget is spent: the part is recorded ``timeout`` with whatever it had saved, and the next part
starts; a part that finishes early passes its unused seconds on to the next one, so the total never exceeds the sum
of the budgets, 500 s by default, under the 9 minutes the run may take):

- ``device`` (20 s): the measured copy bandwidth (a 1 GiB device-to-device ``copy_``, read + write bytes, median of
  10 after warm-up, CUDA events) and bf16 matmul rate (an 8192^3 GEMM on normal random operands, 2 n^3 FLOPs per
  product, median of 10); the yardsticks of every fraction below;
- ``kernels`` (100 s): every fastft kernel's forward / backward time at the audit shapes against the PyTorch
  formula, torch.compile and Liger Kernel (:mod:`fastft.bench.kernels`), with its bytes model as a fraction of the
  measured copy bandwidth and its error against float64;
- ``lora_step`` (170 s): one LoRA training step (r=16 on the seven projections, AdamW) at Llama-3.1-8B's real
  dimensions with random weights, batch 1 x 4096 random tokens, bf16 and 4-bit NF4 (bitsandbytes), for plain
  transformers + PEFT, Liger and fastft (:func:`fastft.bench.step.build_model`), each configuration in its own
  process: tokens/s (steps after the first), MFU and peak memory (``max_memory_allocated``, weights included);
- ``moe_step`` (30 s): one MoE training step at Qwen3-30B-A3B's and gpt-oss-20b's real dimensions (2 decoder layers,
  random weights, bf16, 1 x 4096 tokens), LoRA (experts included) and full fine-tuning, for transformers' ``eager``
  and ``grouped_mm`` experts, Liger and fastft, in one process, most important configurations first
  (:mod:`fastft.bench.gpu_moe`): tokens/s, peak memory, the bytes one MoE layer saves for backward;
- ``logprob_head`` (30 s): fastft's log-prob head (:func:`fastft.kernels.logprob_head.linear_log_probs`, frozen head,
  log-probs + entropy forward, backward from the log-probs) against TRL's ``trl.kernels.ChunkedLogProbFunction`` (what
  TRL's fused LM head runs) and the full-logits PyTorch formula, 8192 tokens, hidden 4096, vocabulary 128256, bf16:
  forward / backward time, peak memory beyond the inputs, max error against float64 (:mod:`fastft.bench.gpu_rl`);
- ``grpo_loss_step`` (30 s): one GRPO loss step at Llama-3.1-8B's head dimensions (8 completions x 1024 tokens:
  policy log-probs with grad, reference log-probs under ``no_grad``, clipped surrogate + KL, backward) through fastft,
  TRL's chunked function and full logits: step time and peak memory;
- ``max_context`` (60 s): the longest sequence one training step fits in under an 80 GB (80e9 bytes) cap
  (``set_per_process_memory_fraction``; an OOM or a peak above the cap does not fit), per contender in its
  memory-saving mode (plain and Liger with transformers' checkpointing, fastft with offloaded checkpointing, and
  fastft ``long``: offloaded checkpointing with the tiled MLP of ``set_long_context``; GPU and host peak reported):
  doubling from 4096, then bisecting; a probe that would not end within the part's budget is not started, and the
  answer says "time budget" instead of a failing length;
- ``vlm_step`` (40 s, its seconds taken from ``kernels`` 10, ``lora_step`` 20 and ``max_context`` 10): one
  vision-language LoRA training step at Qwen2.5-VL-7B's dimensions with 4 decoder layers and 4 vision blocks, one
  image of 1024 visual tokens plus 512 text tokens, LoRA r=16 on vision and language layers, for plain transformers
  + PEFT, fastft and fastft with offloaded checkpointing (:mod:`fastft.bench.vlm`): tokens/s and peak memory;
- ``context_parallel`` (20 s, its seconds taken from ``kernels``): one GPU's check of context parallelism's attention
  blocks at Llama-3-8B's attention shape with 8 ranks of 8192 tokens (:mod:`fastft.bench.context_parallel`): the last
  rank's block forward / backward time and peak memory beyond the inputs next to a materialised mask's and the math
  path's scores (which kernels it reaches), the slowest rank with contiguous shards against the head-tail layout, and
  max errors against float64 at a small shape (fp32 and bf16).

MFU counts model FLOPs, not hardware FLOPs (recomputation by checkpointing is not counted), over the measured bf16
matmul rate. Per trained token of a sequence of S tokens: ``4 N + 6 N_lora + 6 L Hq D S`` where N is the frozen
matmul weights (the decoder projections and lm_head; the embedding is a lookup): 2N forward and 2N for the input
gradients of the backward (frozen weights get no weight gradient, the 2N a full fine-tune adds); the LoRA matrices
are trained (6 per parameter); causal attention is ``2 L Hq D S`` forward (QK^T and PV over half the S x S scores)
and twice that backward. 4-bit contenders count the same FLOPs (dequantisation is overhead, not model FLOPs).

Missing optional peers are reported, never a crash: Liger Kernel "not installed" (or "skipped: needs CUDA"), 4-bit
"not installed" without bitsandbytes, TRL's rows "not installed" without trl. The results go to ``DIR/<gpu-name>-<date>.json`` and ``.md`` (rewritten after
every part, so a killed run keeps what it measured); process logs to ``--logs`` (default ``DIR/logs``).
:func:`readme_table` renders the newest GPU result of a results folder as the README's GPU table, and
``--update-readme README.md`` writes it between ``<!-- gpu-results:start -->`` and ``<!-- gpu-results:end -->``.

``--dry-run`` runs every part on the CPU at tiny shapes (the device part measures the CPU's copy and matmul), in
well under a minute: the test suite runs it so that the suite cannot rot while no GPU is at hand.

The next session with the GPU machine (H200; bitsandbytes, liger-kernel and trl are not installed there, so they
travel as wheels: once, here, in the repository root, ``echo /.whl/ >> .git/info/exclude`` and ``python3 -m pip
download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_24_x86_64 -d
.whl bitsandbytes==0.50.2 liger-kernel==0.8.5``, 44 MB, then ``python3 -m pip download trl==1.16.0 --no-deps
--only-binary=:all: -d .whl`` (a pure-Python wheel, under 1 MB; the suite uses only ``trl.kernels``, which needs
transformers and triton, both there, so none of trl's other requirements travel; the wheels travel as the device
README says, in the ignored ``.whl`` folder named in ``carry``) runs, with ``timeout_s=580`` and ``carry=[".whl"]``::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit; python3 -m fastft.bench.gpu --out $OUT
    --logs /tmp/gpu-logs 2>&1 | tee $OUT/gpu.log; tar czf $OUT/logs.tgz -C /tmp gpu-logs

and commits ``$OUT/<gpu>-<date>.json`` and ``.md`` under ``benchmarks/results/``, then ``python -m fastft.bench gpu
--update-readme README.md`` (results from ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from fastft.bench.gpu_parts import GRACE_S, ModelDims, spawn, train_flops_per_token, worker, write_json
from fastft.bench.gpu_report import DEFAULT_RESULTS, MARKERS, markdown, memory_bytes, readme_table, update_readme

__all__ = ["BUDGETS_S", "MARKERS", "PARTS", "main", "markdown", "readme_table", "run_suite", "update_readme"]

PARTS = (
    "device",
    "kernels",
    "lora_step",
    "moe_step",
    "logprob_head",
    "grpo_loss_step",
    "max_context",
    "vlm_step",
    "context_parallel",
)
BUDGETS_S = {
    "device": 20.0,
    "kernels": 100.0,
    "lora_step": 170.0,
    "moe_step": 30.0,
    "logprob_head": 30.0,
    "grpo_loss_step": 30.0,
    "max_context": 60.0,
    "vlm_step": 40.0,
    "context_parallel": 20.0,
}
DRY_RUN_BUDGETS_S = {
    "device": 20.0,
    "kernels": 30.0,  # about 6 s (no torch.compile in the dry run)
    "lora_step": 50.0,
    "moe_step": 20.0,
    "max_context": 40.0,
    "logprob_head": 30.0,
    "grpo_loss_step": 30.0,
    "vlm_step": 60.0,  # importing transformers' Qwen2.5-VL and PEFT takes 10-30 s of it on a busy CPU
    "context_parallel": 20.0,  # about 5 s: importing torch, then tiny attention blocks
}
CAP_BYTES = 80 * 10**9  # "80 GB": what an 80 GB card leaves a training process, with room for the CUDA context

# ----------------------------------------------------------------------------------------------------
# The suite
# ----------------------------------------------------------------------------------------------------


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except OSError:  # no git here
        return None
    return done.stdout.strip() or None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _meta(dry_run: bool, budgets: dict[str, float], argv: list[str]) -> dict[str, Any]:
    from fastft.bench import harness

    cuda = not dry_run
    device = torch.device("cuda" if cuda else "cpu")
    meta = harness.environment(device)
    date = meta["date"][:10]
    stem = f"{_slug(torch.cuda.get_device_name(device))}-{date}" if cuda else f"dry-run-cpu-{date}"
    meta.update(
        suite="fastft GPU suite",
        dry_run=dry_run,
        stem=stem,
        fastft_commit=_commit(),
        budgets_s=budgets,
        command=["python", "-m", "fastft.bench", "gpu", *argv],
        **{p: _version(p) for p in ("fastft", "transformers", "peft", "bitsandbytes", "liger_kernel", "trl")},
    )
    return meta


def _derive(record: dict) -> None:
    """Fill in what needs two parts: MFU (lora_step over device's matmul rate) and ratios to plain."""
    device = record["parts"].get("device", {}).get("results") or {}
    lora = record["parts"].get("lora_step", {}).get("results") or {}
    rate = device.get("matmul_flops_per_s")
    dims = ModelDims(**lora["model"]) if lora.get("model") else None
    plain = {r["quant"]: r for r in lora.get("rows", []) if r["contender"] == "plain" and r.get("tokens_per_s")}
    for row in lora.get("rows", []):
        if not row.get("tokens_per_s") or dims is None:
            continue
        flops = train_flops_per_token(dims, dims.seq_len) * row["tokens_per_s"]
        row["model_flops_per_s"] = flops
        row["mfu"] = flops / rate if rate else None
        base = plain.get(row["quant"])
        row["x_plain"] = row["tokens_per_s"] / base["tokens_per_s"] if base else None
        memory = (memory_bytes(row), memory_bytes(base) if base else None)
        row["memory_of_plain"] = memory[0] / memory[1] if all(memory) else None


def _save(record: dict, out: Path) -> None:
    _derive(record)
    stem = record["meta"]["stem"]
    write_json(out / f"{stem}.json", record)
    try:
        report = markdown(record)
    except Exception:  # noqa: BLE001 - a one-shot GPU run must not lose its measurements to a report bug
        report = f"# fastft GPU suite\n\nThe markdown report failed; the numbers are in {stem}.json.\n\n```\n"
        report += traceback.format_exc() + "```\n"
    (out / f"{stem}.md").write_text(report)


def run_suite(
    out: Path,
    *,
    dry_run: bool = False,
    parts: tuple[str, ...] = PARTS,
    budgets: dict[str, float] | None = None,
    logs: Path | None = None,
    cap_bytes: int = CAP_BYTES,
    argv: list[str] | None = None,
) -> dict:
    """Run ``parts`` in order, each in its own process under its budget, writing ``out/<stem>.json`` and ``.md``
    after each; returns the record. ``budgets`` overrides the defaults part by part (seconds)."""
    budgets = {**(DRY_RUN_BUDGETS_S if dry_run else BUDGETS_S), **(budgets or {})}
    out.mkdir(parents=True, exist_ok=True)
    logs = logs or out / "logs"
    start = time.time()
    record = {"meta": _meta(dry_run, budgets, argv or []), "parts": {}}
    for name in PARTS:
        status = "pending" if name in parts else "skipped"
        reason = "" if name in parts else "not asked for (--parts)"
        record["parts"][name] = {"status": status, "reason": reason, "budget_s": budgets[name], "results": None}
    _save(record, out)
    spare = 0.0  # seconds earlier parts left unused
    for name in (p for p in PARTS if p in parts):
        budget = budgets[name] + spare
        t0 = time.time()
        task = {
            "task": name,
            "dry_run": dry_run,
            "deadline": t0 + budget - GRACE_S,
            "logs": str(logs),
            "cap_bytes": cap_bytes,
            "copy_bytes_per_s": (record["parts"]["device"].get("results") or {}).get("copy_bytes_per_s"),
        }
        print(f"[{time.time() - start:6.1f} s] {name}: budget {budget:.0f} s", file=sys.stderr, flush=True)
        result = spawn(task, budget, logs / f"{name}.log", new_group=True)
        seconds = time.time() - t0
        spare = max(0.0, budget - seconds)
        record["parts"][name] = {"budget_s": budget, "seconds": seconds, "results": None, **result}
        record["meta"]["seconds"] = time.time() - start
        _save(record, out)
        print(f"[{time.time() - start:6.1f} s] {name}: {result['status']} {result['reason']}", file=sys.stderr)
    return record


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def _budgets(items: list[str], parser: argparse.ArgumentParser) -> dict[str, float]:
    budgets = {}
    for item in items:
        name, _, seconds = item.partition("=")
        try:
            value = float(seconds)
        except ValueError:
            value = -1.0
        if name not in PARTS or value <= 0:
            parser.error(f"--budget {item!r}: expected PART=SECONDS with PART one of {', '.join(PARTS)}, SECONDS > 0")
        budgets[name] = value
    return budgets


def main(argv: list[str] | None = None) -> int:
    """``python -m fastft.bench gpu``: run the suite (``--out``) and/or regenerate the README table; the exit
    status is 1 when a part failed or ran out of time."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m fastft.bench gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="run the suite; results go to DIR/<gpu>-<date>.json and .md")
    parser.add_argument("--dry-run", action="store_true", help="every part on the CPU at tiny shapes (< 1 minute)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"subset of {','.join(PARTS)} (default: all)")
    parser.add_argument("--budget", action="append", default=[], metavar="PART=SECONDS", help="a part's time budget")
    parser.add_argument("--cap-gb", type=float, default=CAP_BYTES / 1e9, help="max_context memory cap (default 80)")
    parser.add_argument("--logs", type=Path, help="worker logs (default DIR/logs)")
    parser.add_argument("--update-readme", type=Path, metavar="README", help="regenerate README's GPU table")
    parser.add_argument("--results", type=Path, help=f"results folder for --update-readme (default {DEFAULT_RESULTS})")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # internal: one part in this process
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.worker_out)
    if args.out is None and args.update_readme is None:
        parser.error("nothing to do: give --out DIR (run the suite) and/or --update-readme README.md")
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {', '.join(PARTS)}")
    budgets = _budgets(args.budget, parser)
    if args.out is not None and not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device here: the suite measures a GPU; --dry-run runs it on the CPU at tiny shapes")
    failed = False
    if args.out is not None:
        record = run_suite(
            args.out,
            dry_run=args.dry_run,
            parts=parts,
            budgets=budgets,
            logs=args.logs,
            cap_bytes=int(args.cap_gb * 1e9),
            argv=argv,
        )
        print(markdown(record))
        failed = any(p["status"] in ("failed", "timeout", "OOM") for p in record["parts"].values())
    if args.update_readme is not None:
        try:
            update_readme(args.update_readme, args.results or DEFAULT_RESULTS)
        except (OSError, ValueError) as e:
            parser.error(str(e))
        print(f"{args.update_readme}: GPU table regenerated from {args.results or DEFAULT_RESULTS}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
