"""Issue 14, first "done means": the per-token slope of one LoRA step's peak live bytes, fastft against transformers +
PEFT with its own checkpointing, measured (fastft.bench.long_context: PeakMemoryMeter over forward + backward at
two lengths, Triton kernels interpreted so that their registers are not counted, as on a GPU).

Configuration (the issue's measurement at half its width, so that CI can afford it): Llama-3-8B's proportions --
intermediate 3.5 x hidden, GQA 4:1 (4 query heads and 1 key-value head of 64), LoRA r=16 on the seven projections --
at hidden 256, 2 decoder layers, bf16, SDPA, one sequence of 256 and of 512 tokens. fastft's fixed-size row blocks
(the loss's logits chunk, the LoRA fp32 blocks, the MLP tile) are set to 32 rows (``blocks``/``tile`` of the
bench): at full size they are 1024-row blocks, a constant next to a long sequence, and 32-row blocks make 256-512
tokens "many blocks" in the same way. On a CPU the host is the device, so fastft's offloaded layer inputs count
here (on a GPU they would not): fastft is charged for them.

Which slope this is. 256 -> 512 is linear for every contender (offline: 128 -> 256 gives the same within 3%, except
fastft without checkpointing, 7.3 against 7.7), with fastft's peak in one layer's MLP backward after its recompute.
It is not yet the asymptotic slope: from ~600 tokens at this width fastft's peak moves to the attention backward
(torch's CPU SDPA backward allocates an fp32 dq accumulator, as flash-attention's backward does on a GPU), whose
per-token term is larger (ASYMPTOTIC below, measured offline at 1024 -> 2048; ~4 minutes per contender
interpreted, beyond CI's budget). The bars hold there too at the Llama vocabulary; the CI test guards the phase it
can afford.

Two vocabularies, because plain's slope depends on it and fastft's does not (its loss is chunked):

- ``LLAMA_VOCAB`` = 8016, Llama-3-8B's vocabulary over hidden (128256 / 4096 = 31.3, so 8016 at hidden 256): the
  issue's setting. Plain's peak is then its loss (fp32 logits and their gradient, ~24 bytes per vocabulary entry
  per token), the case a real Llama-3 model is in. The issue's bars are asserted here: offloaded + tiled <= 0.10x,
  tiled without checkpointing <= 0.25x.
- ``SMALL_VOCAB`` = 2048 (8 x hidden): plain's peak is inside its layers (the MLP's backward in fp32), its slope
  the same as at 1024 (asserted), so the ratio says what fastft's layers save against plain's layers, not what the
  chunked loss saves against fp32 logits. The issue's bars are NOT met here (see MEASURED): fastft's peak is one
  layer's backward after its recompute, where the recomputed attention's tensors (normalised input, q, k, v after
  RoPE, attention output, the LoRA products), the residual stream and its gradient, the MLP's input and its dx,
  and the kept layer input are alive at once (4.28 KiB: about 8.6 bf16 hidden-sized rows per token) against plain's ~58;
  past ~600 tokens, the attention backward with its fp32 dq accumulator (5.47 KiB). Going lower needs attention
  and MLP recomputed separately (sub-layer checkpointing) and the input norm fused into q/k/v (its output is kept
  for dA: one row per layer), not done. The test asserts
  the measured ratios plus ~6% as regression bounds.

MEASURED after the input norm was fused into q/k/v (fastft.kernels.normed_qkv), 256 -> 512, this test's own
print: plain 96.20 / 29.16; fastft offloaded + tiled 2.84 (0.030x / 0.098x: at 256 tokens its peak is still a
fixed-size moment, so this pair understates the attention-phase slope, 4.96 at 1024 -> 2048); tiled without
checkpointing 6.84 (0.071x / 0.234x; 6.97 at 1024 -> 2048). Before that fusion
(KiB per token between 256 and 512 tokens; offline, 128 -> 256 and 512 -> 1024 gave the same within 3%,
except fastft without checkpointing at 128 -> 256, 7.3, below the linear regime; the test prints its own table):

    vocabulary    plain    fastft offloaded + tiled    fastft tiled, no checkpointing
    8016          96.20    4.28-4.34 (0.044-0.045x)    7.81-7.83 (0.081x)
    2048          29.16    4.28 (0.147x)               7.72 (0.265x)

ASYMPTOTIC (offline, 1024 -> 2048 tokens, vocabulary 2048; fastft's peak in the attention backward after the
recompute; ``TRITON_INTERPRET=1 python -m fastft.bench.long_context --seq 1024 2048 --tile 32 --blocks 32 --config
hidden_size=256 intermediate_size=896 num_attention_heads=4 num_key_value_heads=1 head_dim=64 vocab_size=2048``):
plain 29.66, fastft offloaded + tiled 5.47 (0.184x; 0.057x of plain's 96.20 at the Llama vocabulary), fastft tiled
without checkpointing 7.97 (0.269x; 0.083x). (512 -> 1024 straddles the change of phase: 7.34 and 9.75, not a
slope of either phase.)

(fastft's slopes at 2048 are measured offline; the test measures fastft at 8016 only and divides by plain at both
vocabularies, which is sound because fastft's peak holds no vocabulary-sized per-token tensor: 4.28 at both; without
checkpointing 7.81 at 8016 against 7.72 at 2048, so the small-vocabulary ratio the test computes, 0.268x, is the
slightly larger one.)
"""

