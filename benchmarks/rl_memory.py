"""One DPO, GRPO and ORPO step inside TRL's own trainers: what autograd keeps for backward, fastft vs plain.

The model is that of ``benchmarks/memory.py`` (Llama-3-8B proportions scaled down: hidden 1024, intermediate 3584,
head_dim 128, 8 query / 2 key-value heads, a 32000 vocabulary, 2 decoder layers, random bf16 weights, SDPA; PEFT LoRA
r=16 on the seven projections), built twice from the same weights: ``plain`` (transformers + PEFT) and ``fastft``
(the same PEFT model after :func:`fastft.patch`). No checkpointing on either side (TRL's ``gradient_checkpointing``
off), so the numbers compare the kernels, not recomputation.

Each contender is handed, unmodified, to TRL's trainer (``DPOTrainer`` / ``GRPOTrainer`` built with ``max_steps=1``;
the trainer installs its fused LM head on the model as in training), and one step of the trainer's own
``compute_loss`` runs on a prepared batch of random tokens, then ``backward()``:

- **DPO** (``sigmoid`` loss, beta 0.1): ``pairs`` chosen + ``pairs`` rejected sequences of ``prompt`` +
  ``completion`` tokens in one batch; the policy pass with grad, the reference pass (adapters disabled, under
  ``no_grad``) and the loss, all inside ``DPOTrainer.compute_loss``;
- **GRPO** (TRL's default ``loss_type="dapo"``, beta 0.04): ``generations`` completions of ``completion`` tokens after one
  ``prompt``; the reference log-probs come first, as TRL computes them when it scores a generation batch
  (``_get_per_token_logps_and_entropies`` with the adapters disabled, under ``no_grad``), then
  ``GRPOTrainer.compute_loss`` (policy log-probs and entropies with grad, clipped surrogate, KL) with random
  advantages;
- **ORPO** (beta 0.1): ``pairs`` chosen + rejected sequences through ``compute_loss`` of TRL's
  ``trl.experimental.orpo.ORPOTrainer`` for plain (which builds the full logits) and of ``fastft.rl.ORPOTrainer``
  (the same objective from hidden states) for fastft.

Counted, per step (as ``benchmarks/memory.py`` counts): **saved activations**, the bytes autograd keeps from forward
to backward, each storage once, parameters and buffers excluded (:class:`fastft.bench.step.ActivationMeter`);
**B x T x V tensors**, any tensor with at least (sequences x tokens x vocabulary) elements saved, or created by any op
in forward or backward (a ``TorchDispatchMode``), other than a parameter; the **loss**, which must agree between the
contenders (same weights, same batch). The ratio is fastft / plain saved activations.

    python benchmarks/rl_memory.py [--json PATH] [--markdown] [--methods dpo,grpo,orpo]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":
    if __package__ in (None, ""):  # python benchmarks/rl_memory.py: the repository importable, benchmarks/ not on
        # the path (its kernels.py would shadow the ``kernels`` package transformers probes for).
        _here = Path(__file__).resolve().parent
        sys.path[:] = [str(_here.parent), *(p for p in sys.path if Path(p or ".").resolve() != _here)]
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on"):
        print("benchmarks/rl_memory.py: ignoring TRITON_INTERPRET (interpreted kernels are for tests)", file=sys.stderr)
        del os.environ["TRITON_INTERPRET"]

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from benchmarks import memory
from fastft.bench import harness
from fastft.bench.step import ActivationMeter, storage_key
from fastft.rl import trl_integration

CONTENDERS = ("plain", "fastft")
LABELS = {"plain": "transformers + PEFT", "fastft": "fastft"}
METHODS = ("dpo", "grpo", "orpo")


@dataclass(frozen=True)
class RLConfig:
    """The model (``memory.StepConfig``'s fields) and the RL batch shapes."""

    model: memory.StepConfig = memory.CONFIG
    pairs: int = 2  # DPO: chosen/rejected pairs per step (2 x pairs sequences)
    generations: int = 4  # GRPO: completions of one prompt per step
    prompt: int = 128
    completion: int = 384

    def sequences(self, method: str) -> int:
        return 2 * self.pairs if method in ("dpo", "orpo") else self.generations

    def describe(self, method: str) -> str:
        pairs = method in ("dpo", "orpo")
        what = f"{self.pairs} chosen/rejected pairs" if pairs else f"{self.generations} completions"
        m = self.model
        return (
            f"Llama ({m.layers} layers, hidden {m.hidden}, intermediate {m.intermediate}, {m.heads}/{m.kv_heads} "
            f"heads, vocab {m.vocab}), {m.dtype}, LoRA r={m.rank}; {what} of {self.prompt} prompt + "
            f"{self.completion} completion tokens"
        )


CONFIG = RLConfig()


# ----------------------------------------------------------------------------------------------------
# The trainers and their batches
# ----------------------------------------------------------------------------------------------------


def _common_args(output_dir: str, batch: int) -> dict:
    return {
        "output_dir": output_dir,
        "max_steps": 1,
        "per_device_train_batch_size": batch,
        "gradient_checkpointing": False,
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "use_cpu": not torch.cuda.is_available(),
    }


def _tokenizer():
    from fastft.bench.assets import default_tokenizer

    return default_tokenizer()  # only tokenizes the trainers' two-row placeholder datasets


def _random_ids(shape: tuple[int, int], vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _dpo_step(model: nn.Module, config: RLConfig, device: torch.device, output_dir: str) -> Callable[[], torch.Tensor]:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    text = {"prompt": ["a"] * 2, "chosen": [" b"] * 2, "rejected": [" c"] * 2}
    args = DPOConfig(**_common_args(output_dir, config.pairs), beta=0.1, max_length=config.prompt + config.completion)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_dict(text), processing_class=_tokenizer())
    # The batch DPOTrainer's collator builds: chosen rows first, then rejected, sharing each pair's prompt.
    prompt = _random_ids((config.pairs, config.prompt), config.model.vocab, 1)
    chosen, rejected = (_random_ids((config.pairs, config.completion), config.model.vocab, s) for s in (2, 3))
    input_ids = torch.cat([torch.cat([prompt, chosen], 1), torch.cat([prompt, rejected], 1)]).to(device)
    completion_mask = torch.zeros_like(input_ids)
    completion_mask[:, config.prompt :] = 1
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "completion_mask": completion_mask}
    return lambda: trainer.compute_loss(trainer.model, inputs)


