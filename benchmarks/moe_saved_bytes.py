"""What autograd keeps for backward in one MoE experts layer: fastft against transformers' experts implementations.

The same routed experts (transformers' ``Qwen3MoeExperts``, or ``GptOssExperts`` with ``--shape gpt-oss-20b``)
with the same weights and routing run one forward under a ``saved_tensors_hooks`` meter, for:

- ``eager``, ``grouped_mm``, ``batched_mm``: transformers' own experts implementations
  (``config._experts_implementation``), as a user runs them;
- ``fastft``: :func:`fastft.kernels.moe_experts.moe_experts` on the module's parameters.

Two modes: ``full`` (expert stacks trainable) and ``lora`` (frozen stacks, PEFT ``target_parameters`` LoRA r=16
on ``gate_up_proj`` and ``down_proj``; fastft reads the same adapters through ``peft_factors``).

Counted: every saved storage once. **Activation bytes** exclude storages that are parameters (expert stacks,
biases, LoRA A/B: they exist anyway), reported apart. The brief's shape (:data:`fastft.bench.moe_shapes.SAVED_BYTES`:
256 tokens, hidden 2048, intermediate 768, 16 experts, top-8, bf16) is the default. Runs on the CPU (fastft's torch
path has the same Function, so the same saved tensors as on a GPU).

    python benchmarks/moe_saved_bytes.py [--shape saved-bytes|gpt-oss-20b|tiny] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses

import torch

from fastft.bench import moe_shapes
from fastft.kernels._dispatch import force_backend
from fastft.kernels.moe_experts import MoELoRA, moe_experts, peft_factors

CONTENDERS = ("eager", "grouped_mm", "batched_mm", "fastft")
# batched_mm gathers one (2I, H) weight matrix per (token, slot) pair: 12.9 GB at the brief's shape, so it is
# measured only where that fits (--contenders adds it back).
DEFAULT_CONTENDERS = ("eager", "grouped_mm", "fastft")
TINY = dataclasses.replace(
    moe_shapes.SAVED_BYTES, name="tiny", tokens=32, hidden=64, intermediate=32, experts=8, top_k=4
)
SHAPES = {
    "saved-bytes": moe_shapes.SAVED_BYTES,
    "gpt-oss-20b": dataclasses.replace(moe_shapes.GPT_OSS_20B, tokens=64),
    "tiny": TINY,
}


class _Holder(torch.nn.Module):
    def __init__(self, experts):
        super().__init__()
        self.experts = experts

    def forward(self, hidden, index, weights):
        return self.experts(hidden, index, weights)


def build_experts(shape: moe_shapes.MoEShape, inputs: dict, implementation: str) -> torch.nn.Module:
    """transformers' experts module of ``shape``'s family holding ``inputs``' stacks (shared storage)."""
    from transformers import AutoConfig

    if shape.gpt_oss:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts as cls

        cfg = AutoConfig.for_model(
            "gpt_oss",
            hidden_size=shape.hidden,
            intermediate_size=shape.intermediate,
            num_local_experts=shape.experts,
            num_experts_per_tok=shape.top_k,
        )
    else:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as cls

        cfg = AutoConfig.for_model(
            "qwen3_moe",
            hidden_size=shape.hidden,
            moe_intermediate_size=shape.intermediate,
            num_experts=shape.experts,
            num_experts_per_tok=shape.top_k,
        )
    cfg._experts_implementation = implementation
    with torch.device("meta"):
        experts = cls(cfg)
    for name in ("gate_up", "down", "gate_up_bias", "down_bias"):
        if name in inputs:
            attr = {"gate_up": "gate_up_proj", "down": "down_proj"}.get(name, name.replace("_bias", "_proj_bias"))
            setattr(experts, attr, torch.nn.Parameter(inputs[name].detach(), requires_grad=inputs[name].requires_grad))
    return experts


