"""``FastModel``: load, add LoRA adapters, train and save a causal LM with fastft's kernels, in Unsloth's words.

The argument names follow Unsloth's ``FastLanguageModel`` (and Hugging Face's), so a notebook ports by changing
the import::

    model, tokenizer = FastModel.from_pretrained("meta-llama/Llama-3.2-1B", max_seq_length=4096, load_in_4bit=True)
    model = FastModel.get_peft_model(model, r=16, use_gradient_checkpointing="unsloth")
    ...  # any unmodified TRL trainer or a plain loop
    FastModel.save_pretrained_merged(model, tokenizer, "out", save_method="merged_16bit")

Everything returned is a plain ``transformers.PreTrainedModel`` or ``peft.PeftModel`` patched in place by
:func:`fastft.patch`; weights are read and written as safetensors only.

``max_seq_length`` is a promise about the data, not a change to the model: nothing is rescaled (RoPE runs as the
config says, also past ``max_position_embeddings``, with a warning at load). A training forward on a longer
sequence raises a ``ValueError`` naming both lengths; eval-mode forwards and generation are not limited.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import warnings
from collections.abc import Iterable
from typing import Any

import peft
import torch
import transformers
from torch import nn

from fastft.models.checkpointing import normalize_checkpointing_mode, set_checkpointing
from fastft.models.families import FAMILIES, family_of
from fastft.models.methods import attach_methods
from fastft.models.patch import causal_lm, patch
from fastft.models.saving import save_merged_4bit, save_merged_16bit

logger = logging.getLogger("fastft")

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SAVE_METHODS = ("merged_16bit", "lora", "merged_4bit")
# Tokens that exist in some vocabularies only to pad (Llama-3's reserved one, common spellings); preferred
# over unk and eos because a collator that masks pad ids from the labels would then also mask a real token.
_PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|PAD_TOKEN|>")
_PICKLE_SUFFIXES = (".bin", ".bin.index.json", ".pt", ".pth", ".ckpt")


# ------------------------------------------------------------------------------------------------ loading


def is_bfloat16_supported() -> bool:
    """Whether this process's CUDA device computes in bf16 natively (Ampere and newer), as Unsloth's helper of the name.

    Notebooks pass ``bf16=is_bfloat16_supported(), fp16=not is_bfloat16_supported()`` to the trainer. A T4
    (sm_75) runs bf16 only by emulation, so it answers False there (fp16 is the fast choice). Without a CUDA device
    it answers False: the trainer's ``bf16=True`` on a CPU needs ``use_cpu=True``, and fp32 is what fastft loads on
    a CPU anyway (pass ``fp16=False, bf16=False`` there).
    """
    if not torch.cuda.is_available():
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch without the argument
        return bool(torch.cuda.is_bf16_supported())


def _resolve_dtype(dtype: torch.dtype | str | None, on_cuda: bool, full_finetuning: bool) -> torch.dtype:
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
            raise ValueError(f"dtype={dtype!r} is not a floating torch dtype; pass torch.bfloat16, 'float16', ...")
        return resolved
    if dtype is not None:
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, its name, or None (automatic), got {dtype!r}")
        return dtype
    if not on_cuda:
        return torch.float32
    if is_bfloat16_supported():
        return torch.bfloat16
    # fp16 master weights cannot be trained under a GradScaler: full fine-tuning keeps fp32 and autocasts.
    return torch.float32 if full_finetuning else torch.float16


def _device_types(device_map: Any) -> set[str] | None:
    """The device types a ``device_map`` names, or None when accelerate decides ("auto", "balanced", ...)."""
    if isinstance(device_map, dict):
        found = [_device_types(v) for v in device_map.values() if v != "disk"]
        return None if any(t is None for t in found) else set().union(*found)
    if isinstance(device_map, int):
        return {"cuda"}
    try:
        return {torch.device(device_map).type}
    except (RuntimeError, TypeError):
        return None


def _require_bitsandbytes(flag: str, devices: set[str] | None) -> None:
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(
            f"{flag}=True quantises the weights with bitsandbytes, which is not installed: "
            f"`pip install bitsandbytes`, or load without {flag}"
        ) from err
    supported = set(getattr(bitsandbytes, "supported_torch_devices", {"cuda", "cpu"}))
    if devices is not None and not devices <= supported:
        raise ValueError(
            f"{flag}=True: bitsandbytes {bitsandbytes.__version__} cannot run on {sorted(devices - supported)} "
            f"(it serves {sorted(supported)}); pass a device_map on one of those, or load without {flag}"
        )


def _refuse_pickle(model_name: str) -> None:
    """A local checkpoint without safetensors weights is refused: loading pickle files can run arbitrary code."""
    if not os.path.isdir(model_name):
        return
    files = os.listdir(model_name)
    if any(f.endswith((".safetensors", ".safetensors.index.json")) for f in files):
        return
    pickles = sorted(f for f in files if f.endswith(_PICKLE_SUFFIXES))
    if pickles:
        raise ValueError(
            f"{model_name!r} holds weights only as pickle files ({', '.join(pickles)}), which can run code when "
            "loaded; fastft reads safetensors. Convert the checkpoint (load it once and save_pretrained), or pass "
            "allow_pickle=True if you trust its source"
        )


def _ensure_pad_token(tokenizer: Any) -> None:
    """Give a tokenizer without a pad token one: a pad token of its vocabulary, else unk, else eos (warned)."""
    if tokenizer.pad_token is not None:
        return
    vocab = tokenizer.get_vocab()
    choice = next((t for t in _PAD_CANDIDATES if t in vocab), None)
    if choice is None and tokenizer.unk_token is not None and tokenizer.unk_token != tokenizer.eos_token:
        choice = tokenizer.unk_token
    if choice is None and tokenizer.eos_token is not None:
        choice = tokenizer.eos_token
        logger.warning(
            "fastft: the tokenizer has no pad token; using eos %r. A collator that masks pad ids from the labels "
            "also masks eos: set tokenizer.pad_token to another token if the model must learn to stop",
            choice,
        )
    if choice is None:
        logger.warning("fastft: the tokenizer has no pad, unk or eos token; set tokenizer.pad_token before batching")
        return
    tokenizer.pad_token = choice


def _check_sequence_length(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: a training forward longer than ``module.max_seq_length`` is an error (see module doc)."""
    if not module.training:
        return
    tokens = kwargs.get("input_ids", args[0] if args else None)
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    limit = getattr(module, "max_seq_length", None)
    if not isinstance(tokens, torch.Tensor) or tokens.dim() < 2 or limit is None or tokens.shape[1] <= limit:
        return
    raise ValueError(
        f"fastft: a training sequence of {tokens.shape[1]} tokens is longer than max_seq_length={limit}. Pass a "
        f"larger max_seq_length to FastModel.from_pretrained (or set model.max_seq_length), or truncate the data "
        f"(tokenizer(..., truncation=True), SFTConfig(max_length={limit}))"
    )


