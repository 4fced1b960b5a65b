"""Decoder-layer checkpointing: recomputation happens, numbers do not change, memory does.

Gradients are compared with ``torch.equal``, not a tolerance: checkpointing here is non-reentrant, so backward
runs the very nodes of the uncheckpointed graph on recomputed saved tensors, and the recomputation repeats the
same CPU kernels on the same fp32 values in the same order (same RNG and autocast state). Any difference at all
would mean a different input, mask or dtype reached the recomputation.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from fastft.models import checkpointing
from fastft.models.checkpointing import normalize_checkpointing_mode, offloaded_checkpoint, set_checkpointing
from fastft.utils.memory import SavedTensorMeter

MODES = ("none", "standard", "offload")
BATCH, SEQ, HIDDEN, LAYERS, VOCAB = 2, 16, 64, 2, 128
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# transformers 5.24 deprecates the gradient_checkpointing_* names that Trainer, TRL, PEFT and users still call.
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.* is deprecated:FutureWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]


def _tiny_llama(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        **overrides,
    )
    return LlamaForCausalLM(config).train()


def _lora_llama(lora_dropout: float = 0.0, **overrides):
    config = LoraConfig(r=4, target_modules=LORA_TARGETS, lora_dropout=lora_dropout)
    model = get_peft_model(_tiny_llama(**overrides), config)
    # PEFT starts lora_B at zero, which would make every lora_A gradient zero and the comparison vacuous.
    generator = torch.Generator().manual_seed(1)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0.0, 0.1, generator=generator)
    return model.train()


def _layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]


def _count_mlp_runs(model: torch.nn.Module) -> list[int]:
    """A counter of how often any layer's MLP starts running: once per layer forward, once more per recompute.

    A pre-hook, because the recomputation stops early once the last saved tensor is rebuilt (inside the MLP).
    """
    runs = [0]
    for layer in _layers(model):
        layer.mlp.register_forward_pre_hook(lambda *_: runs.__setitem__(0, runs[0] + 1))
    return runs


def _input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))


def _step(model: torch.nn.Module, seed: int = 3) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward and backward on fixed tokens: the loss and every trainable parameter's gradient."""
    ids = _input_ids()
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def _assert_same_step(actual, expected) -> None:
    (loss, grads), (loss_expected, grads_expected) = actual, expected
    assert torch.equal(loss, loss_expected), (loss.item(), loss_expected.item())
    assert grads.keys() == grads_expected.keys() and grads
    for name, grad in grads.items():
        assert torch.equal(grad, grads_expected[name]), f"{name}: max diff {(grad - grads_expected[name]).abs().max()}"
        assert grad.abs().max() > 0, f"{name}: zero gradient makes the comparison vacuous"


def test_normalize_checkpointing_mode():
    assert [normalize_checkpointing_mode(v) for v in (False, "none", True, "standard", "unsloth", "offload")] == [
        "none",
        "none",
        "standard",
        "standard",
        "offload",
        "offload",
    ]
    for bad in ("Offload", "full", None, 0, 1, ["offload"]):
        with pytest.raises(ValueError, match=r"use_gradient_checkpointing=.*'unsloth'.*'offload'"):
            normalize_checkpointing_mode(bad)


@pytest.mark.parametrize("mode", MODES)
def test_each_layer_recomputed_once_in_backward(mode):
    model = _lora_llama()
    set_checkpointing(model, mode)
    runs = _count_mlp_runs(model)
    ids = _input_ids()
    loss = model(input_ids=ids, labels=ids).loss
    assert runs[0] == LAYERS
    loss.backward()
    # Exactly one recomputation per layer: a second, nested checkpoint would recompute the inner one again.
    assert runs[0] == (LAYERS if mode == "none" else 2 * LAYERS)


@pytest.mark.parametrize("mode", ["standard", "offload"])
@pytest.mark.parametrize("input_require_grads", [True, False])
def test_lora_loss_and_gradients_equal_no_checkpointing(mode, input_require_grads):
    expected = _step(_lora_llama())
    model = _lora_llama()
    set_checkpointing(model, mode)
    # transformers' enable switch hooks the embeddings so their output requires grad (reentrant checkpointing needs
    # it). Non-reentrant checkpointing does not: without the hook the frozen embedding's output needs no grad and
    # the LoRA gradients inside layer 0 must still arrive.
    if not input_require_grads:
        model.disable_input_require_grads()
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda module, args, out: seen.append(out.requires_grad))
    _assert_same_step(_step(model), expected)
    assert seen == [input_require_grads]


@pytest.mark.parametrize("mode", ["standard", "offload"])
@pytest.mark.parametrize("frozen_embeddings", [True, False])
def test_full_finetuning_gradients_equal_no_checkpointing(mode, frozen_embeddings):
    reference, model = _tiny_llama(), _tiny_llama()
    for m in (reference, model):
        m.get_input_embeddings().weight.requires_grad_(not frozen_embeddings)
    expected = _step(reference)
    set_checkpointing(model, mode)
    model.disable_input_require_grads()
    _assert_same_step(_step(model), expected)


