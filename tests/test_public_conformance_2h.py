"""The 2h preset against the public 2-hour record it claims to be (issue 23): qlabs-eng/slowrun two_hour/train.py at
fd342f0, read from ../shared/reference/slowrun/fd342f0/two_hour/train.py and executed at test time
(tests/public_scripts.py; skipped where that folder is absent). Nothing of it is copied here.

The 2h record is the 1h model (tests/test_public_conformance_1h.py checks it and lends this file its helpers and
micro shape: 8 layers x 64, 4 heads, 64 tokens, vocabulary 200 padded to 256) with per-epoch windows and YaRN: at each
window stage, float32 on the CPU, the same weights in both models:
  - the stage's windows, YaRN RoPE tables and softmax scale (public Yarn.apply on each growth of the long window,
    ours set_window_schedule_stage): as the preset stores them (rope_tables "bf16_values"), the public Yarn's buffers
    bitwise (float32 tensors of bf16 values); on our float32 path (rope_tables ""), its frequencies to float32
    precision and, rounded to bf16, its buffers bitwise;
  - logits and loss in eval mode, the training objective (MTP block included) and every parameter's gradient, the
    looped layers on in the last stage (both switch on at epoch 14);
  - the public's bf16 cast of q, k, v before attention (its FlashAttention dtype, taken on the CPU too; ours the same
    with attn_qkv_bf16, the preset's setting): with the cast off on both sides the models are equal to float32
    precision; with it on both (as both run) ours differ from the public by less than the public itself moves under
    one-ulp float32 noise in its weights, 1/40 of what the cast does on average; the cast's effect is measured;
  - every optimizer group's settings and two steps (never checked before this file): Muon bitwise with the preset's
    muon_bf16, to float32 precision without it;
  - the parameter count at full size on the meta device (1,443,722,775 both).
Schedules over the run (which epoch each stage starts) are tests/test_public_conformance_schedules.py's.

Patches, each where it is used: those of the 1h file (one-rank collectives, float32 Polar Express), the public's
bf16-valued RoPE tables given to our model on its float32 path (rope_tables "", the test without the cast) and, in
the tests that say so, WITHOUT_QKV_CAST (the one patch of the public's
attention: its module-level name `torch` seen with bfloat16 = float32, so that its `fa_dtype` test keeps float32).
"""
import types

import pytest
import torch

import train_gpt
from public_scripts import ONE_RANK_DIST, load_public
from test_public_conformance_1h import (  # helpers only (no tests: pytest would collect them twice)
    ATOL, FULL_PARAMETERS, FULL_VOCAB, LOGIT_ATOL, RTOL, SEQ,
    assert_gradients_equal, compare_optimizer_steps, copy_weights, eval_pair, give_public_rope, group_settings,
    max_rel, micro_hp, our_view, public_model, public_rope, set_loops, tokens, training_pair)

MICRO_SCHEDULE = "1-2:8,24;3-4:24,56;5-6:40,64"  # the record's 256,768 / 768,1792 / 1280,2048 at 64 / 2048 scale


def our_schedule(stages, seq_len: int) -> str:
    """Our window_schedule for the public stages: windows in keys, FA3's w admitting w + 1 (the full length stays)."""
    keys = lambda w: w if w >= seq_len else w + 1  # noqa: E731
    return ";".join(f"{s.start_epoch}-{s.end_epoch}:{keys(s.short_window)},{keys(s.long_window)}" for s in stages)


class _TorchView(types.ModuleType):
    """torch, except for the attributes set on the instance."""

    def __getattr__(self, name):
        return getattr(torch, name)


# The one patch of the public's attention: its CausalSelfAttention.forward casts q, k, v to bf16 unless they are
# already fp16 / bf16, testing `fa_dtype not in (torch.float16, torch.bfloat16)` through its module's name `torch`;
# seen through this view, float32 is in that tuple and nothing is cast. Nothing else of the 2h script's forward reads
# torch.bfloat16 (its RoPE tables round with the .bfloat16() method, unaffected).
WITHOUT_QKV_CAST = _TorchView("torch")
WITHOUT_QKV_CAST.bfloat16 = torch.float32


@pytest.fixture(scope="module")
def public():
    return load_public("2h")


