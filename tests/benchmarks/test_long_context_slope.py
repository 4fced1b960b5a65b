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
  chunked loss saves against fp32 logits. The bar without checkpointing (0.25x) is met and asserted here too; the
  offloaded one (0.10x) is met in this test's phase (0.095x) but not asymptotically (0.167x at 1024 -> 2048, below):
  fastft's peak is then one layer's attention backward after its recompute, ~10 bf16 hidden-sized rows per token,
  of which the whole-sequence SDPA backward's tensors, the residual stream's gradient and the two offloaded layer
  inputs (on a CPU) are ~8 (README, "Long context"); less needs the attention itself replaced (query-chunked recompute), which the long-context path does not do (it keeps
  transformers' attention). The offloaded ratio here is bounded for regressions only.

MEASURED (this test's own print, 2026-12-06, after the input norms were fused into q/k/v and the MLP), KiB per token
256 -> 512: plain 96.20 / 29.16; fastft offloaded + tiled 2.78 (0.029x / 0.095x); tiled without checkpointing 6.84
(0.071x / 0.234x). fastft's slopes do not depend on the vocabulary (no vocabulary-sized per-token tensor: its loss
is chunked), so the test measures fastft at 8016 only and divides by plain at both.

ASYMPTOTIC (offline, 1024 -> 2048 tokens, fastft's peak in the attention backward; ``TRITON_INTERPRET=1 python -m
fastft.bench.long_context --seq 1024 2048 --tile 32 --blocks 32 --config hidden_size=256 intermediate_size=896
num_attention_heads=4 num_key_value_heads=1 head_dim=64 vocab_size=2048``, ~4 minutes per contender): plain 29.66
(96.20 at 8016); fastft offloaded + tiled 4.96 (0.052x at 8016, 0.167x at 2048); tiled without checkpointing 6.97
(0.072x, 0.235x). At the issue's full setting (the bench's default model, hidden 512, vocabulary 16032, no
``--config``; ~20 minutes): plain 192.39, offloaded + tiled 9.72 (0.051x), tiled without checkpointing 13.48
(0.070x).
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
# At the small vocabulary: the offloaded ratio is a regression bound (0.095x measured, plus ~10%: peaks move by ~1%
# between runs, and this phase is not the asymptotic one, module docstring); without checkpointing, the bar.
OFFLOADED_SMALL_BOUND, NO_CKPT_SMALL_BOUND = 0.105, 0.25


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
