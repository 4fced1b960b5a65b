"""Mixture-of-experts models patched by fastft against plain transformers + PEFT.

Each family's tiny model (:func:`fastft.models.tiny_configs.tiny_config`, experts on transformers' eager code for
the plain side) gets the same LoRA adapters (attention and MLP projections, and the routed experts' 3-D
``gate_up_proj`` / ``down_proj`` through PEFT's ``target_parameters``, random non-zero values); one training step
of the patched copy must equal the plain one: the loss, and every trainable gradient (LoRA A and B, the expert
adapters included), and, for full fine-tuning, every gradient (expert weights and routers included).

Tolerance (``RTOL``): 2e-5 of the largest value of each tensor. fastft groups tokens by expert and multiplies by
the low-rank factors instead of PEFT's folded ``W + s * lhs @ rhs``, which reorders fp32 sums over the hidden and
intermediate widths (a few 1e-7 each); a wrong gradient (a missed scaling, a dropped adapter, a wrong expert) is
off by O(1).
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import fastft
from fastft.kernels import force_backend
from fastft.models import experts as fexperts
from fastft.models.tiny_configs import tiny_config

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RTOL = 2e-5
FAMILIES = [
    "qwen3_moe", "qwen3_5_moe_text", "mixtral", "olmoe", "granitemoe", "phimoe", "gpt_oss", "deepseek_v3",
    "glm4_moe", "qwen2_moe", "llama4_text", "deepseek_v2", "glm4_moe_lite", "nemotron_h", "minimax_m3_vl_text",
]  # fmt: skip
ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"]
MLP_TARGETS = ["gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _torch_path():
    """The kernels' torch path (the Triton kernels equal it, tests/kernels)."""
    with force_backend("torch"):
        yield


def _plain(model_type: str, seed: int = 0) -> transformers.PreTrainedModel:
    if model_type not in transformers.models.auto.configuration_auto.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    config = tiny_config(model_type)
    for part in {id(c): c for c in (config, config.get_text_config())}.values():
        part._experts_implementation = "eager"
        if hasattr(part, "router_jitter_noise"):
            part.router_jitter_noise = 0.0  # random in training mode: both sides must route alike
        if hasattr(part, "input_jitter_noise"):
            part.input_jitter_noise = 0.0
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():  # off the initialisation (zero biases, unit norms) so every term counts
            param.add_(torch.randn(param.shape, generator=gen) * 0.02)
    return model


def _inputs(model, tokens: int = 12, batch: int = 2) -> dict:
    vocab = model.get_output_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, vocab, (batch, tokens), generator=gen)
    return {"input_ids": ids, "labels": ids.clone()}


def _lora(model):
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    params = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.dim() == 3}
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=[t for t in ATTENTION_TARGETS + MLP_TARGETS if t in names],
        target_parameters=sorted(params & {"gate_up_proj", "up_proj", "down_proj"}) or None,
        init_lora_weights=False,
    )
    torch.manual_seed(1)
    return peft.get_peft_model(model, config)


