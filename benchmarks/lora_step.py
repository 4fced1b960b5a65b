"""One LoRA training step at Llama-3.1-8B size: tokens per second and peak memory, fastft against the baselines.

The model is Llama-3.1-8B's architecture with random weights (no download): hidden 4096, intermediate 14336,
32 query / 8 key-value heads, vocabulary 128256, Llama-3.1's ``llama3`` RoPE scaling, bf16, SDPA attention, all
32 decoder layers by default (``--layers``): 8.0B parameters, 16 GB in bf16. It is built directly on the device in
bf16 (no CPU round trip; transformers' own initialisation, normal std 0.02, runs on the GPU) from one seed, so every
configuration trains bit-identical weights on identical random tokens (``labels = input_ids``). PEFT LoRA r=16,
lora_alpha 16, no dropout, on all seven projections; AdamW (lr 1e-4) on the LoRA parameters. A training step is
forward + backward + ``optimizer.step()`` + ``zero_grad()``, timed with ``torch.cuda.synchronize`` around each.

Contenders, each in bf16 and in 4-bit (bitsandbytes NF4 with double quantisation and bf16 compute, the modules
``from_pretrained(quantization_config=BitsAndBytesConfig(...))`` creates: every decoder projection a
``Linear4bit``, embeddings, norms and ``lm_head`` in bf16; quantised in place from the bf16 weights by one
``quantize_4bit`` per projection on the GPU, seconds, where a save + reload through disk would move 16 GB per
configuration; "not installed" without bitsandbytes):

- ``plain``: transformers + PEFT as users run it; ``standard`` checkpointing is transformers' own
  (``use_reentrant=False``), enabled before ``get_peft_model`` as a training script does;
- ``liger``: ``apply_liger_kernel_to_llama(model=...)`` with its defaults (rope, rms_norm, swiglu,
  fused_linear_cross_entropy) on the instance, then PEFT ("not installed" without liger_kernel; it needs CUDA);
- ``fastft``: PEFT, then ``fastft.models.patch.patch(peft_model)``; ``offload`` is
  ``fastft.models.checkpointing.set_checkpointing(peft_model, "offload")``.

Default plan (``--contenders`` / ``--checkpointing`` not given), in this order so the time budget drops the least
important runs first: bf16 plain/none, fastft/none, fastft/offload, plain/standard, liger/none; then 4-bit plain/none,
fastft/offload, fastft/none, plain/standard. Plain without checkpointing fits an H200 at 8B x 4096 tokens (about
16 GB weights + 40 GB activations + logits), so it is measured: it is what users run without flags, and the
targets are stated against it (>= 2.5x its tokens/s, <= 30% of its peak memory); plain/standard is the
like-for-like baseline of the checkpointed runs. With ``--contenders`` or ``--checkpointing`` given, every listed
contender runs in every listed quantisation and checkpointing mode it supports (``offload`` is fastft's only).

Every configuration runs in a fresh Python process on CUDA (its own CUDA context, allocator and peak counter;
Liger's global monkey-patching and a crashed kernel cannot touch the next run) with its own time limit
(``--config-timeout``, at most what remains of ``--time-budget``); what does not start before the budget runs out is
recorded "skipped: time budget". An OOM, an exception, a crash or a timeout is recorded for that configuration and
the run goes on. Peak memory is ``torch.cuda.max_memory_allocated`` over the warm-up and timed steps (weights,
optimizer states and activations: what must fit on the GPU). The first-step loss of every configuration of a
quantisation must agree (same weights, same tokens): the largest difference from plain's is the accuracy check.
``DIR/lora_step.json`` and ``DIR/lora_step.md`` are rewritten after each configuration; each worker's log is in
``DIR/logs/``. Expected on an H200: 2-4 minutes (about 15-40 s per configuration: a Python start, the build, the
first step's Triton compilation, 7 steps of well under a second each; 4-bit and Liger only where installed), never
more than ``--time-budget`` plus a few seconds.

``--tiny`` runs the same code on the CPU (no CUDA) at a tiny Llama (2 layers, hidden 128, vocabulary 2048, 64
tokens), all configurations in this process (a Python start costs seconds there): CPU wall time, fastft on its torch
path, and instead of peak memory the bytes autograd saves for backward
(:class:`fastft.utils.memory.SavedTensorMeter`, parameters excluded) in the first step.

    python benchmarks/lora_step.py --out DIR [--layers 32] [--seq-len 4096] [--batch-size 1] [--steps 5]
        [--warmup 2] [--contenders plain,liger,fastft] [--quant bf16,4bit] [--checkpointing none,standard,offload]
        [--time-budget 420] [--config-timeout 150] [--tiny]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.metadata
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

if __name__ == "__main__":
    if __package__ in (None, ""):  # python benchmarks/lora_step.py: make the repository importable, and drop
        # benchmarks/ from the path: its kernels.py would shadow the ``kernels`` package transformers probes for.
        _here = Path(__file__).resolve().parent
        sys.path[:] = [str(_here.parent), *(p for p in sys.path if Path(p or ".").resolve() != _here)]
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on"):
        # fastft reads the variable when imported; interpreted kernels are for correctness, not timing.
        print("benchmarks/lora_step.py: ignoring TRITON_INTERPRET (benchmarks time compiled kernels)", file=sys.stderr)
        del os.environ["TRITON_INTERPRET"]

import torch

from fastft.bench import harness, shapes
from fastft.bench.step import CHECKPOINTING, LORA_TARGETS, ActivationMeter, build_model

CONTENDERS = ("plain", "liger", "fastft")
QUANTS = ("bf16", "4bit")
DEFAULT_PLAN = {
    "bf16": (
        ("plain", "none"),
        ("fastft", "none"),
        ("fastft", "offload"),
        ("plain", "standard"),
        ("liger", "none"),
    ),
    "4bit": (("plain", "none"), ("fastft", "offload"), ("fastft", "none"), ("plain", "standard")),
}
MIN_START_S = 30.0  # a configuration started with less time left than this would only be killed half-way
_PACKAGES = {"liger": "liger_kernel", "4bit": "bitsandbytes"}


@dataclass(frozen=True)
class StepConfig:
    """The model, adapter, batch and step counts of one benchmark run."""

    layers: int = 32
    seq_len: int = 4096
    batch_size: int = 1
    hidden: int = shapes.LLAMA3_8B.hidden
    intermediate: int = shapes.LLAMA3_8B.intermediate
    heads: int = shapes.LLAMA3_8B.n_heads
    kv_heads: int = shapes.LLAMA3_8B.n_kv_heads
    vocab: int = shapes.LLAMA3_8B.vocab
    rank: int = 16
    lora_alpha: int = 16
    init_std: float = 0.02  # transformers' initializer_range: normal weights, logits of std ~1.3 at hidden 4096
    lr: float = 1e-4
    steps: int = 5
    warmup: int = 2
    seed: int = 0

    def describe(self) -> str:
        return (
            f"Llama-3.1-8B architecture, random weights: {self.layers} layers, hidden {self.hidden}, intermediate "
            f"{self.intermediate}, {self.heads}/{self.kv_heads} heads, vocabulary {self.vocab}; LoRA r={self.rank} "
            f"alpha={self.lora_alpha} on {len(LORA_TARGETS)} projections, AdamW lr {self.lr:g}; batch "
            f"{self.batch_size} x {self.seq_len} tokens; {self.warmup} warm-up + {self.steps} timed steps"
        )


# Tiny: init std 0.1 gives logits of std ~1 at hidden 128 (so the loss depends on every layer), and lr 1e-2 moves
# the loss within two steps (so the loss curve also checks the direction of the gradients).
TINY = StepConfig(
    layers=2,
    seq_len=64,
    hidden=128,
    intermediate=448,
    heads=4,
    kv_heads=2,
    vocab=2048,
    init_std=0.1,
    lr=1e-2,
    steps=2,
    warmup=1,
)


@dataclass
class Result:
    """One configuration's outcome; ``status`` is ok, OOM, failed, timeout, not installed or skipped."""

    quant: str
    contender: str
    checkpointing: str
    status: str = "ok"
    reason: str = ""
    note: str = ""  # fastft's patch report
    build_s: float | None = None
    wall_s: float | None = None
    timed_steps: int = 0
    step_ms: float | None = None  # median over the timed steps
    step_ms_all: list[float] = field(default_factory=list)
    tokens_per_s: float | None = None
    peak_bytes: int | None = None  # CUDA: max_memory_allocated over all steps
    reserved_bytes: int | None = None  # CUDA: max_memory_reserved
    model_bytes: int | None = None  # CUDA: allocated after the build (weights, adapters)
    saved_bytes: int | None = None  # CPU: bytes saved for backward in the first step, parameters excluded
    losses: list[float] = field(default_factory=list)  # every step, warm-up included; [0] is the first step

    @property
    def name(self) -> str:
        return f"{self.quant}/{self.contender}/{self.checkpointing}"