def _validate_length(max_seq_length: object) -> None:
    if not isinstance(max_seq_length, int) or isinstance(max_seq_length, bool) or max_seq_length < 1:
        raise ValueError(f"max_seq_length must be a positive int, got {max_seq_length!r}")


def _set_max_seq_length(root: nn.Module, max_seq_length: int) -> None:
    _validate_length(max_seq_length)
    root.max_seq_length = max_seq_length
    if not getattr(root, "_fastft_length_hook", False):
        root.register_forward_pre_hook(_check_sequence_length, with_kwargs=True)
        root._fastft_length_hook = True
    config = root.config.get_text_config() if hasattr(root.config, "get_text_config") else root.config
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and max_seq_length > positions:
        warnings.warn(
            f"max_seq_length={max_seq_length} exceeds the model's max_position_embeddings={positions}: RoPE runs "
            "past the trained positions as configured (nothing is rescaled), and quality may drop there",
            UserWarning,
            stacklevel=3,
        )


# ------------------------------------------------------------------------------------------------ LoRA targets


def _module_names(root: nn.Module) -> tuple[set[str], list[str]]:
    """Last names of the modules LoRA can adapt (linear-like and embeddings), and every full module path."""
    adaptable = (nn.Linear, nn.Embedding, transformers.pytorch_utils.Conv1D)
    leaves = {name.rpartition(".")[2] for name, m in root.named_modules() if name and isinstance(m, adaptable)}
    return leaves, [name for name, _ in root.named_modules()]


