"""Coverage: every causal LM type of the installed transformers, patched by fastft and compared with plain.

``python -m fastft.models.coverage [TYPE ...] [--out DIR] [--timeout S] [--jobs N]`` (also ``fastft coverage``)
builds each type of ``AutoModelForCausalLM`` at a tiny size (:mod:`fastft.models.tiny_configs`), each in its own
process with a timeout, and runs one training step three ways from the same weights and inputs:

- **exact**: plain transformers in float64, the oracle;
- **plain**: plain transformers in fp32 (+ PEFT LoRA);
- **fastft**: the same fp32 model after :func:`fastft.patch`.

once with full fine-tuning and once with LoRA on every linear layer (PEFT's ``"all-linear"``, random non-zero
adapters). A difference is judged against the oracle, so that fp32 rounding is not called a difference: fastft's
loss and every gradient must be as close to float64 as plain fp32's are, within ``ERROR_FACTOR`` times plain's
error plus ``ERROR_FLOOR`` relative (a few fp32 roundings of a reordered sum; a real error, a missing scale or
a wrong gradient, is orders of magnitude larger). Each row also counts the bytes autograd saves for backward in
the LoRA step (plain and fastft) and names every block fastft left on transformers' code, with the reason.

Results: ``equal`` (fastft patched something and matches), ``plain`` (nothing recognised; runs as transformers),
``differs``, ``crash`` (fastft raised where transformers runs), ``timeout``, and ``not built`` / ``transformers
fails`` when the tiny model itself cannot be built or run by transformers (not a fastft result). The table is
printed and written to ``--out`` as ``coverage.json`` and ``coverage.md``. Kernels run their torch path (the
Triton kernels are checked against the same references in ``tests/kernels``).
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

ERROR_FACTOR = 4.0
ERROR_FLOOR = 1e-5
RESULTS = ("equal", "plain", "differs", "crash", "timeout", "transformers fails", "not built")


@dataclass
class StepCheck:
    """One training step of fastft and of plain fp32, each against float64: errors relative to the oracle."""

    loss_fastft: float = 0.0
    loss_plain: float = 0.0
    grad_fastft: float = 0.0  # max over parameters of |g - g64| / |g64|
    grad_plain: float = 0.0
    worst: str = ""  # the parameter whose gradient is furthest beyond the bound, when one is
    ok: bool = True


@dataclass
class Row:
    """One model type's result."""

    model_type: str
    result: str = "not built"
    model_class: str = ""
    norms: int = 0
    mlps: int = 0
    attentions: int = 0
    fused_loss: bool = False
    skipped: dict[str, str] = field(default_factory=dict)
    full: StepCheck | None = None
    lora: StepCheck | None = None
    saved_plain: int = 0
    saved_fastft: int = 0
    detail: str = ""
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------------ one type


def _inputs(vocab: int, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, max(4, min(vocab, 200)), (2, 12), generator=gen)
    labels = ids.clone()
    labels[0, :3] = -100
    return {"input_ids": ids, "labels": labels}


def _perturb_norms(model) -> None:
    """Norm weights start at 1 (or 0 for 1 + w norms); move them so that every weight matters in the check."""
    import torch

    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and "norm" in name.lower():
                param.add_((torch.rand(param.shape, generator=gen, dtype=torch.float64) * 0.6 - 0.3).to(param.dtype))


def _step(model, inputs):
    loss = model(**inputs).loss
    loss.backward()
    grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach().double().item(), grads


def _compare(exact, plain, fast) -> StepCheck:
    (l64, g64), (lp, gp), (lf, gf) = exact, plain, fast
    check = StepCheck(loss_fastft=abs(lf - l64), loss_plain=abs(lp - l64))
    check.ok = check.loss_fastft <= ERROR_FACTOR * check.loss_plain + ERROR_FLOOR * abs(l64)
    worst_excess = 0.0
    for name, g in g64.items():
        norm = g.norm().item()
        if name not in gf:
            check.ok, check.worst = False, f"{name}: no gradient"
            continue
        ef, ep = (gf[name] - g).norm().item(), (gp[name] - g).norm().item()
        check.grad_fastft = max(check.grad_fastft, ef / (norm + 1e-30))
        check.grad_plain = max(check.grad_plain, ep / (norm + 1e-30))
        excess = ef - (ERROR_FACTOR * ep + ERROR_FLOOR * norm + 1e-12)
        if excess > worst_excess:
            worst_excess, check.worst, check.ok = excess, name, False
    return check


def _saved_bytes(model, inputs) -> int:
    from fastft.utils.memory import SavedTensorMeter

    with SavedTensorMeter() as meter:
        loss = model(**inputs).loss
    del loss
    return meter.total_bytes