from __future__ import annotations

import pytest

from fastft.bench.long_context import measure, table

FIELDS = {"hidden_size": 256, "intermediate_size": 896, "num_attention_heads": 4, "num_key_value_heads": 1,
          "head_dim": 64}  # fmt: skip
LLAMA_VOCAB, SMALL_VOCAB = 8016, 2048
SEQ = (256, 512)
BLOCKS = 32  # rows of the loss chunk, LoRA fp32 blocks and MLP tile (module docstring)
OFFLOADED, NO_CKPT = "fastft+tiled", "fastft+tiled (no ckpt)"
# Regression bounds at the small vocabulary (the 0.10 / 0.25 are not met there, module docstring): the
# ratios the test computes (0.147-0.149x and 0.268x) plus ~6%: the peaks move by ~1% between runs (4.28 and 4.34 KiB
# per token seen for the offloaded one), and the bound is for regressions, not for that noise.
OFFLOADED_SMALL_BOUND, NO_CKPT_SMALL_BOUND = 0.158, 0.285


def _measure(contender: str, vocab: int):
    return measure(contender, SEQ, tile=BLOCKS, blocks=BLOCKS, fields={**FIELDS, "vocab_size": vocab})


def test_peak_bytes_per_token_against_plain():
    plain = {v: _measure("plain", v) for v in (LLAMA_VOCAB, SMALL_VOCAB, SMALL_VOCAB // 2)}
    fastft = {c: _measure(c, LLAMA_VOCAB) for c in (OFFLOADED, NO_CKPT)}
    for vocab in (LLAMA_VOCAB, SMALL_VOCAB):
        print(f"\nvocabulary {vocab}:\n" + table([plain[vocab], *fastft.values()]))
    # Plain's peak is in its layers at the small vocabulary: halving it changes nothing (the same allocations).
    assert plain[SMALL_VOCAB].bytes_per_token == pytest.approx(plain[SMALL_VOCAB // 2].bytes_per_token, rel=1e-3)
    ratio = {(c, v): fastft[c].bytes_per_token / plain[v].bytes_per_token for c in fastft for v in plain}
    print({f"{c} / plain at {v}": round(r, 3) for (c, v), r in ratio.items() if v != SMALL_VOCAB // 2})
    assert ratio[OFFLOADED, LLAMA_VOCAB] <= 0.10
    assert ratio[NO_CKPT, LLAMA_VOCAB] <= 0.25
    assert ratio[OFFLOADED, SMALL_VOCAB] <= OFFLOADED_SMALL_BOUND
    assert ratio[NO_CKPT, SMALL_VOCAB] <= NO_CKPT_SMALL_BOUND