def _resolve_targets(root: nn.Module, target_modules: Iterable[str]) -> list[str]:
    """Validate ``target_modules``; map Llama-style names onto fused projections (Phi-3's qkv_proj, gate_up_proj)."""
    leaves, paths = _module_names(root)
    fused = {name: parts for family in FAMILIES.values() for name, parts in family.fused_projections.items()}
    fused.update(family_of(root.config)[1].fused_projections)
    fused = {name: parts for name, parts in fused.items() if name in leaves}
    requested = list(target_modules)
    resolved, unknown = [], []
    for name in requested:
        if name in leaves or ("." in name and any(p == name or p.endswith("." + name) for p in paths)):
            resolved.append(name)
            continue
        hosts = [host for host, parts in fused.items() if name in parts]
        if not hosts:
            unknown.append(name)
        for host in hosts:
            missing = [p for p in fused[host] if p not in requested]
            if missing and host not in resolved:
                warnings.warn(
                    f"target_modules: {name!r} maps onto this model's fused {host!r}, which also computes "
                    f"{missing}: LoRA there adapts those too",
                    UserWarning,
                    stacklevel=3,
                )
            resolved.append(host)
    if unknown:
        raise ValueError(
            f"target_modules={requested!r}: {unknown} are not linear or embedding modules of this "
            f"{type(root).__name__}; valid names are {sorted(leaves)} (or 'all-linear')"
        )
    return list(dict.fromkeys(resolved))


def _writable_dir(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ValueError(f"path={path!r} is not a directory fastft can write to ({err}); pass another path") from err
    return path


def _finish(model: nn.Module) -> nn.Module:
    patch(model)
    return attach_methods(model)  # Unsloth's model.save_pretrained_merged(path, tokenizer, ...), ... (methods.py)


def _is_adapter_folder(model_name: str) -> bool:
    """A local folder of LoRA adapters only (``adapter_config.json``, no model ``config.json``), as save_lora writes."""
    has = os.path.isfile
    return has(os.path.join(model_name, "adapter_config.json")) and not has(os.path.join(model_name, "config.json"))


def _from_adapter_folder(folder: str, **kwargs: Any) -> tuple[nn.Module, Any]:
    """Unsloth's reload of saved adapters, ``from_pretrained("lora_model")``: the base model the adapter config
    names, loaded with the same arguments, then the adapters on it (trainable, as ``get_peft_model`` leaves them)."""
    config = peft.PeftConfig.from_pretrained(folder)
    base = config.base_model_name_or_path
    if not base:
        raise ValueError(
            f"{folder!r} holds LoRA adapters whose adapter_config.json names no base model; load the base with "
            "FastModel.from_pretrained and attach them with peft.PeftModel.from_pretrained(model, folder)"
        )
    model, tokenizer = FastModel.from_pretrained(base, **kwargs)
    model = peft.PeftModel.from_pretrained(model, folder, is_trainable=True)
    if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):  # the tokenizer saved with the adapters
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=kwargs["trust_remote_code"])
        tokenizer.model_max_length = kwargs["max_seq_length"]
        _ensure_pad_token(tokenizer)
    return _finish(model), tokenizer


