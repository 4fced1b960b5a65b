"""The embedded default of ``fastft bench``: a model, a tokenizer and instruction data that need no network.

The files in ``fastft/bench/assets/`` are written by ``scripts/make_bench_assets.py`` (deterministic: running
it again reproduces them byte for byte) and shipped as package data, so they are read through
:mod:`importlib.resources` and work from an installed wheel as from a source checkout:

- ``model_config.json``: Llama-3-8B's proportions scaled down. Hidden 512 with the 3.5x SwiGLU MLP (1792), 8 query
  and 2 key-value heads (Llama-3's 4:1 grouping) of head_dim 64, 4 layers, untied embeddings, Llama-3.1's RoPE
  (theta 500000, ``llama3`` scaling 8x from 8192) and norm eps; vocabulary 2048 (the tokenizer's). 15.7M
  parameters (2.1M of them in the embedding and the head);
- ``tokenizer.json`` + ``tokenizer_config.json``: a byte-level BPE with Llama-3's pre-tokenizer and special tokens
  (``<|begin_of_text|>`` as bos, ``<|eot_id|>`` as eos, ``<|pad|>`` as pad, right padding) and a Llama-3-style
  chat template; ``AutoTokenizer.from_pretrained`` also reads the folder;
- ``instructions.jsonl``: 500 templated instruction/response pairs (arithmetic with worked answers, unit
  conversions, sorting, letters, categories, facts about made-up towns and people, rewriting), a few dozen
  tokens each. Their patterns repeat, so fine-tuning visibly lowers the loss within a few dozen steps.

The model's weights are random (:func:`default_model`, one seed): the benchmark measures speed and memory, and the
loss curve shows that training works, not what the model knows.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import TYPE_CHECKING

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

ASSET_FILES = ("model_config.json", "tokenizer.json", "tokenizer_config.json", "instructions.jsonl")


def assets_dir() -> Traversable:
    """The folder of the shipped files (a ``Traversable``: a ``pathlib.Path`` for an unzipped install)."""
    return resources.files("fastft.bench") / "assets"


def _read(name: str) -> str:
    path = assets_dir() / name
    if not path.is_file():
        raise FileNotFoundError(
            f"fastft's benchmark asset {name!r} is missing (looked for {path}): reinstall fastft "
            f"(`pip install --force-reinstall fastft`), or in a source checkout regenerate the assets with "
            f"`python scripts/make_bench_assets.py`"
        )
    return path.read_text(encoding="utf-8")


def default_config() -> LlamaConfig:
    """The embedded model's :class:`~transformers.LlamaConfig` (a fresh object on every call: change it freely).

    Llama-3-8B scaled down: see the module docstring for the sizes. ``bos/eos/pad_token_id`` are the default
    tokenizer's; ``initializer_range`` (0.02) is the standard deviation :func:`default_model` draws weights with.
    """
    return LlamaConfig.from_dict(json.loads(_read("model_config.json")))


def default_tokenizer() -> PreTrainedTokenizerFast:
    """The embedded byte-level BPE tokenizer, with bos/eos/pad set, right padding and a chat template.

    ``tokenizer(text)`` prepends ``<|begin_of_text|>`` as Llama-3's does; ``apply_chat_template`` renders
    Llama-3-Instruct's turn layout (``<|start_header_id|>user<|end_header_id|>\\n\\n...<|eot_id|>``). Any text
    encodes (byte-level: no unknown token) and decodes back exactly.
    """
    from tokenizers import Tokenizer

    settings = json.loads(_read("tokenizer_config.json"))
    settings.pop("tokenizer_class")
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_read("tokenizer.json")), **settings)


def default_examples() -> list[dict[str, str]]:
    """The embedded instruction data: 500 dicts with ``"prompt"``, ``"response"`` and ``"task"`` (its kind)."""
    return [json.loads(line) for line in _read("instructions.jsonl").splitlines() if line]


def default_model(
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    *,
    config: LlamaConfig | None = None,
    device: torch.device | str | None = None,
) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` of :func:`default_config` (or ``config``) with random weights drawn from ``seed``.

    The weights are drawn by fastft, not by transformers' initialisation, so one seed gives the same model on any
    transformers version and any device: every projection and embedding ``normal(0, initializer_range)``, every
    norm weight 1, every bias 0 (as Llama's own initialisation), in parameter order from one CPU generator, then cast to
    ``dtype`` and moved to ``device``. The global RNG is left as it was. SDPA attention, ``train()`` mode.
    """
    from transformers import AutoModelForCausalLM

    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype such as torch.bfloat16, got {dtype!r}")
    config = default_config() if config is None else config
    with torch.random.fork_rng(devices=[]):  # transformers' own initialisation draws from the global RNG
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float()
    generator = torch.Generator().manual_seed(seed)
    std = config.initializer_range
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):  # input_layernorm, post_attention_layernorm, the final norm
                param.fill_(1.0)
            elif param.dim() == 1:  # biases, where a config asks for them
                param.zero_()
            else:  # projections, embedding, lm_head
                param.normal_(0.0, std, generator=generator)
    return model.to(device=device, dtype=dtype).train()
