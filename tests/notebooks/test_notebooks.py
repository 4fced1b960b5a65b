"""The notebooks run top to bottom on a CPU with the embedded model, train (the loss goes down) and merge right.

Each notebook is executed by nbclient in a fresh IPython kernel, as CI and a user would run it, with its working
directory in a temporary folder (it writes ``outputs/`` there). The kernel is this interpreter (``sys.executable``,
from a kernel spec written for the test), so a virtual environment whose packages differ from the system
interpreter's still runs its own; the repository root goes first on its ``PYTHONPATH`` so the notebooks exercise
this checkout; ``TRITON_INTERPRET`` is removed so fastft runs its torch path on the CPU as a user's would (the
interpreter is for kernel tests); the hub is offline, since the embedded model needs no download. The last cell
prints one JSON line with the losses and the merged-model comparison, which the tests check. A run takes 20-45 s
on 2 cores, most of it the 30 training steps.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics
from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from nbclient import NotebookClient
from safetensors import safe_open

from fastft.bench.assets import default_examples

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
CELL_TIMEOUT_S = 300  # one cell; the longest, training, takes about 20 s on 2 cores
STEPS = 30  # the parameters cell's STEPS for the embedded model
TRL_STEPS = 10  # the TRL run only has to show that the cell works: fewer steps
RL_STEPS = {"dpo": 10, "grpo": 6}  # the parameters cells' STEPS for the embedded model


def _execute(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overrides: str = "") -> nbformat.NotebookNode:
    """Run ``notebooks/<name>.ipynb`` in ``tmp_path/run``, ``overrides`` appended to its parameters cell."""
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    if overrides:
        (parameters,) = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
        parameters.source += "\n" + overrides
    # A kernel spec named python3 that runs this interpreter; JUPYTER_PATH is searched before every installed spec.
    write_kernel_spec(tmp_path / "jupyter" / "kernels" / "python3")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))  # connection files
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["HF_HUB_OFFLINE"] = "1"
    # bitsandbytes' CPU library links the system libgomp, torch its own: two OpenMP runtimes whose threads spin while
    # they wait. On 2 cores each starves the other, every op then waits a time slice (~8 ms), and a 4-bit training
    # step takes 12 s instead of 0.7 s. Passive waiting (sleep, not spin) removes that.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["IPYTHONDIR"] = str(tmp_path / "ipython")  # no profile or startup files of the machine's user
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    client = NotebookClient(
        notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(run_dir)}}
    )
    client.execute(env=env)  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    return notebook


def _summary(notebook: nbformat.NotebookNode) -> dict:
    last = [c for c in notebook.cells if c.cell_type == "code"][-1]
    text = "".join(o.text for o in last.outputs if o.output_type == "stream" and o.name == "stdout")
    return json.loads(text.strip().splitlines()[-1])


def _check_run(summary: dict, run_dir: Path, load_in_4bit: bool, steps: int = STEPS) -> None:
    losses = summary["losses"]
    assert summary["model"] == "embedded" and summary["load_in_4bit"] is load_in_4bit
    assert len(losses) == steps and all(math.isfinite(loss) for loss in losses)
    # The embedded model starts from random weights (loss 7.6, about ln(2048)); AdamW at lr 2e-3 takes the response
    # tokens' loss down by 1.2-2 nats within 10-30 steps. Means of the first and last three steps, as single
    # batches vary by up to 0.8 nats; 0.5 nats is far outside that noise and far below the drop.
    first, last = statistics.mean(losses[:3]), statistics.mean(losses[-3:])
    assert last < first - 0.5, losses
    # fp32 on the CPU: the merged weight W + s*B@A and the live W x + s*B(A x) differ by float reordering only
    # (logits of a few units, differences near 1e-6), so greedy decoding picks the same tokens.
    assert summary["dtype"] == "torch.float32"
    assert summary["max_logit_diff"] < 1e-4 and summary["same_tokens"] is True
    adapter, merged = run_dir / "outputs" / "lora-adapter", run_dir / "outputs" / "merged-16bit"
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        names = list(f.keys())
    assert names and all("lora_" in n for n in names)  # adapters only, no base weights
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config  # the merged model of a 4-bit base is a plain 16/32-bit model
    with safe_open(merged / "model.safetensors", "pt") as f:
        names = list(f.keys())
    assert not any("lora_" in n or "absmax" in n or "quant" in n for n in names)


@pytest.mark.parametrize(("name", "load_in_4bit"), [("quickstart", False), ("qlora", True)])
def test_notebook_runs_trains_and_merges(name, load_in_4bit, tmp_path, monkeypatch):
    notebook = _execute(name, tmp_path, monkeypatch)
    install = notebook.cells[1]
    assert "%pip install" in install.source and install.outputs == []  # off Colab the install cell does nothing
    _check_run(_summary(notebook), tmp_path / "run", load_in_4bit)


def test_quickstart_trl_cell(tmp_path, monkeypatch):
    """The optional TRL cell (off by default) trains the same model through ``SFTTrainer`` instead of the loop."""
    notebook = _execute("quickstart", tmp_path, monkeypatch, overrides=f"USE_TRL = True\nSTEPS = {TRL_STEPS}")
    (loop_cell,) = [c for c in notebook.cells if c.cell_type == "code" and "scaler.step(optimizer)" in c.source]
    (trl_cell,) = [c for c in notebook.cells if c.cell_type == "code" and "SFTTrainer(" in c.source]
    assert loop_cell.outputs == []  # the plain loop did not run: the losses below are the trainer's
    assert any(f"over {TRL_STEPS} steps" in o.get("text", "") for o in trl_cell.outputs)
    _check_run(_summary(notebook), tmp_path / "run", load_in_4bit=False, steps=TRL_STEPS)


def test_dpo_notebook(tmp_path, monkeypatch):
    """TRL's DPOTrainer on the embedded model: a few steps, the first one at the reference (loss ln 2, margin 0)."""
    summary = _summary(_execute("dpo", tmp_path, monkeypatch))
    assert summary["model"] == "embedded" and summary["method"] == "dpo" and summary["dtype"] == "torch.float32"
    losses, margins = summary["losses"], summary["margins"]
    assert len(losses) == len(margins) == RL_STEPS["dpo"]
    assert all(math.isfinite(x) for x in losses + margins)
    # LoRA starts as the identity (B = 0): at step 1 the policy is the reference.
    assert abs(losses[0] - math.log(2)) < 1e-4 and margins[0] == 0


