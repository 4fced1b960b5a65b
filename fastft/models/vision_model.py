"""``FastVisionModel``: load, add LoRA adapters, train and save an image-text-to-text model, in Unsloth's words.

The vision counterpart of :class:`fastft.models.fast_model.FastModel`, with the argument names of Unsloth's
``FastVisionModel``, so a vision notebook ports by changing the import::

    model, processor = FastVisionModel.from_pretrained("Qwen/Qwen2.5-VL-7B-Instruct", load_in_4bit=True)
    model = FastVisionModel.get_peft_model(model, finetune_vision_layers=True, finetune_language_layers=True,
                                           finetune_attention_modules=True, finetune_mlp_modules=True, r=16)
    ...  # TRL's SFTTrainer / GRPOTrainer, with fastft.vision.VisionDataCollator or TRL's own collation
    FastVisionModel.save_pretrained_merged(model, processor, "out", save_method="merged_16bit")

The model is a plain ``transformers`` image-text-to-text model (``AutoModelForImageTextToText``: Qwen2/2.5/3-VL,
Gemma 3/4, Llama 3.2 Vision, Mistral 3 / Pixtral, LFM2-VL, Idefics3 / SmolVLM, LLaVA, ...) patched in place by
:func:`fastft.patch`, which makes its language model and its vision tower fast and leaves what it does not
recognise on transformers' code (named in ``model.fastft_report``).

**Which layers get adapters.** The four ``finetune_*`` flags choose by structure, not by a list of names: a linear
layer belongs to the *language* part when it sits inside the language model (``model.get_decoder()``), to the
*vision* part otherwise (the vision tower and the projector between it and the language model; never the output
head); it is an *attention* module when a module on its path is named like attention (``attn``, ``attention``), an
*MLP* module when one is named like an MLP or a projector (``mlp``, ``ffn``, ``feed_forward``, ``projector``,
``merger``, ``connector``, ``projection``; in the vision part also the layer's own name, for a projector that is a
single linear layer). Patch embeddings, a vision tower's pooling head (SigLIP's ``head``, which the VLMs never
call) and the output head are never adapted. The chosen layers become one PEFT ``target_modules`` regex with the
layer numbers written as ``\\d+``, checked to match exactly those layers.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

import peft
import torch
import transformers
from torch import nn

from fastft.models import fast_model as _fm
from fastft.models.checkpointing import normalize_checkpointing_mode, set_checkpointing
from fastft.models.fast_model import FastModel
from fastft.models.patch import causal_lm, language_model, text_config

_ATTENTION_WORDS = ("attn", "attention")
_PROJECTOR_WORDS = ("projector", "merger", "connector", "projection")
_MLP_WORDS = ("mlp", "ffn", "feed_forward", "feedforward", *_PROJECTOR_WORDS)


# ------------------------------------------------------------------------------------------------ structure


def _is_vision_config(config: Any) -> bool:
    """Whether ``config`` describes a model with a vision part: a vision sub-config, or a model type transformers
    lists as image-text-to-text."""
    names = transformers.models.auto.modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    return getattr(config, "vision_config", None) is not None or getattr(config, "model_type", None) in names


def _text_only_error(what: str, model_type: str) -> ValueError:
    return ValueError(
        f"FastVisionModel: {what} is a text-only {model_type!r} model (its config has no vision part); load it with "
        "fastft.FastModel.from_pretrained, or pass an image-text-to-text checkpoint (Qwen2.5-VL, Gemma 3, LLaVA, ...)"
    )


def _check_vision_model(root: nn.Module) -> nn.Module:
    """The language model of ``root``; a ``ValueError`` naming the model when ``root`` has no vision part."""
    config = getattr(root, "config", None)
    if config is None:
        raise TypeError(f"FastVisionModel expects a transformers PreTrainedModel, got {type(root).__name__}")
    lm = language_model(root)
    if lm is root or text_config(config) is config or not _is_vision_config(config):
        raise _text_only_error(type(root).__name__, getattr(config, "model_type", "?"))
    return lm


def _part_kind(path: str) -> str | None:
    """The kind ("attention", "mlp" or None) of a module path below its part (vision tower or language model)."""
    parts = path.lower().split(".")[:-1]  # the module's own (leaf) name says nothing about its block
    if any(word in part for part in parts for word in _ATTENTION_WORDS):
        return "attention"
    if any(word in part for part in parts for word in _MLP_WORDS):
        return "mlp"
    return None


def lora_layers(
    model: nn.Module,
    finetune_vision_layers: bool = True,
    finetune_language_layers: bool = True,
    finetune_attention_modules: bool = True,
    finetune_mlp_modules: bool = True,
    target_modules: Iterable[str] | None = None,
) -> list[str]:
    """Full names of the linear layers of ``model`` (a transformers VLM) that the four flags choose (see the
    module docstring); ``target_modules`` (last names such as ``"q_proj"``) narrows them further."""
    root = causal_lm(model)
    lm = _check_vision_model(root)
    prefix = next(name for name, module in root.named_modules() if module is lm)
    head = root.get_output_embeddings() if callable(getattr(root, "get_output_embeddings", None)) else None
    wanted_parts = {"vision"} if finetune_vision_layers else set()
    wanted_parts |= {"language"} if finetune_language_layers else set()
    wanted_kinds = {"attention"} if finetune_attention_modules else set()
    wanted_kinds |= {"mlp"} if finetune_mlp_modules else set()
    leaves = set(target_modules) if target_modules is not None else None
    chosen = []
    for name, module in root.named_modules():
        if not isinstance(module, nn.Linear) or module is head:
            continue
        if "head" in name.split(".")[:-1]:
            continue  # a vision tower's pooling head (SigLIP's): the VLMs read the tower's tokens, never call it
        part = "language" if name.startswith(prefix + ".") else "vision"
        below = name[len(prefix) + 1 :] if part == "language" else name
        kind = _part_kind(below)
        if kind is None and part == "vision" and any(w in name.rpartition(".")[2] for w in _PROJECTOR_WORDS):
            kind = "mlp"  # a projector that is one linear layer (Llama 3.2 Vision's, Gemma 4's)
        if part in wanted_parts and kind in wanted_kinds and (leaves is None or name.rpartition(".")[2] in leaves):
            chosen.append(name)
    return chosen


def _pattern(names: list[str], generalise: bool) -> str:
    """One regex that full-matches ``names``: layer numbers as ``\\d+`` (if ``generalise``), siblings grouped."""
    groups: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        parent = r"\.".join(r"\d+" if generalise and p.isdigit() else re.escape(p) for p in parts[:-1])
        leaf = re.escape(parts[-1])
        if leaf not in groups.setdefault(parent, []):
            groups[parent].append(leaf)
    alternatives = [
        (parent + r"\." if parent else "") + (leaves[0] if len(leaves) == 1 else "(?:" + "|".join(leaves) + ")")
        for parent, leaves in groups.items()
    ]
    return alternatives[0] if len(alternatives) == 1 else "(?:" + "|".join(alternatives) + ")"


def lora_target_regex(model: nn.Module, names: list[str]) -> str:
    """The PEFT ``target_modules`` regex for exactly the layers ``names`` of ``model`` (PEFT full-matches it
    against every module name): layer numbers generalised where that selects no other linear layer."""
    root = causal_lm(model)
    linear = [name for name, module in root.named_modules() if isinstance(module, nn.Linear)]
    for generalise in (True, False):
        regex = _pattern(names, generalise)
        if {name for name in linear if re.fullmatch(regex, name)} == set(names):
            return regex
    raise AssertionError(f"the regex of {len(names)} exact names matched other layers: {names}")  # unreachable


def _set_use_cache(model: nn.Module, value: bool) -> None:
    root = causal_lm(model)
    for config in {id(c): c for c in (root.config, text_config(root.config))}.values():
        config.use_cache = value


# ------------------------------------------------------------------------------------------------ public API


class FastVisionModel(FastModel):
    """Load, adapt, switch mode and save Hugging Face image-text-to-text models made fast by :func:`fastft.patch`.

    :meth:`for_training`, :meth:`for_inference` and :meth:`save_pretrained_merged` behave as :class:`FastModel`'s
    (save with the processor in place of the tokenizer).
    """

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
        """Load ``model_name`` (hub id or local folder) with ``AutoModelForImageTextToText`` and its processor
        (``AutoProcessor``), patched. Returns ``(model, processor)``.

        Every argument means what it means in :meth:`FastModel.from_pretrained` (dtype, quantisation, device map,
        safetensors only unless ``allow_pickle``). A text-only checkpoint is refused with a ``ValueError`` naming
        it (use ``FastModel``). The processor's tokenizer gets ``model_max_length = max_seq_length`` and, if it
        has none, a pad token (as ``FastModel`` does). ``max_seq_length`` counts image tokens too.
        """
        _fm._validate_length(max_seq_length)
        model_name = os.fspath(model_name)
        shared = {k: kwargs[k] for k in ("revision", "cache_dir", "local_files_only") if k in kwargs}
        config = transformers.AutoConfig.from_pretrained(
            model_name, token=token, trust_remote_code=trust_remote_code, **shared
        )
        if text_config(config) is config or not _is_vision_config(config):
            raise _text_only_error(repr(model_name), getattr(config, "model_type", "?"))
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
        if device_map is None and torch.cuda.is_available():
            device_map = {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}
        devices = _fm._device_types(device_map if device_map is not None else "cpu")
        on_cuda = torch.cuda.is_available() and (devices is None or "cuda" in devices)
        dtype = _fm._resolve_dtype(dtype, on_cuda, full_finetuning)
        if flag:
            _fm._require_bitsandbytes(flag, devices)
            kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
                load_in_4bit=load_in_4bit,
                load_in_8bit=load_in_8bit,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
            )
        if not allow_pickle:
            _fm._refuse_pickle(model_name)
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        model = transformers.AutoModelForImageTextToText.from_pretrained(
            model_name,
            dtype=dtype,
            device_map=device_map,
            token=token,
            trust_remote_code=trust_remote_code,
            use_safetensors=True if not allow_pickle else None,
            **kwargs,
        )
        processor = _load_processor(model_name, token, trust_remote_code, shared)
        tokenizer = getattr(processor, "tokenizer", processor)
        tokenizer.model_max_length = max_seq_length
        _fm._ensure_pad_token(tokenizer)
        for cfg in (model.config, text_config(model.config), getattr(model, "generation_config", None)):
            if cfg is not None and getattr(cfg, "pad_token_id", None) is None:
                cfg.pad_token_id = tokenizer.pad_token_id
        _fm._set_max_seq_length(model, max_seq_length)
        return _fm._finish(model), processor

    @staticmethod
    def get_peft_model(
        model: nn.Module,
        finetune_vision_layers: bool = True,
        finetune_language_layers: bool = True,
        finetune_attention_modules: bool = True,
        finetune_mlp_modules: bool = True,
        r: int = 16,
        target_modules: Iterable[str] | str | None = None,
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
        **kwargs: Any,
    ) -> peft.PeftModel:
        """LoRA adapters on the vision and/or language layers, attention and/or MLP modules (the four flags; see
        the module docstring for how layers are sorted), through :meth:`FastModel.get_peft_model`.

        ``target_modules``: None (every linear layer the flags choose), a list of last names that narrows them
        (``["q_proj", "v_proj"]``), or a string given to PEFT as it is (``"all-linear"`` or your own regex; the
        flags are then not used). The chosen layers are kept as ``model.peft_config["default"].target_modules``
        (a regex). Every other argument is :meth:`FastModel.get_peft_model`'s.
        """
        if isinstance(model, peft.PeftModel):
            raise TypeError("get_peft_model: the model already has adapters (it is a PeftModel); pass the base model")
        _check_vision_model(model)
        if isinstance(target_modules, str):
            regex = target_modules
        else:
            if not (finetune_vision_layers or finetune_language_layers):
                raise ValueError(
                    "finetune_vision_layers=False and finetune_language_layers=False leave no layer to adapt; "
                    "set one of them to True"
                )
            if not (finetune_attention_modules or finetune_mlp_modules):
                raise ValueError(
                    "finetune_attention_modules=False and finetune_mlp_modules=False leave no module to adapt; "
                    "set one of them to True"
                )
            names = lora_layers(
                model,
                finetune_vision_layers,
                finetune_language_layers,
                finetune_attention_modules,
                finetune_mlp_modules,
                None if target_modules is None else list(target_modules),
            )
            if not names:
                raise ValueError(
                    f"get_peft_model: no linear layer of this {type(model).__name__} matches "
                    f"finetune_vision_layers={finetune_vision_layers}, finetune_language_layers="
                    f"{finetune_language_layers}, finetune_attention_modules={finetune_attention_modules}, "
                    f"finetune_mlp_modules={finetune_mlp_modules}, target_modules={target_modules!r}; valid last "
                    f"names are {sorted({n.rpartition('.')[2] for n in lora_layers(model)})}"
                )
            regex = lora_target_regex(model, names)
        return FastModel.get_peft_model(
            model,
            r=r,
            target_modules=regex,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            bias=bias,
            use_gradient_checkpointing=use_gradient_checkpointing,
            random_state=random_state,
            use_rslora=use_rslora,
            modules_to_save=modules_to_save,
            init_lora_weights=init_lora_weights,
            loftq_config=loftq_config,
            max_seq_length=max_seq_length,
            **kwargs,
        )

    @staticmethod
    def for_training(model: nn.Module, use_gradient_checkpointing: bool | str | None = None) -> nn.Module:
        """Training mode: ``model.train()`` and no KV cache (on the root config and the text config). Returns it.

        ``use_gradient_checkpointing`` (Unsloth's optional argument): None keeps the mode ``get_peft_model`` set;
        False, True, "unsloth" or "offload" switches to that mode."""
        model.train()
        _set_use_cache(model, False)
        if use_gradient_checkpointing is not None:
            set_checkpointing(model, normalize_checkpointing_mode(use_gradient_checkpointing))
        return model

    @staticmethod
    def for_inference(model: nn.Module) -> nn.Module:
        """Inference mode: ``model.eval()`` and the KV cache on. Forwards return full logits again; for batched
        generation set ``processor.tokenizer.padding_side = "left"``. Returns the model."""
        model.eval()
        _set_use_cache(model, True)
        return model


def _load_processor(model_name: str, token: Any, trust_remote_code: bool, shared: dict) -> Any:
    try:
        return transformers.AutoProcessor.from_pretrained(
            model_name, token=token, trust_remote_code=trust_remote_code, **shared
        )
    except (OSError, ValueError, ImportError) as err:
        try:
            import torchvision  # noqa: F401
        except ImportError:
            raise ImportError(
                f"FastVisionModel: the processor of {model_name!r} could not be loaded ({err}). Its image or video "
                "processor may need torchvision, which is not installed: `pip install torchvision`"
            ) from err
        raise