# ----------------------------------------------------------------------------------------------------
# One configuration
# ----------------------------------------------------------------------------------------------------


class _Unavailable(Exception):
    def __init__(self, reason: str, status: str = "not installed") -> None:
        super().__init__(reason)
        self.status = status


def _llama(cfg: StepConfig, device: torch.device):
    """The random-weight bf16 model, built on ``device`` (no CPU round trip) from ``cfg.seed``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        vocab_size=cfg.vocab,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters={  # Llama-3.1's long-context RoPE
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=False,
        use_cache=False,
        initializer_range=cfg.init_std,
    )
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")


def _build(result: Result, cfg: StepConfig, device: torch.device):
    """The PEFT model of the configuration, ready to train (:func:`fastft.bench.step.build_model` on the random
    model of ``cfg``; 4-bit: its projections quantised in place by :func:`fastft.bench.step.quantize_4bit`)."""
    if result.contender == "liger":
        if device.type != "cuda":
            raise _Unavailable("Liger Kernel needs CUDA", status="skipped")
        if importlib.util.find_spec("liger_kernel") is None:
            raise _Unavailable("liger_kernel is not installed")
    if result.quant == "4bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise _Unavailable("bitsandbytes is not installed")
    model, result.note = build_model(
        lambda _seed, _dtype: _llama(cfg, device),
        result.contender,
        dtype=torch.bfloat16,
        device=device,
        load_in_4bit=result.quant == "4bit",
        checkpointing=result.checkpointing,
        seed=cfg.seed,
        rank=cfg.rank,
        lora_alpha=cfg.lora_alpha,
    )
    return model


def _train(result: Result, model: torch.nn.Module, cfg: StepConfig, device: torch.device, deadline: float) -> None:
    """Warm-up and timed steps on one fixed random batch; fills in the times, losses and memory of ``result``."""
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    input_ids = torch.randint(0, cfg.vocab, (cfg.batch_size, cfg.seq_len), generator=g).to(device)
    labels = input_ids.clone()
    harness.synchronize(device)
    if cuda:
        result.model_bytes = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> float:
        t0 = time.perf_counter()
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        harness.synchronize(device)
        elapsed = time.perf_counter() - t0
        result.losses.append(float(loss.detach()))  # outside the timed region
        return elapsed

    for i in range(max(1, cfg.warmup)):  # the first step compiles (Triton) and sizes the optimizer states
        if i == 0 and not cuda:
            with ActivationMeter.for_model(model) as meter:
                last = step()
            result.saved_bytes = meter.total_bytes
        else:
            last = step()
    fit = int((deadline - time.perf_counter()) / max(last, 1e-6))
    times = [step() for _ in range(max(1, min(cfg.steps, fit)))]
    result.timed_steps = len(times)
    result.step_ms_all = [1e3 * t for t in times]
    result.step_ms = statistics.median(result.step_ms_all)
    result.tokens_per_s = cfg.batch_size * cfg.seq_len / (result.step_ms / 1e3)
    if cuda:
        result.peak_bytes = torch.cuda.max_memory_allocated(device)
        result.reserved_bytes = torch.cuda.max_memory_reserved(device)


def _one_line(error: BaseException, limit: int = 300) -> str:
    """The error's message on one line (a table cell), cut to ``limit`` characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def measure(result: Result, cfg: StepConfig, device: torch.device, deadline: float) -> Result:
    """Build and train ``result``'s configuration, filling ``result`` in; errors are recorded, never raised.

    ``deadline`` (``time.perf_counter()`` seconds) bounds the timed steps: after the warm-up, as many of
    ``cfg.steps`` are timed as the last warm-up step says fit (at least one).
    """
    start = time.perf_counter()
    try:
        model = _build(result, cfg, device)
        result.build_s = time.perf_counter() - start
        _train(result, model, cfg, device, deadline)
    except _Unavailable as e:
        result.status, result.reason = e.status, str(e)
    except torch.cuda.OutOfMemoryError as e:
        result.status, result.reason = "OOM", _one_line(e)
        result.peak_bytes = torch.cuda.max_memory_allocated(device)
    except Exception as e:  # noqa: BLE001 - any failure is this configuration's result; the benchmark goes on
        traceback.print_exc()
        result.status, result.reason = "failed", f"{type(e).__name__}: {_one_line(e)}"
    model = None  # in-process runs: free this model (and, after an error, its traceback's tensors) now
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    result.wall_s = time.perf_counter() - start
    return result