def test_grpo_notebook(tmp_path, monkeypatch):
    """TRL's GRPOTrainer on the embedded model with the notebook's two Python reward functions."""
    notebook = _execute("grpo", tmp_path, monkeypatch)
    summary = _summary(notebook)
    assert summary["model"] == "embedded" and summary["method"] == "grpo" and summary["dtype"] == "torch.float32"
    assert len(summary["losses"]) == len(summary["rewards"]) == RL_STEPS["grpo"]
    assert all(math.isfinite(x) for x in summary["losses"])
    # correct_answer is 0 or 1 and digits a share: their sum, averaged over the completions, lies in [0, 2].
    assert all(0 <= r <= 2 for r in summary["rewards"]) and all(0 <= c <= 1 for c in summary["correct"])
    (rewards_cell,) = [c for c in notebook.cells if c.cell_type == "code" and "def correct_answer" in c.source]
    printed = "".join(o.get("text", "") for o in rewards_cell.outputs)
    assert "[1.0, 0.0] [0.5]" in printed  # the reward functions on known completions


def test_vision_notebook(tmp_path, monkeypatch):
    """FastVisionModel on the embedded tiny LLaVA: LoRA on vision and language layers, TRL's SFTTrainer with
    VisionDataCollator on generated pictures, an answer to a new picture, and a merged model that plain transformers
    reloads with the same logits."""
    summary = _summary(_execute("vision", tmp_path, monkeypatch))
    assert summary["model"] == "embedded" and summary["dtype"] == "torch.float32"
    losses = summary["losses"]
    assert len(losses) == STEPS and all(math.isfinite(loss) for loss in losses)
    # Random weights: the answers' loss starts near ln(vocabulary) = 7.6 and the few caption words are learned within
    # 30 steps; the means of the first and last three steps (single batches vary) must drop by more than 1 nat.
    assert statistics.mean(losses[-3:]) < statistics.mean(losses[:3]) - 1.0, losses
    assert isinstance(summary["answer"], str)
    # fp32: merged W + s B A against the live W x + s B (A x), reordered sums only
    assert summary["max_logit_diff"] < 1e-4 and summary["same_tokens"] is True
    run = tmp_path / "run" / "outputs"
    with safe_open(run / "lora-adapter" / "adapter_model.safetensors", "pt") as f:
        names = list(f.keys())
    assert any("vision_tower" in n for n in names) and any("language_model" in n for n in names)
    assert all("lora_" in n for n in names)


