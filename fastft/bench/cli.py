"""``fastft bench``: train the same LoRA model with transformers + PEFT, with fastft (and with Liger Kernel where it
runs), from the same seed on the same data, and report loss, speed and memory side by side.

With no arguments it runs on the embedded default (a small Llama with Llama-3-8B proportions, random weights, a
local tokenizer and instruction data: :mod:`fastft.bench.assets`), a minute or two on a 2-core CPU. ``--model``
benchmarks a Hub model or a local folder, ``--preset`` a published architecture with random weights
(:mod:`fastft.bench.presets`). Each contender gets a fresh model and the same batches (:mod:`fastft.bench.data`), in
this process. On a CPU the contenders take turns step by step (:func:`train_together`: a busy spell of another
program slows each alike, so the ratios hold up on a shared machine) and fastft runs its torch path (the same
hand-written backward as its Triton kernels, which need a GPU), whatever ``TRITON_INTERPRET`` says. On CUDA they
run one after another, each with the GPU's peak counter to itself, Liger last (it patches transformers' functions
for the whole process).

``--max-context GB`` then searches, per contender, the longest sequence whose training step fits in GB: the length
doubles from 16 tokens until a step does not fit (or the model's ``max_position_embeddings`` is reached), then a
bisection narrows the gap to 1/16 of the length. A probe is one training step on random token ids, every position
attended and trained (the memory of long documents, not of padding). On CUDA the process is capped at GB
(``torch.cuda.set_per_process_memory_fraction``) and a step fits when it raises no out-of-memory error and
``torch.cuda.max_memory_allocated`` stays within GB. A CPU has no such counter: there the memory of a step is its
parameters and buffers plus the peak of its own allocations (torch.profiler's allocator events), fresh AdamW states
included (:func:`fastft.bench.step.step_memory`).

Output folder (``--out``, default ``./fastft-bench-<date>-<time>``): ``bench.json`` (versions, device, date, the full
configuration, every number), ``bench.md`` and ``bench.png`` (loss curves and memory bars; needs matplotlib).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.metadata
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastft.bench import report as reporting
from fastft.bench import step

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
FIRST_PROBE = 16  # --max-context starts here and doubles


@dataclass
class _Plan:
    """Everything the run needs, resolved and checked before any model is built."""

    source: step.ModelSource
    described: str
    model_config: dict[str, Any]
    max_positions: int
    vocab_size: int
    tokenizer: Any
    batches: list[dict[str, torch.Tensor]]  # the same for every contender
    device: torch.device
    dtype: torch.dtype
    out: Path


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``fastft bench`` (also ``python -m fastft.bench``)."""
    parser = argparse.ArgumentParser(
        prog="fastft bench",
        description="Train the same LoRA model with transformers + PEFT, fastft and (where it runs) Liger Kernel; "
        "compare loss, tokens/s and memory. `fastft bench gpu` runs the one-shot GPU suite instead.",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", metavar="ID_OR_DIR", help="a Hub model id or a local model folder")
    which.add_argument(
        "--preset", metavar="NAME", help="real dimensions, random weights: " + ", ".join(_preset_names())
    )
    parser.add_argument("--layers", type=int, metavar="N", help="with --preset: keep the first N decoder layers")
    parser.add_argument("--seq-len", type=int, metavar="N", default=128, help="tokens per sequence, padded (128)")
    parser.add_argument("--batch-size", type=int, metavar="N", default=8, help="sequences per step (8)")
    parser.add_argument("--steps", type=int, metavar="N", default=30, help="training steps per contender (30)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16", help="weights and compute (bfloat16)")
    parser.add_argument("--load-in-4bit", action="store_true", help="NF4 base weights (bitsandbytes; needs CUDA)")
    parser.add_argument(
        "--gradient-checkpointing",
        choices=step.CHECKPOINTING,
        default="none",
        help="none, standard (recompute each decoder layer) or offload (fastft only: also park layer inputs on the "
        "host; transformers runs standard)",
    )
    parser.add_argument(
        "--max-context",
        type=float,
        metavar="GB",
        help="also find, per contender, the longest sequence whose training step fits in GB",
    )
    parser.add_argument(
        "--mode",
        choices=("lora", "full", "both"),
        default="lora",
        help="mixture-of-experts presets: LoRA (experts included), full fine-tuning, or both (lora)",
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of the LoRA weights (1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights, LoRA init and batches (0)")
    parser.add_argument("--out", type=Path, metavar="DIR", help="output folder (./fastft-bench-<date>-<time>)")
    return parser


def _preset_names() -> list[str]:
    from fastft.bench.presets import PRESETS

    return list(PRESETS)


def _check_numbers(args: argparse.Namespace) -> None:
    for flag, value in (("--seq-len", args.seq_len), ("--batch-size", args.batch_size), ("--steps", args.steps)):
        if value < 1:
            raise ValueError(f"{flag} {value}: must be at least 1.")
    if args.layers is not None and args.preset is None:
        raise ValueError("--layers cuts the depth of a --preset; pass --preset NAME too (or drop --layers).")
    if args.max_context is not None and args.max_context <= 0:
        raise ValueError(f"--max-context {args.max_context:g}: a memory cap in GB must be positive (e.g. 24).")


def _device(args: argparse.Namespace) -> torch.device:
    cuda = torch.cuda.is_available()
    if args.load_in_4bit:
        if not cuda:
            raise ValueError(
                "--load-in-4bit needs a CUDA device (bitsandbytes' 4-bit training); this machine has none. "
                "Drop --load-in-4bit to benchmark the unquantised model."
            )
        try:
            importlib.metadata.version("bitsandbytes")
        except importlib.metadata.PackageNotFoundError:
            raise ValueError("--load-in-4bit needs bitsandbytes: pip install bitsandbytes") from None
    return torch.device("cuda" if cuda else "cpu")


def _output_folder(out: Path | None) -> Path:
    """``out`` (or the dated default), created and checked writable with a probe file."""
    out = out or Path(f"fastft-bench-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write there ({e.strerror or e}); pass --out a writable folder.") from e
    return out


def _source(args: argparse.Namespace) -> tuple[step.ModelSource, str, Any, Any]:
    """The model source, its description, its config and the tokenizer to use."""
    from fastft.bench import assets

    if args.preset is not None:
        from fastft.bench.presets import PRESETS, preset_config

        config = preset_config(args.preset, args.layers)
        described = f"{args.preset} ({PRESETS[args.preset].source} dimensions, random weights, "
        return config, described + f"{config.num_hidden_layers} layers)", config, assets.default_tokenizer()
    if args.model is not None:
        from transformers import AutoConfig, AutoTokenizer

        folder = Path(args.model).expanduser()
        if folder.is_dir() and not (folder / "config.json").is_file():
            raise ValueError(f"--model {args.model}: the folder has no config.json; pass a saved model's folder.")
        try:
            config = AutoConfig.from_pretrained(args.model)
            tokenizer = AutoTokenizer.from_pretrained(args.model)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"--model {args.model}: no such local folder, and no such model on the Hugging Face Hub (or the "
                f"Hub cannot be reached): {' '.join(str(e).split())[:300]}. Pass a Hub id like "
                "meta-llama/Llama-3.2-1B, a folder saved with save_pretrained, or --preset."
            ) from e
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return args.model, f"{args.model} (pretrained weights)", config, tokenizer
    config = assets.default_config()
    return assets.default_model, "the embedded default (random weights)", config, assets.default_tokenizer()


def resolve(args: argparse.Namespace) -> _Plan:
    """Check the arguments and resolve the model, data, device and output folder; ``ValueError`` on a problem."""
    from fastft.bench import assets
    from fastft.bench.data import make_batches

    _check_numbers(args)
    device = _device(args)
    source, described, config, tokenizer = _source(args)
    try:
        batches = make_batches(
            tokenizer,
            assets.default_examples(),
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            steps=args.steps,
            seed=args.seed,
        )
    except ValueError as e:
        raise ValueError(f"--seq-len {args.seq_len}: {e}") from e
    out = _output_folder(args.out)  # last: a mistyped argument leaves no empty folder behind
    return _Plan(
        source=source,
        described=described,
        model_config=config.to_dict(),
        max_positions=getattr(config, "max_position_embeddings", None) or 2**20,
        vocab_size=min(config.vocab_size, len(tokenizer)),
        tokenizer=tokenizer,
        batches=batches,
        device=device,
        dtype=DTYPES[args.dtype],
        out=out,
    )


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for package in ("fastft", "torch", "triton", "transformers", "peft", "bitsandbytes", "liger-kernel", "accelerate"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    versions["cuda"] = torch.version.cuda
    return versions


def _meta(args: argparse.Namespace, plan: _Plan, argv: list[str]) -> dict[str, Any]:
    from fastft.bench import harness

    env = harness.environment(plan.device)
    config = {
        "model": plan.described,
        "model_source": args.model or (f"preset:{args.preset}" if args.preset else "embedded default"),
        "model_config": plan.model_config,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "dtype": str(plan.dtype).removeprefix("torch."),
        "load_in_4bit": args.load_in_4bit,
        "gradient_checkpointing": args.gradient_checkpointing,
        "max_context_gb": args.max_context,
        "lr": args.lr,
        "seed": args.seed,
        "lora_rank": 16,
        "lora_alpha": 16,
        "lora_targets": list(step.LORA_TARGETS),
        "fastft_backend": "triton" if plan.device.type == "cuda" else "torch path",
        "command": ["fastft", "bench", *argv],
        "out": str(plan.out.resolve()),
    }
    return {
        "date": env["date"],
        "device": env["device"],
        "device_type": env["device_type"],
        "versions": {**_versions(), "python": env["python"]},
        "config": config,
    }


def _row(contender: str, mode: str) -> dict[str, Any]:
    ran = step.checkpointing_for(contender, mode)
    return {
        "contender": contender,
        "label": step.LABELS[contender],
        "checkpointing": ran,
        "checkpointing_note": "transformers has no offloaded checkpointing; ran standard" if ran != mode else "",
        "status": "ok",
        "reason": "",
        "note": "",
        "losses": [],
        "step_seconds": [],
        "tokens": [],
        "tokens_per_s": None,
        "saved_bytes": None,
        "peak_bytes": None,
        "model_bytes": None,
        "max_context": None,
    }


def _bar(label: str, steps: int, position: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=steps, desc=f"{label:>34}", unit="step", file=sys.stderr, position=position, dynamic_ncols=True)


def _out_of_memory(error: RuntimeError) -> bool:
    # torch.OutOfMemoryError, or a library (cuBLAS, a Triton launch) failing to allocate its workspace.
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _fits(model: torch.nn.Module, plan: _Plan, args: argparse.Namespace, seq_len: int) -> tuple[bool, int | None]:
    """Whether one training step at ``seq_len`` fits under the cap, and the bytes it took (None after an OOM)."""
    cap = args.max_context * 1e9
    # Every position a real, trained token (random ids): with padding, a loss that skips ignored positions would
    # look better than it does on long documents.
    g = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(0, plan.vocab_size, (args.batch_size, seq_len), generator=g)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}
    try:
        used = step.step_memory(model, batch, device=plan.device, lr=args.lr)
    except RuntimeError as e:
        if not _out_of_memory(e):
            raise
        used = None
    _free(plan.device)
    return used is not None and used <= cap, used


def max_context(fits: Callable[[int], tuple[bool, int | None]], limit: int) -> dict[str, Any]:
    """The longest sequence length ``fits`` accepts, up to ``limit``: doubling from :data:`FIRST_PROBE`, then
    bisecting until the gap is at most 1/16 of the length (8 tokens at least). Returns ``{"longest": int or None
    (not even the first probe fits), "limit": limit, "reached_limit": bool, "probes": [{"seq_len", "bytes",
    "fits"}]}``."""
    probes: list[dict[str, Any]] = []

    def probe(seq_len: int) -> bool:
        ok, used = fits(seq_len)
        probes.append({"seq_len": seq_len, "bytes": used, "fits": ok})
        return ok

    lo, hi, seq_len = 0, None, min(FIRST_PROBE, limit)
    while hi is None:
        if not probe(seq_len):
            hi = seq_len
        elif seq_len >= limit:
            break
        else:
            lo, seq_len = seq_len, min(2 * seq_len, limit)
    if hi is None:
        lo = seq_len
    while hi is not None and lo and hi - lo > max(8, lo // 16):
        mid = (lo + hi) // 2
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return {"longest": lo or None, "limit": limit, "reached_limit": lo == limit, "probes": probes}


def _attempt(row: dict[str, Any], action: Callable[..., None], *args: Any) -> bool:
    """``action(*args)``; a failure is recorded in ``row`` (status OOM or failed, with the reason) and gives False."""
    try:
        action(*args)
    except Exception as e:  # noqa: BLE001 - one contender's failure is its result; the others still run
        if isinstance(e, RuntimeError) and _out_of_memory(e):
            row.update(status="OOM", reason=" ".join(str(e).split())[:200])
        else:
            traceback.print_exc()
            row.update(status="failed", reason=f"{type(e).__name__}: {' '.join(str(e).split())[:200]}")
        return False
    return True


def _build(row: dict[str, Any], plan: _Plan, args: argparse.Namespace, runs: dict[str, step.TrainingRun]) -> None:
    from fastft.bench.data import tokens_in

    model, row["note"] = step.build_model(
        plan.source,
        row["contender"],
        dtype=plan.dtype,
        device=plan.device,
        load_in_4bit=args.load_in_4bit,
        checkpointing=args.gradient_checkpointing,
        seed=args.seed,
    )
    runs[row["contender"]] = step.TrainingRun(model, device=plan.device, lr=args.lr, tokens_in=tokens_in)


def _step(run: step.TrainingRun, batch: dict[str, torch.Tensor], bar: Any) -> None:
    loss = run.step(batch)
    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
    bar.update()


def _measured(row: dict[str, Any], run: step.TrainingRun) -> None:
    stats = run.stats
    row.update(
        losses=stats.losses,
        step_seconds=stats.step_seconds,
        tokens=stats.tokens,
        tokens_per_s=stats.tokens_per_s,
        saved_bytes=stats.saved_bytes,
        peak_bytes=stats.peak_bytes if stats.peak_bytes is not None else stats.saved_bytes,
        model_bytes=stats.model_bytes,
    )


def _max_context_of(row: dict[str, Any], run: step.TrainingRun, plan: _Plan, args: argparse.Namespace) -> None:
    row["max_context"] = _search(run.model, plan, args)


def train_together(rows: list[dict[str, Any]], plan: _Plan, args: argparse.Namespace) -> None:
    """Build the contenders of ``rows``, train them taking turns step by step on the same batches, then (with
    --max-context) search each one's longest sequence; fills in the rows, failures included. A CPU trains all
    contenders together (a busy spell of another program slows each alike); CUDA one at a time (its own peak
    counter, one model in memory)."""
    runs: dict[str, step.TrainingRun] = {}
    try:
        for row in rows:
            _attempt(row, _build, row, plan, args, runs)
        live = [row for row in rows if row["contender"] in runs]
        bars = {row["contender"]: _bar(row["label"], len(plan.batches), i) for i, row in enumerate(live)}
        for batch in plan.batches:
            for row in live:
                run = runs.get(row["contender"])
                if run is not None and not _attempt(row, _step, run, batch, bars[row["contender"]]):
                    del runs[row["contender"]]  # out of memory, or broken: the others go on
        for bar in bars.values():
            bar.close()
        for row in live:
            if row["contender"] in runs:
                _measured(row, runs[row["contender"]])
                if args.max_context is not None:
                    _attempt(row, _max_context_of, row, runs[row["contender"]], plan, args)
    finally:
        runs.clear()
        _free(plan.device)


def _search(model: torch.nn.Module, plan: _Plan, args: argparse.Namespace) -> dict[str, Any]:
    cuda = plan.device.type == "cuda"
    if cuda:
        total = torch.cuda.get_device_properties(plan.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.max_context * 1e9 / total), plan.device)
    try:
        return max_context(lambda seq_len: _fits(model, plan, args, seq_len), plan.max_positions)
    finally:
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0, plan.device)


def write_outputs(report: dict[str, Any], out: Path) -> list[str]:
    """Write bench.json, bench.png (when matplotlib is there) and bench.md into ``out``; returns messages for the
    user (how to get the plot when matplotlib is missing)."""
    messages = []
    png = out / "bench.png"
    missing = reporting.write_png(report, png)
    if missing:
        messages.append(missing)
    (out / "bench.md").write_text(reporting.markdown(report, None if missing else png.name))
    reporting.write_json(report, out / "bench.json")
    return messages


def main(argv: list[str] | None = None) -> int:
    """Run ``fastft bench`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status (1: a contender
    failed; 2: bad arguments, via argparse)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        plan = resolve(args)
    except ValueError as e:
        parser.error(str(e))
    from fastft.bench import moe
    from fastft.kernels._dispatch import force_backend

    if args.preset is not None and moe.is_moe(plan.source):  # routed experts: each experts implementation
        try:
            return moe.run_cli(args, plan, argv)
        except ValueError as e:
            parser.error(str(e))
    start = time.perf_counter()
    meta = _meta(args, plan, argv)
    print(f"fastft bench: {plan.described} on {meta['device']}; writing to {plan.out}", file=sys.stderr)
    rows = [_row(contender, args.gradient_checkpointing) for contender in step.CONTENDERS]
    # On a CPU, fastft's torch path: Triton kernels would only run interpreted (TRITON_INTERPRET), for tests.
    backend = force_backend("torch") if plan.device.type == "cpu" else contextlib.nullcontext()
    with backend, warnings.catch_warnings():
        # PEFT asks transformers 5.2x for a renamed attribute once per model: noise between the progress bars.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        for row in rows:
            reason = step.liger_unavailable(plan.device) if row["contender"] == "liger" else None
            if reason:
                row.update(status="skipped", reason=reason)
        runnable = [row for row in rows if row["status"] == "ok"]
        # Liger (CUDA only) comes last in either case: it patches transformers' functions for the whole process.
        for group in [runnable] if plan.device.type == "cpu" else [[row] for row in runnable]:
            train_together(group, plan, args)
    meta["seconds"] = time.perf_counter() - start
    report = {"meta": meta, "results": rows}
    report["ratios"] = reporting.summarize(rows)
    messages = write_outputs(report, plan.out)
    print(reporting.table(report))
    for message in messages:
        print(f"fastft bench: {message}", file=sys.stderr)
    print(f"fastft bench: wrote {plan.out / 'bench.json'}, bench.md" + ("" if messages else ", bench.png"))
    return 1 if any(r["status"] in ("failed", "OOM") for r in rows) else 0