# ----------------------------------------------------------------------------------------------------
# The plan and its runner
# ----------------------------------------------------------------------------------------------------


def plan(quants: list[str], contenders: list[str] | None, checkpointing: list[str] | None) -> list[Result]:
    """The configurations to run, in order: the default plan, or every listed combination a contender supports."""
    runs = []
    for quant in quants:
        if contenders is None and checkpointing is None:
            pairs = DEFAULT_PLAN[quant]
        else:
            pairs = []
            for contender in contenders or CONTENDERS:
                modes = checkpointing or [m for c, m in DEFAULT_PLAN["bf16"] if c == contender]
                pairs += [(contender, m) for m in modes if m != "offload" or contender == "fastft"]
        runs += [Result(quant, contender, mode) for contender, mode in pairs]
    return runs


def _installed(result: Result) -> str | None:
    """None when the configuration's optional package is importable; else why not."""
    for key in (result.contender, result.quant):
        package = _PACKAGES.get(key)
        if package and importlib.util.find_spec(package) is None:
            return f"{package} is not installed"
    return None


def _in_subprocess(result: Result, cfg: StepConfig, device: torch.device, timeout: float, logs: Path) -> Result:
    """``measure`` in a fresh Python process, killed after ``timeout`` seconds."""
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{result.name.replace('/', '-')}.log"
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        spec = {
            "result": dataclasses.asdict(result),
            "config": dataclasses.asdict(cfg),
            "device": str(device),
            # Wall-clock (the worker's imports count too): its timed steps stop in time to write the result.
            "deadline": time.time() + timeout - 5,
        }
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec), "--out", str(out)]
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        with log.open("w") as stderr:
            try:
                done = subprocess.run(command, stdout=stderr, stderr=stderr, env=env, timeout=timeout, check=False)
            except subprocess.TimeoutExpired:
                done = None
        if out.exists():
            result = Result(**json.loads(out.read_text()))
        elif done is None:
            result.status, result.reason = "timeout", f"killed after {timeout:.0f} s; log: {_last_line(log)}"
        else:
            result.status, result.reason = "failed", f"worker exit code {done.returncode}; log: {_last_line(log)}"
    result.wall_s = time.perf_counter() - start  # Python start and imports included
    return result


