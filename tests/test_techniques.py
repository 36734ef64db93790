"""The record techniques: each flag's mathematics, each flag's default leaving the plain model exactly unchanged,
and a model with every flag on that trains (and compiles, where torch.compile works on this CPU)."""
import json
import math
import os
import sys
import time

import pytest
import torch

import train_gpt
from conftest import micro_flags, read_metrics

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures"))
import make_plain_reference as reference  # noqa: E402

# Every technique switched on (the values a test or the ablation bench uses); a flag absent from here is a sub-setting.
ALL_ON = dict(value_proj=True, unet_skips=True, attn_gate=True, resid_mix=True, xsa="learned", stochastic_depth=0.1,
              mtp_weight=0.3, loop_repeats=1, window_pattern="SSSL", window_short=8, window_warmup_frac=0.5,
              head_mix=True,
              muon_polar_express=True, muon_eq_r=True, normuon=True, cautious_wd=True, muon_momentum_warmup=5,
              grad_clip=1.0, warmdown_shape=2.0, lr_cycles=2, wd_schedule="inverse", ema_decay=0.9)


def micro_hp(**overrides) -> train_gpt.Hyperparameters:
    settings = dict(vocab_size=256, bos_id=255, n_layer=4, n_embd=32, n_head=2, seq_len=16)
    settings.update(overrides)
    return train_gpt.Hyperparameters(**settings)


def give_weights(model: train_gpt.GPT) -> None:
    """The zero-initialised output projections would hide differences: give them weights."""
    with torch.no_grad():
        for block in model.blocks:
            torch.nn.init.normal_(block.attn.c_proj.weight, std=0.2)
            torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.2)


# ------------------------------------------------------------------------------------------- defaults are plain

MODEL_FLAGS = ["value_proj", "unet_skips", "attn_gate", "resid_mix", "xsa", "stochastic_depth", "mtp_weight",
               "loop_repeats", "window_pattern", "head_mix"]


REFERENCE = torch.load(os.path.join(os.path.dirname(__file__), "fixtures", "plain_reference.pt"), weights_only=True)


@pytest.mark.stored_bitwise
def test_plain_model_matches_stored_reference():
    """The plain model (every flag at its default) gives bitwise the logits and gradients stored in the fixture,
    made by tests/fixtures/make_plain_reference.py from the code before the model refactor (fda763c)."""
    assert set(reference.FLAG_ON) <= set(MODEL_FLAGS)  # a trick added later: its default is checked here all the same
    plain = reference.model_outputs(train_gpt.Hyperparameters(**reference.MICRO))
    assert len(plain["logits"]) == 1 and torch.equal(plain["logits"][0], REFERENCE["plain"]["logits"][0])
    assert plain["grads"].keys() == REFERENCE["plain"]["grads"].keys()
    for name, grad in plain["grads"].items():
        assert torch.equal(grad, REFERENCE["plain"]["grads"][name]), name


@pytest.mark.parametrize("flag", list(reference.FLAG_ON))
def test_flag_on_matches_stored_reference_and_differs_from_plain(flag):
    """Each trick switched on gives bitwise its stored logits (the refactor kept the trick's mathematics), and they
    differ from the plain model's (so the plain reference comparison above can tell a trick that leaks into it)."""
    hp = train_gpt.Hyperparameters(**reference.MICRO, **{flag: reference.FLAG_ON[flag]})
    logits = reference.model_outputs(hp)["logits"]
    stored = REFERENCE["flags"][flag]
    assert len(logits) == len(stored) and all(torch.equal(a, b) for a, b in zip(logits, stored))
    if flag != "mtp_weight":  # the MTP head adds a second output, not a change to the next-token logits
        assert not torch.equal(logits[0], REFERENCE["plain"]["logits"][0])
    else:
        assert len(logits) == 2


@pytest.mark.stored_bitwise
def test_plain_optimizer_step_matches_stored_reference():
    """One step of the plain optimizers (Muon + AdamW as build_optimizers groups them) lands bitwise on the stored
    parameters."""
    stepped = reference.optimizer_step(train_gpt.Hyperparameters(**reference.MICRO))
    assert stepped.keys() == REFERENCE["step"].keys()
    for name, param in stepped.items():
        assert torch.equal(param, REFERENCE["step"][name]), name


