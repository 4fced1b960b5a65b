"""Coverage: every causal LM type of the installed transformers, patched by fastft and compared with plain.

``python -m fastft.models.coverage [TYPE ...] [--out DIR] [--timeout S] [--jobs N]`` (also ``fastft coverage``)
builds each type of ``AutoModelForCausalLM`` at a tiny size (:mod:`fastft.models.tiny_configs`), each in its own
process with a timeout, and runs one training step three ways from the same weights and inputs:

- **exact**: plain transformers in float64, the oracle;
- **plain**: plain transformers in fp32 (+ PEFT LoRA);
- **fastft**: the same fp32 model after :func:`fastft.patch`.

once with full fine-tuning and once with LoRA on every linear layer (PEFT's ``"all-linear"``, random non-zero
adapters; routed experts' 3-D ``gate_up_proj`` / ``down_proj`` through ``target_parameters``). A difference is judged against the oracle, so that fp32 rounding is not called a difference: fastft's
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
import math
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
    experts: int = 0
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


def _deterministic(config) -> None:
    """Dropout and random hashing off everywhere (the three runs must see the same function), on the config and its
    sub-configs."""
    for part in [config, *(getattr(config, key, None) for key in getattr(config, "sub_configs", {}) or {})]:
        if part is None or not hasattr(part, "to_dict"):
            continue
        for name, value in part.to_dict().items():
            lowered = name.lower()
            if ("dropout" in lowered or "pdrop" in lowered) and isinstance(value, float):
                setattr(part, name, 0.0)
        if getattr(part, "attention_type", None) == "block_sparse":  # BigBird's random blocks: full attention
            part.attention_type = "original_full"
        if hasattr(part, "hash_seed") and part.hash_seed is None:  # Reformer's LSH rotations: seeded per forward
            part.hash_seed = 0  # (its layers reseed from torch.seed(), which no manual_seed can fix)


def _step(model, inputs):
    import torch

    torch.manual_seed(11)  # whatever randomness is left (router jitter) draws the same numbers in each run
    loss = model(**inputs).loss
    loss.backward()
    grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach().double().item(), grads


def _compare(exact, plain, fast) -> StepCheck:
    (l64, g64), (lp, gp), (lf, gf) = exact, plain, fast
    check = StepCheck(loss_fastft=abs(lf - l64), loss_plain=abs(lp - l64))
    check.ok = check.loss_fastft <= ERROR_FACTOR * check.loss_plain + ERROR_FLOOR * abs(l64)
    worst_excess = 0.0
    # Relative errors of gradients that are ~0 next to the model's others are rounding noise over nothing:
    # each parameter's is taken against at least 1e-6 of the largest gradient norm.
    scale = 1e-6 * max((g.norm().item() for g in g64.values()), default=0.0)
    for name, g in g64.items():
        norm = g.norm().item()
        if name not in gf:
            check.ok, check.worst = False, f"{name}: no gradient"
            continue
        ef, ep = (gf[name] - g).norm().item(), (gp[name] - g).norm().item()
        check.grad_fastft = max(check.grad_fastft, ef / max(norm, scale, 1e-30))
        check.grad_plain = max(check.grad_plain, ep / max(norm, scale, 1e-30))
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
        _deterministic(config)
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
    # Copies are taken before any forward (some models cache state in their first forward and cannot be copied
    # afterwards).
    plain, fast = copy.deepcopy(exact).float(), copy.deepcopy(exact).float()
    lora_base = copy.deepcopy(exact)
    try:
        reference = _step(exact, inputs)
        plain_full = _step(plain, inputs)
    except Exception as exc:  # noqa: BLE001 - transformers itself cannot train the tiny model
        row.result, row.detail = "transformers fails", _one_line(exc)
        return row
    if not all(math.isfinite(loss) for loss, _ in (reference, plain_full)):
        row.result, row.detail = (
            "transformers fails",
            f"plain transformers' loss is {plain_full[0]} (float64: {reference[0]})",
        )
        return row
    try:
        fastft.patch(fast)
        report = fast.fastft_report
        row.norms, row.mlps, row.attentions = report.norms, report.mlps, report.attentions
        row.experts = report.experts
        row.fused_loss, row.skipped = report.fused_loss, dict(report.skipped)
        row.full = _compare(reference, plain_full, _step(fast, inputs))
    except Exception as exc:  # noqa: BLE001 - fastft broke a model transformers runs: the worst result
        row.result, row.detail = "crash", _one_line(exc, traceback_tail=True)
        return row

    lora = _lora_twins(lora_base, inputs)
    if isinstance(lora, str):
        row.detail = f"LoRA not compared: {lora}"
    else:
        lora_reference, plain_lora, plain_lora_step, fast_lora = lora
        try:
            row.saved_plain = _saved_bytes(plain_lora, inputs)
            fastft.patch(fast_lora)
            row.lora = _compare(lora_reference, plain_lora_step, _step(fast_lora, inputs))
            row.saved_fastft = _saved_bytes(fast_lora, inputs)
        except Exception as exc:  # noqa: BLE001
            row.result, row.detail = "crash", "LoRA: " + _one_line(exc, traceback_tail=True)
            return row
    patched = row.norms + row.mlps + row.attentions > 0 or row.fused_loss
    failed = [(name, check) for name, check in (("full", row.full), ("LoRA", row.lora)) if check and not check.ok]
    if failed:
        row.result = "differs"
        row.detail = "; ".join(f"{name}: {check.worst or 'loss'}" for name, check in failed)
    else:
        row.result = "equal" if patched else "plain"
    return row


# PEFT's "all-linear" first; where PEFT refuses a layer of the model (Mamba's out_proj) or a wrapped layer breaks
# the model (a router returning a tuple), the attention and MLP projections of the usual names.
_LORA_TARGETS = (
    "all-linear",
    ["q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj",
     "c_attn", "c_proj", "c_fc", "fc1", "fc2", "dense", "query_key_value", "in_proj"],
)  # fmt: skip


def _lora_twins(base, inputs):
    """(float64 LoRA step, plain fp32 LoRA model, its step, fastft's copy) or the reason LoRA cannot be compared."""
    import peft
    import torch

    reason = ""
    for targets in _LORA_TARGETS:
        try:
            names = {n.rsplit(".", 1)[-1] for n, _ in base.named_modules()}
            if isinstance(targets, list):
                targets = [t for t in targets if t in names]
                if not targets:
                    continue
            # Routed experts' 3-D weights are parameters, not modules: PEFT adapts them with target_parameters.
            expert_params = sorted(
                {n.rsplit(".", 1)[-1] for n, p in base.named_parameters() if p.dim() == 3}
                & {"gate_up_proj", "up_proj", "down_proj"}
            )
            config = peft.LoraConfig(
                r=4,
                lora_alpha=8,
                target_modules=targets,
                target_parameters=expert_params or None,
                init_lora_weights=False,
            )
            model = copy.deepcopy(base)
            torch.manual_seed(1)
            exact = peft.get_peft_model(model, config)
            plain, fast = copy.deepcopy(exact).float(), copy.deepcopy(exact).float()
            return _step(exact, inputs), plain, _step(plain, inputs), fast
        except Exception as exc:  # noqa: BLE001 - try the narrower target list, or give the reason
            reason = _one_line(exc)
    return reason or "no linear layer to adapt"


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
        import torch
        import transformers

        torch.set_num_threads(1)  # tiny matmuls; the processes run side by side
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
            "| type | result | norms | MLPs | attention | experts | fused loss | full fine-tuning | LoRA "
            "| saved KiB plain → fastft | left on transformers' code |"
        ),
        "| --- | --- | ---: | ---: | ---: | ---: | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        left = "; ".join(f"{k} ({v})" for k, v in sorted(row.skipped.items()))
        if row.detail:
            left = f"{row.detail}{'; ' + left if left else ''}"
        saved = f"{_kib(row.saved_plain)} → {_kib(row.saved_fastft)}" if row.saved_fastft else ""
        lines.append(
            f"| {row.model_type} | {row.result} | {row.norms} | {row.mlps} | {row.attentions} | {row.experts} | "
            f"{'on' if row.fused_loss else 'off'} | {_step_cell(row.full)} | {_step_cell(row.lora)} | {saved} | "
            f"{left.replace('|', '/')} |"
        )
    return "\n".join(lines) + "\n"


