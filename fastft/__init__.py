"""fastft: hand-derived Triton kernels that make Hugging Face LLM fine-tuning faster and leaner.

``from fastft import FastModel`` loads and patches a causal LM (Unsloth's ``FastLanguageModel`` argument
names; ``FastLanguageModel`` is the same class under Unsloth's name); ``fastft.patch(model)`` makes a model the user built themselves fast, in place. The kernels live in
:mod:`fastft.kernels`. ``FastModel`` and ``patch`` are imported on first use, so ``import fastft.kernels``
does not pull in transformers, PEFT and bitsandbytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastft.models.fast_model import FastLanguageModel, FastModel, is_bfloat16_supported
    from fastft.models.patch import patch
    from fastft.models.vision_model import FastVisionModel

__version__ = "0.1.0.dev0"
_CHAT_TEMPLATE_NAMES = ("apply_chat_template", "standardize_sharegpt", "to_sharegpt")
__all__ = [
    "FastLanguageModel",
    "FastModel",
    "FastVisionModel",
    "__version__",
    "apply_chat_template",
    "is_bfloat16_supported",
    "patch",
    "standardize_sharegpt",
    "to_sharegpt",
]


def __getattr__(name: str) -> Any:
    if name in ("FastModel", "FastLanguageModel", "is_bfloat16_supported"):
        from fastft.models import fast_model

        return getattr(fast_model, name)
    if name == "FastVisionModel":
        from fastft.models.vision_model import FastVisionModel

        return FastVisionModel
    if name in _CHAT_TEMPLATE_NAMES:  # Unsloth's notebooks import these from the package itself
        import importlib

        return getattr(importlib.import_module("fastft.chat_templates"), name)
    if name == "patch":
        from fastft.models.patch import patch

        return patch
    raise AttributeError(f"module 'fastft' has no attribute {name!r}")
