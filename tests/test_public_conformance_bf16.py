"""The bf16 rounding sites of the public slowrun records against ours (issue 23, item 3), each site against the
public script's own code, loaded on the CPU by tests/public_scripts.py from ../shared/reference/slowrun/ (train.py,
tiny/, two_hour/, unlimited/ at fd342f0; the baseline train.py at 0d49316; skipped where that folder is absent).
Nothing of theirs is copied here.

  (a) Muon, all five records: muon_step_fused rounds the momentum to bf16 for Polar Express (on the CPU too) and keeps
      it there through NorMuon, rounds NorMuon's beta2 and factor, lr sqrt(max(1, rows/cols)) and wd to bf16, and steps
      by lr u in bf16. Ours with muon_bf16 (every GPU preset) against the public optimizer class itself (DistMuonAdamW
      on one rank; MuonAdamW for unlimited and baseline): parameters bitwise after two steps, tall, wide and square
      matrices stacked as the public stacks them; the momentum and NorMuon states bitwise too. 15min: its EMAs are
      written mul_/add_ around an active mask, ours lerp_: the states agree to float32 rounding, and that rounding
      first flips a bf16 rounding of the momentum at step 8 of this test's data (then ~12 % of one matrix's elements
      differ, mostly by bf16 ulps of the update, a few by a cautious-decay flip). Without the flag ours is not the
      public's (the test can fail); the flags off leave the plain path bitwise (the plain reference fixture).
  (b) the 15min lm_head is a bf16 Parameter (CastedLinearT), its AdamW state and update in bf16; ours keeps float32
      master weights (by design): one step of the public's own AdamW in bf16 against ours in float32, measured.
  (c) RoPE tables: the 1h, 15min, unlimited and baseline records store cos/sin as bf16 tensors (_precompute_rotary),
      the 2h record (window schedule) as float32 Yarn buffers holding bf16-rounded values, which its bf16 q, k meet
      by type promotion, in float32. rope_tables (the presets: bf16; 2h: bf16_values) stores ours so: our GPT's tables
      are the public's bitwise, in its dtype, and rotate a float32 q (the CPU) and a bf16 q (CUDA autocast's) to the
      public's bits. On CUDA bf16 gives the numbers of "" (float32 tables cast to q's bf16 at use); on the CPU in
      float32 the rounding's effect on micro logits is measured.
  (d) the 2h record casts q, k, v to bf16 before attention (FA3's dtype, so on the CPU too): our attention with the
      2h preset's attn_qkv_bf16 and rope_tables equals its CausalSelfAttention bitwise, in float32 and under CPU bf16
      autocast, two layers (with and without the value residual), a window and YaRN's softmax scale.
"""
from __future__ import annotations

import contextlib
import os
import sys
import types

import pytest
import torch

import train_gpt
from conftest import assert_bitwise_plain_reference
from public_scripts import ONE_RANK_DIST, load_public

TRACKS = ("1h", "2h", "15min", "unlimited", "baseline")
# stacked as the public stacks one shape's matrices: two wide, two tall, three square
SHAPES = [(32, 64), (32, 64), (64, 32), (64, 32), (48, 48), (48, 48), (48, 48)]
LR_MULTIPLIER, MOMENTUM = 0.7, 0.9  # a scheduled point (mid-warmdown, mid-momentum-warmup): values that round


def public_optimizer(module, groups, monkeypatch):
    """The public's own optimizer over `groups`: its single-process MuonAdamW where it has one, else DistMuonAdamW
    on ONE_RANK_DIST."""
    if hasattr(module, "MuonAdamW"):
        return module.MuonAdamW(groups)
    monkeypatch.setattr(module, "dist", ONE_RANK_DIST)
    return module.DistMuonAdamW(groups)


def preset_hp(track: str, **overrides) -> train_gpt.Hyperparameters:
    return train_gpt.Hyperparameters(**{**train_gpt.PRESETS[track], "device": "cpu", **overrides})