def _grpo_step(model: nn.Module, config: RLConfig, device: torch.device, output_dir: str) -> Callable[[], torch.Tensor]:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer.utils import use_adapter

    args = GRPOConfig(
        **_common_args(output_dir, config.generations),
        num_generations=config.generations,
        max_completion_length=config.completion,
        beta=0.04,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=lambda completions, **kwargs: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["a"] * config.generations}),
        processing_class=_tokenizer(),
    )
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps  # set by Trainer.train()
    n, vocab = config.generations, config.model.vocab
    prompt_ids = _random_ids((1, config.prompt), vocab, 1).expand(n, -1).contiguous().to(device)
    completion_ids = _random_ids((n, config.completion), vocab, 2).to(device)
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": torch.ones_like(prompt_ids),
        "completion_ids": completion_ids,
        "completion_mask": torch.ones_like(completion_ids),
        "advantages": torch.randn(n, generator=torch.Generator().manual_seed(4)).to(device),
        # TRL's default loss ("dapo") normalises by the completion tokens of the generation batch
        "num_items_in_batch": torch.tensor(float(n * config.completion), device=device),
    }

    def step() -> torch.Tensor:
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        with torch.no_grad(), use_adapter(trainer.model, adapter_name=None):  # the reference: adapters off
            ref, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, config.completion)
        return trainer.compute_loss(trainer.model, {**inputs, "ref_per_token_logps": ref})

    return step


