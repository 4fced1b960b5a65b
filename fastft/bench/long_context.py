"""How the peak memory of one training step grows with the sequence length: bytes per token, plain vs fastft.

The longest context a GPU fits is set by the step's *peak* of live tensor bytes, and at long sequences the peak
grows linearly with the tokens: ``peak(T) ~ fixed + slope x T``. The slope is what decides how many tokens fit, so
that is what this measures, on a CPU: the peak of :class:`fastft.utils.memory.PeakMemoryMeter` over one forward +
backward (no optimizer step: its states do not depend on the tokens) at two sequence lengths, and
``slope = (peak(T2) - peak(T1)) / (T2 - T1)``. Triton kernels run in the interpreter (``TRITON_INTERPRET=1``), so
what they hold in registers is not counted, as on a GPU; on a CPU the host is the device, so offloaded layer inputs
count too (on a GPU they would not).

The model is Llama-3-8B with every width divided by 8 (:data:`SCALED_LLAMA3_8B`: hidden 512, intermediate 1792,
4 query heads and 1 key-value head of 128, vocabulary 128256 / 8 = 16032; 2 decoder layers), bf16, SDPA attention,
PEFT LoRA r=16 on the seven projections. With every width scaled alike, each per-token term (``b T H``, ``b T I``,
``4 T V``) shrinks by the same factor, so the ratios between contenders are those of the full-size model per
layer. Contenders (:data:`CONTENDERS`):

- ``plain``: transformers + PEFT with transformers' own (non-reentrant) gradient checkpointing;
- ``fastft``: :func:`fastft.patch` with offloaded checkpointing;
- ``fastft+tiled``: the same plus :func:`fastft.models.long_context.set_long_context` (tiled MLP, and what that
  module's other switches turn on);
- ``fastft+tiled (no ckpt)``: tiling alone, no checkpointing.

    TRITON_INTERPRET=1 python -m fastft.bench.long_context [--seq 512 1024] [--tile 128] [--contenders ...]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch
from transformers import LlamaConfig

from fastft.utils.memory import PeakMemoryMeter

SCALED_LLAMA3_8B = {
    "hidden_size": 512,
    "intermediate_size": 1792,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 128,
    "vocab_size": 16032,
    "rope_theta": 500000.0,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
}

# name -> (build_model contender, checkpointing, long-context switches: None, or set_long_context keyword arguments)
CONTENDERS: dict[str, tuple[str, str, dict | None]] = {
    "plain": ("plain", "standard", None),
    "fastft": ("fastft", "offload", None),
    "fastft+tiled": ("fastft", "offload", {}),
    "fastft+tiled (no ckpt)": ("fastft", "none", {}),
}


@dataclass
class Slope:
    """One contender: the step's peak at each length (bytes) and the growth per token between them."""

    contender: str
    seq_lens: tuple[int, int]
    peaks: tuple[int, int]
    at_peak: str  # the longer length's allocations alive at the peak (PeakMemoryMeter.summary, KiB)

    @property
    def bytes_per_token(self) -> float:
        return (self.peaks[1] - self.peaks[0]) / (self.seq_lens[1] - self.seq_lens[0])


def build(contender: str, tile: int | None = None, fields: dict | None = None, seed: int = 0):
    """The PEFT LoRA model of ``contender`` (:data:`CONTENDERS`) on the scaled Llama config, bf16, training mode."""
    from fastft.bench.step import build_model

    kind, mode, switches = CONTENDERS[contender]
    config = LlamaConfig(**{**SCALED_LLAMA3_8B, **(fields or {})})
    config._attn_implementation = "sdpa"
    model, _ = build_model(config, kind, dtype=torch.bfloat16, checkpointing=mode, seed=seed)
    if switches is not None:
        from fastft.models.long_context import set_long_context

        set_long_context(model, **{"tiled_mlp": tile or True, **switches})
    return model


def step_peak(model: torch.nn.Module, seq_len: int, seed: int = 1) -> PeakMemoryMeter:
    """The meter of one forward + backward on one random row of ``seq_len`` tokens (labels = inputs)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=gen)
    model.zero_grad(set_to_none=True)
    with PeakMemoryMeter() as meter:
        model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    return meter


def measure(contender: str, seq_lens: tuple[int, int] = (512, 1024), tile: int | None = 128, **kw) -> Slope:
    """:class:`Slope` of ``contender`` between the two lengths (``tile``: rows per MLP tile for the tiled ones)."""
    model = build(contender, tile, **kw)
    meters = [step_peak(model, n) for n in seq_lens]
    return Slope(contender, tuple(seq_lens), tuple(m.peak_bytes for m in meters), meters[-1].summary(1024, 12))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastft.bench.long_context", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, nargs=2, default=[512, 1024])
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    parser.add_argument("--explain", action="store_true", help="list the allocations alive at each peak")
    args = parser.parse_args(argv)
    results = [measure(c, tuple(args.seq), args.tile) for c in args.contenders]
    base = next((r.bytes_per_token for r in results if r.contender == "plain"), None)
    print(f"| contender | peak at {args.seq[0]} (MiB) | peak at {args.seq[1]} (MiB) | KiB per token | vs plain |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in results:
        ratio = f"{r.bytes_per_token / base:.3f}x" if base else "-"
        p0, p1 = (p / 2**20 for p in r.peaks)
        print(f"| {r.contender} | {p0:.2f} | {p1:.2f} | {r.bytes_per_token / 1024:.2f} | {ratio} |")
    if args.explain:
        for r in results:
            print(f"\n{r.contender} at {args.seq[1]} tokens (KiB):\n{r.at_peak}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