def muon_pair(track: str, hp, monkeypatch, steps: int = 2):
    """Our Muon (build_muon from hp) and the public optimizer's Muon groups (one per shape, the settings of its
    setup_optimizer: momentum, beta2 0.95, 5 steps, our lr and wd) from the same weights, stepped `steps` times on the
    same gradients. Returns (ours, theirs, our optimizer, public optimizer, initial weights)."""
    generator = torch.Generator().manual_seed(0)
    initial = [torch.randn(shape, generator=generator) * shape[-1] ** -0.5 for shape in SHAPES]
    grads = [[torch.randn(shape, generator=generator) for shape in SHAPES] for _ in range(steps)]
    ours = [torch.nn.Parameter(w.clone()) for w in initial]
    theirs = [torch.nn.Parameter(w.clone()) for w in initial]
    optimizer = train_gpt.build_muon(ours, hp, train_gpt.Dist())
    for group in optimizer.param_groups:
        group["lr"], group["momentum"] = hp.muon_lr * LR_MULTIPLIER, MOMENTUM
    public = public_optimizer(load_public(track), [
        dict(kind="muon", params=[p for p in theirs if tuple(p.shape) == shape], lr=hp.muon_lr * LR_MULTIPLIER,
             momentum=MOMENTUM, ns_steps=5, beta2=0.95, weight_decay=hp.muon_wd) for shape in sorted(set(SHAPES))],
        monkeypatch)
    for step in range(steps):
        for mine, public_p, grad in zip(ours, theirs, grads[step]):
            mine.grad, public_p.grad = grad.clone(), grad.clone()
        optimizer.step()
        public.step()
    return ours, theirs, optimizer, public, initial


# ------------------------------------------------------------------------------------------------ (a) Muon

@pytest.mark.parametrize("track", TRACKS)
def test_muon_bf16_is_the_publics_muon_step_bitwise(track, monkeypatch):
    """The preset's Muon (muon_bf16 on; Polar Express, NorMuon, cautious shape-scaled decay; MuonEq-R where the
    record has it) against the public's muon_step_fused through its own optimizer: every parameter bitwise after two
    steps, and the momentum and second-moment states (15min: to float32 rounding, its EMA's other form)."""
    hp = preset_hp(track)
    assert hp.muon_bf16 and hp.muon_polar_express and hp.normuon and hp.cautious_wd and hp.muon_wd_scaled
    ours, theirs, optimizer, public, _ = muon_pair(track, hp, monkeypatch)
    for index, (mine, public_p) in enumerate(zip(ours, theirs)):
        assert torch.equal(mine.detach(), public_p.detach()), f"{track}: matrix {index} {tuple(mine.shape)}"
    for shape in sorted(set(SHAPES)):
        indices = [i for i, s in enumerate(SHAPES) if s == shape]
        state = public.state[theirs[indices[0]]]  # the public keeps one stacked state per shape
        for ours_key, public_key in (("momentum_buffer", "momentum_buffer"),
                                     ("second_moment", "second_momentum_buffer")):
            mine = torch.stack([optimizer.state[ours[i]][ours_key] for i in indices])
            want = state[public_key][:len(indices)]
            if track == "15min":  # buffer (1 - w) + grad w (its active-mask form) against lerp_: float32 rounding
                torch.testing.assert_close(mine, want, rtol=0, atol=2 ** -22 * want.abs().max().item())
            else:
                assert torch.equal(mine, want), f"{track}: {shape} {ours_key}"


def test_muon_without_the_flag_is_not_the_publics(monkeypatch):
    """The comparison can fail: the 1h preset's Muon in float32 (muon_bf16 off) lands elsewhere than the public's bf16
    step on every element (measured 15,104 of 15,104, up to 0.33 of the largest step)."""
    ours, theirs, _, _, initial = muon_pair("1h", preset_hp("1h", muon_bf16=False), monkeypatch)
    differing = sum(int((a.detach() != b.detach()).sum()) for a, b in zip(ours, theirs))
    largest = max((b.detach() - w).abs().max().item() for b, w in zip(theirs, initial))
    worst = max((a.detach() - b.detach()).abs().max().item() for a, b in zip(ours, theirs))
    print(f"Muon fp32 vs the public's bf16: {differing} of {sum(p.numel() for p in ours)} elements differ, "
          f"max {worst / largest:.2e} of the largest step")
    assert differing > 0.9 * sum(p.numel() for p in ours) and worst / largest > 0.02


@pytest.mark.stored_bitwise
def test_muon_bf16_off_is_the_plain_path():
    """The flags' defaults: off, and the plain model's logits, gradients and optimizer step bitwise the stored
    fixture (tests/fixtures/plain_reference.pt)."""
    hp = train_gpt.Hyperparameters()
    assert not hp.muon_bf16 and not hp.attn_qkv_bf16
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures"))
    import make_plain_reference  # the fixture's micro shape
    assert_bitwise_plain_reference(train_gpt.Hyperparameters(**make_plain_reference.MICRO))


