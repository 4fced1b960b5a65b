"""The parts of the GPU suite (:mod:`fastft.bench.gpu`) and the worker processes they run in.

Each part is a function ``(spec, emit) -> payload``: ``spec`` is the JSON task the suite hands the worker (the part,
``dry_run``, a wall-clock ``deadline``, the logs folder, the memory cap, the measured copy bandwidth), ``emit(payload)``
saves partial results (a part killed at its budget keeps them), and the payload is ``{"results": ...}``. The LoRA
configurations and max-context contenders are sub-tasks of the same kind: on CUDA each runs in its own process (its
own allocator and peak counter; Liger patches transformers' module functions globally), on a CPU in the part's.
:func:`spawn` starts a worker (``python -m fastft.bench.gpu --worker SPEC``) and kills it at its budget;
:func:`worker` is that process's side. The model FLOPs behind MFU are :func:`train_flops_per_token`.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastft.bench import context_parallel, gpu_moe, gpu_rl, vlm

GRACE_S = 5.0  # a part's own deadline comes this long before it is killed: it saves what it has and exits
# The LoRA step configurations (quant, contender, checkpointing), most important first: a budget cut drops the last.
LORA_PLAN = (
    ("bf16", "plain", "none"),
    ("bf16", "fastft", "none"),
    ("bf16", "liger", "none"),
    ("4bit", "plain", "none"),
    ("4bit", "fastft", "none"),
    ("4bit", "liger", "none"),
    ("bf16", "fastft", "offload"),
)
MAX_CONTEXT_PLAN = (("plain", "standard"), ("liger", "standard"), ("fastft", "offload"), ("fastft", "long"))
# "long": offloaded checkpointing plus fastft.models.long_context.set_long_context (tiled MLP with its norm fused;
# every layer input kept: one step's host memory is far below the machine's at the lengths the budget reaches).
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds the fastft package
# spawn(new_group=True): the worker leads a process group of its own, so a kill at its budget takes its children.
_NEW_GROUP: dict[str, Any] = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}

# ----------------------------------------------------------------------------------------------------
# The model and its FLOPs
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelDims:
    """The decoder the LoRA parts train: Llama-3.1-8B, or a tiny one with the same structure for the dry run."""

    layers: int = 32
    hidden: int = 4096
    intermediate: int = 14336
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    vocab: int = 128256
    rank: int = 16
    seq_len: int = 4096  # of the lora_step part
    batch_size: int = 1
    steps: int = 5  # the first compiles and allocates; tokens/s counts the others
    max_positions: int = 131072  # the longest context the max_context part tries
    first_probe: int = 4096

    def config(self):
        """The transformers ``LlamaConfig`` (Llama-3.1's ``llama3`` RoPE scaling, untied head, no cache)."""
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            vocab_size=self.vocab,
            max_position_embeddings=self.max_positions,
            rms_norm_eps=1e-5,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": min(8192, self.max_positions),
            },
            tie_word_embeddings=False,
            use_cache=False,
        )


LLAMA31_8B = ModelDims()
TINY = ModelDims(
    layers=2, hidden=64, intermediate=224, heads=4, kv_heads=2, head_dim=16, vocab=512, rank=8, seq_len=32,
    steps=2, max_positions=2048, first_probe=16,
)  # fmt: skip


def train_flops_per_token(dims: ModelDims, seq_len: int) -> float:
    """Model FLOPs of one LoRA training step per trained token (module docstring): ``4 N + 6 N_lora + 6 L Hq D S``."""
    q, kv = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    h, i = dims.hidden, dims.intermediate
    # (in, out) of q, k, v, o, gate, up, down
    projections = ((h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h))
    frozen = dims.layers * sum(a * b for a, b in projections) + dims.vocab * h  # + lm_head
    lora = dims.layers * dims.rank * sum(a + b for a, b in projections)
    attention = 6 * dims.layers * q * seq_len
    return 4 * frozen + 6 * lora + attention


