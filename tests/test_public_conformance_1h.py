"""The 1h preset against the public 1-hour record it claims to be (issue 23): qlabs-eng/slowrun train.py at fd342f0,
read from ../shared/reference/slowrun/fd342f0/train.py and executed at test time (tests/public_scripts.py; skipped
where that folder is absent). Nothing of it is copied here.

At a micro width (8 layers x 64, 4 heads, 64 tokens, a 200-token vocabulary padded to 256 as the public pads 50,257
to 50,304), float32 on the CPU, the same random weights copied into both models through an explicit name map that
covers every parameter of both:
  - logits and loss in eval mode, the training objective (next token + 0.3 x the MTP block) and every parameter's
    gradient, with the looped layers (public set_dupe_layers, ours loop_repeats / loop_range / loop_active) off and on;
  - stochastic depth ("batch": one draw per block call) and dropout 0.1 under one seed: the same draws;
  - every optimizer group's settings and two steps from the same weights and gradients (public DistMuonAdamW from
    setup_optimizer, ours build_optimizers): AdamW to float32 precision; Muon bitwise as the preset runs it (muon_bf16:
    the public's bf16 rounding) and to float32 precision with muon_bf16 off, both sides in float32;
  - the parameter count at full size on the meta device (1,443,722,775 both);
  - the evaluation: the public val windows (its DataLoader on a val file written here) against PublicWindows, the
    loss and bits per byte of evaluate_bpb, and the probability average of 3 checkpoints with equal and recency
    weights (evaluate_bpb_logit_avg) against our epoch snapshots' mixtures.
Schedules over the run are tests/test_public_conformance_schedules.py's.

What the test patches, each where it is used: the public's one-rank collectives (ONE_RANK_DIST: gloo has no
reduce_scatter future) and its Polar Express in float32 for the float32 comparison only (bfloat16_as_float32: it
rounds to bf16 unconditionally, its CUDA precision). Our RoPE tables are the preset's own (rope_tables "bf16": the
public's bf16 tensors, asserted bitwise wherever the weights are copied);
test_rope_tables_are_the_public_ones_up_to_bf16_storage checks them, and measures the float32 tables' effect.
"""
import contextlib
import dataclasses
import re

import numpy as np
import pytest
import torch

import train_gpt
from public_scripts import ONE_RANK_DIST, bfloat16_as_float32, load_public, public_block, run_block

# micro shape: 8 layers so that "SSSL", the U-Net halves (4 + 4) and a decoder-only loop range (4:6, as the public
# 15:21 starts at its first decoder layer) all exist; a vocabulary that is not a multiple of 64, so the slice matters
LAYERS, WIDTH, HEADS, SEQ, BATCH, VOCAB = 8, 64, 4, 64, 2, 200
LOOP = (4, 6)
FULL_VOCAB = 50257  # the public run's tiktoken gpt2 n_vocab (train.py: "vocab_size = encoder.n_vocab  # 50257")
FULL_PARAMETERS = 1_443_722_775
RTOL, ATOL = 1e-5, 1e-5  # float32
LOGIT_ATOL = 3e-5  # logits reach +-10 (softcap 10) after 8 layers of float32: 3e-6 of that (measured 1.4e-5)


# ---------------------------------------------------------------------------------------------- shared helpers

