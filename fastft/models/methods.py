"""The save and upload methods Unsloth users call on their model, attached to every model ``FastModel`` returns.

``model.save_pretrained_merged(path, tokenizer, save_method=...)``, ``model.push_to_hub_merged(repo_id, tokenizer,
...)``, ``model.save_pretrained_gguf(path, tokenizer, quantization_method=...)``, ``model.push_to_hub_gguf(repo_id,
tokenizer, ...)``, ``model.save_lora(path)`` and ``model.load_lora(path)``. They are bound to the instance (the
model's class is untouched); the GGUF ones import :mod:`fastft.export` when called, so loading a model never imports
the ``gguf`` package. Uploads go through ``huggingface_hub``'s ``HfApi`` as it is: without network or a token they
fail with its own error, after the files were written to a temporary folder.
"""

from __future__ import annotations

import os
import tempfile
import types
from collections.abc import Sequence
from typing import Any

import peft
from torch import nn

DEFAULT_COMMIT_MESSAGE = "Upload model trained with fastft"


def _hub_token(token: str | bool | None) -> str | bool | None:
    """Unsloth's notebooks pass ``token=""`` for "not set": that means the token ``huggingface-cli login`` saved."""
    return None if token == "" else token


def _check_repo_id(repo_id: object) -> str:
    if not isinstance(repo_id, str) or not repo_id.strip("/") or repo_id.count("/") > 1:
        raise ValueError(f"repo_id={repo_id!r} is not a Hub repository name; pass 'name' or 'owner/name'")
    return repo_id


def upload_folder(
    folder: str, repo_id: str, token: str | bool | None, private: bool | None, commit_message: str
) -> Any:
    """Create ``repo_id`` (if it does not exist) and upload ``folder`` to it with ``huggingface_hub``."""
    from huggingface_hub import HfApi

    api = HfApi(token=_hub_token(token))
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message, repo_type="model")


def save_pretrained_merged(
    self: nn.Module, save_directory: str | os.PathLike, tokenizer: Any = None, save_method: str = "merged_16bit"
) -> None:
    """Save the model merged (``"merged_16bit"``, ``"merged_4bit"``) or its adapters (``"lora"``) with ``tokenizer``.

    See :meth:`fastft.FastModel.save_pretrained_merged`; the live model is left as it was and may keep training.
    """
    from fastft.models.fast_model import FastModel

    FastModel.save_pretrained_merged(self, tokenizer, save_directory, save_method=save_method)


def push_to_hub_merged(
    self: nn.Module,
    repo_id: str,
    tokenizer: Any = None,
    save_method: str = "merged_16bit",
    token: str | bool | None = None,
    private: bool | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
) -> Any:
    """:meth:`save_pretrained_merged` into a temporary folder, then upload it to ``repo_id`` (created if needed).

    ``token`` is a Hub token (``None`` or ``""``: the one ``huggingface-cli login`` saved); ``private`` applies when
    the repository is created. Returns ``huggingface_hub``'s ``CommitInfo``.
    """
    from fastft.models.fast_model import FastModel

    repo_id = _check_repo_id(repo_id)
    with tempfile.TemporaryDirectory(prefix="fastft-merged-") as folder:
        FastModel.save_pretrained_merged(self, tokenizer, folder, save_method=save_method)
        return upload_folder(folder, repo_id, token, private, commit_message)


def save_pretrained_gguf(
    self: nn.Module,
    save_directory: str | os.PathLike,
    tokenizer: Any,
    quantization_method: str | Sequence[str] = "q8_0",
    **kwargs: Any,
) -> Any:
    """GGUF files of the merged model in ``save_directory`` (and an Ollama ``Modelfile``): see
    :func:`fastft.export.save_pretrained_gguf` for the methods and options. Returns the written paths."""
    from fastft.export import save_pretrained_gguf as export

    return export(self, tokenizer, save_directory, quantization_method=quantization_method, **kwargs)


def push_to_hub_gguf(
    self: nn.Module,
    repo_id: str,
    tokenizer: Any,
    quantization_method: str | Sequence[str] = "q8_0",
    token: str | bool | None = None,
    **kwargs: Any,
) -> Any:
    """:meth:`save_pretrained_gguf` into a temporary folder, then upload it to ``repo_id``: see
    :func:`fastft.export.push_to_hub_gguf`."""
    from fastft.export import push_to_hub_gguf as export

    repo_id = _check_repo_id(repo_id)
    return export(self, tokenizer, repo_id, quantization_method=quantization_method, token=_hub_token(token), **kwargs)


def _require_adapters(model: nn.Module, what: str) -> None:
    if not isinstance(model, peft.PeftModel):
        raise TypeError(
            f"{what} needs a model with LoRA adapters (FastModel.get_peft_model); this "
            f"{type(model).__name__} has none. Save the whole model with save_pretrained_merged"
        )


def save_lora(self: nn.Module, save_directory: str | os.PathLike) -> None:
    """Write the LoRA adapters only (PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``).

    They load with :meth:`load_lora`, with ``PeftModel.from_pretrained(base, path)``, or with
    ``FastModel.from_pretrained(path)`` (which loads the base model the adapter config names).
    """
    _require_adapters(self, "save_lora")
    self.save_pretrained(os.fspath(save_directory), safe_serialization=True)


def load_lora(self: nn.Module, save_directory: str | os.PathLike, adapter_name: str | None = None) -> nn.Module:
    """Load adapters written by :meth:`save_lora` into this model; returns the model.

    With ``adapter_name=None`` the weights replace those of the active adapter, whose rank and target modules must
    match the saved ones (checked: a mismatch names both). With a name, they are added as a new adapter of that name
    (PEFT's ``load_adapter``; switch with ``model.set_adapter(name)``).
    """
    _require_adapters(self, "load_lora")
    path = os.fspath(save_directory)
    if adapter_name is not None:
        self.load_adapter(path, adapter_name=adapter_name)
        return self
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    saved = peft.PeftConfig.from_pretrained(path)
    active = self.active_adapter
    live = self.peft_config[active]
    mismatched = [
        f"{field}: saved {getattr(saved, field)!r}, live {getattr(live, field)!r}"
        for field in ("peft_type", "r", "target_modules", "modules_to_save")
        if _normalised(getattr(saved, field, None)) != _normalised(getattr(live, field, None))
    ]
    if mismatched:
        raise ValueError(
            f"load_lora({path!r}): the saved adapter does not fit the active adapter {active!r} ({'; '.join(mismatched)}"
            "); pass adapter_name='...' to load it as an adapter of its own"
        )
    result = set_peft_model_state_dict(self, load_peft_weights(path), adapter_name=active)
    missing = [k for k in result.missing_keys if "lora_" in k and f".{active}." in k]
    if missing:
        raise ValueError(f"load_lora({path!r}): the saved adapter lacks {len(missing)} tensors, e.g. {missing[0]}")
    return self


def _normalised(value: Any) -> Any:
    return sorted(value) if isinstance(value, set | list | tuple) else value


METHODS = {
    "save_pretrained_merged": save_pretrained_merged,
    "push_to_hub_merged": push_to_hub_merged,
    "save_pretrained_gguf": save_pretrained_gguf,
    "push_to_hub_gguf": push_to_hub_gguf,
    "save_lora": save_lora,
    "load_lora": load_lora,
}


def attach_methods(model: nn.Module) -> nn.Module:
    """Bind :data:`METHODS` to ``model`` (this instance only); returns it."""
    for name, function in METHODS.items():
        setattr(model, name, types.MethodType(function, model))
    return model