def _step(model, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _assert_close(name: str, actual: torch.Tensor | None, expected: torch.Tensor | None) -> None:
    assert expected is not None and actual is not None, f"{name}: gradient missing (fastft {actual is not None})"
    scale = expected.abs().max().clamp_min(1e-8)
    err = ((actual - expected).abs().max() / scale).item()
    assert err <= RTOL, f"{name}: relative error {err:.2e} > {RTOL}"


def _compare(plain, fast, inputs) -> None:
    loss_p, grads_p = _step(plain, inputs)
    loss_f, grads_f = _step(fast, inputs)
    _assert_close("loss", loss_f, loss_p)
    assert grads_p.keys() == grads_f.keys()
    for name in grads_p:
        _assert_close(name, grads_f[name], grads_p[name])


def _experts_modules(model) -> list:
    return [m for m in model.modules() if fexperts.experts_structure(m) is not None or fexperts.is_patched(m)]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_lora_step_equals_plain_peft(model_type):
    plain = _lora(_plain(model_type))
    fast = copy.deepcopy(plain)
    fastft.patch(fast)
    report = fast.fastft_report
    assert report.experts > 0, report.summary()
    assert not [k for k, v in report.skipped.items() if v.startswith("routed experts")], report.summary()
    expert_lora = [n for n, p in fast.named_parameters() if p.requires_grad and ("gate_up_proj" in n or "experts" in n)]
    assert expert_lora, "the experts must carry LoRA adapters for this test to mean something"
    _compare(plain, fast, _inputs(plain))
    # Only the adapters train: the 3-D expert weights are frozen and get no gradient.
    for module in _experts_modules(fast.get_base_model()):
        for name in (fexperts._up_name(module), "down_proj"):
            weight = fexperts.read_weight(module, name).base
            assert not weight.requires_grad and weight.grad is None


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss", "deepseek_v3", "llama4_text"])
def test_full_finetuning_step_equals_plain(model_type):
    plain = _plain(model_type)
    fast = copy.deepcopy(plain)
    fastft.patch(fast)
    assert fast.fastft_report.experts > 0
    _compare(plain, fast, _inputs(plain))


def test_registered_in_transformers_experts_interface():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    assert ALL_EXPERTS_FUNCTIONS[fexperts.IMPLEMENTATION] is fexperts.experts_forward
    plain = _plain("qwen3_moe")
    fast = copy.deepcopy(plain)
    fastft.patch(fast)
    assert fast.config._experts_implementation == "fastft"
    inputs = _inputs(plain)
    plain.eval(), fast.eval()
    with torch.no_grad():
        expected = plain(inputs["input_ids"]).logits
        torch.testing.assert_close(fast(inputs["input_ids"]).logits, expected, rtol=RTOL, atol=RTOL)
        fast.set_experts_implementation("eager")  # the config keeps saying what runs
        assert fast.config._experts_implementation == "eager"
        torch.testing.assert_close(fast(inputs["input_ids"]).logits, expected, rtol=RTOL, atol=RTOL)


def test_experts_implementation_fastft_chosen_at_load_runs_without_patch(tmp_path):
    plain = _plain("mixtral")
    plain.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="fastft")
    assert loaded.config._experts_implementation == "fastft"
    inputs = _inputs(plain)
    _compare(plain, loaded, inputs)
    assert all(fexperts.is_patched(m) for m in _experts_modules(loaded))


def test_disable_adapter_runs_the_base_weights():
    plain = _lora(_plain("qwen3_moe"))
    fast = copy.deepcopy(plain)
    fastft.patch(fast)
    inputs = _inputs(plain)
    plain.eval(), fast.eval()
    with torch.no_grad(), plain.disable_adapter(), fast.disable_adapter():
        expected, actual = plain(**inputs).loss, fast(**inputs).loss
    _assert_close("loss without adapters", actual, expected)
    with torch.no_grad():
        assert abs(fast(**inputs).loss - actual) > 1e-4, "the adapters must change the loss"


def test_a_formula_fastft_does_not_have_stays_on_transformers_code():
    """Experts with an activation fastft's kernel does not have (ReLU^2 here): the probe rejects them and the
    block runs the implementation it ran before patching (grouped_mm here), although the config says fastft."""
    from transformers.activations import ACT2FN

    plain = _plain("qwen3_moe")
    for module in _experts_modules(plain):
        module.act_fn = ACT2FN["relu2"]
    plain.set_experts_implementation("grouped_mm")
    fast = copy.deepcopy(plain)
    fastft.patch(fast)
    assert fast.fastft_report.experts == 0
    assert fast.fastft_report.skipped["Qwen3MoeExperts"].startswith("routed experts: formula not recognised")
    _compare(plain, fast, _inputs(plain))


# ------------------------------------------------------------------------------------------------ routing


def _patched_experts(model_type: str = "qwen3_moe"):
    model = _plain(model_type)
    fastft.patch(model)
    module = next(m for m in model.modules() if fexperts.is_patched(m))
    return module


def _routing_case(module, tokens: int, index: torch.Tensor, gen: torch.Generator):
    hidden = (
        module.gate_up_proj.shape[-1] if not getattr(module, "is_transposed", False) else module.gate_up_proj.shape[1]
    )
    x = torch.randn(tokens, hidden, generator=gen, dtype=torch.float64).requires_grad_()
    w = torch.rand(index.shape, generator=gen, dtype=torch.float64).requires_grad_()
    return x, w