def test_notebooks_match_their_generator(capsys):
    """The committed notebooks are what ``notebooks/make_notebooks.py`` writes (sources, fixed ids, no outputs)."""
    spec = importlib.util.spec_from_file_location("make_notebooks", NOTEBOOKS / "make_notebooks.py")
    make_notebooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_notebooks)
    assert make_notebooks.main(["--check"]) == 0, capsys.readouterr().err
    for name in ("quickstart", "qlora", "dpo", "grpo", "conversational", "ollama", "vision"):
        notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        nbformat.validate(notebook)
        assert all(c.get("outputs", []) == [] and c.get("execution_count") is None for c in notebook.cells)
        assert sum("parameters" in c.metadata.get("tags", []) for c in notebook.cells) == 1


def test_conversational_notebook_on_smollm2(smollm2_checkpoint, tmp_path, monkeypatch):
    """Unsloth's Llama-3.2 Conversational notebook, ported, top to bottom on the real SmolLM2-135M-Instruct.

    The checkpoint folder comes from the session fixture (the notebook's own conversion cell does the same when it is
    run without one). Every save cell runs: LoRA, its reload through ``FastLanguageModel.from_pretrained``, merged
    16-bit and 4-bit, and the GGUF files (q8_0, f16, q4_k_m); the Hub pushes are skipped without ``HF_TOKEN``.
    """
    notebook = _execute(
        "conversational", tmp_path, monkeypatch, overrides=f"SMOLLM2_FOLDER = {str(smollm2_checkpoint)!r}"
    )
    summary = _summary(notebook)
    assert summary["model"] == "smollm2" and len(summary["losses"]) == 3
    assert all(math.isfinite(loss) for loss in summary["losses"])
    # train_on_responses_only: row 4 (two exchanges) keeps the labels of its two replies only, each with the template's
    # end of turn (text here: SmolLM2 has no <|eot_id|> token), then the eos TRL appends to text rows. Between them at
    # most the first characters of the next header's text, which the token ending the first reply may share.
    first, second = (e["response"].strip() for e in default_examples()[8:10])
    text, head, tail = summary["labelled_text"], f"{first}<|eot_id|>", f"{second}<|eot_id|><|im_end|>"
    assert text.startswith(head) and text.endswith(tail), text
    assert "<|start_header_id|>".startswith(text[len(head) : -len(tail)]), text
    assert 0 < summary["labelled_tokens"] < summary["row_tokens"] / 2
    assert summary["reloaded"] == "PeftModelForCausalLM"  # from_pretrained("lora_model") put the adapters back
    # fp32: merged W + s*B@A against the live W x + s*B(A x) differ by float reordering only (logits of ~20, 30 layers)
    assert summary["max_logit_diff"] < 1e-3 and summary["same_tokens"] is True
    run = tmp_path / "run"
    assert (run / "model" / "model.safetensors").exists() and (run / "model-lora" / "adapter_config.json").exists()
    assert "quantization_config" in json.loads((run / "model-4bit" / "config.json").read_text())
    gguf = [name for name in summary["gguf_files"] if name.endswith(".gguf")]
    assert sorted(name.rsplit(".", 2)[1].lower() for name in gguf) == ["f16", "q4_k_m", "q8_0"], summary["gguf_files"]


def test_ollama_notebook_on_smollm2(smollm2_checkpoint, tmp_path, monkeypatch):
    """Unsloth's Llama-3 Ollama notebook, ported: to_sharegpt, standardize_sharegpt and a text chat template through
    apply_chat_template, SFT, the LoRA reload, merged saves, GGUF files and the Ollama Modelfile."""
    notebook = _execute("ollama", tmp_path, monkeypatch, overrides=f"SMOLLM2_FOLDER = {str(smollm2_checkpoint)!r}")
    summary = _summary(notebook)
    assert summary["model"] == "smollm2" and len(summary["losses"]) == 3
    assert all(math.isfinite(loss) for loss in summary["losses"])
    assert summary["exchanges"] == [3, 3, 3, 3]  # conversation_extension=3
    text = summary["first_text"]
    assert (
        text.startswith("Below are some instructions that describe some tasks.") and text.count("### Response:\n") == 3
    )
    assert text.count("<|im_end|>") == 3  # each reply ends with SmolLM2's eos
    assert summary["reloaded"] == "PeftModelForCausalLM"
    gguf = [name for name in summary["gguf_files"] if name.endswith(".gguf")]
    assert sorted(name.rsplit(".", 2)[1].lower() for name in gguf) == ["f16", "q4_k_m", "q8_0"], summary["gguf_files"]
    modelfile = summary["modelfile"]
    assert modelfile.startswith("FROM ") and "### Instruction:" in modelfile and "<|im_end|>" in modelfile, modelfile
