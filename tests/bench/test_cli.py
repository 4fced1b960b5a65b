"""``fastft bench`` end to end: the command on the embedded default in a fresh process (as a user runs it, without
the session's TRITON_INTERPRET), its files, its --max-context search, the missing-matplotlib message and every
clear error.

One run of the command (3 steps of 2 x 64 tokens, --max-context 0.1 GB) serves the end-to-end tests: a Python
start with transformers and PEFT costs seconds on its own.
"""

from __future__ import annotations

import builtins
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastft.bench import cli
from fastft.bench import report as reporting

ROOT = Path(__file__).resolve().parents[2]
CAP_GB = 0.1  # the default model is 34 MB of weights; a step of 2 x 256 tokens needs ~90-125 MB (plain more)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["HF_HUB_OFFLINE"] = "1"
    # One thread: two OpenMP threads spin-wait against whatever else shares a 2-core runner (seen: 10x slower steps);
    # these tests check what the command writes, not its speed.
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, dict]:
    out = tmp_path_factory.mktemp("bench") / "out"
    args = ["--steps", "3", "--seq-len", "64", "--batch-size", "2", "--max-context", str(CAP_GB), "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "fastft.bench", *args],
        cwd=ROOT,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done, out, json.loads((out / "bench.json").read_text())


def test_writes_json_markdown_png_and_prints_the_table(run):
    done, out, _ = run
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "bench.md").read_text()
    assert "| transformers + PEFT | none |" in markdown and "| fastft | none |" in markdown
    assert "![loss curves and memory](bench.png)" in markdown
    table = done.stdout
    assert "contender" in table and "tokens/s" in table and "saved for backward" in table
    assert "fastft/plain: " in table and "x tokens/s" in table and "x saved for backward" in table
    assert "3/3" in done.stderr  # the progress bars reached the end


def test_json_says_where_the_numbers_come_from(run):
    _, out, report = run
    meta = report["meta"]
    assert {"torch", "triton", "transformers", "peft", "fastft"} <= {k for k, v in meta["versions"].items() if v}
    assert meta["device_type"] == "cpu" and meta["device"].startswith("CPU") and meta["date"][:2] == "20"
    config = meta["config"]
    assert config["seq_len"] == 64 and config["batch_size"] == 2 and config["steps"] == 3
    assert config["model_source"] == "embedded default" and config["model_config"]["hidden_size"] == 512
    assert config["dtype"] == "bfloat16" and config["fastft_backend"] == "torch path"
    assert config["out"] == str(out.resolve()) and config["max_context_gb"] == CAP_GB


def test_contenders_train_the_same_model(run):
    rows = {r["contender"]: r for r in run[2]["results"]}
    plain, fast, liger = rows["plain"], rows["fastft"], rows["liger"]
    assert plain["status"] == fast["status"] == "ok"
    assert liger["status"] == "skipped" and liger["reason"]  # no liger-kernel / no CUDA here
    for row in (plain, fast):
        assert len(row["losses"]) == len(row["step_seconds"]) == len(row["tokens"]) == 3
        assert row["tokens_per_s"] > 0 and row["saved_bytes"] > 0 and row["peak_bytes"] == row["saved_bytes"]
    # Same weights, LoRA init and batches, bf16. The loss is ln(2048) = 7.62 plus ~0.01 from the random model;
    # fused kernels round bf16 at other points than transformers, which moves a token-mean of this size by ~1e-4
    # at most (seen: 1e-5). 2e-3 leaves room for that and still fails a step that computes another function.
    assert abs(fast["losses"][0] - plain["losses"][0]) < 2e-3
    assert fast["max_loss_diff"] == max(abs(a - b) for a, b in zip(fast["losses"], plain["losses"]))
    ratios = run[2]["ratios"]["fastft/plain"]
    assert ratios["saved_bytes"] == fast["saved_bytes"] / plain["saved_bytes"] < 0.8  # no logits, fused MLP
    assert ratios["tokens_per_s"] == pytest.approx(fast["tokens_per_s"] / plain["tokens_per_s"])


def test_max_context_finds_the_longest_sequence_under_the_cap(run):
    done, _, report = run
    cap = CAP_GB * 1e9
    longest = {}
    for row in report["results"][:2]:
        search = row["max_context"]
        probes = {p["seq_len"]: p for p in search["probes"]}
        longest[row["contender"]] = search["longest"]
        # The reported length was measured within the cap; every longer one that was tried was not.
        assert probes[search["longest"]]["fits"] and probes[search["longest"]]["bytes"] <= cap
        assert all(p["bytes"] > cap for n, p in probes.items() if n > search["longest"])
        assert not search["reached_limit"]
    # Saving less for backward is what lets fastft train longer sequences in the same memory.
    assert 16 <= longest["plain"] < longest["fastft"]
    assert report["ratios"]["fastft/plain"]["max_context"] == longest["fastft"] / longest["plain"]
    assert "max context" in done.stdout