def test_presets_set_the_flags_where_their_records_round():
    """muon_bf16: every GPU preset (all five public muon_step_fused round as above); attn_qkv_bf16: 2h only (the one
    script whose attention casts q, k, v); rope_tables: bf16, 2h bf16_values (its Yarn buffers); none of them on a
    CPU preset. muon_bf16 with the symmetric Gram kernel is refused (it computes the products in another order), and
    so is an unknown rope_tables."""
    for name, preset in train_gpt.PRESETS.items():
        gpu = name in TRACKS or preset is train_gpt.PRESETS["1h"]  # "slowrun" is the 1h preset's alias
        assert preset.get("muon_bf16", False) == gpu, name
        assert preset.get("attn_qkv_bf16", False) == (name == "2h"), name
        assert preset.get("rope_tables", "") == ("bf16_values" if name == "2h" else "bf16" if gpu else ""), name
    with pytest.raises(train_gpt.ConfigError, match="muon_bf16"):
        train_gpt.check_hyperparameters(preset_hp("1h", muon_gram="triton"), 1)
    with pytest.raises(train_gpt.ConfigError, match="rope_tables"):
        train_gpt.check_hyperparameters(preset_hp("1h", rope_tables="fp16"), 1)


# ------------------------------------------------------------------------------------------------ (b) lm_head

# measured: |bf16 step - float32 step| / |float32 step| (Frobenius) and the fraction of elements whose bf16 step is 0,
# first AdamW step, by the weights' scale (the public's init is N(0, 0.001^2))
LM_HEAD_STEP = {0.001: (3.5e-3, 0.0), 0.03: (7.5e-2, 0.0), 0.3: (0.68, 0.41)}


def test_15min_bf16_lm_head_adamw_step_measured(monkeypatch):
    """One step of the public's AdamW (its own DistMuonAdamW, its 15min head settings) on its bf16 lm_head, against
    torch's AdamW in float32 (ours) from the same bf16-valued weights and gradient: the bf16 step departs from the
    float32 one by LM_HEAD_STEP (each asserted within a factor 3): 0.3 % at the init's scale, 8 % at |w| ~ 0.03, 68 %
    at |w| ~ 0.3, where 41 % of the updates (lr 8e-4 against bf16 spacings of 2^-10..2^-9) round to nothing. The
    weights themselves stay within bf16's 2^-9 of each other (their storage)."""
    module = load_public("15min")
    hp = preset_hp("15min")
    assert (hp.head_lr, hp.adam_wd) == (module.UNEMBEDDING_LR, module.WEIGHT_DECAY)
    generator = torch.Generator().manual_seed(0)
    for scale, (want_step, want_zero) in LM_HEAD_STEP.items():
        weights = (torch.randn(64, 256, generator=generator) * scale).bfloat16()
        grad = (torch.randn(64, 256, generator=generator) * 1e-3).bfloat16()
        public_w, our_w = torch.nn.Parameter(weights.clone()), torch.nn.Parameter(weights.float())
        assert module.CastedLinearT(64, 256).weight.dtype == torch.bfloat16  # the public's lm_head Parameter
        public = public_optimizer(module, [dict(kind="adamw", params=[public_w], lr=module.UNEMBEDDING_LR,
                                                betas=module.ADAM_BETAS, eps=1e-10, weight_decay=module.WEIGHT_DECAY)],
                                  monkeypatch)
        ours = torch.optim.AdamW([our_w], lr=hp.head_lr, betas=(hp.adam_beta1, hp.adam_beta2), eps=hp.adam_eps,
                                 weight_decay=hp.adam_wd)
        public_w.grad, our_w.grad = grad.clone(), grad.float()
        public.step()
        ours.step()
        public_step, our_step = public_w.detach().float() - weights.float(), our_w.detach() - weights.float()
        step_error = ((public_step - our_step).norm() / our_step.norm()).item()
        zero = (public_step == 0).float().mean().item()
        apart = ((public_w.detach().float() - our_w.detach()).norm() / our_w.detach().norm()).item()
        print(f"lm_head |w| ~ {scale}: bf16 step off the float32 step by {step_error:.2e} (Frobenius), "
              f"{zero:.2f} of its elements 0, weights {apart:.1e} apart")
        assert want_step / 3 < step_error < want_step * 3
        assert zero <= want_zero * 1.5 + 0.01 and apart < 2 ** -8


# ------------------------------------------------------------------------------------------------ (c) RoPE tables

