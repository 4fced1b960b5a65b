"""Every exportable family, tiny and LoRA-merged, read back by llama.cpp and by transformers' GGUF loader.

For each family of ``fastft/models/families.py`` a tiny model (2 layers, Gemma-3: 6, so that one global
layer follows five sliding ones) gets random non-zero LoRA adapters on every projection and is exported
as f32 and f16 in one call. llama.cpp (llama-cpp-python, f32 key/value cache) then loads each file and

- tokenizes several texts as the Hugging Face tokenizer does (byte-level BPE for Llama/Qwen, SentencePiece
  as Llama-2 for Mistral, as Gemma for the Gemmas, as Phi-3 for Phi-3);
- computes per-token logits equal to the merged transformers model's: f32 files within 2e-5 of the logits'
  scale (fp32 summation order), Gemma within 2e-3 (ggml's GELU reads an f16 lookup table); f16 files
  within 2e-2 (weights and llama.cpp's activations rounded to f16, 11 bits);
- generates the same 8 greedy tokens from the f16 file.

transformers' own GGUF loader reads the f16 file back to the merged weights rounded to f16 (norms are f32
in the file; Gemma's ``1 + w`` is undone by the loader to fp32 rounding).
"""

from __future__ import annotations

import numpy as np
import peft
import pytest
import torch

from fastft.export import save_pretrained_gguf
from fastft.export.merge import merged_state_dict
from tests.export.client import hf_greedy, hf_logits, llama_greedy, llama_logits, load
from tests.export.tokenizers_local import byte_level, sentencepiece
from tests.models.tiny import lora_config, tiny_model

TOKENIZER = {"mistral": "llama", "gemma": "gemma", "gemma2": "gemma", "gemma3_text": "gemma", "phi3": "phi3"}
EXTRA = {
    "gemma": {"tie_word_embeddings": True},
    # a score scale llama.cpp does not use (it uses head_dim = 16): folded into the query projection
    "gemma2": {"tie_word_embeddings": True, "query_pre_attn_scalar": 32},
    # the default query_pre_attn_scalar (256) is folded into the query norm
    "gemma3_text": {"tie_word_embeddings": True, "num_hidden_layers": 6},
}
TEXTS = [
    "The quick brown fox jumps over the lazy dog, 12345 times!",
    "What is 17 + 25? Answer: 42.\nNext line:  two spaces.",
    "Rewrite this sentence in the past tense: I walk to school.",
]
# transformers' GGUF loader has no Gemma (1) architecture; Gemma-2's folded query scale is not undone by it; for
# Qwen-3 it does not read attention.key_length and builds head_dim 128 (the default) instead of the file's 16.
READBACK = ["llama", "mistral", "qwen2", "gemma3_text", "phi3"]


def _model_and_tokenizer(family: str):
    tokenizer = sentencepiece(TOKENIZER[family]) if family in TOKENIZER else byte_level()
    config = {
        "vocab_size": len(tokenizer) + 5,  # padded embedding rows become unused [PAD] tokens
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id or 0,
        **EXTRA.get(family, {}),
    }
    model = peft.get_peft_model(tiny_model(family, **config), lora_config(family))
    return model, tokenizer


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"])
def test_family_round_trip(family, tmp_path):
    model, tokenizer = _model_and_tokenizer(family)
    paths = save_pretrained_gguf(model, tokenizer, tmp_path, ["f32", "f16"], progress=False)
    assert [p.rsplit(".", 2)[-2] for p in paths[:2]] == ["F32", "F16"] and paths[2].endswith("Modelfile")

    f32_bound = 2e-3 if family.startswith("gemma") else 2e-5
    for path, bound in ((paths[0], f32_bound), (paths[1], 2e-2)):
        llm = load(path)
        for text in TEXTS:
            ids = tokenizer(text)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids, (family, text)
            ref = hf_logits(model, ids)
            err = np.abs(llama_logits(llm, ids) - ref).max()
            assert err <= bound * np.abs(ref).max(), f"{family} {path}: logits differ by {err:.3e}"
        if path == paths[1]:
            ids = tokenizer(TEXTS[0])["input_ids"]
            assert llama_greedy(llm, ids, 8) == hf_greedy(model, ids, 8), family
        llm.close()

    if family in READBACK:
        import transformers

        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=paths[1].rsplit("/", 1)[-1])
        merged = merged_state_dict(model)
        got = back.state_dict()
        for name, tensor in merged.items():
            if name == "lm_head.weight" and model.config.tie_word_embeddings:
                continue
            expected = tensor.float() if tensor.dim() == 1 else tensor.half().float()
            if family == "gemma3_text" and name.endswith(("q_norm.weight",)):
                continue  # holds the folded score scale (256 ** -0.5 -> 16 ** -0.5), which the loader keeps
            torch.testing.assert_close(got[name], expected, rtol=0, atol=1e-6, msg=f"{family}: {name}")


# Families the coverage run patches beyond families.py, built from fastft's tiny configs: OLMo-2 (post-norms,
# q/k norms over the whole width), Granite (embedding, attention, residual and logit multipliers, set away from 1
# so each one counts), SmolLM-3 (no rope on every 4th layer: 4 layers).
COVERAGE = {
    "olmo2": {},
    "granite": {
        "attention_multiplier": 0.2,
        "embedding_multiplier": 3.0,
        "residual_multiplier": 0.5,
        "logits_scaling": 2.0,
    },
    "smollm3": {
        "num_hidden_layers": 4,
        "no_rope_layers": [1, 1, 1, 0],
        "layer_types": ["full_attention"] * 4,
        "use_sliding_window": False,
    },
}


@pytest.mark.parametrize("family", sorted(COVERAGE))
def test_coverage_family_round_trip(family, tmp_path):
    import transformers

    from fastft.models.tiny_configs import tiny_config

    tokenizer = byte_level()
    config = tiny_config(family)
    for key, value in {
        "vocab_size": len(tokenizer) + 5,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **COVERAGE[family],
    }.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    model = peft.get_peft_model(model, lora_config("llama"))
    paths = save_pretrained_gguf(model, tokenizer, tmp_path, ["f32", "f16"], progress=False)
    for path, bound in ((paths[0], 2e-5), (paths[1], 2e-2)):
        llm = load(path)
        for text in TEXTS:
            ids = tokenizer(text)["input_ids"]
            ref = hf_logits(model, ids)
            err = np.abs(llama_logits(llm, ids) - ref).max()
            assert err <= bound * np.abs(ref).max(), f"{family} {path}: logits differ by {err:.3e}"
        ids = tokenizer(TEXTS[0])["input_ids"]
        assert llama_greedy(llm, ids, 8) == hf_greedy(model, ids, 8), family
        llm.close()