def _orpo_step(model: nn.Module, config: RLConfig, device: torch.device, output_dir: str) -> Callable[[], torch.Tensor]:
    """ORPO: TRL's ``trl.experimental.orpo.ORPOTrainer`` for plain, ``fastft.rl.ORPOTrainer`` for fastft."""
    from datasets import Dataset

    if hasattr(model, "fastft_report"):
        from fastft.rl import ORPOConfig, ORPOTrainer
    else:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    # Text whose tokens reach the configured lengths (the shipped tokenizer: ~1 token per short word; its ids are
    # < 2048, so the model's vocabulary must be at least that).
    words = [f" w{i % 97}" for i in range(config.prompt + config.completion)]
    text = {
        "prompt": ["".join(words[: config.prompt])] * config.pairs,
        "chosen": ["".join(words[config.prompt :])] * config.pairs,
        "rejected": ["".join(reversed(words[config.prompt :]))] * config.pairs,
    }
    args = ORPOConfig(
        **_common_args(output_dir, config.pairs),
        beta=0.1,
        max_length=config.prompt + config.completion,
        max_completion_length=config.completion,
    )
    trainer = ORPOTrainer(model=model, args=args, train_dataset=Dataset.from_dict(text), processing_class=_tokenizer())
    batch = next(iter(trainer.get_train_dataloader()))
    return lambda: trainer.compute_loss(trainer.model, batch)


_STEPS = {"dpo": _dpo_step, "grpo": _grpo_step, "orpo": _orpo_step}


# ----------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------


class _LargeTensorWatch(TorchDispatchMode):
    """Every op output with at least ``threshold`` elements that is not (a view of) a parameter, by storage."""

    def __init__(self, threshold: int, ignore: set[tuple[str, int]]) -> None:
        super().__init__()
        self.threshold, self.ignore, self.found = threshold, ignore, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() >= self.threshold:
                key = storage_key(t)
                if key not in self.ignore and key not in self.found:
                    self.found[key] = f"{str(t.dtype).removeprefix('torch.')} {tuple(t.shape)} ({func.__name__})"
        return out


@dataclass
class RLMemoryResult:
    """What one RL step of a contender keeps for backward and creates (bytes; shapes as text)."""

    method: str
    contender: str
    activation_bytes: int
    saved_tensors: int
    largest_saved: str
    largest_saved_bytes: int
    btv_saved: list[str]
    btv_created: list[str]
    head_calls: dict[str, int]
    loss: float
    seconds: float