def test_optimizer_and_schedule_defaults_are_bitwise_plain():
    """The default optimizer flags' step is test_plain_optimizer_step_matches_stored_reference (bitwise, stored);
    here the default LR schedule is the hand formula, exactly."""
    hp = micro_hp(warmdown_frac=0.5, final_lr_frac=0.1)
    for step in range(20):
        factor = 1.0 if step < 10 else 1.0 - (step / 20 - 0.5) / 0.5 * 0.9
        assert train_gpt.lr_multiplier(step, 20, hp) == factor


# ----------------------------------------------------------------------------------------------- model tricks

def test_xsa_fixed_output_is_orthogonal_to_own_value():
    torch.manual_seed(0)
    y, v = torch.randn(2, 5, 3, 8), torch.randn(2, 5, 3, 8)  # (B, T, H, D)
    out = train_gpt.exclusive_self_attention(y, v, 1.0)
    cosine = ((out * v).sum(-1) / (out.norm(dim=-1) * v.norm(dim=-1))).abs().max().item()
    print(f"XSA s=1: max |cos(y_out, v)| = {cosine:.2e} (before: "
          f"{((y * v).sum(-1) / (y.norm(dim=-1) * v.norm(dim=-1))).abs().max().item():.2f})")
    assert cosine < 1e-5
    # the component orthogonal to v is untouched
    v_hat = torch.nn.functional.normalize(v, dim=-1)
    assert torch.allclose(out, y - (y * v_hat).sum(-1, keepdim=True) * v_hat, atol=1e-6)
    # learned strength tanh(0) = 0 is the identity; inside the model the s = 1 property holds per head
    assert torch.equal(train_gpt.exclusive_self_attention(y, v, torch.tanh(torch.zeros(3))), y)


def test_xsa_inside_attention_per_head():
    torch.manual_seed(0)
    attn = train_gpt.CausalSelfAttention(micro_hp(xsa="fixed"))
    captured = {}
    attn.c_proj.register_forward_hook(lambda module, args, out: captured.update(y=args[0]))
    attn.c_v.register_forward_hook(lambda module, args, out: captured.update(v=out))
    x = torch.randn(2, 16, 32)
    cos, sin = train_gpt.rotary_tables(16, 16, 10000.0)
    attn(x, cos, sin)
    y, v = captured["y"].view(2, 16, 2, 16), captured["v"].view(2, 16, 2, 16)
    assert (y * torch.nn.functional.normalize(v, dim=-1)).sum(-1).abs().max() < 1e-5


def test_looped_layers_run_the_configured_number_of_times():
    hp = micro_hp(n_layer=6, loop_repeats=2, loop_range="2:4")
    model = train_gpt.GPT(train_gpt.model_config(hp))
    calls = [0] * 6
    for layer, block in enumerate(model.blocks):
        block.register_forward_hook(lambda module, args, out, layer=layer: calls.__setitem__(layer, calls[layer] + 1))
    idx = torch.randint(0, 256, (1, 16))
    model(idx)
    assert calls == [1] * 6  # before loop_start_frac: a plain pass
    model.loop_active = True
    calls[:] = [0] * 6
    model(idx)
    assert calls == [1, 1, 3, 3, 1, 1]  # layers 2 and 3 once plus two replays
    assert model.layer_order() == [0, 1, 2, 3, 2, 3, 2, 3, 4, 5]


def test_sliding_window_mask_and_attention():
    mask = train_gpt.sliding_window_mask(6, 2, torch.device("cpu"))
    assert mask.int().tolist()[3] == [0, 0, 1, 1, 0, 0]  # token 3 sees itself and token 2 only
    assert train_gpt.window_sizes(micro_hp(window_pattern="SSSL", n_layer=6)) == [8, 8, 8, 16, 8, 16]
    # a window as long as the sequence is plain causal attention
    torch.manual_seed(0)
    attn = train_gpt.CausalSelfAttention(micro_hp())
    x = torch.randn(1, 16, 32)
    cos, sin = train_gpt.rotary_tables(16, 16, 10000.0)
    full = train_gpt.sliding_window_mask(16, 16, torch.device("cpu"))
    assert torch.allclose(attn(x, cos, sin), attn(x, cos, sin, attn_mask=full), atol=1e-6)