def _last_line(path: Path) -> str:
    lines = path.read_text(errors="replace").strip().splitlines()
    return lines[-1] if lines else "empty"


def run_all(
    runs: list[Result],
    cfg: StepConfig,
    device: torch.device,
    args: argparse.Namespace,
    report: Callable[[list[Result]], None],
) -> list[Result]:
    """Every configuration once, within the time budget; ``report(results)`` after each one."""
    isolate = args.isolate == "process" or (args.isolate == "auto" and device.type == "cuda")
    start = time.perf_counter()
    done: list[Result] = []
    for result in runs:
        left = args.time_budget - (time.perf_counter() - start)
        missing = _installed(result)
        if missing:
            result.status, result.reason = "not installed", missing
        elif left < min(MIN_START_S, args.time_budget):
            result.status, result.reason = "skipped", f"time budget: {left:.0f} s of {args.time_budget:.0f} s left"
        elif isolate:
            result = _in_subprocess(result, cfg, device, min(args.config_timeout, left), args.out / "logs")
        else:
            result = measure(result, cfg, device, time.perf_counter() + min(args.config_timeout, left))
        done.append(result)
        speed = f"{result.tokens_per_s:,.0f} tok/s" if result.tokens_per_s else ""
        memory = _bytes(result.peak_bytes if result.peak_bytes is not None else result.saved_bytes)
        print(
            f"[{time.perf_counter() - start:6.1f} s] {result.name:24s} {result.status:13s} {speed} {memory} "
            f"{result.reason}",
            file=sys.stderr,
            flush=True,
        )
        report(done)
    return done


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