def public_tables(module, track: str, seq_len: int, head_dim: int):
    """The tables the public model rotates with: its GPT's _precompute_rotary (on a stand-in for the model: it reads
    only wte's device), the 2h run's (window schedule) Yarn buffers, built on meta as its GPT builds them, then reset
    on the CPU."""
    if track == "2h":
        yarn = module.Yarn(head_dim, seq_len).to_empty(device="cpu")
        yarn.reset()
        return yarn.cos, yarn.sin
    stand_in = types.SimpleNamespace(transformer=types.SimpleNamespace(wte=types.SimpleNamespace(
        weight=torch.empty(0))))
    return module.GPT._precompute_rotary(stand_in, seq_len, head_dim)


def our_rotation(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, storage: str) -> torch.Tensor:
    """q's rotation as CausalSelfAttention.forward runs it (bf16_values: q in float32 first)."""
    return train_gpt.apply_rotary(x.float() if storage == "bf16_values" else x, cos, sin)


@pytest.mark.parametrize("track", TRACKS)
def test_rope_tables_and_rotation_are_the_publics(track):
    """Our GPT built from the preset (rope_tables) stores the tables the public rotates with, bitwise and in its
    dtype (bf16 tensors; 2h: float32 tensors of bf16 values), at the preset's head_dim 128 and 2048 positions
    (15min: its 32 of 64 pairs); and rotates q alike, bitwise and to the same dtype: a float32 q (the CPU) and a bf16
    q (CUDA autocast's)."""
    module = load_public(track)
    hp = preset_hp(track, n_layer=1, n_head=1, n_embd=128, mlp_hidden=128, vocab_size=64, bos_id=63, train_vocab=0,
                   eval_vocab=0, loop_range="", fp8_head=False)
    assert hp.rope_tables == ("bf16_values" if track == "2h" else "bf16") and hp.seq_len == 2048
    ours = train_gpt.GPT(train_gpt.model_config(hp))
    public_cos, public_sin = public_tables(module, track, hp.seq_len, 128)
    for mine, theirs in ((ours.rotary_cos, public_cos), (ours.rotary_sin, public_sin)):
        assert mine.dtype == theirs.dtype and torch.equal(mine, theirs)
    q = torch.randn(2, hp.seq_len, 2, 128, generator=torch.Generator().manual_seed(1))
    for x in (q, q.bfloat16()):
        got = our_rotation(x, ours.rotary_cos, ours.rotary_sin, hp.rope_tables)
        want = module.apply_rotary_emb(x, public_cos, public_sin)
        assert got.dtype == want.dtype and torch.equal(got, want), (track, x.dtype)


# measured: max |logits(preset's rope_tables) - logits(float32 tables, "")| / max |logits|, our micro models in
# float32 on the CPU: what the tables' bf16 rounding does there (on CUDA "" and "bf16" give the same numbers)
ROPE_LOGITS = {"1h": 3.1e-3, "15min": 3.9e-3}


@pytest.mark.parametrize("track", sorted(ROPE_LOGITS))
def test_rope_tables_effect_in_float32_measured(track):
    """The preset's bf16 tables against float32 ones ("", the default) in our micro model (4 layers x 64, 4 heads,
    64 tokens), float32 eval logits: ROPE_LOGITS, asserted within a factor 3 (bf16's 2^-9 relative rounding of
    cos/sin, diluted by the rest of the network)."""
    overrides = dict(n_layer=4, n_embd=64, n_head=4, mlp_hidden=128, seq_len=64, vocab_size=128, bos_id=127,
                     train_vocab=0, eval_vocab=0, window_short=17, loop_range="1:3" if track == "1h" else "",
                     fp8_head=False, rope_pairs=8 if track == "15min" else 0)
    logits = {}
    for storage in ("", "bf16"):
        model = train_gpt.GPT(train_gpt.model_config(preset_hp(track, rope_tables=storage, **overrides))).eval()
        with torch.no_grad():
            for index, (_, p) in enumerate(sorted(model.named_parameters())):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(index)) * p.shape[-1] ** -0.5)
            logits[storage] = model(torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(1)))
    effect = ((logits["bf16"] - logits[""]).abs().max() / logits[""].abs().max()).item()
    print(f"{track}: bf16 RoPE tables move float32 logits by {effect:.2e} of their largest")
    assert ROPE_LOGITS[track] / 3 < effect < ROPE_LOGITS[track] * 3


# ------------------------------------------------------------------------------------------------ (d) 2h q, k, v

WIDTH, HEADS, SEQ, WINDOW = 64, 4, 48, 15  # public FA3 window 15 = our 16 keys