def fastft_view(model: torch.nn.Module, num_experts: int) -> tuple[torch.nn.Module, MoELoRA | None]:
    """The experts module inside ``model`` (PEFT-wrapped or not) and its active adapters as :class:`MoELoRA`."""
    wrappers = {m.parameter_name: m for m in model.modules() if type(m).__name__ == "ParamWrapper"}
    if not wrappers:
        return model.experts, None

    def factors(name):
        w = wrappers[name]
        A, B = peft_factors(w.lora_A["default"].weight, w.lora_B["default"].weight, num_experts)
        return A, B, w.scaling["default"]

    gu, d = factors("gate_up_proj"), factors("down_proj")
    return wrappers["gate_up_proj"].get_base_layer(), MoELoRA(*gu, *d)


def _meter():
    saved: dict[int, tuple] = {}

    def pack(t):
        st = t.untyped_storage()
        saved[st.data_ptr()] = (tuple(t.shape), str(t.dtype).replace("torch.", ""), st.nbytes())
        return t

    return saved, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def measure(shape: moe_shapes.MoEShape, mode: str, contenders=CONTENDERS, dtype=torch.bfloat16) -> list[dict]:
    """One row per contender: activation bytes, parameter bytes, and the saved activation tensors."""
    from peft import LoraConfig, get_peft_model

    inputs = moe_shapes.moe_inputs(shape, torch.device("cpu"), dtype, train_experts=mode == "full")
    kwargs = moe_shapes.moe_kwargs(shape)
    rows = []
    for contender in contenders:
        model = _Holder(build_experts(shape, inputs, "eager" if contender == "fastft" else contender))
        if mode == "lora":
            torch.manual_seed(0)
            model = get_peft_model(
                model,
                LoraConfig(
                    r=16,
                    lora_alpha=32,
                    target_modules=[],
                    target_parameters=["experts.gate_up_proj", "experts.down_proj"],
                    init_lora_weights=False,
                ),
            )
        param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
        hidden = inputs["hidden"]
        saved, hooks = _meter()
        with hooks:
            if contender == "fastft":
                experts, lora = fastft_view(model, shape.experts)
                with force_backend("torch"):
                    moe_experts(
                        hidden,
                        inputs["top_k_index"],
                        inputs["top_k_weights"],
                        experts.gate_up_proj,
                        experts.down_proj,
                        getattr(experts, "gate_up_proj_bias", None),
                        getattr(experts, "down_proj_bias", None),
                        lora=lora,
                        **kwargs,
                    )
            else:
                model(hidden, inputs["top_k_index"], inputs["top_k_weights"])
        activations = [v for k, v in saved.items() if k not in param_ptrs]
        rows.append(
            {
                "contender": contender,
                "mode": mode,
                "activation_bytes": sum(v[2] for v in activations),
                "parameter_bytes": sum(v[2] for k, v in saved.items() if k in param_ptrs),
                "tensors": sorted(activations, key=lambda v: -v[2]),
            }
        )
    return rows


def markdown(shape: moe_shapes.MoEShape, rows: list[dict]) -> str:
    lines = [
        (
            f"Saved for backward, one MoE experts forward: {shape.name} (T={shape.tokens}, H={shape.hidden}, "
            f"I={shape.intermediate}, E={shape.experts}, top-{shape.top_k}), bf16, CPU"
        ),
        "",
        "| mode | contender | activation bytes | fastft / this | saved activation tensors |",
        "|---|---|---:|---:|---|",
    ]
    ours = {r["mode"]: r["activation_bytes"] for r in rows if r["contender"] == "fastft"}
    for r in rows:
        ratio = ours[r["mode"]] / r["activation_bytes"] if r["activation_bytes"] else float("nan")
        tensors = ", ".join(f"{s} {d}" for s, d, _ in r["tensors"][:6]) + (" ..." if len(r["tensors"]) > 6 else "")
        lines.append(
            f"| {r['mode']} | {r['contender']} | {r['activation_bytes'] / 2**20:.2f} MiB | {ratio:.3f}x | "
            f"{len(r['tensors'])}: {tensors} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="saved-bytes")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--contenders", default=",".join(DEFAULT_CONTENDERS), help=f"from {','.join(CONTENDERS)}")
    args = parser.parse_args(argv)
    shape = SHAPES[args.shape]
    contenders = tuple(args.contenders.split(","))
    rows = measure(shape, "full", contenders) + measure(shape, "lora", contenders)
    print(markdown(shape, rows))
    if args.json:
        args.json.write_text(json.dumps({"shape": dataclasses.asdict(shape), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