@pytest.mark.parametrize("case", ["top1", "all_experts", "one_token", "all_to_one", "unused_experts"])
def test_routing_edge_cases_equal_eager_in_float64(case):
    module = _patched_experts().double()
    experts = module.gate_up_proj.shape[0]
    gen = torch.Generator().manual_seed(3)
    tokens = 1 if case == "one_token" else 9
    if case == "top1":
        index = torch.randint(0, experts, (tokens, 1), generator=gen)
    elif case == "all_experts":
        index = torch.stack([torch.randperm(experts, generator=gen) for _ in range(tokens)])
    elif case == "all_to_one":
        index = torch.zeros(tokens, 2, dtype=torch.long)
        index[:, 1] = 1
    else:
        index = torch.stack([torch.randperm(2, generator=gen) for _ in range(tokens)])
    x, w = _routing_case(module, tokens, index, gen)
    eager = fexperts._eager_forward(type(module))
    expected = eager(module, x, index, w)
    actual = module(x, index, w)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    grads_e = torch.autograd.grad(expected.square().sum(), (x, w, module.gate_up_proj, module.down_proj))
    grads_a = torch.autograd.grad(actual.square().sum(), (x, w, module.gate_up_proj, module.down_proj))
    for a, e in zip(grads_a, grads_e):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_malformed_routing_gets_a_clear_error():
    module = _patched_experts()
    x = torch.randn(4, module.gate_up_proj.shape[-1])
    experts = module.gate_up_proj.shape[0]
    with pytest.raises(ValueError, match="top_k_index"):
        module(x, torch.full((4, 2), experts), torch.rand(4, 2))
    with pytest.raises(ValueError, match="top_k_weights"):
        module(x, torch.zeros(4, 2, dtype=torch.long), torch.rand(4, 3))
    with pytest.raises(ValueError, match="top_k_index"):
        module(x, torch.zeros(3, 2, dtype=torch.long), torch.rand(3, 2))


def test_patching_twice_changes_nothing():
    model = _lora(_plain("gpt_oss"))
    fastft.patch(model)
    first = model.fastft_report.summary()
    fastft.patch(model)
    assert model.fastft_report.summary() == first


def test_lora_reaches_the_experts_as_factors(monkeypatch):
    """PEFT's one-adapter parametrization is read as (base, lhs, rhs, scaling): W + s * lhs @ rhs is never formed."""
    seen = []
    original = fexperts.grouped_experts

    def spy(hidden, index, weights, gate_up, down, *rest):
        seen.append((gate_up.lhs is not None and gate_up.dense is None, down.lhs is not None and down.dense is None))
        return original(hidden, index, weights, gate_up, down, *rest)

    monkeypatch.setattr(fexperts, "grouped_experts", spy)
    model = _lora(_plain("qwen3_moe"))
    fastft.patch(model)
    seen.clear()
    _step(model, _inputs(model))
    assert seen and all(a and b for a, b in seen), seen


# ------------------------------------------------------------------------------------------------ TRL


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_trl_sft_equals_plain_per_step(model_type, tmp_path):
    """FastModel + TRL's SFTTrainer with LoRA on attention and experts (``target_parameters``) against plain
    transformers + PEFT: per-step losses within 1e-5 relative (SGD carries fp32 reorderings forward linearly;
    a wrong expert gradient moves the second step's loss by far more)."""
    from fastft import FastModel
    from tests.models.test_family_sft import SEED, STEPS, _losses, _save

    _save(model_type, tmp_path)
    lora = {
        "r": 4,
        "lora_alpha": 16,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "target_parameters": ["gate_up_proj", "down_proj"],
    }
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    tokenizer.pad_token = tokenizer.unk_token
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        plain = peft.get_peft_model(plain, peft.LoraConfig(task_type="CAUSAL_LM", **lora))
    reference = _losses(plain, tokenizer, tmp_path)

    model, fast_tokenizer = FastModel.from_pretrained(tmp_path, max_seq_length=64)
    model = FastModel.get_peft_model(model, random_state=SEED, **lora)
    assert model.fastft_report.experts > 0, model.fastft_report.summary()
    ours = _losses(model, fast_tokenizer, tmp_path)
    assert len(ours) == len(reference) == STEPS
    assert reference[-1] != reference[0]
    for step, (a, b) in enumerate(zip(ours, reference)):
        assert abs(a - b) <= 1e-5 * abs(b), f"{model_type} step {step}: fastft {a} vs plain {b}"


