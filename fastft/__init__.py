"""fastft: hand-derived Triton kernels that make Hugging Face LLM fine-tuning faster and leaner.

``from fastft import FastModel`` loads and patches a causal LM (Unsloth's ``FastLanguageModel`` argument
names); ``fastft.patch(model)`` makes a model the user built themselves fast, in place. The kernels live in
:mod:`fastft.kernels`. ``FastModel`` and ``patch`` are imported on first use, so ``import fastft.kernels``
does not pull in transformers, PEFT and bitsandbytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastft.models.fast_model import FastModel
    from fastft.models.patch import patch
    from fastft.models.vision_model import FastVisionModel

__version__ = "0.1.0.dev0"
__all__ = ["FastModel", "FastVisionModel", "__version__", "patch"]


def __getattr__(name: str) -> Any:
    if name == "FastModel":
        from fastft.models.fast_model import FastModel

        return FastModel
    if name == "FastVisionModel":
        from fastft.models.vision_model import FastVisionModel

        return FastVisionModel
    if name == "patch":
        from fastft.models.patch import patch

        return patch
    raise AttributeError(f"module 'fastft' has no attribute {name!r}")