def _bytes(n: int | None) -> str:
    return "" if n is None else f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _memory(r: dict) -> int | None:
    return r["peak_bytes"] if r["peak_bytes"] is not None else r["saved_bytes"]


def summarize(results: list[dict]) -> dict:
    """Per quantisation: ratios of every row to plain/none and plain/standard, and the first-step loss check."""
    checks = {}
    for quant in QUANTS:
        rows = [r for r in results if r["quant"] == quant]
        plain = {r["checkpointing"]: r for r in rows if r["contender"] == "plain" and r["status"] == "ok"}
        for r in rows:
            r["ratios"] = {}
            for mode, base in plain.items():
                if r["status"] == "ok":
                    r["ratios"][mode] = {
                        "throughput": r["tokens_per_s"] / base["tokens_per_s"],
                        "memory": _memory(r) / _memory(base) if _memory(r) and _memory(base) else None,
                    }
        first = {f"{r['contender']}/{r['checkpointing']}": r["losses"][0] for r in rows if r["losses"]}
        ref = next((r["losses"][0] for r in plain.values() if r["losses"]), None)
        if ref is not None and len(first) > 1:
            worst = max(first, key=lambda k: abs(first[k] - ref))
            checks[quant] = {"plain_first_loss": ref, "max_abs_diff": abs(first[worst] - ref), "worst": worst}
    return checks


