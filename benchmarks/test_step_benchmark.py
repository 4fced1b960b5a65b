"""pytest-benchmark: one LoRA training step end to end, transformers + PEFT against fastft.

    pytest benchmarks/ --benchmark-only                      # this machine's numbers
    pytest benchmarks/ --benchmark-only --benchmark-autosave  # keep them; --benchmark-compare shows the change

The step is what ``fastft bench`` times (:mod:`fastft.bench.step`): the embedded default model (Llama-3-8B's
proportions scaled down, random weights, bf16) with PEFT LoRA r=16 on the seven projections, one batch of 8 x 128
tokens of the embedded instruction data, forward + backward + AdamW ``step()`` + ``zero_grad()``, synchronised on
CUDA. Each contender gets a fresh model and one untimed step first (Triton compilation, AdamW states); then
pytest-benchmark times single steps. ``extra_info`` records tokens per step, tokens/s at the median and the bytes
saved for backward. On a CPU fastft runs its torch path (Triton kernels only run interpreted there, which is for
tests, not timing).

The default ``python -m pytest`` does not collect this file (``testpaths = ["tests"]``).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from fastft.bench import assets, data, step
from fastft.kernels._dispatch import force_backend

SEQ_LEN, BATCH_SIZE = 128, 8
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5.2x renames checkpointing APIs


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    (one,) = data.make_batches(
        assets.default_tokenizer(), assets.default_examples(), seq_len=SEQ_LEN, batch_size=BATCH_SIZE, steps=1
    )
    return {k: v.to(DEVICE) for k, v in one.items()}


@pytest.mark.parametrize("contender", ["plain", "fastft"])
def test_training_step(benchmark, contender, batch):
    backend = force_backend("torch") if DEVICE.type == "cpu" else contextlib.nullcontext()
    with backend:
        model, note = step.build_model(assets.default_model, contender, dtype=torch.bfloat16, device=DEVICE)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def one_step() -> float:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step.synchronize(DEVICE)
            return float(loss.detach())

        with step.ActivationMeter.for_model(model) as meter:
            first = one_step()
        loss = benchmark.pedantic(one_step, rounds=5, iterations=1, warmup_rounds=1)

    tokens = data.tokens_in(batch)
    benchmark.extra_info.update(
        contender=contender,
        device=str(DEVICE),
        tokens_per_step=tokens,
        tokens_per_s=tokens / benchmark.stats.stats.median,
        saved_bytes=meter.total_bytes,
        note=note,
    )
    # The embedded data is learnable: seven AdamW steps lower the loss of this batch (it is the only one trained).
    assert loss < first, (first, loss)