@pytest.mark.parametrize("mode", ["standard", "offload"])
def test_dropout_masks_repeat_in_recomputation(mode):
    dropout = {"attention_dropout": 0.2, "lora_dropout": 0.2}
    expected = _step(_lora_llama(**dropout), seed=5)
    # The dropout is live: another seed gives another loss, so equal gradients below need the RNG state restored.
    assert not torch.equal(_step(_lora_llama(**dropout), seed=6)[0], expected[0])
    model = _lora_llama(**dropout)
    set_checkpointing(model, mode)
    _assert_same_step(_step(model, seed=5), expected)


def test_offload_under_autocast_gradients_equal():
    def step(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _step(model)

    expected = step(_lora_llama())
    model = _lora_llama()
    set_checkpointing(model, "offload")
    _assert_same_step(step(model), expected)


def test_offload_supports_autograd_grad():
    expected = _step(_lora_llama())[1]
    model = _lora_llama()
    set_checkpointing(model, "offload")
    names, params = zip(*[(name, p) for name, p in model.named_parameters() if p.requires_grad], strict=True)
    ids = _input_ids()
    torch.manual_seed(3)
    grads = torch.autograd.grad(model(input_ids=ids, labels=ids).loss, params)
    for name, grad in zip(names, grads, strict=True):
        assert torch.equal(grad, expected[name]), name


def test_checkpointed_layer_saves_only_its_input():
    model = _lora_llama()
    layer = _layers(model)[0]
    hidden = torch.randn(BATCH, SEQ, HIDDEN, requires_grad=True)
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    cos_sin = model.get_base_model().model.rotary_emb(hidden, positions)
    saved = {}
    for mode in MODES:
        set_checkpointing(model, mode)
        with SavedTensorMeter() as meter:
            layer(hidden, attention_mask=None, position_embeddings=cos_sin)
        saved[mode] = meter.total_bytes
    input_bytes = BATCH * SEQ * HIDDEN * 4
    # Checkpointed: the layer input and nothing else (here on the CPU: the input itself, no copy; on a GPU the
    # offload copy lives in host memory). Unchekpointed: norms, projections, attention, MLP intermediates and the
    # frozen weights the LoRA path needs, more than ten inputs' worth even at this tiny size.
    assert saved["standard"] == saved["offload"] == input_bytes
    assert saved["none"] > 10 * input_bytes


def test_hf_switches_after_set_checkpointing():
    expected = _step(_lora_llama())
    model = _lora_llama()
    set_checkpointing(model, "offload")
    assert model.is_gradient_checkpointing and model.config.use_cache is False
    # Trainer / TRL enable checkpointing their own way later; offload mode stays.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert all(layer._gradient_checkpointing_func is offloaded_checkpoint for layer in _layers(model))
    runs = _count_mlp_runs(model)
    _assert_same_step(_step(model), expected)
    assert runs[0] == 2 * LAYERS
    # "standard" uses transformers' function (what it set last), not the offloading one.
    set_checkpointing(model, "standard")
    for layer in _layers(model):
        assert layer._gradient_checkpointing_func.func is torch.utils.checkpoint.checkpoint
        assert layer._gradient_checkpointing_func.keywords == {"use_reentrant": False}
    # Disabling still disables, in any mode.
    set_checkpointing(model, "offload")
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing
    model.zero_grad()
    runs[0] = 0
    _assert_same_step(_step(model), expected)
    assert runs[0] == LAYERS
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    model.zero_grad()
    runs[0] = 0
    _assert_same_step(_step(model), expected)
    assert runs[0] == 2 * LAYERS


def test_set_checkpointing_keeps_the_model_as_it_was():
    model, other = _lora_llama(), _lora_llama()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    text = repr(model)
    for mode in ("offload", "offload", "standard", "offload"):
        set_checkpointing(model, mode)
    set_checkpointing(other, "unsloth")
    layers = _layers(model)
    assert len(layers) == LAYERS
    for layer, other_layer in zip(layers, _layers(other), strict=True):
        assert isinstance(layer, LlamaDecoderLayer) and type(layer).__name__ == "LlamaDecoderLayer"
        # One subclass per library class, made once: no subclass of a subclass after repeated calls.
        assert type(layer) is type(other_layer) and type(layer).__bases__[1] is LlamaDecoderLayer
        assert layer._gradient_checkpointing_func is offloaded_checkpoint
    assert repr(model) == text
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[name], before[name]) for name in before)
    set_checkpointing(model, False)
    assert not model.is_gradient_checkpointing
    runs = _count_mlp_runs(model)
    _step(model)
    assert runs[0] == LAYERS


