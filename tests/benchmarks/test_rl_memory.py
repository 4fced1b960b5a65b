"""benchmarks/rl_memory.py at a tiny size: one DPO step and one GRPO loss step inside TRL's own trainers.

fastft must keep less for backward than transformers + PEFT in the same trainer step (the ratio < 1), compute the
same loss (same weights, same batch), and never save or create a batch x seq x vocab tensor. The stated size
(vocab 32000, 2 x 512 tokens) is the script's default, run by hand (its numbers go to the issue); here a tiny
Llama keeps the test to seconds. fastft runs its torch path (the session's Triton interpreter is for kernel tests).
"""

from __future__ import annotations

import pytest

from benchmarks import memory, rl_memory
from fastft.kernels._dispatch import force_backend

TINY = rl_memory.RLConfig(
    model=memory.StepConfig(hidden=128, intermediate=448, vocab=2048, layers=2, heads=4, kv_heads=2, seq=32),
    pairs=1,
    generations=2,
    prompt=8,
    completion=24,
)
pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # transformers 5.2x renames checkpointing APIs
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


@pytest.fixture(scope="module")
def report() -> dict:
    with force_backend("torch"):
        return rl_memory.run(config=TINY)


def test_fastft_keeps_less_and_computes_the_same_loss(report):
    rows = {(r["method"], r["contender"]): r for r in report["results"]}
    assert set(rows) == {(m, c) for m in rl_memory.METHODS for c in rl_memory.CONTENDERS}
    for method in rl_memory.METHODS:
        plain, fastft = rows[method, "plain"], rows[method, "fastft"]
        assert plain["activation_bytes"] > 0 and plain["activation_ratio"] == 1.0
        assert fastft["activation_ratio"] < 1.0, (method, fastft["activation_ratio"])
        # TRL's chunked log-prob calls ran on fastft's kernel for fastft's model and on TRL's for plain's (ORPO:
        # TRL's experimental trainer computes full logits, fastft's trainer calls linear_log_probs itself)
        assert plain["head_calls"]["fastft"] == 0, plain["head_calls"]
        if method != "orpo":
            assert fastft["head_calls"]["fastft"] > 0 and fastft["head_calls"]["trl"] == 0, fastft["head_calls"]
        # bf16 weights, the same batch: the losses agree to bf16 rounding.
        assert fastft["loss"] == pytest.approx(plain["loss"], abs=2e-2), method


def test_no_batch_seq_vocab_tensor_with_fastft(report):
    for row in report["results"]:
        if row["contender"] == "fastft":
            assert row["btv_saved"] == [] and row["btv_created"] == [], row
            sequences = TINY.sequences(row["method"])
            assert row["largest_saved_bytes"] < sequences * (TINY.prompt + TINY.completion) * TINY.model.vocab


def test_markdown(report):
    text = rl_memory.markdown(report)
    assert "| DPO | fastft |" in text and "| GRPO | transformers + PEFT |" in text and "| ORPO | fastft |" in text
    assert "DPOTrainer / GRPOTrainer" in text and "vocab 2048" in text