def padded(vocab: int) -> int:
    """The public GPT's table size: vocab rounded up to a multiple of 64 (its pad_vocab_size_to)."""
    return -(-vocab // 64) * 64


def public_config(public, **overrides):
    """The public GPTConfig the run builds (its argparse defaults for dropout, stochastic depth, IHA) at micro size."""
    args = public.args
    settings = dict(sequence_len=SEQ, vocab_size=VOCAB, n_layer=LAYERS, n_head=HEADS, n_kv_head=HEADS, n_embd=WIDTH,
                    dropout=args.dropout, stoch_depth=args.stoch_depth, use_iha=args.iha, iha_mix_v=args.iha)
    return public.GPTConfig(**{**settings, **overrides})


def public_model(public, seed: int = 0, **overrides):
    """A public GPT at micro size, its init_weights, then every parameter moved off its init by a seeded draw (gates,
    lambdas, mixing matrices and skips away from 0 / 1 / identity, logits large enough for the softcap to bend)."""
    with torch.device("meta"):  # built as the run builds it (the 2h Yarn's tables exist only after this)
        model = public.GPT(public_config(public, **overrides))
    model.to_empty(device="cpu")
    with torch.random.fork_rng():  # init_weights draws from the global generator
        torch.manual_seed(seed)
        model.init_weights()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if name == "lm_head.weight" else 0.1
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return model


def micro_hp(preset: str = "1h", public_net=None, **overrides) -> train_gpt.Hyperparameters:
    """The preset with only its shapes shrunk to the micro model's (and the window counted in keys: the public
    short window T/2 admits T/2 + 1 keys under FA3's rule)."""
    shapes = dict(vocab_size=padded(VOCAB), train_vocab=VOCAB, eval_vocab=VOCAB, bos_id=VOCAB - 1, n_layer=LAYERS,
                  n_embd=WIDTH, n_head=HEADS, seq_len=SEQ, window_short=SEQ // 2 + 1,
                  loop_range=f"{LOOP[0]}:{LOOP[1]}", device_batch_size=BATCH, batch_tokens=BATCH * SEQ,
                  val_batch_size=BATCH, device="cpu", compile="off")
    if public_net is not None:  # the public MLP's hidden width at this n_embd (8 d / 3 rounded up to 256)
        shapes["mlp_hidden"] = public_net.transformer.h[0].mlp.c_fc.out_features
    return train_gpt.Hyperparameters(**{**train_gpt.PRESETS[preset], **shapes, **overrides})


MIXES = {"q_mix": 0, "k_mix": 1, "v_mix": 2}  # IHA's three matrices are our head_mix[0], [1], [2]
NAME_RULES = [  # public name pattern -> our name (the attention and MLP matrices keep their names)
    (r"^transformer\.wte\.weight$", "wte.weight"),
    (r"^ve_projs\.(\d+)\.weight$", r"blocks.\1.attn.c_x0v.weight"),
    (r"^transformer\.h\.(\d+)\.attn\.ve_gate\.weight$", r"blocks.\1.attn.value_gate"),
    (r"^transformer\.h\.(\d+)\.attn\.attn_gate\.weight$", r"blocks.\1.attn.out_gate"),
    (r"^transformer\.h\.(\d+)\.attn\.[qkv]_mix$", r"blocks.\1.attn.head_mix"),
    (r"^mtp_block\.attn\.ve_gate\.weight$", "mtp_block.attn.value_gate"),
    (r"^mtp_block\.attn\.attn_gate\.weight$", "mtp_block.attn.out_gate"),
    (r"^mtp_block\.attn\.[qkv]_mix$", "mtp_block.attn.head_mix"),
    (r"^transformer\.h\.(\d+)\.(attn\.c_[qkv]|attn\.c_proj|mlp\.c_gate|mlp\.c_fc|mlp\.c_proj)\.weight$",
     r"blocks.\1.\2.weight"),
    (r"^(mtp_block\.(attn\.c_[qkv]|attn\.c_proj|mlp\.c_gate|mlp\.c_fc|mlp\.c_proj)\.weight)$", r"\1"),
    (r"^(lm_head\.weight|resid_lambdas|x0_lambdas|skip_weights|mtp_proj\.weight)$", r"\1"),
]


def weight_map(public_net, ours) -> dict[str, tuple[str, int | None]]:
    """public parameter name -> (our parameter name, index into it or None). Asserts the map covers every parameter
    of both models exactly once (head_mix: its three slices) with equal shapes."""
    mapping, covered = {}, []
    our_params = dict(ours.named_parameters())
    for name, p in public_net.named_parameters():
        target = next((re.sub(pattern, replacement, name) for pattern, replacement in NAME_RULES
                       if re.match(pattern, name)), None)
        assert target in our_params, f"public {name} has no counterpart ({target})"
        index = MIXES.get(name.rsplit(".", 1)[-1])
        ours_shape = our_params[target].shape if index is None else our_params[target][index].shape
        assert ours_shape == p.shape, f"{name} {tuple(p.shape)} vs {target} {tuple(ours_shape)}"
        mapping[name] = (target, index)
        covered += [(target, index)]
    expected = [(name, None) for name in our_params if not name.endswith("attn.head_mix")]
    expected += [(name, i) for name in our_params if name.endswith("attn.head_mix") for i in range(3)]
    assert sorted(covered, key=str) == sorted(expected, key=str), "the map misses or repeats a parameter"
    return mapping


def our_view(ours_params: dict, target: tuple[str, int | None]) -> torch.Tensor:
    name, index = target
    return ours_params[name] if index is None else ours_params[name][index]


def copy_weights(public_net, ours, rope: bool = True) -> dict:
    """Copies every public parameter into ours; with rope, asserts that our RoPE tables, as our model stores them
    (the preset's rope_tables), are the public's bitwise and in its dtype (nothing of them is copied)."""
    mapping, params = weight_map(public_net, ours), dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in public_net.named_parameters():
            our_view(params, mapping[name]).copy_(p)
    if rope:
        for mine, theirs in zip((ours.rotary_cos, ours.rotary_sin), public_rope(public_net)):
            theirs = theirs[:, :mine.size(1)]
            assert mine.dtype == theirs.dtype and torch.equal(mine, theirs), "RoPE tables: not the public's"
    return mapping


def public_rope(public_net):
    """The public's cos / sin tables (bf16, 10 x seq_len positions): the 1h model's buffers, the 2h model's Yarn's."""
    holder = getattr(public_net, "yarn", public_net)
    return holder.cos, holder.sin


def give_public_rope(public_net, ours) -> None:
    """The public's tables into ours (for a model on our float32 path, rope_tables "": the 2h file's)."""
    cos, sin = public_rope(public_net)
    with torch.no_grad():
        ours.rotary_cos.copy_(cos[:, :ours.rotary_cos.size(1)].float())
        ours.rotary_sin.copy_(sin[:, :ours.rotary_sin.size(1)].float())


def set_loops(public_net, ours, on: bool, loops: int) -> None:
    """Looped layers: the public's set_dupe_layers (no switch back: its attribute cleared), ours loop_active."""
    if on:
        public_net.set_dupe_layers(LOOP[0], LOOP[1], loops)
    else:
        public_net._dupe_layers = None
    ours.loop_active = on


def tokens(seed: int, rows: int = BATCH, length: int = SEQ) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.randint(0, VOCAB, (rows, length + 1), generator=torch.Generator().manual_seed(seed))
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


def max_rel(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected| / max |expected|: one figure per tensor for the report."""
    return ((got.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)).item()


def weight_ulps(got_step: torch.Tensor, expected_step: torch.Tensor, weight: torch.Tensor) -> float:
    """The largest difference of two steps of `weight` in float32 ulps of its largest element."""
    return ((got_step - expected_step).abs().max() / (torch.finfo(torch.float32).eps * weight.abs().max())).item()


def eval_pair(public_net, ours, x, y):
    """(public logits, public per-token loss, our logits, our per-token loss) in eval mode, ours through the run's
    evaluation path (target_log_probs, as score on the CPU)."""
    public_net.eval(), ours.eval()
    with torch.no_grad():
        public_logits = public_net(x)
        public_loss = public_net(x, y, loss_reduction="none").view(-1)
        our_logits = ours(x)
        our_loss = -train_gpt.target_log_probs(ours, x, y)
    return public_logits, public_loss, our_logits, our_loss


def training_pair(public_net, ours, hp, x, y, seed: int):
    """One training forward and backward of each under torch.manual_seed(seed): the public's (loss, metrics), ours
    MemberObjective.sums (the run's objective) divided by the target count, as the public's means are."""
    public_net.train(), ours.train()
    public_net.zero_grad(set_to_none=True), ours.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    public_loss, metrics = public_net(x, y)
    public_loss.backward()
    torch.manual_seed(seed)
    ce, objective = train_gpt.MemberObjective(hp, torch.device("cpu"), []).sums(ours, x, y)
    count = y.numel()
    (objective / count).backward()
    return public_loss.detach(), metrics["lm_loss"].detach(), (objective / count).detach(), (ce / count).detach()


def assert_gradients_equal(public_net, ours, mapping, rtol=RTOL, atol=ATOL) -> float:
    """Every parameter's gradient equal; returns the largest relative difference (per tensor, vs its max)."""
    params, worst = dict(ours.named_parameters()), 0.0
    for name, p in public_net.named_parameters():
        assert p.grad is not None, f"public {name} has no gradient"
        ours_grad = our_view({n: q.grad for n, q in params.items()}, mapping[name])
        torch.testing.assert_close(ours_grad, p.grad, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
        worst = max(worst, max_rel(ours_grad, p.grad))
    return worst


def group_settings(public_opt, public_net, optimizers, mapping, ours) -> int:
    """Each public group's settings equal those of our group holding the mapped parameter; every public parameter
    is in exactly one group. Returns how many parameters were compared."""
    where = {id(p): (type(optimizer).__name__, group) for optimizer in optimizers
             for group in optimizer.param_groups for p in group["params"]}
    names = {id(p): name for name, p in public_net.named_parameters()}
    params, compared = dict(ours.named_parameters()), []
    for group in public_opt.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            kind, ours_group = where[id(params[mapping[name][0]])]
            assert kind == ("AdamW" if group["kind"] == "adamw" else "Muon"), name
            assert ours_group["lr"] == pytest.approx(group["lr"], rel=1e-12), name
            assert ours_group["weight_decay"] == group["weight_decay"], name
            if group["kind"] == "adamw":
                assert (tuple(ours_group["betas"]), ours_group["eps"]) == (tuple(group["betas"]), group["eps"]), name
            else:
                assert (ours_group["momentum"], ours_group["ns_steps"], ours_group["normuon_beta2"]) == (
                    group["momentum"], group["ns_steps"], group["beta2"]), name
                # what the public's muon_step_fused always does: Nesterov, MuonEq-R, Polar Express, NorMuon (above),
                # cautious weight decay, the decay scaled with the step by sqrt(max(1, rows / cols))
                assert (ours_group["nesterov"], ours_group["eq_r"], ours_group["polar_express"],
                        ours_group["cautious_wd"], ours_group["wd_scaled"]) == (True,) * 5, name
            compared.append(name)
    assert sorted(compared) == sorted(names.values()), "a public parameter in no group, or in two"
    return len(compared)


MUON_RTOL = 2e-5  # float32 Polar Express: 5 matrix iterations of differently ordered products (measured ~1e-5)
ADAM_RTOL = 1e-5  # the public AdamW divides exp_avg by sqrt(exp_avg_sq / bias2), torch's by sqrt(exp_avg_sq) /
# sqrt(bias2): the steps differ in their last bits (measured ~6e-6 of the step)
ULPS = 2 * torch.finfo(torch.float32).eps  # the new weight's own rounding: a step much smaller than its weight (the
# lm_head's lr 0.0005 on weights ~2) is known only to the weight's ulp (measured 7e-5 of such a step)
NEAR_ZERO = 1e-4  # an update element below this fraction of its matrix's largest: its cautious-decay sign is noise


def compare_optimizer_steps(public_net, public_opt, ours, optimizers, hp, mapping, label: str, steps: int = 2):
    """`steps` steps of both optimizers, each after the same seeded random gradients, from the same weights (ours
    reset to the public's after each step); every parameter's step (new - old) compared with the public's.

    Muon, by hp.muon_bf16: on, ours rounds where the public's muon_step_fused rounds (bf16 orthogonalisation, update,
    lr, wd), so the public runs as it is and every Muon weight must come out bitwise the public's. Off, ours computes
    in float32 and the public runs in float32 too (bfloat16_as_float32); then the cautious weight decay, which decides
    per element by the sign of update x weight, may flip where the update is ~0 (the steps then differ by lr wd w):
    our update direction comes from a twin stepped without weight decay, elements with |u| >= NEAR_ZERO of the
    matrix's largest are asserted, the others only counted where they differ (the flips)."""
    twin = train_gpt.GPT(train_gpt.model_config(hp))
    twin_optimizers = train_gpt.build_optimizers(twin, dataclasses.replace(hp, muon_wd=0.0), train_gpt.Dist())
    muon_ids = {id(p) for g in public_opt.param_groups if g["kind"] == "muon" for p in g["params"]}
    params, twin_params = dict(ours.named_parameters()), dict(twin.named_parameters())
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        with torch.no_grad():
            for name, p in twin_params.items():
                p.copy_(params[name])
        before = {name: p.detach().clone() for name, p in public_net.named_parameters()}
        for p in public_net.parameters():
            p.grad = torch.randn(p.shape, generator=generator)
        for model, named in ((ours, params), (twin, twin_params)):
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            for name, p in public_net.named_parameters():
                our_view({n: q.grad for n, q in named.items()}, mapping[name]).copy_(p.grad)
        twin_before = {name: p.detach().clone() for name, p in twin_params.items()}
        with contextlib.nullcontext() if hp.muon_bf16 else bfloat16_as_float32():
            public_opt.step()
        for optimizer in optimizers + twin_optimizers:
            optimizer.step()
        twin_update = {name: twin_before[name] - p.detach() for name, p in twin_params.items()}
        worst, ulps, flips, elements = {"AdamW": 0.0, "Muon": 0.0}, {"AdamW": 0.0, "Muon": 0.0}, 0, 0
        for name, p in public_net.named_parameters():
            public_step = p.detach() - before[name]
            our_step = our_view(params, mapping[name]).detach() - before[name]
            message = lambda m: f"{name}, step {step}: {m}"  # noqa: E731
            if id(p) not in muon_ids:
                atol = ADAM_RTOL * public_step.abs().max().item() + ULPS * before[name].abs().max().item()
                torch.testing.assert_close(our_step, public_step, rtol=ADAM_RTOL, atol=atol, msg=message)
                worst["AdamW"] = max(worst["AdamW"], max_rel(our_step, public_step))
                ulps["AdamW"] = max(ulps["AdamW"], weight_ulps(our_step, public_step, before[name]))
                continue
            if hp.muon_bf16:
                assert torch.equal(our_view(params, mapping[name]), p), f"{name}, step {step}: not bitwise"
                elements += p.numel()
                continue
            update = our_view(twin_update, mapping[name])
            decided = update.abs() >= NEAR_ZERO * update.abs().max()
            scale = MUON_RTOL * public_step.abs().max().item() + ULPS * before[name].abs().max().item()
            torch.testing.assert_close(our_step[decided], public_step[decided], rtol=MUON_RTOL, atol=scale,
                                       msg=message)
            worst["Muon"] = max(worst["Muon"], max_rel(our_step[decided], public_step[decided]))
            ulps["Muon"] = max(ulps["Muon"], weight_ulps(our_step[decided], public_step[decided], before[name]))
            flips += int((~torch.isclose(our_step, public_step, rtol=MUON_RTOL, atol=scale)).sum())
            elements += p.numel()
        muon = (f"Muon bf16: {elements:,} elements bitwise the public's" if hp.muon_bf16 else
                f"Muon fp32 worst {worst['Muon']:.2e} ({ulps['Muon']:.2f} ulps), cautious-decay flips {flips} of "
                f"{elements:,} elements")
        print(f"{label} optimizer step {step + 1}: AdamW worst {worst['AdamW']:.2e} of the step "
              f"({ulps['AdamW']:.2f} weight ulps), {muon}")
        assert flips <= elements * 1e-3
        with torch.no_grad():
            for name, p in public_net.named_parameters():
                our_view(params, mapping[name]).copy_(p)


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def public():
    return load_public("1h")


@pytest.fixture(scope="module")
def models(public):
    """(public model, ours, their map, our hp): the same weights, built once for the module's forward tests."""
    public_net = public_model(public)
    hp = micro_hp("1h", public_net)
    ours = train_gpt.GPT(train_gpt.model_config(hp))
    mapping = copy_weights(public_net, ours)
    return public_net, ours, mapping, hp


# ---------------------------------------------------------------------------------------------- settings

def test_preset_settings_are_the_public_arguments(public):
    """The 1h preset's model, loop and averaging settings are the public script's argparse defaults and constants
    (the rest of the comparison is numbers, below): softcap, dropout, stochastic depth, MTP weight, IHA and its LR,
    the loop range, repeats and start epoch, the 3 averaged checkpoints with both weightings, the window pattern and
    short window (FA3's T/2 admits T/2 + 1 keys), the 50,257 real tokens of a table padded to 50,304, and the 4,864
    val windows: the public's eval steps (its own line) x device batch x 8 ranks."""
    args, hp = public.args, train_gpt.parse_args(["--preset", "1h"])
    assert (hp.logit_softcap, hp.dropout, hp.stochastic_depth, hp.stochastic_depth_style) == (
        args.logit_cap, args.dropout, args.stoch_depth, "batch")
    assert (hp.mtp_weight, hp.mtp_style, hp.head_mix, hp.head_mix_lr) == (args.mtp_weight, "block", args.iha,
                                                                          args.iha_lr)
    assert (hp.loop_range, hp.loop_repeats, hp.loop_start_epoch) == (
        f"{args.dupe_layers_start}:{args.dupe_layers_end}", args.dupe_loops, args.dupe_start_epoch)
    assert (hp.epoch_snapshots, hp.epoch_snapshot_weights) == (args.logit_avg, args.logit_avg_mode)
    assert (hp.n_layer, hp.n_embd, hp.n_head, hp.seq_len) == (public.DEPTH, public.N_EMBD, public.N_HEAD,
                                                               public.MAX_SEQ_LEN)
    assert (hp.window_pattern, hp.window_short) == (public.WINDOW_PATTERN, public.MAX_SEQ_LEN // 2 + 1)
    assert (hp.train_vocab, hp.eval_vocab, hp.vocab_size) == (FULL_VOCAB, FULL_VOCAB, padded(FULL_VOCAB))
    assert (hp.batch_tokens, hp.device_batch_size) == (public.TOTAL_BATCH_SIZE, args.device_batch_size)
    steps = run_block(public_block("1h", "eval_steps = EVAL_TOKENS", "dupe_active = False", include_last=False),
                      EVAL_TOKENS=public.EVAL_TOKENS, args=args, MAX_SEQ_LEN=public.MAX_SEQ_LEN,
                      ddp_world_size=8)["eval_steps"]
    assert hp.val_public_windows == steps * args.device_batch_size * 8 == 4864


def test_parameter_count_at_full_size_is_the_public_count(public):
    """Both models at the full 1h shape on the meta device: 1,443,722,775 parameters each (trunk + MTP block)."""
    config = public.GPTConfig(vocab_size=FULL_VOCAB, dropout=public.args.dropout, stoch_depth=public.args.stoch_depth,
                              use_iha=public.args.iha, iha_mix_v=public.args.iha)
    with torch.device("meta"):
        public_count = sum(p.numel() for p in public.GPT(config).parameters())
    ours = sum(p.numel() for p in train_gpt.build_model_meta(train_gpt.parse_args(["--preset", "1h"])).parameters())
    print(f"1h parameters: public {public_count:,}, ours {ours:,}")
    assert public_count == ours == FULL_PARAMETERS


# ---------------------------------------------------------------------------------------------- model

def test_rope_tables_are_the_public_ones_up_to_bf16_storage(public, models):
    """As the preset runs (rope_tables "bf16"), our RoPE tables are the public's bitwise, bf16 tensors as it stores
    them (and the eval logits below run on them). Our float32 path (rope_tables ""), rounded to bf16, gives the
    public's tables bitwise too: the rounding is the only difference, and it moves the float32 eval logits by the
    figure printed (on CUDA the two paths are the same numbers: float32 tables are rounded to q's bf16 at use)."""
    public_net, _, _, hp = models
    assert hp.rope_tables == "bf16"
    cos, sin = public_rope(public_net)
    preset = train_gpt.GPT(train_gpt.model_config(hp))
    for mine, theirs in ((preset.rotary_cos, cos[:, :SEQ]), (preset.rotary_sin, sin[:, :SEQ])):
        assert mine.dtype == theirs.dtype == torch.bfloat16 and torch.equal(mine, theirs)
    fp32 = train_gpt.GPT(train_gpt.model_config(dataclasses.replace(hp, rope_tables="")))
    for mine, theirs in ((fp32.rotary_cos, cos[:, :SEQ]), (fp32.rotary_sin, sin[:, :SEQ])):
        assert mine.dtype == torch.float32 and torch.equal(mine.bfloat16(), theirs)
    copy_weights(public_net, preset)
    copy_weights(public_net, fp32, rope=False)
    x, _ = tokens(5)
    with torch.no_grad():
        with_public, with_fp32 = preset.eval()(x), fp32.eval()(x)
    effect = (with_fp32 - with_public).abs().max().item()
    print(f"1h RoPE tables fp32 vs the public's bf16: eval logits differ by {effect:.2e} (max abs)")
    assert 0 < effect < 0.1


@pytest.mark.parametrize("looped", [False, True], ids=["loops_off", "loops_on"])
def test_eval_logits_and_loss_equal_the_public(public, models, looped):
    """Eval mode: the (B, T, 200) soft-capped logits (the padded 56 columns sliced off, as the public slices them)
    and every target's loss equal the public model's, with the looped layers off and on."""
    public_net, ours, _, hp = models
    set_loops(public_net, ours, looped, hp.loop_repeats)
    x, y = tokens(1)
    public_logits, public_loss, our_logits, our_loss = eval_pair(public_net, ours, x, y)
    assert our_logits.shape == public_logits.shape == (BATCH, SEQ, VOCAB)
    assert public_logits.abs().max() > 5  # the softcap (10) bends these
    torch.testing.assert_close(our_logits, public_logits, rtol=RTOL, atol=LOGIT_ATOL)
    torch.testing.assert_close(our_loss, public_loss, rtol=RTOL, atol=ATOL)
    print(f"1h eval loops={looped}: logits max rel {max_rel(our_logits, public_logits):.2e}, "
          f"loss max rel {max_rel(our_loss, public_loss):.2e}")


@pytest.mark.parametrize("looped", [False, True], ids=["loops_off", "loops_on"])
def test_training_objective_and_every_gradient_equal_the_public(public, models, looped):
    """Training mode at the preset's dropout 0.1 and stochastic depth 0.05: the objective (next-token mean + 0.3 x
    the MTP block's mean), its next-token part, and every parameter's gradient equal the public's."""
    public_net, ours, mapping, hp = models
    set_loops(public_net, ours, looped, hp.loop_repeats)
    x, y = tokens(2)
    public_loss, public_lm, our_objective, our_ce = training_pair(public_net, ours, hp, x, y, seed=7)
    torch.testing.assert_close(our_objective, public_loss, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(our_ce, public_lm, rtol=RTOL, atol=ATOL)
    assert (public_loss - public_lm).abs() > 0.3  # the MTP term is in it
    worst = assert_gradients_equal(public_net, ours, mapping)
    print(f"1h train loops={looped}: objective rel {max_rel(our_objective, public_loss):.2e}, "
          f"worst gradient rel {worst:.2e}")


def test_stochastic_depth_and_dropout_draw_the_same_under_one_seed(public):
    """Stochastic depth 0.5 (one draw per block call, p l / (L - 1), the MTP block at p L / (L - 1)) and dropout 0.1,
    loops on: under the same seed the two models draw the same blocks and masks, so the objective and every
    gradient are equal; another seed gives another objective (the draws matter), and so does eval mode."""
    public_net = public_model(public, seed=3, stoch_depth=0.5)
    hp = micro_hp("1h", public_net, stochastic_depth=0.5)
    ours = train_gpt.GPT(train_gpt.model_config(hp))
    mapping = copy_weights(public_net, ours)
    assert [b.drop_prob for b in ours.blocks] + [ours.mtp_block.drop_prob] == pytest.approx(
        [b.drop_prob for b in public_net.transformer.h] + [public_net.mtp_block.drop_prob], rel=1e-15)
    set_loops(public_net, ours, True, hp.loop_repeats)
    x, y = tokens(3)
    objectives = []
    for seed in (11, 12):
        public_loss, _, our_objective, _ = training_pair(public_net, ours, hp, x, y, seed=seed)
        torch.testing.assert_close(our_objective, public_loss, rtol=RTOL, atol=ATOL)
        worst = assert_gradients_equal(public_net, ours, mapping)
        objectives.append(public_loss.item())
        print(f"1h draws seed {seed}: objective {public_loss.item():.6f} vs {our_objective.item():.6f}, "
              f"worst gradient rel {worst:.2e}")
    public_net.eval()
    with torch.no_grad():
        eval_objective = public_net(x, y)[0].item()
    assert abs(objectives[0] - objectives[1]) > 1e-3 and abs(objectives[0] - eval_objective) > 1e-3


# ---------------------------------------------------------------------------------------------- optimizer

@pytest.mark.parametrize("precision", ["preset", "fp32"])
def test_optimizer_groups_and_two_steps_equal_the_public(public, monkeypatch, precision):
    """Every group's settings (AdamW lr, betas, eps, weight decay; Muon lr, momentum, steps, NorMuon beta2, weight
    decay and the variants the public always applies) as setup_optimizer makes them, then two steps from the same
    weights and gradients (compare_optimizer_steps): AdamW steps equal the public's; Muon's bitwise as the preset
    runs it (muon_bf16: the public's bf16 rounding) and to float32 precision with muon_bf16 off (the mathematics)."""
    public_net = public_model(public, seed=4)
    hp = micro_hp("1h", public_net, **({} if precision == "preset" else dict(muon_bf16=False)))
    assert hp.muon_bf16 == (precision == "preset")
    ours = train_gpt.GPT(train_gpt.model_config(hp))
    mapping = copy_weights(public_net, ours)
    monkeypatch.setattr(public, "dist", ONE_RANK_DIST)
    public_opt = public_net.setup_optimizer()
    optimizers = train_gpt.build_optimizers(ours, hp, train_gpt.Dist())
    assert group_settings(public_opt, public_net, optimizers, mapping, ours) == len(mapping)
    compare_optimizer_steps(public_net, public_opt, ours, optimizers, hp, mapping, f"1h ({precision})")


# ---------------------------------------------------------------------------------------------- evaluation

VAL_WINDOWS = 50  # disjoint 65-token windows in the micro val file (+ a tail the loaders drop)


@pytest.fixture(scope="module")
def val_file(tmp_path_factory):
    """A val file as the public DataLoader reads it (tokens, doc_starts, bos_id, seq_shuffle_seed 42) and its flat
    tokens for ours. The header's bos_id is the one the public loader asserts (GPT-2's 50256); the micro documents
    start with token VOCAB - 1."""
    rng = np.random.default_rng(5)
    pieces = [np.concatenate([[VOCAB - 1], rng.integers(0, VOCAB - 1, rng.integers(20, 120))])
              for _ in range(80)]
    flat = np.concatenate(pieces)[:VAL_WINDOWS * (SEQ + 1) + 13]
    starts = np.flatnonzero(flat == VOCAB - 1)
    path = tmp_path_factory.mktemp("val") / "val.pt"
    torch.save(dict(tokens=torch.from_numpy(flat.astype(np.int32)), doc_starts=torch.from_numpy(starts),
                    bos_id=50256, seq_shuffle_seed=42), path)
    return str(path), flat


def public_windows(public, path, ranks: int, steps: int, monkeypatch) -> list[list[np.ndarray]]:
    """The (SEQ + 1)-token windows each rank's public val DataLoader gives in `steps` evaluation steps."""
    per_rank = []
    for rank in range(ranks):
        monkeypatch.setenv("RANK", str(rank)), monkeypatch.setenv("LOCAL_RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(ranks))
        loader, rows = public.DataLoader(path, BATCH, SEQ, device="cpu"), []
        for _ in range(steps):
            x, y, _ = next(loader)
            rows += [np.concatenate([xr[:1].numpy(), yr.numpy()]) for xr, yr in zip(x, y)]
        per_rank.append(rows)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name)
    return per_rank


def test_public_val_windows_are_ours(public, val_file, monkeypatch):
    """The public val loader's windows over 3 evaluation steps on 8 ranks (48 of the file's 50; the file's shuffle
    seed 42, prepare_data.py's) are, as a set, PublicWindows(count 48, the preset's val_window_seed)'s over 8 ranks;
    on one rank (6 steps, 12 windows) the same windows in the same order."""
    path, flat = val_file
    seed = train_gpt.parse_args(["--preset", "1h"]).val_window_seed
    for ranks, steps in ((8, 3), (1, 6)):
        public_rows = public_windows(public, path, ranks, steps, monkeypatch)
        windows = train_gpt.PublicWindows(flat, SEQ, "val", ranks * steps * BATCH, seed)
        ours = [[np.concatenate([x[:1].numpy(), y.numpy()]) for xb, yb in windows.batches(rank, ranks, BATCH)
                 for x, y in zip(xb, yb)] for rank in range(ranks)]
        flatten = lambda rows: sorted(tuple(row.tolist()) for rank in rows for row in rank)  # noqa: E731
        assert flatten(ours) == flatten(public_rows) and len(flatten(ours)) == ranks * steps * BATCH
        if ranks == 1:
            assert [row.tolist() for row in ours[0]] == [row.tolist() for row in public_rows[0]]


def byte_table() -> np.ndarray:
    """Bytes per token id for bits per byte: 1-6, 0 for the document token (as <|endoftext|>) and the padding."""
    table = np.random.default_rng(6).integers(1, 7, padded(VOCAB))
    table[VOCAB - 1:] = 0
    return table


def test_evaluate_bpb_and_checkpoint_probability_average_equal_the_public(public, val_file, monkeypatch):
    """On the public val windows (one rank, 4 steps of 2): (1) one model's loss and bits per byte by the public
    evaluate_bpb and by ours (score, the run's per-epoch public evaluation); (2) 3 checkpoints'
    probability average by the public evaluate_bpb_logit_avg (checkpoint files as the run writes them) with its equal
    and recency weights, and ours (score, the run's scoring of averages) with snapshot_mixtures'
    weights: the same weights, loss and bits per byte. The models run as the averaged ones do, looped layers on."""
    path, flat = val_file
    steps, table = 4, byte_table()
    public_net = public_model(public, seed=8)
    hp = micro_hp("1h", public_net)
    snapshots = []
    for k in range(3):  # 3 epoch-end checkpoints: the weights moved a little each epoch
        net = public_model(public, seed=8)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * k * torch.randn(p.shape, generator=torch.Generator().manual_seed(100 + k)))
        ours = train_gpt.GPT(train_gpt.model_config(hp))
        copy_weights(net, ours)
        ours.loop_active = True
        file = f"{path}.epoch_{k:03d}.pt"
        torch.save({name: p.data.float().cpu() for name, p in net.named_parameters()}, file)
        snapshots.append((file, net, ours))
    public_net.set_dupe_layers(LOOP[0], LOOP[1], hp.loop_repeats)
    windows = train_gpt.PublicWindows(flat, SEQ, "val", steps * BATCH, hp.val_window_seed)

    # (1) one model, the last checkpoint
    _, last, ours_last = snapshots[-1]
    last.set_dupe_layers(LOOP[0], LOOP[1], hp.loop_repeats)
    last.eval()
    public_bpb, public_loss = public.evaluate_bpb(last, public.DataLoader(path, BATCH, SEQ, device="cpu"), steps,
                                                  torch.from_numpy(table[:VOCAB]).int())
    our_loss, our_bpb = train_gpt.score([ours_last], [1.0], windows, train_gpt.Dist(), BATCH, token_bytes=table)
    assert our_loss == pytest.approx(public_loss, rel=RTOL) and our_bpb == pytest.approx(public_bpb, rel=RTOL)
    print(f"1h evaluate_bpb: loss {public_loss:.7f} vs {our_loss:.7f}, bpb {public_bpb:.7f} vs {our_bpb:.7f}")

    # (2) the probability average: the run's own weight lines, then its evaluation (names it reads from the run)
    for name, value in dict(orig_model=public_net, autocast_ctx=contextlib.nullcontext(),
                            token_bytes=torch.from_numpy(table[:VOCAB]).int(),
                            build_val_loader=lambda: public.DataLoader(path, BATCH, SEQ, device="cpu")).items():
        monkeypatch.setattr(public, name, value, raising=False)
    public_weights = run_block(public_block("1h", "equal_w    = [1.0 / n] * n", "weighted_w = "), n=3)
    mixtures = train_gpt.snapshot_mixtures(hp, 3)
    assert mixtures.keys() == {"equal", "recency"}
    for label, public_label in (("equal", "equal_w"), ("recency", "weighted_w")):
        assert mixtures[label] == pytest.approx(public_weights[public_label], rel=1e-15)
        public_net.eval()
        public_bpb, public_loss = public.evaluate_bpb_logit_avg(public_net, [file for file, _, _ in snapshots],
                                                                public_weights[public_label], steps)
        our_loss, our_bpb = train_gpt.score([ours for _, _, ours in snapshots], mixtures[label], windows, train_gpt.Dist(), BATCH, token_bytes=table)
        print(f"1h logit avg {label}: loss {public_loss:.7f} vs {our_loss:.7f}, bpb {public_bpb:.7f} vs {our_bpb:.7f}")
        assert our_loss == pytest.approx(public_loss, rel=RTOL) and our_bpb == pytest.approx(public_bpb, rel=RTOL)