def test_forward_assigned_to_the_library_class_keeps_checkpointing(monkeypatch):
    expected = _step(_lora_llama())
    ours, plain = _lora_llama(), _lora_llama()
    set_checkpointing(ours, "offload")
    plain.gradient_checkpointing_enable()
    library_forward = LlamaDecoderLayer.forward
    runs = [0]

    def patched_forward(self, *args, **kwargs):
        # What a patching library does: a new forward on the class. It calls the library's (whose checkpoint
        # wrapper, if any, sees it is not the outermost forward and only runs the layer).
        runs[0] += 1
        return library_forward(self, *args, **kwargs)

    monkeypatch.setattr(LlamaDecoderLayer, "forward", patched_forward)
    _assert_same_step(_step(ours), expected)
    # The patched forward ran inside our checkpoint: once in forward, once in the recomputation, per layer.
    assert runs[0] == 2 * LAYERS
    runs[0] = 0
    _assert_same_step(_step(plain), expected)
    # transformers 5.24 checkpoints by wrapping each class's forward, so the patch silently dropped it (no
    # recomputation); older versions checkpoint in GradientCheckpointingLayer.__call__ and still recompute.
    assert runs[0] == (2 * LAYERS if "__call__" in vars(GradientCheckpointingLayer) else LAYERS)


def test_set_checkpointing_needs_decoder_layers():
    set_checkpointing(torch.nn.Linear(2, 2), "none")
    with pytest.raises(ValueError, match="found no transformers GradientCheckpointingLayer in Linear"):
        set_checkpointing(torch.nn.Linear(2, 2), "offload")


class _Block(torch.nn.Module):
    """Dropout, a matmul and a kwarg tensor; returns a tuple, like older transformers layers."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)
        self.calls = 0

    def forward(self, x: torch.Tensor, *, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        hidden = torch.nn.functional.dropout(torch.tanh(self.linear(x)), p=0.3) * scale
        return hidden, hidden.sum(-1)


def _block_step(block: _Block, x: torch.Tensor, scale: torch.Tensor, wrap) -> list[torch.Tensor]:
    torch.manual_seed(4)
    hidden, total = wrap(block, x, scale=scale)
    (hidden.square().sum() + total.sum()).backward()
    return [block.linear.weight.grad, block.linear.bias.grad, scale.grad] + ([x.grad] if x.requires_grad else [])


@pytest.mark.parametrize("input_requires_grad", [False, True])
def test_offloaded_checkpoint_matches_plain_call(input_requires_grad):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    expected_block, block = _Block(), _Block()
    block.load_state_dict(expected_block.state_dict())
    expected = _block_step(
        expected_block,
        x.clone().requires_grad_(input_requires_grad),
        torch.ones(8, requires_grad=True),
        _Block.__call__,
    )
    # The kwarg tensor is not offloaded (kept by reference) and still gets its gradient.
    actual = _block_step(
        block, x.clone().requires_grad_(input_requires_grad), torch.ones(8, requires_grad=True), offloaded_checkpoint
    )
    assert block.calls == 2
    for got, want in zip(actual, expected, strict=True):
        assert torch.equal(got, want)
    with torch.no_grad():
        offloaded_checkpoint(block, x, scale=torch.ones(8))
    assert block.calls == 3


def test_offloaded_checkpoint_refuses_reentrant():
    with pytest.raises(ValueError, match=r"use_reentrant=True\) is not supported"):
        offloaded_checkpoint(torch.sin, torch.randn(3, requires_grad=True), use_reentrant=True)


def _saved_data_pointers(function, *args) -> set[int]:
    pointers = set()

    def pack(tensor):
        pointers.add(tensor.data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function(*args)
    return pointers


@pytest.mark.parametrize("device_input", [False, True])
def test_offloaded_checkpoint_host_copy(monkeypatch, device_input):
    """A CPU input is kept as is; a device input (the copy branch, forced here) is copied and then let go."""
    if device_input:
        monkeypatch.setattr(checkpointing, "_on_host", lambda tensor: False)
    linear = torch.nn.Linear(8, 8)
    leaf = torch.randn(4, 8, requires_grad=True)
    x = leaf * 2
    x_pointer, outputs = x.data_ptr(), []
    pointers = _saved_data_pointers(lambda: outputs.append(offloaded_checkpoint(lambda h: linear(h).relu(), x)))
    assert (x_pointer in pointers) is not device_input
    if device_input:
        # Nothing holds the device tensor any more: its memory goes back as soon as the caller drops it.
        alive = weakref.ref(x)
        del x
        gc.collect()
        assert alive() is None
    outputs[0].sum().backward()
    grads = [leaf.grad.clone(), linear.weight.grad.clone()]
    leaf.grad, linear.weight.grad = None, None
    linear(leaf * 2).relu().sum().backward()
    assert torch.equal(grads[0], leaf.grad) and torch.equal(grads[1], linear.weight.grad)