def check_type(model_type: str) -> Row:
    """Build ``model_type`` tiny and compare fastft with plain transformers (see the module docstring)."""
    import peft
    import torch
    import transformers

    import fastft
    from fastft.models import tiny_configs
    from fastft.models.patch import text_config

    row = Row(model_type)
    unbuildable = getattr(tiny_configs, "UNBUILDABLE", {})
    if model_type in unbuildable:
        row.detail = unbuildable[model_type]
        return row
    try:
        config = tiny_configs.tiny_config(model_type)
        for part in {id(c): c for c in (config, text_config(config))}.values():
            part._experts_implementation = "eager"  # the float64 oracle: grouped_mm has no float64 kernel
        torch.manual_seed(0)
        exact = transformers.AutoModelForCausalLM.from_config(config).to(torch.float64)
        _perturb_norms(exact)
    except Exception as exc:  # noqa: BLE001 - the tiny model cannot be built: not a fastft result
        row.detail = _one_line(exc)
        return row
    row.model_class = type(exact).__name__
    vocab = exact.get_output_embeddings().weight.shape[0] if exact.get_output_embeddings() is not None else 256
    inputs = _inputs(vocab)

    def twins(model):
        plain = copy.deepcopy(model).float()
        return plain, copy.deepcopy(plain)

    try:
        reference = _step(exact, inputs)
        plain, fast = twins(exact)
        plain_full = _step(plain, inputs)
        lora_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        torch.manual_seed(1)
        exact.zero_grad(set_to_none=True)
        exact_lora = peft.get_peft_model(exact, lora_config)
        lora_reference = _step(exact_lora, inputs)
        plain_lora, fast_lora = twins(exact_lora)
        plain_lora_step = _step(plain_lora, inputs)
        row.saved_plain = _saved_bytes(plain_lora, inputs)
    except Exception as exc:  # noqa: BLE001 - transformers itself cannot train the tiny model
        row.result, row.detail = "transformers fails", _one_line(exc)
        return row

    try:
        fastft.patch(fast)
        report = fast.fastft_report
        row.norms, row.mlps, row.attentions = report.norms, report.mlps, report.attentions
        row.fused_loss, row.skipped = report.fused_loss, dict(report.skipped)
        row.full = _compare(reference, plain_full, _step(fast, inputs))
        fastft.patch(fast_lora)
        row.lora = _compare(lora_reference, plain_lora_step, _step(fast_lora, inputs))
        row.saved_fastft = _saved_bytes(fast_lora, inputs)
    except Exception as exc:  # noqa: BLE001 - fastft broke a model transformers runs: the worst result
        row.result, row.detail = "crash", _one_line(exc, traceback_tail=True)
        return row
    patched = row.norms + row.mlps + row.attentions > 0 or row.fused_loss
    if not (row.full.ok and row.lora.ok):
        row.result = "differs"
        worst = row.full.worst if not row.full.ok else row.lora.worst
        row.detail = f"{'full' if not row.full.ok else 'LoRA'}: {worst}"
    else:
        row.result = "equal" if patched else "plain"
    return row


def _one_line(exc: BaseException, traceback_tail: bool = False) -> str:
    text = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]
    if traceback_tail:
        frames = traceback.extract_tb(exc.__traceback__)
        if frames:
            last = frames[-1]
            text += f" (at {Path(last.filename).name}:{last.lineno})"
    return text


# ------------------------------------------------------------------------------------------------ processes


def _child(model_type: str, conn) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        row = check_type(model_type)
    except BaseException as exc:  # noqa: BLE001 - reported, never raised across the pipe
        row = Row(model_type, result="crash", detail=_one_line(exc, traceback_tail=True))
    row.seconds = round(time.perf_counter() - start, 2)
    conn.send(asdict(row))
    conn.close()


def _row_from_dict(data: dict) -> Row:
    full, lora = data.pop("full", None), data.pop("lora", None)
    return Row(**data, full=StepCheck(**full) if full else None, lora=StepCheck(**lora) if lora else None)


