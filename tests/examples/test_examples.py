"""examples/sft.py, dpo.py and grpo.py run end to end with their defaults (the embedded model) for two steps.

Each example's ``main(argv)`` is imported from its file and called in this process (a subprocess would pay the
torch/transformers/TRL imports again, about 10 s each). fastft's torch path runs (``force_backend``): the Triton
interpreter the test session enables is for kernel tests, far too slow for training. What is checked: two logged
steps with finite losses (and DPO's reward margins, GRPO's rewards), the model TRL trained is a PEFT model with
fastft's layers in it, and the one line per step the example prints.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import peft
import pytest

from fastft.kernels._dispatch import force_backend
from fastft.models.layers import FastRMSNorm

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # transformers 5.2x renames checkpointing APIs
    pytest.mark.filterwarnings("ignore::UserWarning"),  # pin_memory without an accelerator, and the like
]


def _run(name: str, tmp_path: Path, *extra: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with force_backend("torch"):
        trainer = module.main(["--steps", "2", "--output-dir", str(tmp_path / name), *extra])
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [1, 2]
    assert all(math.isfinite(entry["loss"]) for entry in logs)
    assert isinstance(trainer.model, peft.PeftModel)
    assert any(isinstance(m, FastRMSNorm) for m in trainer.model.modules())  # fastft patched what TRL trained
    return module, logs


def test_sft(tmp_path, capsys):
    _, logs = _run("sft", tmp_path)
    # Random weights over a 2048-token vocabulary: the first loss is about ln(2048) = 7.62.
    assert abs(logs[0]["loss"] - math.log(2048)) < 0.5
    assert capsys.readouterr().out.count("token accuracy") == 2


def test_dpo(tmp_path, capsys):
    module, logs = _run("dpo", tmp_path)
    # LoRA starts as the identity (B = 0): the policy is the reference, every margin 0 and the loss ln 2.
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-4) and logs[0]["rewards/margins"] == 0
    assert all(math.isfinite(entry["rewards/margins"]) for entry in logs)
    assert capsys.readouterr().out.count("margin") == 2
    # The rejected answer is a corrupted chosen one: a changed last number, or shuffled words.
    pair = module.preference_dataset()[0]
    assert pair["chosen"][0]["content"] != pair["rejected"][0]["content"]


def test_grpo(tmp_path, capsys):
    module, logs = _run("grpo", tmp_path, "--max-completion-length", "8")
    for entry in logs:
        assert 0 <= entry["rewards/correct_answer/mean"] <= 1 and 0 <= entry["rewards/digits/mean"] <= 1
        assert entry["reward"] == pytest.approx(entry["rewards/correct_answer/mean"] + entry["rewards/digits/mean"])
    assert capsys.readouterr().out.count("reward") == 2
    # The verifiable reward: the last number of the completion against the answer column.
    completions = [[{"role": "assistant", "content": "so 4 x 5 = 20. The answer is 20."}], "I think 19"]
    assert module.correct_answer(completions, answer=["20", "20"]) == [1.0, 0.0]
    assert module.digits(["12ab", ""]) == [0.5, 0.0]
