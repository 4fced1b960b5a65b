"""Getting a fine-tuned model out: GGUF files for llama.cpp / Ollama / LM Studio, with an Ollama Modelfile.

Exports only read models (LoRA is merged on the fly, tensor by tensor); they never patch or change them.
"""

from fastft.export.architectures import ARCHITECTURES, UnsupportedModelError
from fastft.export.gguf import push_to_hub_gguf, quantization_methods, save_pretrained_gguf
from fastft.export.ollama import write_modelfile
from fastft.export.tokenizer import UnsupportedTokenizerError

__all__ = [
    "ARCHITECTURES",
    "UnsupportedModelError",
    "UnsupportedTokenizerError",
    "push_to_hub_gguf",
    "quantization_methods",
    "save_pretrained_gguf",
    "write_modelfile",
]