def measure(
    method: str, contender: str, config: RLConfig = CONFIG, device: torch.device | None = None
) -> RLMemoryResult:
    """Build ``contender``'s model and ``method``'s trainer, run one step (module docstring) and account for it."""
    device = device or torch.device("cpu")
    model, _ = memory.build(contender, config.model, device)
    with tempfile.TemporaryDirectory() as output_dir:
        step = _STEPS[method](model, config, device, output_dir)
        btv = config.sequences(method) * (config.prompt + config.completion) * config.model.vocab
        meter = ActivationMeter.for_model(model)
        watch = _LargeTensorWatch(btv, set(meter.exclude))
        before = dict(trl_integration.calls)
        start = time.perf_counter()
        with watch, meter:
            loss = step()
        with watch:
            loss.backward()
        seconds = time.perf_counter() - start
        head_calls = {k: trl_integration.calls[k] - before.get(k, 0) for k in ("fastft", "trl")}
    largest, largest_bytes, btv_saved, counted = "-", 0, [], set()
    for key, saved in zip(meter.keys, meter.saved):
        if key in counted:
            continue
        counted.add(key)
        text = f"{str(saved.dtype).removeprefix('torch.')} {saved.shape}"
        if saved.storage_bytes > largest_bytes:
            largest, largest_bytes = f"{text} {_mb(saved.storage_bytes)}", saved.storage_bytes
        if math.prod(saved.shape) >= btv:
            btv_saved.append(text)
    return RLMemoryResult(
        method=method,
        contender=contender,
        activation_bytes=meter.total_bytes,
        saved_tensors=len(counted),
        largest_saved=largest,
        largest_saved_bytes=largest_bytes,
        btv_saved=btv_saved,
        btv_created=list(watch.found.values()),
        head_calls=head_calls,
        loss=float(loss.detach()),
        seconds=seconds,
    )


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def run(
    methods: tuple[str, ...] = METHODS,
    config: RLConfig = CONFIG,
    device: torch.device | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> dict:
    """Every (method, contender) step; a dict ready for JSON and :func:`markdown`, with fastft / plain ratios."""
    device = device or torch.device("cpu")
    trl_integration.install()  # from the start, so plain's head calls are counted (as TRL's) too
    rows = []
    for method in methods:
        by = {c: dataclasses.asdict(measure(method, c, config, device)) for c in CONTENDERS}
        for row in by.values():
            row["activation_ratio"] = row["activation_bytes"] / by["plain"]["activation_bytes"]
            rows.append(row)
            log(f"{method} {row['contender']}: {_mb(row['activation_bytes'])} in {row['seconds']:.1f} s")
    memory._random_llama.cache_clear()
    meta = harness.environment(device)
    meta.update(
        config=dataclasses.asdict(config),
        described={m: config.describe(m) for m in methods},
        backend="triton" if device.type == "cuda" else "torch path",
        trl=_version("trl"),
    )
    return {"meta": meta, "results": rows}


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    with contextlib.suppress(PackageNotFoundError):
        return version(package)
    return "not installed"


def _head(calls: dict[str, int]) -> str:
    """Which kernel TRL's chunked log-prob calls ran on during the step (fastft's or TRL's), with counts."""
    return ", ".join(f"{'fastft' if k == 'fastft' else 'TRL'} x{n}" for k, n in calls.items() if n) or "-"


def markdown(report: dict) -> str:
    """The report as a README-ready markdown section: one table, then what was measured and how."""
    meta, rows = report["meta"], report["results"]
    lines = [
        "| step | contender | saved activations | fastft / plain | largest saved tensor | B x T x V tensor? "
        + "| log-prob head | loss |",
        "| --- | --- | ---: | ---: | --- | --- | --- | ---: |",
    ]
    for r in rows:
        found = r["btv_saved"] or r["btv_created"]
        btv = (
            f"yes: {len(r['btv_saved'])} saved, {len(r['btv_created'])} created (e.g. {found[0]})" if found else "none"
        )
        ratio = "-" if r["contender"] == "plain" else f"{r['activation_ratio']:.1%}"
        lines.append(
            f"| {r['method'].upper()} | {LABELS[r['contender']]} | {_mb(r['activation_bytes'])} | {ratio} "
            f"| {r['largest_saved']} | {btv} | {_head(r['head_calls'])} | {r['loss']:.4f} |"
        )
    lines += [""] + [f"{m.upper()}: {text}." for m, text in meta["described"].items()]
    lines += [
        "",
        (
            f"Inside TRL {meta['trl']}'s own DPOTrainer / GRPOTrainer (`compute_loss` + `backward()` of one step, "
            "reference log-probs with the adapters disabled) and ORPO (trl.experimental's trainer for plain, "
            f"fastft.rl.ORPOTrainer for fastft); {meta['device']}, torch {meta['torch']}, fastft on its "
            f"{meta['backend']}; {meta['date']}. Saved activations: bytes autograd keeps for backward, each storage "
            "once, parameters excluded. B x T x V: a tensor with at least sequences x tokens x vocabulary elements "
            "saved or created anywhere in the step. On a CPU TRL's fused head scores every position (Triton "
            "devices: only the labelled ones) in one (tokens, 32768) bf16 tile, which is as large as the logits: that "
            "is plain's created tensor."
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/rl_memory.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results (and where they come from) to this file")
    parser.add_argument("--markdown", action="store_true", help="print the README-ready markdown section")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    parser.add_argument("--completion", type=int, default=CONFIG.completion, help="completion tokens per sequence")
    args = parser.parse_args(argv)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if set(methods) - set(METHODS):
        parser.error(f"--methods: unknown {sorted(set(methods) - set(METHODS))}; choose from {', '.join(METHODS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = dataclasses.replace(CONFIG, completion=args.completion)
    report = run(methods, config, device, log=lambda line: print(line, file=sys.stderr, flush=True))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    if args.markdown:
        print(markdown(report))
    else:
        for r in report["results"]:
            print(
                f"{r['method']} {r['contender']}: {_mb(r['activation_bytes'])} ({r['activation_ratio']:.1%} of plain)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
