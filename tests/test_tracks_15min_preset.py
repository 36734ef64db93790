"""The 15min preset (records/TRACKS.md section 1.3): the record's shape, size and recipe, and a micro-width run with
every flag that runs on CPU (fp8_head is CUDA-only: its bf16 reference path computes the same loss)."""
import math

import pytest

import train_gpt
from conftest import micro_preset_run


def test_15min_preset_states_the_record_and_its_flags():
    """Its full-scale model has the public 316,935,848 parameters, by the formula of TRACKS section 3 written out:
    2 V d + L (4 d^2 + 3 d f + 12 H) + 8 (32 H + d^2) + 2 L + L/2 + L H (V 50,304, d 1024, L 16, H 8, f 2816)."""
    hp = train_gpt.parse_args(["--preset", "15min"])
    assert (hp.n_layer, hp.n_embd, hp.n_head, hp.mlp, hp.mlp_hidden, hp.logit_softcap, hp.num_epochs) == \
        (16, 1024, 8, "swiglu", 2816, 15.0, 15)
    assert hp.device_batch_size * hp.seq_len * 8 * 2 == hp.batch_tokens == 524288  # 16 x 2 accumulation on 8 GPUs
    assert (hp.muon_lr, hp.embed_lr, hp.head_lr, hp.scalar_lr) == pytest.approx((0.04 * 0.8, 0.15 * 0.8, 0.001 * 0.8,
                                                                                 0.25 * 0.8))
    assert (hp.rope_pairs, hp.key_offset, hp.resid_lambda_init, hp.dropout_mlp, hp.xsa, hp.xsa_eps) == \
        (32, True, 1.1, False, "learned", 1e-4)
    assert (hp.recurrence, hp.recurrence_start_frac, hp.mtp_offsets, hp.fp8_head, hp.train_vocab, hp.eval_vocab) == \
        (2, 0.7, "1,0.5,0.25", True, 0, 50257)
    assert hp.ema_decay == pytest.approx(0.15 ** (10 / 190)) and (hp.ckpt_avg_epochs, hp.lr_epoch_cosine) == (4, 4)
    assert hp.muon_eq_r is False and hp.muon_wd_scaled is True  # 15m:919 scales lr (and so the decay) by the shape
    n_params = sum(p.numel() for p in train_gpt.build_model_meta(hp).parameters())
    V, d, L, H, f = 50304, 1024, 16, 8, 2816
    assert n_params == 2 * V * d + L * (4 * d * d + 3 * d * f + 12 * H) + 8 * (32 * H + d * d) + 2 * L + L // 2 + L * H
    assert n_params == 316_935_848
    lines = train_gpt.preset_record_lines(hp, n_params)
    assert lines[0] == "preset 15min: reproduces the 15min record 3.307 (qlabs-eng/slowrun tiny/train.py@fd342f0)"
    assert "316,935,848 vs 316,935,848 parameters" in lines[1] and "recurrence on" in lines[1]


def test_15min_preset_plans_8_cards_and_refuses_fp8_on_cpu():
    """The record's batch fits the plan on 8 x 80 GB as 16 x 2 accumulation; a CPU run with fp8_head is one line."""
    hp = train_gpt.parse_args(["--preset", "15min", "--plan_only", "--plan_world_size", "8", "--memory_budget_gb",
                               "79.1"])
    train_gpt.check_hyperparameters(hp, 8)
    with pytest.raises(train_gpt.ConfigError, match="fp8_head needs a CUDA device"):
        train_gpt.check_hyperparameters(train_gpt.parse_args(["--preset", "15min", "--device", "cpu"]), 1)


def test_15min_preset_trains_at_micro_width_with_every_cpu_flag_on(micro_data, tmp_path):
    """train_gpt.main with --preset 15min, only the shapes shrunk (and fp8_head off: CUDA only; the public stepping's
    unit a whole step, as the record's 256 windows are, here 12): 4 steps crossing the
    recurrence switch (0.7 x 4 = step 2.8), the multi-offset loss, weight-decay knots, EMA and weight-average
    candidates; the log names the record; the train loss is finite and falls."""
    log, losses = micro_preset_run("15min", micro_data, tmp_path, max_steps=4, vocab_size=320, eval_vocab=256,
                                   mlp_hidden=64, window_short=9, rope_pairs=4, fp8_head=False, val_tokens=256,
                                   val_public_windows=4, device_batch_size=2, val_batch_size=4,
                                   public_steps=12)
    assert "preset 15min: reproduces the 15min record 3.307 (qlabs-eng/slowrun tiny/train.py@fd342f0)" in log
    assert "multi-offset" in log
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
