"""llama.cpp as the client that checks every export (through llama-cpp-python), and transformers' side of it.

``Llama`` is created with llama.cpp's extra CPU buffer types off (``use_extra_bufts=False``): the
llama-cpp-python build of the development machine crashes (SIGSEGV) in the repacked/AMX kernels on any
quantised file, llama.cpp's own included; the plain CPU kernels compute the same model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")


def load(path: str, n_ctx: int = 256, f32_cache: bool = True):
    default = llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_model_default_params = params
    llama_cpp.llama.llama_cpp.llama_model_default_params = params
    try:
        cache = {"type_k": 0, "type_v": 0} if f32_cache else {}  # GGML_TYPE_F32: no f16 rounding of keys/values
        return llama_cpp.Llama(path, n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=1, **cache)
    finally:
        llama_cpp.llama_model_default_params = default
        llama_cpp.llama.llama_cpp.llama_model_default_params = default


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    """Per-position logits of llama.cpp on ``ids`` (float64, ``(len(ids), vocab)``)."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


@torch.no_grad()
def hf_logits(model, ids: list[int]) -> np.ndarray:
    return model(torch.tensor([ids])).logits[0].double().numpy()


@torch.no_grad()
def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy tokens of transformers with no stopping rule (the same ``n`` tokens llama.cpp is asked for)."""
    out = model(torch.tensor([ids]), use_cache=True)
    past, generated = out.past_key_values, []
    for _ in range(n):
        token = int(out.logits[0, -1].argmax())
        generated.append(token)
        out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
    return generated