# ----------------------------------------------------------------------------------------------------
# Parts (each runs in a worker process: ``spec`` says what, ``emit`` saves partial results)
# ----------------------------------------------------------------------------------------------------


def _device(spec: dict) -> torch.device:
    return torch.device("cpu" if spec["dry_run"] else "cuda")


def _left(spec: dict) -> float:
    return spec["deadline"] - time.time()


def _part_device(spec: dict, emit: Callable[[dict], None]) -> dict:
    from fastft.bench import harness

    device = _device(spec)
    cuda = device.type == "cuda"
    copy_bytes = None if cuda else 8 << 20
    matmul_n = None if cuda else 256
    results: dict[str, Any] = {"name": harness.device_name(device)}
    results["copy_bytes_per_s"] = harness.copy_bandwidth(str(device), copy_bytes)
    results["copy_note"] = "1 GiB device-to-device copy_, read + write" if cuda else "8 MiB host copy_, read + write"
    emit({"results": results})
    results["matmul_flops_per_s"] = harness.matmul_rate(str(device), matmul_n)
    results["matmul_note"] = f"{matmul_n or 8192}^3 bf16 matmul of normal random operands"
    if cuda:
        props = torch.cuda.get_device_properties(device)
        results.update(
            total_memory=props.total_memory,
            sm_count=props.multi_processor_count,
            capability=f"{props.major}.{props.minor}",
            l2_bytes=getattr(props, "L2_cache_size", None),
        )
    return {"results": results}


def _part_kernels(spec: dict, emit: Callable[[dict], None]) -> dict:
    from fastft.bench import harness, kernels

    device = _device(spec)
    copy = spec.get("copy_bytes_per_s") or harness.copy_bandwidth(str(device))
    results: dict[str, Any] = {"copy_bytes_per_s": copy, "rows": []}
    done: list = []

    def on_result(r) -> None:
        done.append(r)
        kernels.annotate(done, copy)
        results["rows"] = [dataclasses.asdict(x) for x in done]
        emit({"results": results})

    contenders = tuple(c for c in kernels.CONTENDERS if not (spec["dry_run"] and c == "torch.compile"))
    if spec["dry_run"]:  # inductor compiles C++ for minutes on a CPU: the dry run leaves torch.compile out
        results["note"] = "dry run: torch.compile left out (compiling takes minutes on a CPU)"
    # torch.compile runs last; none starts once less than 25 s (a compilation) is left.
    final = kernels.run_all(
        device,
        None,
        contenders,
        budget_s=max(0.0, _left(spec) - 25.0),
        target_s=0.01 if spec["dry_run"] else 0.5,
        log=lambda line: print(line, flush=True),
        tokens=4 if spec["dry_run"] else None,
        on_result=on_result,
    )
    kernels.annotate(final, copy)
    results["rows"] = [dataclasses.asdict(r) for r in final]  # sorted by kernel, then contender
    return {"results": results}


