"""The GPU suite's RL parts (fastft.bench.gpu_rl) at their dry-run shapes on the CPU: every contender runs, agrees
with the others and with float64, and a missing trl is a "not installed" row, not a crash. (The suite's own dry run,
tests/bench/test_gpu_suite.py, runs both parts end to end in worker processes.)"""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

from fastft.bench import gpu_report, gpu_rl
from fastft.kernels._dispatch import force_backend

TRL = importlib.util.find_spec("trl") is not None
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _spec() -> dict:
    return {"dry_run": True, "deadline": time.time() + 60}


@pytest.fixture(scope="module")
def parts() -> dict:
    with force_backend("torch"):  # as the suite's workers run on a CPU (no Triton interpreter)
        return {
            "logprob_head": gpu_rl.part_logprob_head(_spec(), lambda _: None),
            "grpo_loss_step": gpu_rl.part_grpo_loss_step(_spec(), lambda _: None),
        }


def test_logprob_head_part(parts):
    rows = {r["contender"]: r for r in parts["logprob_head"]["results"]["rows"]}
    assert list(rows) == list(gpu_rl.CONTENDERS)
    for name, row in rows.items():
        if name == "trl" and not TRL:
            assert row["status"] == "not installed" and "trl" in row["reason"]
            continue
        assert row["status"] == "ok", row
        assert row["fwd_ms"] > 0 and row["bwd_ms"] > 0 and row["vs_fastft"] > 0
        # bf16 logits (hidden 64, |logit| ~ 0.1) are rounded once as lm_head rounds them: an error of a few 1e-3
        # against float64, the same for every contender; the entropy sums them away.
        assert row["errors"]["log_probs"] < 5e-3 and row["errors"]["entropy"] < 1e-3, row["errors"]
    assert rows["fastft"]["vs_fastft"] == 1.0


def test_grpo_loss_step_part(parts):
    results = parts["grpo_loss_step"]["results"]
    assert results["dims"]["tokens"] == gpu_rl.TINY_HEAD.tokens
    rows = {r["contender"]: r for r in results["rows"]}
    assert list(rows) == ["fastft", "trl", "full logits"]
    ran = [r for r in rows.values() if r["status"] == "ok"]
    assert len(ran) == (3 if TRL else 2)
    for row in ran:  # the same step through each head: the losses agree to fp32 summation order
        assert row["step_ms"] > 0 and row["loss"] == pytest.approx(rows["fastft"]["loss"], abs=1e-5)


def test_grpo_loss_against_the_formula():
    # The loss of the part against a direct transcription: ratio 1 (old = current policy), so the surrogate is -A;
    # the KL term is exp(d) - d - 1 with d = ref - logp.
    g = torch.Generator().manual_seed(0)
    hidden, ref = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    weight, labels = torch.randn(11, 8, generator=g), torch.randint(0, 11, (6,), generator=g)
    advantages = torch.tensor([0.5, -1.0])
    fn = gpu_rl._head_fn("pytorch")
    logp, ref_logp = fn(hidden, weight, labels)[0], fn(ref, weight, labels)[0]
    d = ref_logp - logp
    want = (-advantages.repeat_interleave(3) + gpu_rl.GRPO_BETA * (d.exp() - d - 1)).mean()
    got = gpu_rl.grpo_loss(fn, hidden, ref, weight, labels, advantages)
    torch.testing.assert_close(got, want)


def test_report_sections(parts):
    record = {"parts": {name: {"results": payload["results"]} for name, payload in parts.items()}}
    text = "\n".join(gpu_report._rl_sections(record["parts"]))
    assert "## Log-prob head" in text and "## GRPO loss step" in text
    assert "| fastft |" in text and "| full logits |" in text and "2 completions x 16 tokens" in text