def test_tricks_keep_the_model_causal():
    torch.manual_seed(0)
    hp = micro_hp(**{k: v for k, v in ALL_ON.items() if k in MODEL_FLAGS})
    model = train_gpt.GPT(train_gpt.model_config(hp)).eval()
    model.loop_active = True
    give_weights(model)
    idx = torch.randint(0, 256, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    assert torch.allclose(model(idx)[:, :10], model(changed)[:, :10], atol=1e-5)


def test_scalars_and_gates_go_to_adamw():
    hp = micro_hp(**ALL_ON)
    model = train_gpt.GPT(train_gpt.model_config(hp))
    adamw, muon = train_gpt.build_optimizers(model, hp, train_gpt.Dist())
    muon_ids = {id(p) for group in muon.param_groups for p in group["params"]}
    names = {name for name, p in model.named_parameters() if id(p) not in muon_ids}
    for expected in ("blocks.0.attn.out_gate", "blocks.1.attn.value_gate", "blocks.0.attn.head_mix",
                     "blocks.0.attn.xsa_alpha", "resid_lambdas", "x0_lambdas", "skip_weights"):
        assert expected in names
    assert "mtp_proj.weight" not in names and "blocks.1.attn.c_x0v.weight" not in names  # matrices: Muon


# ------------------------------------------------------------------------------------------------- optimizer

@pytest.mark.parametrize("shape", [(64, 32), (32, 128), (96, 96)])
def test_polar_express_and_newton_schulz_flatten_singular_values(shape):
    torch.manual_seed(0)
    grad = torch.randn(*shape)
    spreads = {}
    for name, orthogonalize in (("newton_schulz", train_gpt.newton_schulz_orthogonalize),
                                ("polar_express", train_gpt.polar_express_orthogonalize)):
        singular = torch.linalg.svdvals(orthogonalize(grad, 5))
        bulk = singular[: int(0.9 * singular.numel())]  # square Gaussians have a few values too near 0 to reach 1
        spreads[name] = (singular.min().item(), bulk.min().item(), singular.max().item())
        assert 0.6 < bulk.min() and singular.max() < 1.25
    print(f"{shape}: singular values (min, 90%-bulk min, max) " +
          ", ".join(f"{k} {a:.3f} {b:.3f} {c:.3f}" for k, (a, b, c) in spreads.items()))
    # Polar Express is designed to land closer to 1 than the fixed quintic's [0.7, 1.2] band: its worst bulk value
    # deviates less from 1
    worst = {k: max(1 - bulk_min, top - 1) for k, (_, bulk_min, top) in spreads.items()}
    assert worst["polar_express"] < worst["newton_schulz"]


def test_cautious_weight_decay_spares_opposed_entries():
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(16, 8))
    param.grad = torch.randn(16, 8)
    start = param.detach().clone()
    muon = train_gpt.Muon([param], lr=0.1, momentum=0.0, nesterov=False, ns_steps=5, weight_decay=0.5,
                          cautious_wd=True)
    update = train_gpt.newton_schulz_orthogonalize(param.grad, 5) * 2**0.5
    muon.step()
    applied = param.detach() - (start - 0.1 * update)  # what weight decay did, per entry
    opposed = update * start < 0
    assert 0 < opposed.sum() < opposed.numel()
    assert torch.allclose(applied[opposed], torch.zeros(()), atol=1e-7)  # undecayed
    assert torch.allclose(applied[~opposed], -0.1 * 0.5 * start[~opposed], atol=1e-6)  # decayed as usual