def staged_models(public, seed: int, **hp_overrides):
    """(stage, public model, ours, map, hp) at each window stage in turn: the public model as its run sets it (the
    first stage's windows without YaRN, then set_window_sizes(..., apply_yarn=True) at each new stage), ours by
    set_window_schedule_stage; on our float32 path (rope_tables "") our RoPE tables are replaced by the public's
    bf16-valued ones after each stage's own check (check_stage_rope)."""
    stages = public.parse_window_schedule(MICRO_SCHEDULE, SEQ)
    public_net = public_model(public, seed=seed, use_window_schedule=True)
    hp = micro_hp("2h", public_net, window_schedule=our_schedule(stages, SEQ), **hp_overrides)
    ours = train_gpt.GPT(train_gpt.model_config(hp))
    mapping = copy_weights(public_net, ours, rope=False)  # each stage's tables: check_stage_rope
    for index, stage in enumerate(stages):
        public_net.set_window_sizes(stage.short_window, stage.long_window, apply_yarn=index > 0)
        train_gpt.set_window_schedule_stage(ours, index)
        assert ours.window_stage == index
        yield index, public_net, ours, mapping, hp


def check_stage_rope(public_net, ours, stage: int) -> None:
    """Our stage's windows (in keys) are the public's FA3 windows + 1 (the full length stays); its softmax scale is
    the public Yarn's. Its tables: as the preset stores them (rope_tables "bf16_values"), the public Yarn's buffers
    bitwise and in their dtype (float32 tensors of bf16 values); on our float32 path (rope_tables ""), those of the
    public Yarn's inv_freq to float32 precision and, rounded to bf16, the public's stored tables, which our model then
    takes (the public rotates with them)."""
    windows = [w if w >= SEQ else w + 1 for w, _ in public_net.window_sizes]
    assert ours.window_sizes == windows, f"stage {stage}"
    assert all(module.softmax_scale == pytest.approx((public_net.yarn.attn_scale,), rel=1e-12)
               for module in ours.modules() if isinstance(module, train_gpt.CausalSelfAttention))
    cos, sin = public_rope(public_net)
    if ours.config.rope_tables == "bf16_values":
        for mine, theirs in ((ours.rotary_cos, cos[:, :SEQ]), (ours.rotary_sin, sin[:, :SEQ])):
            assert mine.dtype == theirs.dtype == torch.float32 and torch.equal(mine, theirs), f"stage {stage}"
        return
    assert ours.config.rope_tables == ""
    angles = torch.outer(torch.arange(SEQ, dtype=torch.float32), public_net.yarn.inv_freq)
    torch.testing.assert_close(ours.rotary_cos[0, :, 0], angles.cos(), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.rotary_sin[0, :, 0], angles.sin(), rtol=0, atol=1e-6)
    assert torch.equal(ours.rotary_cos.bfloat16().float(), cos[:, :SEQ]) and torch.equal(
        ours.rotary_sin.bfloat16().float(), sin[:, :SEQ]), f"stage {stage}"
    give_public_rope(public_net, ours)

# ---------------------------------------------------------------------------------------------- settings

def test_preset_schedule_and_settings_are_the_public_arguments(public):
    """The 2h preset's window schedule is the public --window-schedule in keys, YaRN on; the loop start, the
    averaged checkpoints and the final-epoch cosines are its --dupe-start-epoch, --logit-avg, --swa-last-epochs
    (when in the run each acts: the schedules file)."""
    args, hp = public.args, train_gpt.parse_args(["--preset", "2h"])
    assert hp.window_schedule == our_schedule(args.window_schedule, public.MAX_SEQ_LEN) == \
        "1-6:257,769;7-13:769,1793;14-22:1281,2048"
    assert hp.yarn and hp.num_epochs == args.num_epochs
    assert (hp.loop_start_epoch, hp.epoch_snapshots, hp.lr_epoch_cosine) == (
        args.dupe_start_epoch, args.logit_avg, args.swa_last_epochs)
    assert (hp.loop_range, hp.loop_repeats) == (f"{args.dupe_layers_start}:{args.dupe_layers_end}", args.dupe_loops)
    assert (hp.head_mix_lr, hp.logit_softcap, hp.mtp_weight, hp.dropout, hp.stochastic_depth) == (
        args.iha_lr, args.logit_cap, args.mtp_weight, args.dropout, args.stoch_depth)