@pytest.mark.parametrize("model_type", ["deepseek_v3", "glm4_moe_lite"])
def test_mla_projections_run_the_fused_lora_function(model_type):
    """MLA's low-rank q and kv projections (and o) run fastft's fused LoRA Function, rotary on fastft's kernel."""
    from fastft.models.layers import FastAttention, FastProjection

    model = _lora(_plain(model_type))
    fastft.patch(model)
    _step(model, _inputs(model))
    attentions = [m for m in model.modules() if isinstance(m, FastAttention)]
    assert attentions
    for attention in attentions:
        names = [n for n in ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")]
        present = [getattr(attention, n) for n in names if isinstance(getattr(attention, n, None), torch.nn.Module)]
        assert len(present) >= 4 and all(isinstance(p, FastProjection) for p in present)


# ------------------------------------------------------------------------------------------------ QLoRA


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_qlora_keeps_experts_unquantised_and_equals_plain(model_type, tmp_path):
    """transformers + bitsandbytes 4-bit quantises the linear layers and leaves the 3-D expert stacks in the compute
    dtype (what fastft supports, and says in the README); fastft patches those experts and equals plain bnb + PEFT."""
    pytest.importorskip("bitsandbytes")
    _plain(model_type).save_pretrained(tmp_path)

    def load():
        quantization = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
        model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, quantization_config=quantization, dtype=torch.float32, experts_implementation="eager"
        )
        return _lora(model)

    plain, fast = load(), load()
    fast.load_state_dict({n: p for n, p in plain.state_dict().items() if "lora_" in n}, strict=False)
    assert any("Linear4bit" in type(m).__name__ for m in plain.modules()), "the linear layers are 4-bit"
    for module in _experts_modules(plain.get_base_model()):
        assert fexperts.read_weight(module, "gate_up_proj").base.dtype == torch.float32  # not quantised
    fastft.patch(fast)
    assert fast.fastft_report.experts > 0, fast.fastft_report.summary()
    _compare(plain, fast, _inputs(plain))


@pytest.mark.parametrize(("model_type", "coef"), [("qwen3_moe", None), ("qwen3_moe", 0.05), ("gpt_oss", 0.05)])
def test_router_aux_loss_is_unchanged(model_type, coef):
    """With ``output_router_logits`` the load-balancing loss (from transformers' own router logits) enters the loss
    and the router's gradient exactly as in plain transformers; Qwen3-MoE's default coefficient (0.001, a change
    of the loss below the head probe's tolerance) included."""
    plain = _plain(model_type)
    plain.config.output_router_logits = True
    if coef is not None:
        plain.config.router_aux_loss_coef = plain.router_aux_loss_coef = coef
    fast = copy.deepcopy(plain)
    fastft.patch(fast)
    assert fast.fastft_report.experts > 0
    inputs = _inputs(plain)
    plain.train(), fast.train()
    aux_p, aux_f = plain(**inputs).aux_loss, fast(**inputs).aux_loss
    _assert_close("aux_loss", aux_f.detach(), aux_p.detach())
    _compare(plain, fast, inputs)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_bf16_experts_are_no_worse_than_transformers_against_float64(model_type):
    """bf16 experts: fastft's output and every gradient (input, router weights, expert weights) are as close to the
    float64 formula as transformers' own eager experts in bf16 (the numerical contract for low precision); the
    factor 1.5 leaves room for a different but equally good rounding order."""
    module = _patched_experts(model_type)
    experts = fexperts.read_weight(module, fexperts._up_name(module)).base.shape[0]
    hidden = module.down_proj.shape[-1] if getattr(module, "is_transposed", False) else module.down_proj.shape[1]
    gen = torch.Generator().manual_seed(11)
    index = torch.stack([torch.randperm(experts, generator=gen)[:2] for _ in range(48)])
    x64 = torch.randn(48, hidden, generator=gen, dtype=torch.float64)
    w64 = torch.rand(index.shape, generator=gen, dtype=torch.float64)
    eager = fexperts._eager_forward(type(module))

    def run(dtype, forward):
        m = copy.deepcopy(module).to(dtype)
        x, w = x64.to(dtype).requires_grad_(), w64.to(dtype).requires_grad_()
        y = forward(m, x, index, w)
        params = [p for p in m.parameters()]
        grads = torch.autograd.grad(y.float().square().sum(), [x, w, *params])
        return [y.detach().double(), *(g.double() for g in grads)]

    exact = run(torch.float64, eager)
    plain = run(torch.bfloat16, eager)
    ours = run(torch.bfloat16, lambda m, x, i, w: m(x, i, w))
    for k, (e, p, o) in enumerate(zip(exact, plain, ours)):
        scale = e.abs().max().clamp_min(1e-12)
        err_plain, err_ours = ((p - e).abs().max() / scale).item(), ((o - e).abs().max() / scale).item()
        assert err_ours <= 1.5 * err_plain + 1e-3, (k, err_ours, err_plain)
