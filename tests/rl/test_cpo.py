"""fastft.rl.CPOTrainer against trl.experimental.cpo.CPOTrainer: same loss, gradients and metrics for every loss.

Tolerances are those of tests/rl/_preference.py (fp32, the two differ only in the head's summation order).
"""

from __future__ import annotations

import warnings

import pytest

from fastft.kernels._dispatch import force_backend
from tests.rl import _preference as pref

pytest.importorskip("trl")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl.experimental.cpo import CPOTrainer as TRLCPOTrainer

from fastft.rl.cpo import CPOConfig, CPOTrainer

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

# Every loss TRL 1.16's CPOConfig accepts ("alphapo" is simpo with cpo_alpha=0 and the AlphaPO reward shaping when
# alpha != 0), label smoothing, the AlphaPO shaping on another loss, and no behaviour-cloning term.
SETTINGS = {
    "sigmoid": {"loss_type": "sigmoid"},
    "sigmoid-smoothed": {"loss_type": "sigmoid", "label_smoothing": 0.1},
    # TRL computes AlphaPO's p^-alpha as exp(logp)^-alpha: a summed log-prob below -103 underflows exp to 0 and
    # the reward to -inf, so the shaping is usable only with the averaged log-probs of ipo and simpo.
    "ipo-alpha": {"loss_type": "ipo", "alpha": 0.3},
    "sigmoid-no-nll": {"loss_type": "sigmoid", "cpo_alpha": 0.0},
    "hinge": {"loss_type": "hinge"},
    "ipo": {"loss_type": "ipo"},
    "simpo": {"loss_type": "simpo", "simpo_gamma": 0.7},
    "alphapo": {"loss_type": "alphapo", "alpha": 0.2},
}


def _args(tmp_path, **overrides) -> CPOConfig:
    return CPOConfig(**pref.common_args(tmp_path, beta=0.3, **overrides))


@pytest.mark.parametrize("name", list(SETTINGS))
def test_every_loss_type_equals_trl(tmp_path, name):
    trl_trainer, fast_trainer = pref.twins(TRLCPOTrainer, CPOTrainer, _args(tmp_path, **SETTINGS[name]))
    batch = pref.first_batch(trl_trainer)
    with force_backend("torch"):
        pref.assert_same_step(trl_trainer, fast_trainer, batch)


@pytest.mark.parametrize("use_peft", [False, True], ids=["full", "lora"])
def test_triton_head_equals_trl(tmp_path, use_peft):
    trl_trainer, fast_trainer = pref.twins(TRLCPOTrainer, CPOTrainer, _args(tmp_path), use_peft=use_peft)
    with force_backend("triton"):
        pref.assert_same_step(trl_trainer, fast_trainer, pref.first_batch(trl_trainer))


def test_training_steps_equal_trl(tmp_path):
    trl_trainer, fast_trainer = pref.twins(TRLCPOTrainer, CPOTrainer, _args(tmp_path, loss_type="simpo"))
    with force_backend("torch"):
        pref.assert_same_history(trl_trainer, fast_trainer, steps=3)


def test_encoder_decoder_is_refused(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    from tests.rl.tiny import tokenizer

    tok = tokenizer()
    config = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                      decoder_start_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    with pytest.raises(NotImplementedError, match="encoder-decoder"):
        CPOTrainer(model=T5ForConditionalGeneration(config), args=_args(tmp_path, max_completion_length=32),
                   train_dataset=pref.preference_pairs(2), processing_class=tok)  # fmt: skip