def _random_batch(dims: ModelDims, seq_len: int, device: torch.device, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, dims.vocab, (dims.batch_size, seq_len), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _unavailable(contender: str, quant: str, device: torch.device) -> tuple[str, str] | None:
    """(status, reason) when the configuration cannot run here: a peer not installed, or Liger without CUDA."""
    if quant == "4bit" and importlib.util.find_spec("bitsandbytes") is None:
        return "not installed", "bitsandbytes is not installed (pip install bitsandbytes)"
    if contender == "liger":
        if importlib.util.find_spec("liger_kernel") is None:
            return "not installed", "liger-kernel is not installed (pip install liger-kernel)"
        if device.type != "cuda":
            return "skipped", "Liger Kernel needs CUDA"
    return None


def _build(spec: dict, device: torch.device):
    from fastft.bench import step

    dims = ModelDims(**spec["dims"])
    long = spec["checkpointing"] == "long"
    model, note = step.build_model(
        dims.config(),
        spec["contender"],
        dtype=torch.bfloat16,
        device=device,
        load_in_4bit=spec["quant"] == "4bit",
        checkpointing="offload" if long else spec["checkpointing"],
        rank=dims.rank,
        lora_alpha=dims.rank,
    )
    if long:
        from fastft.models.long_context import set_long_context

        set_long_context(model, tiled_mlp=True)
        note += "; long context: tiled MLP (norm fused), offloaded checkpointing"
    return model, note


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _lora_config(spec: dict, emit: Callable[[dict], None]) -> dict:
    """One LoRA configuration: build, ``dims.steps`` training steps, tokens/s and memory."""
    from fastft.bench import step

    device, dims = _device(spec), ModelDims(**spec["dims"])
    start = time.perf_counter()
    model, note = _build(spec, device)
    built = time.perf_counter() - start
    batch = _random_batch(dims, dims.seq_len, device)
    stats = step.train(model, [batch] * dims.steps, device=device, tokens_in=lambda b: b["labels"].numel())
    return {
        "note": note,
        "build_s": built,
        "tokens_per_s": stats.tokens_per_s,
        "step_s": statistics.median(stats.step_seconds[1:] or stats.step_seconds),
        "step_s_all": stats.step_seconds,
        "losses": stats.losses,
        "peak_bytes": stats.peak_bytes,
        "model_bytes": stats.model_bytes,
        "saved_bytes": stats.saved_bytes,
    }


def _part_lora_step(spec: dict, emit: Callable[[dict], None]) -> dict:
    device = _device(spec)
    dims = TINY if spec["dry_run"] else LLAMA31_8B
    results: dict[str, Any] = {"model": dataclasses.asdict(dims), "rows": []}
    for quant, contender, mode in LORA_PLAN:
        row = {"quant": quant, "contender": contender, "checkpointing": mode}
        task = dict(spec, task="lora_config", dims=dataclasses.asdict(dims), **row)
        # At most 120 s each on the GPU (about 30 are expected): a hung configuration cannot eat the rest.
        row.update(_sub_task(task, device, min_start_s=0 if spec["dry_run"] else 25.0, timeout=min(_left(spec), 120)))
        results["rows"].append(row)
        emit({"results": results})
    return {"results": results}


def _step_bytes(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> int | None:
    """The memory one training step on ``batch`` takes (:func:`fastft.bench.step.step_memory`); None if it ran out."""
    from fastft.bench import step

    try:
        return step.step_memory(model, batch, device=device)
    except RuntimeError as e:  # torch.cuda.OutOfMemoryError, or cuBLAS failing to allocate its workspace
        if not isinstance(e, torch.cuda.OutOfMemoryError) and "out of memory" not in str(e).lower():
            raise
        return None
    finally:
        _free(device)


def _max_context_one(spec: dict, emit: Callable[[dict], None]) -> dict:
    """The longest sequence one training step of a contender fits in under ``spec["cap_bytes"]``, until deadline."""
    device, dims, cap = _device(spec), ModelDims(**spec["dims"]), spec["cap_bytes"]
    if device.type == "cuda":  # the allocator refuses beyond the cap: an OOM there is "does not fit"
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
    model, note = _build(spec, device)
    out: dict[str, Any] = {"note": note, "longest": None, "stopped": None, "probes": []}
    if device.type == "cuda":  # compile the Triton kernels first, so the probes' times predict the next probe's
        _step_bytes(model, _random_batch(dims, min(512, dims.first_probe), device), device)

    def fits(seq_len: int) -> bool:
        t0 = time.perf_counter()
        used = _step_bytes(model, _random_batch(dims, seq_len, device), device)
        ok = used is not None and used <= cap
        host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's peak host memory (Linux KiB)
        out["probes"].append(
            {"seq_len": seq_len, "bytes": used, "host_bytes": host, "fits": ok, "seconds": time.perf_counter() - t0}
        )
        if ok:
            out["longest"] = max(out["longest"] or 0, seq_len)
        emit(out)
        return ok

    def affordable(seq_len: int) -> bool:
        # The slowest seconds per model FLOP seen so far (an OOM probe ends early and is faster), times the FLOPs of
        # a step at seq_len (attention makes them grow faster than the length), with 1.5x to spare.
        def flops(n: int) -> float:
            return n * train_flops_per_token(dims, n)

        rate = max((p["seconds"] / flops(p["seq_len"]) for p in out["probes"]), default=0.0)
        guess = 1.5 * rate * flops(seq_len)
        if guess < _left(spec):
            return True
        out["stopped"] = f"time budget (a step at {seq_len} tokens would take ~{guess:.0f} s)"
        return False

    lo, hi, seq_len = 0, None, dims.first_probe
    while hi is None and affordable(seq_len):  # double until a length does not fit
        if not fits(seq_len):
            hi = seq_len
        elif seq_len >= dims.max_positions:
            out["stopped"] = f"the model's {dims.max_positions} positions"
            break
        else:
            lo, seq_len = seq_len, min(2 * seq_len, dims.max_positions)
    while hi is not None and lo and hi - lo > max(8, lo // 16):  # bisect to 1/16 of the length
        mid = (lo + hi) // 2
        if not affordable(mid):
            break
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    if hi is not None and out["stopped"] is None:
        out["stopped"] = f"does not fit at {hi}"
    return out


def _part_max_context(spec: dict, emit: Callable[[dict], None]) -> dict:
    device = _device(spec)
    dims = TINY if spec["dry_run"] else LLAMA31_8B
    # The dry run's "cap" is 1 MB on the CPU's memory model (resident + step peak): small enough that plain hits it.
    cap = 1_000_000 if spec["dry_run"] else spec["cap_bytes"]
    results: dict[str, Any] = {"cap_bytes": cap, "model": dataclasses.asdict(dims), "rows": []}
    runnable = [(c, m) for c, m in MAX_CONTEXT_PLAN if _unavailable(c, "bf16", device) is None]
    for contender, mode in MAX_CONTEXT_PLAN:
        row: dict[str, Any] = {"contender": contender, "checkpointing": mode, "quant": "bf16"}
        results["rows"].append(row)
        task = dict(spec, task="max_context_one", dims=dataclasses.asdict(dims), cap_bytes=cap, **row)
        share = None
        if (contender, mode) in runnable:  # an equal share of what is left for each contender still to run
            share = _left(spec) / (len(runnable) - runnable.index((contender, mode)))
            task["deadline"] = time.time() + share - GRACE_S
        row.update(_sub_task(task, device, min_start_s=0 if spec["dry_run"] else 20.0, timeout=share))
        emit({"results": results})
    return {"results": results}


def _sub_task(task: dict, device: torch.device, min_start_s: float, timeout: float | None = None) -> dict:
    """Run a configuration: in a fresh process on CUDA (its own allocator, peak counter and Liger's global patches),
    in this one on a CPU; returns its fields with ``status`` and ``reason``. Never raises."""
    blocked = _unavailable(task["contender"], task["quant"], device)
    if blocked:
        return {"status": blocked[0], "reason": blocked[1]}
    left = _left(task) if timeout is None else timeout
    if left < max(min_start_s, 1.0):
        return {"status": "skipped", "reason": f"time budget: {max(left, 0):.0f} s left"}
    if device.type != "cuda":
        return _in_process(task)
    name = "-".join(str(task[k]) for k in ("task", "quant", "contender", "checkpointing"))
    return spawn(task, left, Path(task["logs"]) / f"{name}.log", new_group=False)


def _in_process(task: dict) -> dict:
    try:
        return {"status": "ok", "reason": "", **_TASKS[task["task"]](task, lambda _: None)}
    except torch.cuda.OutOfMemoryError as e:
        return {"status": "OOM", "reason": _one_line(e)}
    except Exception as e:  # noqa: BLE001 - a configuration's failure is its result; the others still run
        traceback.print_exc()
        return {"status": "failed", "reason": f"{type(e).__name__}: {_one_line(e)}"}


_TASKS: dict[str, Callable[[dict, Callable[[dict], None]], dict]] = {
    "device": _part_device,
    "kernels": _part_kernels,
    "lora_step": _part_lora_step,
    "max_context": _part_max_context,
    "logprob_head": gpu_rl.part_logprob_head,
    "grpo_loss_step": gpu_rl.part_grpo_loss_step,
    "moe_step": gpu_moe.part_moe_step,
    "vlm_step": vlm.part_vlm_step,
    "context_parallel": context_parallel.part_context_parallel,
    "lora_config": _lora_config,
    "max_context_one": _max_context_one,
}


# ----------------------------------------------------------------------------------------------------
# Worker processes
# ----------------------------------------------------------------------------------------------------


def _one_line(error: BaseException | str, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as JSON through a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")  # a reader (or a kill) never sees half a file
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def spawn(task: dict, timeout: float, log: Path, *, new_group: bool) -> dict:
    """``task`` in a ``python -m fastft.bench.gpu --worker`` process, killed after ``timeout`` s (with its whole
    process group when ``new_group``); returns what it saved, with ``status`` ok, failed, OOM or timeout."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # benchmarks time compiled kernels
    # The worker imports the same fastft as this process, installed or not.
    env["PYTHONPATH"] = os.pathsep.join([str(_PACKAGE_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(task))
        command = [sys.executable, "-m", "fastft.bench.gpu", "--worker", str(spec_path), "--worker-out", str(out_path)]
        with log.open("a") as sink:
            proc = subprocess.Popen(
                command, stdout=sink, stderr=subprocess.STDOUT, env=env, **(_NEW_GROUP if new_group else {})
            )
            try:
                proc.wait(timeout=max(timeout, 0.01))
                timed_out = False
            except subprocess.TimeoutExpired:
                if new_group:
                    os.killpg(proc.pid, signal.SIGKILL)  # the worker and every process it started
                else:
                    proc.kill()
                proc.wait()
                timed_out = True
        saved = json.loads(out_path.read_text()) if out_path.exists() else {}
    if timed_out:
        saved.update(status="timeout", reason=f"killed at its budget of {timeout:.0f} s; results saved before kept")
    elif proc.returncode != 0 and saved.get("status") in (None, "running"):
        saved.update(status="failed", reason=f"worker exit code {proc.returncode}; log {log}: {_last_line(log)}")
    saved.setdefault("status", "failed")
    saved.setdefault("reason", "")
    return saved


def _last_line(path: Path) -> str:
    lines = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return _one_line(lines[-1]) if lines else "empty"


def worker(spec_path: Path, out_path: Path) -> int:
    """The worker process's side of :func:`spawn`: run the task in ``spec_path``, saving to ``out_path`` as it goes
    (status ``running``) and at the end (``ok``, ``OOM`` or ``failed`` with the reason); returns the exit status."""
    spec = json.loads(spec_path.read_text())
    if spec["dry_run"]:
        # Tiny shapes gain nothing from threads, and on a busy CPU two OpenMP threads make a 32 x 64 matmul
        # take milliseconds instead of microseconds (seen on a loaded 2-core CI machine).
        torch.set_num_threads(1)
    last: dict = {}

    def emit(payload: dict) -> None:
        last.clear()
        last.update(payload)
        write_json(out_path, {"status": "running", "reason": "", **payload})

    try:
        payload = _TASKS[spec["task"]](spec, emit)
    except torch.cuda.OutOfMemoryError as e:
        write_json(out_path, {**last, "status": "OOM", "reason": _one_line(e)})
        return 1
    except Exception as e:  # noqa: BLE001 - recorded in the result file; the suite goes on
        traceback.print_exc()
        write_json(out_path, {**last, "status": "failed", "reason": f"{type(e).__name__}: {_one_line(e)}"})
        return 1
    write_json(out_path, {"status": "ok", "reason": "", **payload})
    return 0