def test_normuon_and_muon_eq_r_give_balanced_finite_updates():
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(32, 16))
    grad = torch.randn(32, 16) * torch.logspace(-2, 1, 32)[:, None]  # rows of very different sizes
    update = train_gpt.newton_schulz_orthogonalize(grad, 5)
    second = torch.zeros(32, 1)
    rescaled = train_gpt.normuon_rescale(update, second, 0.95)
    assert torch.allclose(rescaled.norm(), update.norm(), rtol=1e-5)  # the Frobenius norm is kept
    row_spread = lambda m: (m.norm(dim=1).max() / m.norm(dim=1).min()).item()
    print(f"NorMuon row-norm spread {row_spread(update):.2f} -> {row_spread(rescaled):.2f}")
    assert row_spread(rescaled) < row_spread(update) and row_spread(rescaled) < 1.01
    param.grad = grad
    muon = train_gpt.Muon([param], lr=0.1, momentum=0.9, nesterov=True, ns_steps=5, weight_decay=0.0, eq_r=True,
                          normuon_beta2=0.95, polar_express=True)
    muon.step()
    assert torch.isfinite(param).all()


def test_schedules():
    hp = micro_hp(warmdown_frac=0.5, warmdown_shape=2.0, lr_cycles=2, lr_cycle_floor=0.2)
    factors = [train_gpt.lr_multiplier(step, 20, hp) for step in range(20)]
    # two cosine cycles over steps 0-9, each falling from 1 towards the floor 0.2, then a restart at step 5
    assert factors[0] == 1.0 and factors[5] == 1.0
    assert factors[4] == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 0.8)))
    assert min(factors[:10]) >= 0.2 and factors[1] > factors[2] > factors[3] > factors[4]
    assert factors[15] == pytest.approx(0.25)  # (1 - 0.5)^2
    assert train_gpt.wd_multiplier(3.0, 4.0, 0.25, micro_hp(wd_schedule="inverse")) == 4.0
    saw = [train_gpt.wd_multiplier(s / 5, 4.0, 1.0, micro_hp(wd_schedule="sawtooth", wd_sawtooth_epochs=2))
           for s in range(20)]
    assert saw[:10] == [1.0] * 10 and saw[10] == 2.0 and saw[14] == pytest.approx(0.4) and saw[15] == 2.0
    hp = micro_hp(muon_momentum_warmup=10, muon_momentum=0.95)
    assert train_gpt.muon_momentum(0, hp) == 0.85 and train_gpt.muon_momentum(20, hp) == pytest.approx(0.95)


# ------------------------------------------------------------------------------------------------- averaging

def test_ema_matches_closed_form():
    decay, weights = 0.8, [torch.tensor([float(k), -2.0 * k]) for k in range(6)]
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(weights[0])
    ema = train_gpt.WeightEMA(model, decay)
    for w in weights[1:]:
        with torch.no_grad():
            model.weight.copy_(w)
        ema.update(model)
    n = len(weights) - 1
    closed = decay**n * weights[0] + sum((1 - decay) * decay**(n - k) * weights[k] for k in range(1, n + 1))
    assert torch.allclose(ema.averages[0][0], closed, atol=1e-6)
    ema.blend_into(model, 0.25)
    assert torch.allclose(model.weight[0], 0.25 * closed + 0.75 * weights[-1], atol=1e-6)


# --------------------------------------------------------------------------------------- everything on at once