def test_missing_matplotlib_says_how_to_get_the_plot(run, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    messages = cli.write_outputs(run[2], tmp_path)
    assert messages == [reporting.PLOT_MISSING] and "pip install 'fastft[plot]'" in messages[0]
    assert not (tmp_path / "bench.png").exists()
    assert json.loads((tmp_path / "bench.json").read_text()) == run[2]
    assert "bench.png" not in (tmp_path / "bench.md").read_text()


def test_model_from_a_folder(tmp_path, monkeypatch):
    # --model loads with from_pretrained (weights and tokenizer from the folder), in this process: a small Llama.
    from fastft.bench import assets

    config = assets.default_config()
    config.update({"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 224, "head_dim": 16})
    folder = tmp_path / "model"
    assets.default_model(seed=3, config=config).save_pretrained(folder)
    assets.default_tokenizer().save_pretrained(folder)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU path on any machine
    out = tmp_path / "out"
    argv = ["--model", str(folder), "--steps", "2", "--seq-len", "64", "--batch-size", "2", "--out", str(out)]
    assert cli.main(argv) == 0
    report = json.loads((out / "bench.json").read_text())
    assert report["meta"]["config"]["model_source"] == str(folder)
    assert report["meta"]["config"]["model_config"]["hidden_size"] == 64
    plain, fast = report["results"][:2]
    assert plain["status"] == fast["status"] == "ok" and len(fast["losses"]) == 2
    assert abs(fast["losses"][0] - plain["losses"][0]) < 2e-3  # bf16, as in test_contenders_train_the_same_model


def test_a_failing_contender_is_reported_and_the_others_run(tmp_path, monkeypatch, capsys):
    real_build = cli.step.build_model

    def build(source, contender, **kwargs):
        if contender == "fastft":
            raise RuntimeError("boom: a kernel that does not compile")
        return real_build(source, contender, **kwargs)

    monkeypatch.setattr(cli.step, "build_model", build)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    assert cli.main(["--steps", "1", "--seq-len", "64", "--batch-size", "1", "--out", str(out)]) == 1
    plain, fast = json.loads((out / "bench.json").read_text())["results"][:2]
    assert plain["status"] == "ok" and len(plain["losses"]) == 1
    assert fast["status"] == "failed" and fast["reason"] == "RuntimeError: boom: a kernel that does not compile"
    assert "fastft: failed: RuntimeError: boom" in capsys.readouterr().out


def _error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_clear_errors(tmp_path, capsys, monkeypatch):
    out = ["--out", str(tmp_path / "out")]
    err = _error(["--preset", "llama9", *out], capsys)
    assert "--preset 'llama9' does not exist; choose one of: llama3-8b, qwen3-8b, gemma2-9b" in err
    err = _error(["--model", str(tmp_path / "no-such-model"), *out], capsys)
    assert "no-such-model: no such local folder, and no such model on the Hugging Face Hub" in err
    err = _error(["--model", "nobody-at-all/no-such-model", *out], capsys)  # HF_HUB_OFFLINE (conftest): no network
    assert "nobody-at-all/no-such-model: no such local folder" in err
    (tmp_path / "empty").mkdir()
    assert "the folder has no config.json" in _error(["--model", str(tmp_path / "empty"), *out], capsys)
    (tmp_path / "a-file").write_text("")
    err = _error(["--out", str(tmp_path / "a-file" / "out")], capsys)
    assert "cannot write there" in err and "a-file" in err
    assert "--layers cuts the depth of a --preset" in _error(["--layers", "2", *out], capsys)
    assert "--layers 99: gemma2-9b has 42" in _error(["--preset", "gemma2-9b", "--layers", "99", *out], capsys)
    assert "--steps 0: must be at least 1" in _error(["--steps", "0", *out], capsys)
    assert "--seq-len 8: seq_len=8 leaves no room" in _error(["--seq-len", "8", *out], capsys)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # what a CPU-only machine says
    assert "--load-in-4bit needs a CUDA device" in _error(["--load-in-4bit", *out], capsys)


def test_console_script_and_module_entry_points(capsys):
    from fastft.bench import __main__ as bench_main
    from fastft.cli import main as fastft_main

    with pytest.raises(SystemExit) as exit_info:
        fastft_main(["bench", "--help"])
    assert exit_info.value.code == 0 and "--max-context GB" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        fastft_main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("fastft 0.")
    with pytest.raises(SystemExit):
        fastft_main(["nonsense"])
    assert "invalid choice: 'nonsense'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        bench_main.main(["--gradient-checkpointing", "offload", "--help"])
    assert exit_info.value.code == 0 and "fastft bench" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:  # `python -m fastft.bench gpu` is the one-shot GPU suite
        bench_main.main(["gpu", "--help"])
    assert exit_info.value.code == 0 and "python -m fastft.bench gpu" in capsys.readouterr().out