def attention_pair(module, layer: int, matched: bool):
    """The 2h public's CausalSelfAttention (no IHA) of a 2-layer model and ours (the 2h preset, head mixing off;
    matched: its attn_qkv_bf16 and rope_tables, else both at their defaults) with the same random weights (public
    c_q, c_k, c_v, c_proj, ve_gate, attn_gate -> ours c_q, c_k, c_v, c_proj, value_gate, out_gate; the public's ve
    projection, applied by its GPT, -> our c_x0v), every parameter of both mapped. Returns them, the projection and
    our hp."""
    config = module.GPTConfig(sequence_len=SEQ, vocab_size=128, n_layer=2, n_head=HEADS, n_kv_head=HEADS,
                              n_embd=WIDTH, use_iha=False)
    public = module.CausalSelfAttention(config, layer).eval()
    flags = {} if matched else dict(attn_qkv_bf16=False, rope_tables="")
    hp = preset_hp("2h", n_layer=2, n_embd=WIDTH, n_head=HEADS, seq_len=SEQ, head_mix=False, **flags)
    ours = train_gpt.CausalSelfAttention(train_gpt.model_config(hp), layer).eval()
    generator = torch.Generator().manual_seed(layer)
    names = {"c_q.weight": "c_q.weight", "c_k.weight": "c_k.weight", "c_v.weight": "c_v.weight",
             "c_proj.weight": "c_proj.weight", "attn_gate.weight": "out_gate"}
    if public.ve_gate is not None:
        names["ve_gate.weight"] = "value_gate"
    public_params, our_params = dict(public.named_parameters()), dict(ours.named_parameters())
    assert set(public_params) == set(names) and set(our_params) == set(names.values()) | (
        {"c_x0v.weight"} if public.ve_gate is not None else set())
    ve_proj = torch.nn.Linear(WIDTH, WIDTH, bias=False)
    with torch.no_grad():
        for public_name, our_name in names.items():
            value = torch.randn(public_params[public_name].shape, generator=generator) * 0.3
            public_params[public_name].copy_(value)
            our_params[our_name].copy_(value)
        ve_proj.weight.copy_(torch.randn(WIDTH, WIDTH, generator=generator) * WIDTH ** -0.5)
        if "c_x0v.weight" in our_params:
            our_params["c_x0v.weight"].copy_(ve_proj.weight)
    return public, ours, ve_proj, hp


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
@pytest.mark.parametrize("layer, scaled", [(0, False), (1, True)])  # layer 1 of 2: the value residual; YaRN's scale
def test_2h_attention_is_the_publics(autocast, layer, scaled):
    """Our attention with the 2h preset's attn_qkv_bf16 and rope_tables (bf16_values) equals the public 2h
    CausalSelfAttention bitwise, given its Yarn tables and ours as our GPT stores them, a window of 15 (our 16 keys)
    and, for layer 1, YaRN's softmax scale after its first growth (768 -> 1792): in float32 on the CPU, where the
    public's q, k, v cast acts, and under CPU bf16 autocast (CUDA's dtypes: q, k out of bf16 matmuls meet its float32
    tables). With both flags at their defaults ours is not the public's (the test can fail)."""
    module = load_public("2h")
    generator = torch.Generator().manual_seed(10 + layer)
    x = torch.randn(2, SEQ, WIDTH, generator=generator)
    x0 = torch.randn(2, SEQ, WIDTH, generator=generator)
    public_cos, public_sin = public_tables(module, "2h", SEQ, WIDTH // HEADS)
    scale = (WIDTH // HEADS) ** -0.5 * (0.2 * torch.log(torch.tensor(1792 / 768)).item() + 1) if scaled else None
    mask = train_gpt.sliding_window_mask(SEQ, WINDOW + 1, torch.device("cpu"))
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    off = {}
    for matched in (True, False):
        public, ours, ve_proj, hp = attention_pair(module, layer, matched)
        cos, sin = train_gpt.rotary_tables(SEQ, WIDTH // HEADS, hp.rope_base)
        cos, sin = train_gpt.stored_rotary(cos, hp.rope_tables), train_gpt.stored_rotary(sin, hp.rope_tables)
        if scaled:
            ours.softmax_scale = (scale,)
        with torch.no_grad(), context:
            ve = ve_proj(x0) if public.ve_gate is not None else None
            want = public(x, ve, (public_cos, public_sin), (WINDOW, 0), softmax_scale=scale)
            got = ours(x, cos, sin, x0, attn_mask=mask)
        if matched:
            assert got.dtype == want.dtype and torch.equal(got, want)
        off[matched] = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
    print(f"2h attention layer {layer} ({'bf16 autocast' if autocast else 'float32'}): with the flags at their "
          f"defaults {off[False]:.2e} of the largest output off the public's")
    assert off[False] > 1e-4