def run(model_types: list[str], timeout: float = 180.0, jobs: int = 2, progress=None) -> list[Row]:
    """Check each type in its own (forked) process, ``jobs`` at a time; a process past ``timeout`` seconds is
    killed and its type reported as ``timeout``."""
    # Prepared once in the parent, before any process is forked: each child starts with them imported.
    os.environ.setdefault("TRITON_INTERPRET", "0")
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import fastft  # noqa: F401

    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    pending, running, rows = list(model_types), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            model_type = pending.pop(0)
            receive, send = context.Pipe(duplex=False)
            process = context.Process(target=_child, args=(model_type, send), daemon=True)
            process.start()
            send.close()
            running[model_type] = (process, receive, time.perf_counter())
        time.sleep(0.05)
        for model_type, (process, receive, started) in list(running.items()):
            elapsed = time.perf_counter() - started
            row = None
            if receive.poll():
                try:
                    row = _row_from_dict(receive.recv())
                except EOFError:
                    row = Row(model_type, result="crash", detail=f"process died (exit code {process.exitcode})")
            elif not process.is_alive():
                row = Row(model_type, result="crash", detail=f"process died (exit code {process.exitcode})")
            elif elapsed > timeout:
                process.kill()
                row = Row(model_type, result="timeout", detail=f"no result within {timeout:g} s")
            if row is None:
                continue
            process.join(1)
            receive.close()
            row.seconds = row.seconds or round(elapsed, 2)
            rows[model_type] = row
            del running[model_type]
            if progress is not None:
                progress(row)
    return [rows[t] for t in model_types]


def causal_lm_types() -> list[str]:
    """Every model type the installed transformers maps to ``AutoModelForCausalLM``, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


# ------------------------------------------------------------------------------------------------ the table


def _sci(x: float) -> str:
    return f"{x:.1e}"


def _step_cell(check: StepCheck | None) -> str:
    if check is None:
        return ""
    return f"{_sci(check.loss_fastft)} / {_sci(check.grad_fastft)} (plain {_sci(check.loss_plain)} / {_sci(check.grad_plain)})"


def _kib(n: int) -> str:
    return f"{n / 1024:.0f}"


def markdown(rows: list[Row], versions: dict[str, str]) -> str:
    """The coverage table as markdown, with the counts per result and the versions it was measured on."""
    counts = {r: sum(row.result == r for row in rows) for r in RESULTS}
    lines = [
        f"fastft coverage on transformers {versions.get('transformers', '?')} (torch {versions.get('torch', '?')}): "
        f"{len(rows)} causal LM types; " + ", ".join(f"{n} {r}" for r, n in counts.items() if n),
        "",
        (
            "Errors are against a float64 run of plain transformers: loss / max relative gradient error, fastft's "
            "and (in brackets) plain fp32's. Saved bytes: what autograd keeps for backward in the LoRA step, KiB."
        ),
        "",
        (
            "| type | result | norms | MLPs | attention | fused loss | full fine-tuning | LoRA "
            "| saved KiB plain → fastft | left on transformers' code |"
        ),
        "| --- | --- | ---: | ---: | ---: | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        left = "; ".join(f"{k} ({v})" for k, v in sorted(row.skipped.items()))
        if row.detail:
            left = f"{row.detail}{'; ' + left if left else ''}"
        saved = f"{_kib(row.saved_plain)} → {_kib(row.saved_fastft)}" if row.saved_fastft else ""
        lines.append(
            f"| {row.model_type} | {row.result} | {row.norms} | {row.mlps} | {row.attentions} | "
            f"{'on' if row.fused_loss else 'off'} | {_step_cell(row.full)} | {_step_cell(row.lora)} | {saved} | "
            f"{left.replace('|', '/')} |"
        )
    return "\n".join(lines) + "\n"


def versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"transformers": transformers.__version__, "torch": torch.__version__, "peft": peft.__version__}


def main(argv: list[str] | None = None, prog: str = "python -m fastft.models.coverage") -> int:
    """Run the coverage command; exit status 1 when any type crashed or differs, else 0."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("types", nargs="*", help="model types to check (default: every causal LM type)")
    parser.add_argument("--out", type=Path, default=Path("coverage"), help="folder for coverage.json and .md")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per type before it is killed")
    parser.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)), help="types at a time")
    args = parser.parse_args(argv)
    known = causal_lm_types()
    unknown = [t for t in args.types if t not in known]
    if unknown:
        parser.error(f"not causal LM types of this transformers: {', '.join(unknown)} (see {prog} --help)")

    def progress(row: Row) -> None:
        print(f"{row.model_type:28s} {row.result:18s} {row.seconds:6.1f}s {row.detail[:100]}", flush=True)

    rows = run(args.types or known, timeout=args.timeout, jobs=args.jobs, progress=progress)
    info = versions()
    table = markdown(rows, info)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "coverage.md").write_text(table)
    payload = {"versions": info, "rows": [asdict(r) for r in rows]}
    (args.out / "coverage.json").write_text(json.dumps(payload, indent=1))
    print(table.split("\n", 1)[0])
    print(f"wrote {args.out / 'coverage.md'} and {args.out / 'coverage.json'}")
    return 1 if any(r.result in ("crash", "differs", "timeout") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
