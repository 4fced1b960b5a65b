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

Short sequences and fastft's fixed-size blocks. fastft's long-context path holds a few *fixed-size* transients:
the fused loss's logits chunk (at least 256 rows, 1024 when the head is trained), the LoRA Functions' fp32 row
blocks (1024 rows) and the MLP tiles. Next to a long sequence they are a constant; in a 512-token measurement
they cover the whole sequence and then grow with it, which is not the long-context slope. ``--blocks N`` scales
them to N rows (:func:`small_blocks`; the MLP tile is ``--tile``), so that a few hundred tokens are many blocks,
as a long sequence is at full size, and the slope between two short lengths is the long-context one. Check that
the lengths are in the linear regime (``--seq`` takes more than two; the slopes between neighbours must agree).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import sys
from collections.abc import Iterator
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


@contextlib.contextmanager
def small_blocks(rows: int | None) -> Iterator[None]:
    """fastft's fixed-size row blocks at ``rows`` rows inside the block (module docstring); ``None``: unchanged.

    The fused loss's logits chunk (``fused_linear_cross_entropy``: floors and byte budget) and the LoRA Functions'
    fp32 row blocks (``lora._LORA_BACKWARD_ROWS``). The MLP tile is an argument of its own (:func:`build`).
    """
    if rows is None:
        yield
        return
    if rows < 1:
        raise ValueError(f"small_blocks: rows must be a positive number of rows, got {rows!r}.")
    # import_module, not attribute access: the package re-exports a function named like the loss's module.
    loss = importlib.import_module("fastft.kernels.fused_linear_cross_entropy")
    lora = importlib.import_module("fastft.kernels.lora")
    # LOGITS_CHUNK_BYTES = 0: the byte budget gives 0 rows, so the chunk is the floor, ``rows``.
    values = {
        (loss, "LOGITS_CHUNK_BYTES"): 0,
        (loss, "MIN_CHUNK_ROWS"): rows,
        (loss, "MIN_CHUNK_ROWS_WEIGHT_GRAD"): rows,
        (lora, "_LORA_BACKWARD_ROWS"): rows,
    }
    saved = {key: getattr(*key) for key in values}
    try:
        for (module, name), value in values.items():
            setattr(module, name, value)
        yield
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)


@dataclass
class Slope:
    """One contender: the step's peak at each length (bytes) and the growth per token between them."""

    contender: str
    seq_lens: tuple[int, ...]
    peaks: tuple[int, ...]
    at_peak: str  # the longest length's allocations alive at the peak (PeakMemoryMeter.summary, KiB)

    @property
    def bytes_per_token(self) -> float:
        """Between the last two lengths."""
        return self.slopes[-1]

    @property
    def slopes(self) -> list[float]:
        """Bytes per token between each pair of neighbouring lengths (equal ones: the linear regime)."""
        pairs = itertools.pairwise(zip(self.seq_lens, self.peaks, strict=True))
        return [(p1 - p0) / (n1 - n0) for (n0, p0), (n1, p1) in pairs]


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


def measure(
    contender: str,
    seq_lens: tuple[int, ...] = (512, 1024),
    tile: int | None = 128,
    blocks: int | None = None,
    **kw,
) -> Slope:
    """:class:`Slope` of ``contender`` over the lengths (``tile``: rows per MLP tile for the tiled ones; ``blocks``:
    :func:`small_blocks`)."""
    if len(seq_lens) < 2 or list(seq_lens) != sorted(set(seq_lens)):
        raise ValueError(f"measure: seq_lens must be two or more increasing lengths, got {seq_lens!r}.")
    model = build(contender, tile, **kw)
    with small_blocks(blocks):
        meters = [step_peak(model, n) for n in seq_lens]
    return Slope(contender, tuple(seq_lens), tuple(m.peak_bytes for m in meters), meters[-1].summary(1024, 12))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastft.bench.long_context", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[512, 1024], help="two or more increasing lengths")
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=None, help="fastft's fixed-size row blocks at this many rows")
    parser.add_argument(
        "--config",
        nargs="+",
        default=[],
        metavar="FIELD=INT",
        help="LlamaConfig fields replacing the scaled Llama-3-8B's (e.g. hidden_size=256 vocab_size=2048)",
    )
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    parser.add_argument("--explain", action="store_true", help="list the allocations alive at each peak")
    args = parser.parse_args(argv)
    try:
        fields = {k: int(v) for k, v in (item.split("=", 1) for item in args.config)}
    except ValueError:
        parser.error(f"--config takes FIELD=INT items, got {args.config}")
    results = [measure(c, tuple(args.seq), args.tile, args.blocks, fields=fields) for c in args.contenders]
    print(table(results))
    if args.explain:
        for r in results:
            print(f"\n{r.contender} at {args.seq[-1]} tokens (KiB):\n{r.at_peak}")
    return 0


def table(results: list[Slope]) -> str:
    """Markdown table: each contender's peaks (MiB), KiB per token between neighbouring lengths, ratio to plain."""
    base = next((r.bytes_per_token for r in results if r.contender == "plain"), None)
    lens = results[0].seq_lens
    pairs = [f"{a}->{b}" for a, b in itertools.pairwise(lens)]
    lines = [
        "| contender | " + " | ".join(f"peak at {n} (MiB)" for n in lens) + " | "
        + " | ".join(f"KiB/token {p}" for p in pairs) + " | vs plain |",
        "| --- |" + " ---: |" * (len(lens) + len(pairs) + 1),
    ]  # fmt: skip
    for r in results:
        ratio = f"{r.bytes_per_token / base:.3f}x" if base else "-"
        peaks = " | ".join(f"{p / 2**20:.2f}" for p in r.peaks)
        slopes = " | ".join(f"{s / 1024:.2f}" for s in r.slopes)
        lines.append(f"| {r.contender} | {peaks} | {slopes} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