def markdown(meta: dict, results: list[dict], checks: dict) -> str:
    """The report: where the numbers come from, one table row per configuration, the loss check."""
    cpu = meta["device_type"] != "cuda"
    mem = "saved for backward" if cpu else "peak memory"
    lines = [
        "# fastft LoRA training step" + (" (CPU numbers, tiny config)" if cpu else ""),
        "",
        f"- {meta['described']}",
        f"- device: {meta['device']}; {meta['date']}; total {meta.get('seconds', 0):.0f} s",
        (
            f"- torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, transformers "
            f"{meta['transformers']}, peft {meta['peft']}, bitsandbytes {meta['bitsandbytes']}, "
            f"liger_kernel {meta['liger_kernel']}"
        ),
        (
            "- tokens/s: batch x sequence / median step time (forward, backward, AdamW step; synchronised); "
            + (
                "saved for backward: bytes autograd keeps in the first step (each storage once, parameters excluded)"
                if cpu
                else "peak memory: torch.cuda.max_memory_allocated over all steps (weights included)"
            )
        ),
        "- issue 3 targets: fastft >= 2.5x plain's tokens/s and <= 30% of plain's peak memory (plain/none)",
        "",
        (
            f"| quant | contender | checkpointing | tokens/s | x plain | x plain+ckpt | {mem} | % plain | % plain+ckpt "
            "| step ms | first loss | status |"
        ),
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]

    def ratio(r: dict, mode: str, key: str, spec: str) -> str:
        value = r["ratios"].get(mode, {}).get(key)
        return "-" if value is None else format(value, spec)

    for r in results:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}".replace("|", "/")
        lines.append(
            f"| {r['quant']} | {r['contender']} | {r['checkpointing']} | "
            f"{'-' if r['tokens_per_s'] is None else format(r['tokens_per_s'], ',.0f')} | "
            f"{ratio(r, 'none', 'throughput', '.2f')} | {ratio(r, 'standard', 'throughput', '.2f')} | "
            f"{_bytes(_memory(r)) or 'n/a'} | {ratio(r, 'none', 'memory', '.0%')} | "
            f"{ratio(r, 'standard', 'memory', '.0%')} | "
            f"{'-' if r['step_ms'] is None else format(r['step_ms'], '.0f')} | "
            f"{format(r['losses'][0], '.4f') if r['losses'] else '-'} | {status} |"
        )
    lines.append("")
    for quant, check in checks.items():
        lines.append(
            f"- {quant} first-step loss: plain {check['plain_first_loss']:.4f}; largest |difference| "
            f"{check['max_abs_diff']:.2e} ({check['worst']})"
        )
    notes = sorted({r["note"] for r in results if r["note"]})
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/lora_step.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for lora_step.json and lora_step.md")
    parser.add_argument("--layers", type=int, help="decoder layers (default 32; tiny 2)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default 4096; tiny 64)")
    parser.add_argument("--batch-size", type=int, help="sequences per step (default 1)")
    parser.add_argument("--steps", type=int, help="timed steps (default 5; tiny 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps first, the first one compiles (default 2; tiny 1)")
    parser.add_argument("--contenders", help=f"subset of {','.join(CONTENDERS)} (default: the plan in the docstring)")
    parser.add_argument("--quant", default=",".join(QUANTS), help=f"subset of {','.join(QUANTS)}")
    parser.add_argument("--checkpointing", help=f"subset of {','.join(CHECKPOINTING)} (default: per contender)")
    parser.add_argument("--time-budget", type=float, default=420.0, help="seconds for all configurations (420)")
    parser.add_argument("--config-timeout", type=float, default=150.0, help="seconds per configuration (150)")
    parser.add_argument(
        "--isolate",
        choices=("auto", "process", "none"),
        default="auto",
        help="one Python process per configuration, or all in this one (auto: processes on CUDA)",
    )
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama on the CPU (what the tests run)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one configuration, result JSON to --out
    args = parser.parse_args(argv)

    if args.worker:
        spec = json.loads(args.worker)
        deadline = time.perf_counter() + spec["deadline"] - time.time()
        result = measure(Result(**spec["result"]), StepConfig(**spec["config"]), torch.device(spec["device"]), deadline)
        args.out.write_text(json.dumps(dataclasses.asdict(result)))
        return 0

    def listed(value: str | None, allowed: tuple[str, ...], flag: str) -> list[str] | None:
        if value is None:
            return None
        items = [v.strip() for v in value.split(",") if v.strip()]
        unknown = sorted(set(items) - set(allowed))
        if unknown:
            parser.error(f"{flag}: unknown {unknown}; choose from {', '.join(allowed)}")
        return items

    contenders = listed(args.contenders, CONTENDERS, "--contenders")
    quants = listed(args.quant, QUANTS, "--quant")
    modes = listed(args.checkpointing, CHECKPOINTING, "--checkpointing")
    base = TINY if args.tiny else StepConfig()
    given = {"layers": args.layers, "seq_len": args.seq_len, "batch_size": args.batch_size}
    given |= {"steps": args.steps, "warmup": args.warmup}
    cfg = dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})
    device = torch.device("cpu") if args.tiny else shapes.default_device()
    if device.type != "cuda" and not args.tiny:
        parser.error("no CUDA device: the full-size benchmark needs a GPU; --tiny runs the CPU version")
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on"):
        raise RuntimeError("TRITON_INTERPRET is set: fastft would run interpreted kernels; unset it to benchmark.")

    start = time.perf_counter()
    meta = harness.environment(device)
    meta.update(
        {p: _version(p) for p in ("transformers", "peft", "bitsandbytes", "liger_kernel")},
        config=dataclasses.asdict(cfg),
        described=cfg.describe(),
        command=sys.argv if argv is None else argv,
        time_budget_s=args.time_budget,
    )
    args.out.mkdir(parents=True, exist_ok=True)

    def report(done: list[Result]) -> None:
        rows = [dataclasses.asdict(r) for r in done]
        checks = summarize(rows)
        meta["seconds"] = time.perf_counter() - start
        (args.out / "lora_step.json").write_text(
            json.dumps({"meta": meta, "results": rows, "checks": checks}, indent=1)
        )
        (args.out / "lora_step.md").write_text(markdown(meta, rows, checks))

    report([])  # the files exist from the start, even if the run is killed before a configuration finishes
    results = run_all(plan(quants, contenders, modes), cfg, device, args, report)
    print((args.out / "lora_step.md").read_text())
    return 1 if any(r.contender == "fastft" and r.status in ("failed", "OOM", "timeout") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