def test_parameter_count_at_full_size_is_the_public_count(public):
    """Both models at the full 2h shape (window schedule and YaRN on) on the meta device: 1,443,722,775 each."""
    config = public.GPTConfig(vocab_size=FULL_VOCAB, dropout=public.args.dropout, stoch_depth=public.args.stoch_depth,
                              use_iha=public.args.iha, iha_mix_v=public.args.iha, use_window_schedule=True)
    with torch.device("meta"):
        public_count = sum(p.numel() for p in public.GPT(config).parameters())
    ours = sum(p.numel() for p in train_gpt.build_model_meta(train_gpt.parse_args(["--preset", "2h"])).parameters())
    print(f"2h parameters: public {public_count:,}, ours {ours:,}")
    assert public_count == ours == FULL_PARAMETERS


# ---------------------------------------------------------------------------------------------- model per stage

def test_each_window_stage_equals_the_public_without_the_qkv_cast(public, monkeypatch):
    """At each of the 3 window stages (loops on in the last, as from epoch 14): windows, YaRN tables and scale
    (check_stage_rope); eval logits and loss; the training objective (dropout 0.1, stochastic depth 0.05, MTP block)
    and every gradient: equal to float32 precision once the bf16 cast of q, k, v is off on both sides (the public's
    by WITHOUT_QKV_CAST, ours attn_qkv_bf16 False): the mathematics of the two models. Ours on its float32 RoPE
    path (rope_tables ""), so that check_stage_rope checks YaRN's frequencies to float32 precision before our model
    takes the public's bf16-valued tables (the preset's own tables: the test below, bitwise)."""
    monkeypatch.setattr(public, "torch", WITHOUT_QKV_CAST)
    x, y = tokens(1)
    for stage, public_net, ours, mapping, hp in staged_models(public, seed=0, attn_qkv_bf16=False, rope_tables=""):
        check_stage_rope(public_net, ours, stage)
        set_loops(public_net, ours, stage == 2, hp.loop_repeats)
        public_logits, public_loss, our_logits, our_loss = eval_pair(public_net, ours, x, y)
        torch.testing.assert_close(our_logits, public_logits, rtol=RTOL, atol=LOGIT_ATOL)
        torch.testing.assert_close(our_loss, public_loss, rtol=RTOL, atol=ATOL)
        public_objective, public_lm, our_objective, our_ce = training_pair(public_net, ours, hp, x, y, seed=stage)
        torch.testing.assert_close(our_objective, public_objective, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(our_ce, public_lm, rtol=RTOL, atol=ATOL)
        worst = assert_gradients_equal(public_net, ours, mapping)
        print(f"2h stage {stage + 1} (windows {public_net.window_sizes[0][0]}/{public_net.window_sizes[-1][0]}, "
              f"scale {public_net.yarn.attn_scale:.6f}), no qkv cast: logits max rel "
              f"{max_rel(our_logits, public_logits):.2e}, loss {max_rel(our_loss, public_loss):.2e}, objective "
              f"{max_rel(our_objective, public_objective):.2e}, worst gradient {worst:.2e}")


QKV_LOGIT_ATOL = 1e-2  # both casting: a q, k or v element whose float32 value differs in its last bit between the
# two models may round to a neighbouring bf16 (2^-8 apart) in one of them; through 8 layers on logits up to 9.6 that
# reaches 4.8e-3 (measured; the public itself moves by up to 1.5e-2 when its weights move by one float32 ulp)
QKV_GRAD_REL = 2e-2  # the same for the gradients, per tensor, of its largest element (measured 5.4e-3)


def one_ulp_sensitivity(public_net, x) -> torch.Tensor:
    """How far the public's eval logits move when a third of its weights move by one float32 ulp (seeded): the
    float32 noise its bf16 cast turns into bf16 steps. The weights are restored."""
    saved = {name: p.detach().clone() for name, p in public_net.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    public_net.eval()
    with torch.no_grad():
        reference = public_net(x)
        for p in public_net.parameters():
            p.mul_(1 + torch.finfo(torch.float32).eps * torch.randint(-1, 2, p.shape, generator=generator))
        moved = public_net(x)
        for name, p in public_net.named_parameters():
            p.copy_(saved[name])
    return moved - reference


def test_each_window_stage_matches_the_public_as_both_run_with_the_qkv_cast(public):
    """The public as it runs (q, k, v cast to bf16 before its attention, on the CPU too) against ours as the preset runs
    (attn_qkv_bf16: the same cast; rope_tables "bf16_values": the public's tables, bitwise). At each stage: the cast
    moves the public's eval logits (its effect, measured by removing it); ours differ from the public's by under
    1/10 of that on average (measured 1/40), by no more than the public itself moves under one-ulp float32 noise in
    its weights, and by at most QKV_LOGIT_ATOL; the per-token loss likewise; the training objective to float32
    precision; every gradient within QKV_GRAD_REL."""
    x, y = tokens(1)
    for stage, public_net, ours, mapping, hp in staged_models(public, seed=0):
        assert hp.attn_qkv_bf16 and hp.rope_tables == "bf16_values"
        check_stage_rope(public_net, ours, stage)
        set_loops(public_net, ours, stage == 2, hp.loop_repeats)
        public_logits, public_loss, our_logits, our_loss = eval_pair(public_net, ours, x, y)
        public.torch = WITHOUT_QKV_CAST
        try:
            cast_effect = eval_pair(public_net, ours, x, y)[0] - public_logits
        finally:
            public.torch = torch
        noise = one_ulp_sensitivity(public_net, x)
        difference = our_logits - public_logits
        assert difference.abs().mean() <= 0.1 * cast_effect.abs().mean()
        assert difference.abs().mean() <= noise.abs().mean()
        torch.testing.assert_close(our_logits, public_logits, rtol=0, atol=QKV_LOGIT_ATOL)
        torch.testing.assert_close(our_loss, public_loss, rtol=0, atol=QKV_LOGIT_ATOL)
        public_objective, public_lm, our_objective, our_ce = training_pair(public_net, ours, hp, x, y, seed=stage)
        torch.testing.assert_close(our_objective, public_objective, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(our_ce, public_lm, rtol=RTOL, atol=ATOL)
        params, worst = dict(ours.named_parameters()), 0.0
        for name, p in public_net.named_parameters():
            ours_grad = our_view({n: q.grad for n, q in params.items()}, mapping[name])
            torch.testing.assert_close(ours_grad, p.grad, rtol=0, atol=QKV_GRAD_REL * p.grad.abs().max().item(),
                                       msg=lambda m: f"{name}: {m}")
            worst = max(worst, max_rel(ours_grad, p.grad))
        print(f"2h stage {stage + 1}, both casting: the cast moves the public's logits by "
              f"{cast_effect.abs().max():.2e} max, {cast_effect.abs().mean():.2e} mean (logits up to "
              f"{public_logits.abs().max():.1f}); ours vs the public {difference.abs().max():.2e} max, "
              f"{difference.abs().mean():.2e} mean; the public under 1-ulp weight noise {noise.abs().max():.2e} max, "
              f"{noise.abs().mean():.2e} mean; objective {max_rel(our_objective, public_objective):.2e}, worst "
              f"gradient {worst:.2e}")


# ---------------------------------------------------------------------------------------------- optimizer

@pytest.mark.parametrize("precision", ["preset", "fp32"])
def test_optimizer_groups_and_two_steps_equal_the_public(public, monkeypatch, precision):
    """The 2h setup_optimizer's groups (its IHA group at --iha-lr directly) and two steps from the same weights and
    gradients: the 1h file's comparison (compare_optimizer_steps: Muon bitwise with the preset's muon_bf16, to
    float32 precision without), on the 2h script's DistMuonAdamW."""
    overrides = {} if precision == "preset" else dict(muon_bf16=False)
    _, public_net, ours, mapping, hp = next(staged_models(public, seed=5, **overrides))
    assert hp.muon_bf16 == (precision == "preset")
    monkeypatch.setattr(public, "dist", ONE_RANK_DIST)
    public_opt = public_net.setup_optimizer()
    optimizers = train_gpt.build_optimizers(ours, hp, train_gpt.Dist())
    assert group_settings(public_opt, public_net, optimizers, mapping, ours) == len(mapping)
    compare_optimizer_steps(public_net, public_opt, ours, optimizers, hp, mapping, f"2h ({precision})")