@pytest.fixture
def one_thread():
    """Tiny shapes on a shared 2-core machine: a second OpenMP thread only spins (measured: 45 ms/step on one
    thread, 2.5 s/step on two under load), so these runs use one and restore the setting after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_flag_on_trains(tmp_path, micro_data, one_thread):
    train_path, val_path = micro_data
    flags = micro_flags(train_path, val_path, str(tmp_path / "logs"), "all", num_epochs=3, n_layer=4,
                        **ALL_ON, ema_start_frac=0.5, loop_start_frac=0.3)
    assert train_gpt.main(flags) == 0
    train = [row["train_loss"] for row in read_metrics(str(tmp_path / "logs" / "all")) if row["kind"] == "train"]
    result = json.load(open(os.path.join(tmp_path, "logs", "all", "result.json")))
    print(f"all flags on: {len(train)} steps, train loss {train[0]:.3f} -> {train[-1]:.3f}, "
          f"val {result['val_loss']:.3f} (unigram {result['unigram_val_loss']:.3f})")
    assert len(train) >= 24
    assert sum(train[-5:]) / 5 < 0.75 * train[0]
    assert result["val_loss"] < result["unigram_val_loss"]


def test_every_flag_on_eager_matches_compiled(one_thread):
    hp = micro_hp(**{k: v for k, v in ALL_ON.items() if k in MODEL_FLAGS})
    torch.manual_seed(0)
    model = train_gpt.GPT(train_gpt.model_config(hp)).eval()
    model.loop_active = True
    give_weights(model)
    idx = torch.randint(0, 256, (2, 16))
    eager = model(idx)
    start = time.time()
    try:
        compiled = torch.compile(model)(idx)
    except Exception as error:  # no C compiler, unsupported platform: compile is an optional path on CPU
        pytest.skip(f"torch.compile unavailable on this CPU: {type(error).__name__}: {str(error)[:200]}")
    print(f"compile + run: {time.time() - start:.1f}s, max |eager - compiled| = {(eager - compiled).abs().max():.2e}")
    assert torch.allclose(eager, compiled, atol=1e-4, rtol=1e-4)


def test_window_schedule_grows_the_windows_to_full():
    """window_warmup_frac: stages in equal slices of the warmup, full windows after it; the narrow stage really
    hides distant tokens and the last stage is the unscheduled model."""
    hp = micro_hp(n_layer=1, window_pattern="L", window_warmup_frac=0.5, window_warmup_stages=4)
    assert [train_gpt.window_stage(s, 40, hp) for s in range(0, 40, 5)] == [0, 1, 2, 3, 3, 3, 3, 3]
    assert train_gpt.scaled_window_sizes([8, 16], 0, 4) == [2, 4]
    assert train_gpt.scaled_window_sizes([8, 16], 3, 4) == [8, 16]
    torch.manual_seed(0)
    model = train_gpt.GPT(train_gpt.model_config(hp)).eval()
    give_weights(model)
    idx = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    changed = idx.clone()
    changed[0, 0] = (idx[0, 0] + 1) % 256  # a different first token
    model.set_window_stage(0, 4)  # window 4: positions >= 4 cannot see token 0
    assert model.window_sizes == [4]
    narrow = (model(idx) - model(changed)).abs().amax(dim=-1)[0]
    assert narrow[4:].max() == 0 and narrow[:4].min() > 0
    model.set_window_stage(3, 4)  # full: every position sees token 0
    assert model.window_sizes == [16]
    assert (model(idx) - model(changed)).abs().amax(dim=-1)[0].min() > 0
    with pytest.raises(train_gpt.ConfigError, match="window_pattern"):
        train_gpt.check_hyperparameters(micro_hp(window_warmup_frac=0.5), 1)


def test_saved_member_reloads_in_the_schedule_state_it_was_taken_in(tmp_path):
    """A snapshot taken before the loop starts and early in the window schedule must score, once reloaded, as the
    in-memory model did: not with the looped layers replaying or the full windows (a finished run's state)."""
    hp = micro_hp(n_layer=4, loop_repeats=2, loop_range="1:3", window_pattern="SL", window_short=4,
                  window_warmup_frac=0.5, window_warmup_stages=2)
    torch.manual_seed(0)
    model = train_gpt.GPT(train_gpt.model_config(hp))
    with torch.no_grad():  # the init zeroes output projections: give every layer a say
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.set_window_stage(0, 2)
    assert model.window_sizes != model.full_window_sizes and not model.loop_active
    idx = torch.randint(0, 255, (2, 16))
    with torch.no_grad():
        expected = model.eval()(idx)
    path = str(tmp_path / "members" / "snapshot.pt")
    train_gpt.save_candidate(path, model)
    loaded, _ = train_gpt.load_member(path, torch.device("cpu"))
    assert loaded.window_sizes == model.window_sizes and loaded.loop_active is False
    with torch.no_grad():
        assert torch.allclose(loaded(idx), expected, atol=1e-5)
        # the finished state (loop on, full windows) is a different function: the test would see a wrong reload
        model.loop_active, model.window_sizes = True, model.full_window_sizes
        assert not torch.allclose(model(idx), expected, atol=1e-3)