# ------------------------------------------------------------------------------------------------ public API


class FastModel:
    """Load, adapt, switch mode and save Hugging Face causal LMs made fast by :func:`fastft.patch`."""

    @staticmethod
    def from_pretrained(
        model_name: str | os.PathLike,
        max_seq_length: int = 2048,
        dtype: torch.dtype | str | None = None,
        load_in_4bit: bool = False,
        load_in_8bit: bool = False,
        full_finetuning: bool = False,
        device_map: Any = None,
        token: str | bool | None = None,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
        *,
        allow_pickle: bool = False,
        **kwargs: Any,
    ) -> tuple[nn.Module, Any]:
        """Load ``model_name`` (hub id or local folder) with ``AutoModelForCausalLM`` and its tokenizer, patched.

        ``dtype=None`` picks bf16 on a CUDA device with bf16, else fp16 there (fp32 with ``full_finetuning``), and
        fp32 on the CPU. ``device_map=None`` puts the model on the CUDA device of this process (``LOCAL_RANK``)
        when there is one, else on the CPU. ``load_in_4bit`` is bitsandbytes NF4 with double quantisation,
        computing in ``dtype``; ``load_in_8bit`` is bitsandbytes int8. Weights are read from safetensors files
        only; ``allow_pickle=True`` also accepts ``.bin`` checkpoints (they can run code: only from a trusted
        source). ``full_finetuning=True`` keeps every weight trainable and refuses quantisation; with False
        nothing is frozen here either (:meth:`get_peft_model` freezes the base). The model gets
        ``max_seq_length`` (see the module doc for longer sequences); the tokenizer gets ``model_max_length =
        max_seq_length`` and, if it has none, a pad token: a pad token of its vocabulary, else unk, else eos.
        Other ``kwargs`` go to ``AutoModelForCausalLM.from_pretrained``. A local folder of LoRA adapters (what
        ``save_method="lora"`` or ``model.save_pretrained`` writes) loads the base model its config names with these
        arguments and returns a ``PeftModel`` with those adapters, trainable. Returns ``(model, tokenizer)``.
        """
        _validate_length(max_seq_length)
        if load_in_4bit and load_in_8bit:
            raise ValueError("load_in_4bit=True and load_in_8bit=True: choose one quantisation")
        flag = "load_in_4bit" if load_in_4bit else "load_in_8bit" if load_in_8bit else None
        if flag and full_finetuning:
            raise ValueError(
                f"full_finetuning=True trains every weight, which {flag}=True makes frozen integers; drop one"
            )
        if flag and "quantization_config" in kwargs:
            raise ValueError(f"{flag}=True and quantization_config=...: pass only one of them")
        if kwargs.get("use_safetensors") is False and not allow_pickle:
            raise ValueError("use_safetensors=False reads pickle files; pass allow_pickle=True to allow that")
        kwargs.pop("use_safetensors", None)
        model_name = os.fspath(model_name)
        if _is_adapter_folder(model_name):
            return _from_adapter_folder(
                model_name,
                max_seq_length=max_seq_length,
                dtype=dtype,
                load_in_4bit=load_in_4bit,
                load_in_8bit=load_in_8bit,
                device_map=device_map,
                token=token,
                trust_remote_code=trust_remote_code,
                attn_implementation=attn_implementation,
                allow_pickle=allow_pickle,
                **kwargs,
            )
        if device_map is None and torch.cuda.is_available():
            device_map = {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}
        devices = _device_types(device_map if device_map is not None else "cpu")
        on_cuda = torch.cuda.is_available() and (devices is None or "cuda" in devices)
        dtype = _resolve_dtype(dtype, on_cuda, full_finetuning)
        if flag:
            _require_bitsandbytes(flag, devices)
            kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
                load_in_4bit=load_in_4bit,
                load_in_8bit=load_in_8bit,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
            )
        if not allow_pickle:
            _refuse_pickle(model_name)
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        shared = {k: kwargs[k] for k in ("revision", "cache_dir", "local_files_only", "gguf_file") if k in kwargs}
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                model_name,
                dtype=dtype,
                device_map=device_map,
                token=token,
                trust_remote_code=trust_remote_code,
                use_safetensors=True if not allow_pickle else None,
                **kwargs,
            )
        except OSError as err:
            if allow_pickle or "cannot be loaded with `safetensors`" not in str(err):  # transformers' wording
                raise
            raise ValueError(
                f"{model_name!r} has no safetensors weights and fastft does not read pickle files by default; "
                "pass allow_pickle=True if you trust its source"
            ) from err
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            model_name, token=token, trust_remote_code=trust_remote_code, **shared
        )
        tokenizer.model_max_length = max_seq_length
        _ensure_pad_token(tokenizer)
        for config in (model.config, getattr(model, "generation_config", None)):
            if config is not None and getattr(config, "pad_token_id", None) is None:
                config.pad_token_id = tokenizer.pad_token_id
        _set_max_seq_length(model, max_seq_length)
        return _finish(model), tokenizer

    @staticmethod
    def get_peft_model(
        model: nn.Module,
        r: int = 16,
        target_modules: Iterable[str] | str = LLAMA_TARGETS,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        bias: str = "none",
        use_gradient_checkpointing: bool | str = "unsloth",
        random_state: int = 3407,
        use_rslora: bool = False,
        modules_to_save: list[str] | None = None,
        init_lora_weights: bool | str = True,
        loftq_config: Any = None,
        max_seq_length: int | None = None,
        tiled_mlp: bool | int = False,
        **kwargs: Any,
    ) -> peft.PeftModel:
        """Wrap ``model`` in LoRA adapters (``peft.get_peft_model`` with a ``CAUSAL_LM`` ``LoraConfig``), patched.

        ``target_modules`` (a list of module names) is checked against the model's linear and embedding modules;
        names written for Llama map onto fused projections where the model has them (Phi-3: q/k/v_proj ->
        qkv_proj, gate/up_proj -> gate_up_proj). A string goes to PEFT as it is ("all-linear" or a regex). The
        adapters' initial values depend only on ``random_state`` (the global RNG is left as it was).
        ``use_gradient_checkpointing``: False, True, "unsloth" or "offload" (see fastft.models.checkpointing).
        Quantised bases are not upcast (PEFT's prepare_model_for_kbit_training casts every non-4-bit weight to
        fp32; fastft's kernels accumulate in fp32 already); PEFT freezes the base and keeps adapters in fp32, and
        fp16 ``modules_to_save`` copies are made fp32 so a GradScaler can unscale them. ``max_seq_length``
        replaces the one given at load; ``tiled_mlp`` (True, or rows per tile) runs the MLPs over sequence tiles
        for long contexts (:func:`fastft.models.long_context.set_long_context`); other ``kwargs`` are
        ``LoraConfig`` fields (``use_dora``, ``layers_to_transform``, ...).
        """
        if isinstance(model, peft.PeftModel):
            raise TypeError("get_peft_model: the model already has adapters (it is a PeftModel); pass the base model")
        if getattr(model, "config", None) is None:
            raise TypeError(f"get_peft_model expects a transformers PreTrainedModel, got {type(model).__name__}")
        from torch.distributed.fsdp import FSDPModule

        if any(isinstance(module, FSDPModule) for module in model.modules()):
            raise TypeError(
                "get_peft_model: the model is already sharded (fastft.distributed.shard / fully_shard), and FSDP2 "
                "only manages the parameters present when it ran; add adapters before sharding: get_peft_model "
                "first, then shard()"
            )
        mode = normalize_checkpointing_mode(use_gradient_checkpointing)
        fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
        unknown = sorted(set(kwargs) - fields)
        if unknown:
            raise TypeError(f"get_peft_model got {unknown}, which are not LoraConfig fields; valid: {sorted(fields)}")
        targets = target_modules if isinstance(target_modules, str) else _resolve_targets(model, target_modules)
        if loftq_config:  # Unsloth's notebooks pass loftq_config={} or None to mean "no LoftQ"
            if getattr(model, "is_quantized", False) or getattr(model.config, "quantization_config", None):
                raise ValueError("loftq_config quantises a full-precision base itself; load without load_in_4bit")
            init_lora_weights = "loftq" if init_lora_weights is True else init_lora_weights
        config = peft.LoraConfig(
            task_type="CAUSAL_LM",
            r=r,
            target_modules=targets,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            bias=bias,
            use_rslora=use_rslora,
            modules_to_save=modules_to_save,
            init_lora_weights=init_lora_weights,
            loftq_config=loftq_config or {},
            **kwargs,
        )
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(random_state)
            peft_model = peft.get_peft_model(model, config)
        for param in peft_model.parameters():
            if param.requires_grad and param.dtype == torch.float16:
                param.data = param.data.float()
        set_checkpointing(peft_model, mode)
        if max_seq_length is not None:
            _set_max_seq_length(model, max_seq_length)
        peft_model = _finish(peft_model)
        if tiled_mlp:
            from fastft.models.long_context import set_long_context

            set_long_context(peft_model, tiled_mlp=tiled_mlp)
        return peft_model

    @staticmethod
    def for_training(model: nn.Module) -> nn.Module:
        """Training mode: ``model.train()`` and no KV cache kept (``config.use_cache = False``). Returns the model.

        The fused loss (no full logits) is active in training mode with labels; call :meth:`for_inference`
        before ``generate``.
        """
        model.train()
        causal_lm(model).config.use_cache = False
        return model

    @staticmethod
    def for_inference(model: nn.Module) -> nn.Module:
        """Inference mode: ``model.eval()`` and the KV cache on (``config.use_cache = True``). Returns the model.

        Forwards return full logits again. For batched generation pad on the left
        (``tokenizer.padding_side = "left"``); that setting belongs to the tokenizer and is left to the caller.
        """
        model.eval()
        causal_lm(model).config.use_cache = True
        return model

    @staticmethod
    def save_pretrained_merged(
        model: nn.Module,
        tokenizer: Any,
        path: str | os.PathLike,
        save_method: str = "merged_16bit",
    ) -> None:
        """Save ``model`` (and ``tokenizer``, unless None) under ``path`` without changing the live model.

        ``"merged_16bit"``: a plain transformers safetensors checkpoint with ``W + scaling * B @ A`` merged into
        every LoRA layer (computed in fp32), 4/8-bit bases dequantised, in the model's dtype (bf16/fp16, fp32
        models stay fp32), with no ``quantization_config``; it needs host memory for one copy of the model.
        ``"lora"``: the adapters only (PEFT's ``save_pretrained``), loadable with ``PeftModel.from_pretrained``.
        ``"merged_4bit"``: the merged checkpoint quantised to bitsandbytes NF4 (as loading ``merged_16bit``
        with ``load_in_4bit=True`` gives); warned, as NF4 rounding loses much of a LoRA update.
        """
        if save_method not in SAVE_METHODS:
            raise ValueError(f"save_method={save_method!r} is not one of {SAVE_METHODS}")
        if save_method == "lora" and not isinstance(model, peft.PeftModel):
            raise ValueError(
                "save_method='lora' needs a model with adapters (FastModel.get_peft_model); use 'merged_16bit'"
            )
        path = _writable_dir(path)
        if save_method == "lora":
            model.save_pretrained(path)
        elif save_method == "merged_16bit":
            save_merged_16bit(model, path)
        else:
            save_merged_4bit(model, path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)


FastLanguageModel = FastModel
"""Unsloth's name for :class:`FastModel` (the same class), so ``from fastft import FastLanguageModel`` ports a notebook."""
