"""GGUF export: a fine-tuned model (LoRA merged) as files that llama.cpp, Ollama and LM Studio load.

``save_pretrained_gguf(model, tokenizer, "out", quantization_method="q8_0")`` writes ``out/<name>.Q8_0.gguf``
(and an Ollama ``Modelfile`` beside it) with the ``gguf`` package alone: no llama.cpp checkout, no compiler.

- ``f32``, ``f16``, ``bf16``, ``q8_0``, ``q4_0``, ``q4_1``, ``q5_0`` and ``q5_1`` are written directly: the
  ``gguf`` package quantises them in Python (``gguf.quants``), one tensor at a time. Norms, biases and other 1-D
  tensors stay f32 and a matrix whose rows do not split into 32-value blocks falls back to f16, as llama.cpp's
  own converter does.
- The k-quants and i-quants (``q4_k_m``, ``q5_k_m``, ``q6_k``, ``q2_k``, ``q3_k_m``, ``iq4_xs``, ...) go through
  llama.cpp's quantiser (``llama_model_quantize`` of ``llama-cpp-python``, the optional extra
  ``pip install "fastft[gguf]"``), from an f16 (bf16 for a bf16 model) file written first.
- A list of methods writes one file each; the 16-bit file is written once and reused as the quantiser's input.

Every check (method names, architecture, tokenizer, mergeable weights, destination) runs before the first
byte is written. Each file is written under a temporary name (``.<name>.partial``) and renamed when complete,
so an interrupted export never leaves a file that looks finished; a progress bar counts the tensors.

Tensor names come from ``gguf``'s name maps, hyperparameters and per-family differences from
:mod:`fastft.export.architectures`, the vocabulary from :mod:`fastft.export.tokenizer`, the merge from
:mod:`fastft.export.merge`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastft.export.architectures import (
    Architecture,
    UnsupportedModelError,
    architecture_of,
    head_dim,
    query_scale_factor,
    rope_frequency_factors,
    write_hyperparameters,
)
from fastft.export.merge import check_mergeable, merged_entries
from fastft.export.tokenizer import GGUFVocab, convert_tokenizer

# Written by the gguf package in Python: method -> (GGML tensor type name, llama file type name).
PYTHON_METHODS: dict[str, tuple[str, str]] = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
}
# Written by llama.cpp's quantiser (llama-cpp-python): method -> llama_cpp's LLAMA_FTYPE_* name.
LLAMA_CPP_METHODS: dict[str, str] = {
    name: f"LLAMA_FTYPE_MOSTLY_{name.upper()}"
    for name in (
        "q2_k",
        "q2_k_s",
        "q3_k_s",
        "q3_k_m",
        "q3_k_l",
        "q4_k_s",
        "q4_k_m",
        "q5_k_s",
        "q5_k_m",
        "q6_k",
        "iq4_nl",
        "iq4_xs",
        "iq3_xxs",
        "iq3_xs",
        "iq3_s",
        "iq3_m",
        "iq2_m",
    )
}
# The names Unsloth users type for the same things.
ALIASES = {
    "not_quantized": "f16",
    "fast_quantized": "q8_0",
    "quantized": "q4_k_m",
    "q3_k": "q3_k_m",
    "q4_k": "q4_k_m",
    "q5_k": "q5_k_m",
    "float16": "f16",
    "float32": "f32",
    "bfloat16": "bf16",
}

_GGUF_EXTRA = 'pip install "fastft[gguf]"'


def quantization_methods() -> list[str]:
    """Every method name :func:`save_pretrained_gguf` accepts (aliases included)."""
    return sorted(PYTHON_METHODS) + sorted(LLAMA_CPP_METHODS) + sorted(ALIASES)


def _normalise_methods(quantization_method: str | Sequence[str]) -> list[str]:
    names = [quantization_method] if isinstance(quantization_method, str) else list(quantization_method)
    if not names:
        raise ValueError("quantization_method is empty; pass a method such as 'q8_0' or a list of them.")
    methods = []
    for name in names:
        key = ALIASES.get(str(name).lower(), str(name).lower())
        if key not in PYTHON_METHODS and key not in LLAMA_CPP_METHODS:
            raise ValueError(
                f"quantization_method {name!r} is not known. Written directly: {', '.join(PYTHON_METHODS)}; through "
                f"llama.cpp's quantiser ({_GGUF_EXTRA}): {', '.join(LLAMA_CPP_METHODS)}; "
                f"aliases: {', '.join(f'{a}={b}' for a, b in ALIASES.items())}."
            )
        if key not in methods:
            methods.append(key)
    return methods


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as error:
        raise ImportError(
            f"k-quants and i-quants (q4_k_m, q5_k_m, q6_k, ...) are made by llama.cpp's quantiser, which comes with "
            f"llama-cpp-python: {_GGUF_EXTRA}. Methods written without it: {', '.join(PYTHON_METHODS)}."
        ) from error
    return llama_cpp


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as error:
        raise ImportError(f"GGUF export needs the gguf package: {_GGUF_EXTRA} (or pip install gguf).") from error
    return gguf


def _text_config(model: Any) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(
            f"save_pretrained_gguf expects a transformers model (or a PEFT model); got {type(model).__name__}."
        )
    if hasattr(config, "text_config") and not hasattr(config, "num_hidden_layers"):
        raise UnsupportedModelError(
            f"{config.model_type} is a multimodal model; GGUF export writes text-only causal LMs. Export its "
            "language model alone (for Gemma-3: Gemma3ForCausalLM) or use llama.cpp's converter with mmproj."
        )
    return config


class _Plan:
    """What one export writes, decided (and checked) before any file is opened."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        gguf = _gguf()
        self.config = _text_config(model)
        self.model_type, self.arch = architecture_of(self.config)
        check_mergeable(model)
        self.entries = merged_entries(model)
        shapes = {name: shape for name, shape, _ in self.entries}
        embed = next((shape for name, shape in shapes.items() if name.endswith("embed_tokens.weight")), None)
        if embed is None:
            raise UnsupportedModelError(f"{self.model_type}: no embed_tokens.weight in the model's state dict.")
        self.vocab_size = int(embed[0])
        write_hyperparameters(self.config, _NullWriter(), self.arch, self.vocab_size)  # raises on what is unsupported
        self.vocab: GGUFVocab = convert_tokenizer(tokenizer, self.vocab_size)
        self.name_map = gguf.get_tensor_name_map(_arch_enum(gguf, self.arch), int(self.config.num_hidden_layers))
        tied = bool(getattr(self.config, "tie_word_embeddings", False))
        self.tensors: list[tuple[str, str, tuple[int, ...], Callable[[], torch.Tensor]]] = []
        for name, shape, compute in self.entries:
            if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
                continue
            gguf_name = self.name_map.get_name(name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None and name == "lm_head.weight":
                raise UnsupportedModelError(
                    f"{self.model_type}: llama.cpp's {self.arch.gguf_arch} graph always uses the token embedding as "
                    "its output layer, but this model's lm_head is not tied to it (tie_word_embeddings=False); such "
                    "a model cannot be written to GGUF."
                )
            if gguf_name is None:
                raise UnsupportedModelError(
                    f"{self.model_type}: the tensor {name!r} has no GGUF name in gguf's map for "
                    f"{self.arch.gguf_arch}; this model is not one llama.cpp's {self.arch.gguf_arch} graph runs."
                )
            self.tensors.append((name, gguf_name, shape, compute))
        self.rope_freqs = None
        if self.arch.gguf_arch == "llama":
            self.rope_freqs = rope_frequency_factors(self.config, head_dim(self.config))
        self.q_scale = query_scale_factor(self.config, self.arch)

    def transform(self, name: str, gguf_name: str, tensor: torch.Tensor) -> np.ndarray:
        """The array llama.cpp expects for the transformers tensor ``name`` (float32, row-major)."""
        data = tensor.detach().to(device="cpu", dtype=torch.float32)
        config, arch = self.config, self.arch
        if arch.permute_qk and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
            heads = (
                config.num_attention_heads
                if ".attn_q." in gguf_name
                else (getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
            )
            data = data.reshape(heads, 2, data.shape[0] // heads // 2, *data.shape[1:]).transpose(1, 2)
            data = data.reshape(tensor.shape)
        if arch.norm_offset and name.endswith("norm.weight"):
            data = data + arch.norm_offset
        if self.q_scale != 1.0 and (
            (arch.query_scale == "q_proj" and ".attn_q." in gguf_name)
            or (arch.query_scale == "q_norm" and ".attn_q_norm." in gguf_name)
        ):
            data = data * self.q_scale
        return np.ascontiguousarray(data.numpy())


class _NullWriter:
    """Accepts every ``add_*`` call: lets the metadata code run its checks before a file exists."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def _arch_enum(gguf: Any, arch: Architecture) -> Any:
    for key, value in gguf.MODEL_ARCH_NAMES.items():
        if value == arch.gguf_arch:
            return key
    raise UnsupportedModelError(f"the installed gguf package does not know the architecture {arch.gguf_arch!r}.")


def _safe_name(name: str, vocab: GGUFVocab) -> str:
    """``general.name``, unless llama.cpp would fail on it.

    llama.cpp sets Phi-3's strip attributes when the model *name* contains "phi3" or "phi-3", and then looks up
    ``<unk>``, ``<s>``, ``</s>`` and ``<|endoftext|>``, failing to load a file whose vocabulary lacks one. Such a
    name is written without the "3" match (the tokens then keep the attributes the file gives them).
    """
    lowered = name.lower()
    if ("phi3" in lowered or "phi-3" in lowered) and not {"<unk>", "<s>", "</s>", "<|endoftext|>"} <= set(vocab.tokens):
        return lowered.replace("phi-3", "phi_3").replace("phi3", "phi_3")
    return name


def _tensor_type(gguf: Any, shape: tuple[int, ...], wanted: Any) -> Any:
    """The GGML type of one tensor: f32 for 1-D, f16 where rows do not fill whole quantisation blocks."""
    qt = gguf.GGMLQuantizationType
    if len(shape) < 2:
        return qt.F32
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    if shape[-1] % block != 0:
        return qt.F16
    return wanted


def _write_file(plan: _Plan, path: Path, method: str, name: str, progress: bool) -> None:
    """Write one GGUF file of ``method`` to ``path`` (through a temporary name)."""
    gguf = _gguf()
    type_name, file_type = PYTHON_METHODS[method]
    wanted = gguf.GGMLQuantizationType[type_name]
    partial = path.with_name(f".{path.name}.partial")
    writer = gguf.GGUFWriter(partial, plan.arch.gguf_arch)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(_safe_name(name, plan.vocab))
        writer.add_file_type(int(gguf.LlamaFileType[file_type]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_hyperparameters(plan.config, writer, plan.arch, plan.vocab_size)
        plan.vocab.write(writer)

        layout = []  # (gguf name, computes the array, GGML type, shape)
        if plan.rope_freqs is not None:
            freqs = plan.rope_freqs
            layout.append(
                (
                    gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                    lambda f=freqs: f,
                    gguf.GGMLQuantizationType.F32,
                    tuple(freqs.shape),
                )
            )
        for hf_name, gguf_name, shape, compute in plan.tensors:
            layout.append(
                (
                    gguf_name,
                    lambda h=hf_name, g=gguf_name, c=compute: plan.transform(h, g, c()),
                    _tensor_type(gguf, shape, wanted),
                    shape,
                )
            )
        for gguf_name, _, qtype, shape in layout:
            nbytes = gguf.quant_shape_to_byte_shape(shape, qtype)[-1] * int(np.prod(shape[:-1]))
            writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        bar = _progress(len(layout), f"GGUF {method}", progress)
        for gguf_name, make, qtype, shape in layout:
            array = make()
            data = gguf.quants.quantize(array, qtype) if qtype != gguf.GGMLQuantizationType.F32 else array
            writer.write_tensor_data(np.ascontiguousarray(data).view(np.uint8).reshape(-1))
            bar.update(1)
        bar.close()
        writer.close()
        os.replace(partial, path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled)


def _quantize_with_llama_cpp(source: Path, path: Path, method: str) -> None:
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_CPP_METHODS[method])
    params.nthread = max(1, (os.cpu_count() or 1))
    partial = path.with_name(f".{path.name}.partial")
    try:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params)
        if status != 0:
            raise RuntimeError(f"llama.cpp's quantiser failed ({status}) making {method} from {source}.")
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _file_name(base: str, method: str) -> str:
    return f"{base}.{method.upper()}.gguf"


def _check_destination(directory: Path, names: list[str], overwrite: bool) -> None:
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"save_directory {str(directory)!r} exists and is not a folder.")
    existing = [n for n in names if (directory / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{', '.join(existing)} already exist in {str(directory)!r}; pass overwrite=True to replace them or "
            "choose another save_directory."
        )


def save_pretrained_gguf(
    model: Any,
    tokenizer: Any,
    save_directory: str | os.PathLike,
    quantization_method: str | Sequence[str] = "q8_0",
    *,
    model_name: str | None = None,
    modelfile: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> list[str]:
    """Write ``model`` (LoRA merged) and ``tokenizer`` as GGUF files in ``save_directory``; return their paths.

    ``quantization_method`` is one method or a list (one file each): see :func:`quantization_methods`.
    Files are named ``<model_name>.<METHOD>.gguf`` (``model_name`` defaults to the folder's name). With
    ``modelfile`` an Ollama ``Modelfile`` is written beside the first file (its path is returned last). Files
    that already exist are only replaced with ``overwrite=True``. Nothing is written when any check fails:
    unknown method, unsupported architecture or tokenizer, an unmergeable adapter, a missing llama-cpp-python.
    """
    methods = _normalise_methods(quantization_method)
    directory = Path(save_directory)
    base = model_name or directory.resolve().name or "model"
    if any(m in LLAMA_CPP_METHODS for m in methods):
        _llama_cpp()
    plan = _Plan(model, tokenizer)
    names = [_file_name(base, m) for m in methods] + (["Modelfile"] if modelfile else [])
    _check_destination(directory, names, overwrite)
    directory.mkdir(parents=True, exist_ok=True)

    written: dict[str, Path] = {}
    for method in methods:
        if method in PYTHON_METHODS:
            written[method] = directory / _file_name(base, method)
            _write_file(plan, written[method], method, base, progress)
    quantised = [m for m in methods if m in LLAMA_CPP_METHODS]
    if quantised:
        source = next((written[m] for m in ("f32", "bf16", "f16") if m in written), None)
        scratch = None
        if source is None:
            scratch = Path(tempfile.mkdtemp(prefix=".fastft-gguf-", dir=directory))
            dtype = next((t.dtype for _, t in _first_weights(model)), torch.float16)
            source = scratch / _file_name(base, "bf16" if dtype == torch.bfloat16 else "f16")
            _write_file(plan, source, "bf16" if dtype == torch.bfloat16 else "f16", base, progress)
        try:
            for method in quantised:
                written[method] = directory / _file_name(base, method)
                _quantize_with_llama_cpp(source, written[method], method)
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
    paths = [str(written[m]) for m in methods]
    if modelfile:
        from fastft.export.ollama import write_modelfile

        paths.append(str(write_modelfile(directory / "Modelfile", written[methods[0]].name, tokenizer)))
    return paths


def _first_weights(model: Any):
    for name, param in model.named_parameters():
        if param.is_floating_point():
            yield name, param
            return


def push_to_hub_gguf(
    model: Any,
    tokenizer: Any,
    repo_id: str,
    quantization_method: str | Sequence[str] = "q8_0",
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload GGUF export (fastft)",
    **kwargs: Any,
) -> list[str]:
    """:func:`save_pretrained_gguf` into a temporary folder, then upload its files to ``repo_id`` on the Hub.

    The upload goes through ``huggingface_hub`` as it is (its errors, e.g. without network, are its own).
    Returns the uploaded files' paths inside the repository.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="fastft-gguf-") as folder:
        paths = save_pretrained_gguf(
            model,
            tokenizer,
            folder,
            quantization_method,
            model_name=kwargs.pop("model_name", repo_id.split("/")[-1]),
            **kwargs,
        )
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message, repo_type="model")
    return [Path(p).name for p in paths]