README_BEGIN, README_END = "<!-- coverage-table -->", "<!-- /coverage-table -->"


def readme_table(rows: list[Row], versions: dict[str, str]) -> str:
    """The README's family table: the counts per result and one line per type fastft patches (stable facts
    only: what was patched and what was left, not the measured errors, which ``coverage.md`` has)."""
    counts = {r: sum(row.result == r for row in rows) for r in RESULTS}
    lines = [
        f"Measured by `fastft coverage` on transformers {versions.get('transformers', '?')}: {len(rows)} causal LM "
        "types, " + ", ".join(f"{n} {r}" for r, n in counts.items() if n) + ". Every type fastft patches:",
        "",
        "| type | norms | MLPs | attention | experts | fused loss | left on transformers' code |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for row in rows:
        if row.result != "equal":
            continue
        left = "; ".join(f"{k} ({v})" for k, v in sorted(row.skipped.items()))
        lines.append(
            f"| {row.model_type} | {row.norms} | {row.mlps} | {row.attentions} | {row.experts} | "
            f"{'on' if row.fused_loss else 'off'} | {left.replace('|', '/')} |"
        )
    return "\n".join(lines) + "\n"


def update_readme(path: Path, table: str) -> None:
    """Replace the block between the coverage markers of ``path`` with ``table``."""
    text = path.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{path} has no {README_BEGIN} ... {README_END} block to replace")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    path.write_text(f"{head}{README_BEGIN}\n{table}{README_END}{tail}")


def versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"transformers": transformers.__version__, "torch": torch.__version__, "peft": peft.__version__}


def main(argv: list[str] | None = None, prog: str = "python -m fastft.models.coverage") -> int:
    """Run the coverage command; exit status 1 when any type crashed or differs, else 0."""
    # Before torch loads OpenMP: busy-waiting threads of processes side by side cost 10-100x on small machines.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("types", nargs="*", help="model types to check (default: every causal LM type)")
    parser.add_argument("--out", type=Path, default=Path("coverage"), help="folder for coverage.json and .md")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per type before it is killed")
    parser.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)), help="types at a time")
    parser.add_argument("--readme", type=Path, help="also rewrite this README's coverage table")
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
    if args.readme is not None:
        update_readme(args.readme, readme_table(rows, info))
    print(table.split("\n", 1)[0])
    print(f"wrote {args.out / 'coverage.md'} and {args.out / 'coverage.json'}")
    return 1 if any(r.result in ("crash", "differs", "timeout") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
