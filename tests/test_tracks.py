"""The 1h record's training recipe (issue 15, records/TRACKS.md F0-F10): each setting against a hand computation or a
float64 evaluation of the formula the public script (qlabs-eng/slowrun train.py at fd342f0) uses, each flag at its
default leaving the plain model bitwise unchanged, and the 1h preset training at micro width with every flag on."""
import dataclasses
import math
import os
import sys

import numpy as np
import pytest
import torch

import train_gpt
from conftest import micro_preset_run

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures"))
import make_plain_reference as reference  # noqa: E402

if not torch.cuda.is_available():  # the Triton loss interpreted on CPU tensors, as in tests/test_kernels.py
    os.environ.setdefault("TRITON_INTERPRET", "1")

REFERENCE = torch.load(os.path.join(os.path.dirname(__file__), "fixtures", "plain_reference.pt"), weights_only=True)


def micro_hp(**overrides) -> train_gpt.Hyperparameters:
    return train_gpt.Hyperparameters(**{**dict(vocab_size=64, bos_id=63, n_layer=2, n_embd=16, n_head=2, seq_len=8),
                                        **overrides})


def trained_param(values: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(values.clone())


# ----------------------------------------------------------------------------------------------- defaults are plain

# (flag, a value that switches it on but must not change the plain model's numbers): an identical computation
INERT_ON = dict(train_vocab=64, eval_vocab=64, mlp_hidden=64, out_gate_channels=32)


@pytest.mark.stored_bitwise
def test_record_flags_at_default_leave_the_plain_model_and_step_bitwise():
    """Every flag of this work set explicitly to its default: the stored plain logits, gradients and optimizer step
    (tests/fixtures/plain_reference.pt) come out bitwise."""
    defaults = dict(mlp_hidden=0, proj_init="zero", out_gate_channels=32, train_vocab=0, eval_vocab=0,
                    loop_start_epoch=0, muon_wd_scaled=False, resid_lr_scale=1.0, x0_beta1=0.0, gates_muon=False,
                    lr_epoch_cosine=0)
    hp = train_gpt.Hyperparameters(**reference.MICRO, **defaults)
    plain = reference.model_outputs(hp)
    assert torch.equal(plain["logits"][0], REFERENCE["plain"]["logits"][0])
    for name, grad in plain["grads"].items():
        assert torch.equal(grad, REFERENCE["plain"]["grads"][name]), name
    stepped = reference.optimizer_step(hp)
    for name, param in stepped.items():
        assert torch.equal(param, REFERENCE["step"][name]), name


@pytest.mark.parametrize("flag", list(INERT_ON))
def test_record_flag_at_an_identical_value_is_bitwise_plain(flag):
    """train_vocab = vocab_size (a full slice), mlp_hidden = the rule's width (4 x 16 = 64), out_gate_channels = 32
    with the gate on: the same numbers bitwise, so the flag's code path adds no arithmetic of its own."""
    extra = dict(attn_gate=True) if flag == "out_gate_channels" else {}
    base = train_gpt.Hyperparameters(**reference.MICRO, **extra)
    assert train_gpt.mlp_hidden_width(base) == 64
    plain, flagged = (reference.model_outputs(hp) for hp in (base, dataclasses.replace(base, **{flag: INERT_ON[flag]})))
    assert torch.equal(plain["logits"][0], flagged["logits"][0])
    for name, grad in plain["grads"].items():
        assert torch.equal(grad, flagged["grads"][name]), name


# ----------------------------------------------------------------------------------------------- F1 loss vocabulary

def test_train_vocab_softmax_over_the_first_columns_only():
    """train_vocab 13 of 16: the loss equals float64 logsumexp(z[:13]) - z[y], z = 10 tanh(h W^T / 10); the padded
    rows 13..15 of lm_head get exactly zero gradient; the fused (chunked) path gives the same loss; eval_vocab 14 gives
    14 logits in eval mode."""
    hp = micro_hp(vocab_size=16, bos_id=12, logit_softcap=10.0, train_vocab=13, eval_vocab=14)
    model = train_gpt.build_model(hp, train_gpt.Dist(), seed=0)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    idx = torch.randint(0, 13, (2, 8), generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 13, (2, 8), generator=torch.Generator().manual_seed(1))
    logits = model(idx)
    assert logits.shape == (2, 8, 13)
    loss = train_gpt.cross_entropy_sum(logits, targets) / targets.numel()
    loss.backward()
    z = 10 * torch.tanh(model.features(idx).detach().double() @ model.lm_head.weight.detach().double().T / 10)
    expected = (torch.logsumexp(z[..., :13], -1) - z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)).mean()
    assert abs(loss.item() - expected.item()) < 1e-5
    assert torch.count_nonzero(model.lm_head.weight.grad[13:]) == 0
    assert torch.count_nonzero(model.lm_head.weight.grad[:13]) > 0
    fused, ce = train_gpt.fused_loss_sums(model(idx, raw_logits=True), targets, 10.0, "chunked")
    assert abs(fused.item() / targets.numel() - expected.item()) < 1e-5 and abs(ce.item() - fused.item()) < 1e-6
    model.eval()
    assert model(idx).shape == (2, 8, 14)


def test_triton_loss_reads_a_vocabulary_slice_with_the_full_row_stride():
    """The fused Triton loss on raw[..., :33] of a 40-column tensor (the view head() returns with train_vocab): the
    loss and the gradient of the 33 columns equal the chunked reference on a contiguous copy; columns 33..39 get 0."""
    pytest.importorskip("triton")
    full = torch.randn(2, 5, 40, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 33, (2, 5), generator=torch.Generator().manual_seed(1))
    copy, strided = full[..., :33].clone().requires_grad_(True), full.clone().requires_grad_(True)
    expected = train_gpt.fused_loss_sums(copy, targets, 10.0, "chunked")[0]
    expected.backward()
    loss = train_gpt.fused_loss_sums(strided[..., :33], targets, 10.0, "triton", tile=16)[0]
    loss.backward()
    assert abs(loss.item() - expected.item()) < 1e-4
    assert torch.allclose(strided.grad[..., :33], copy.grad, atol=1e-6)
    assert torch.count_nonzero(strided.grad[..., 33:]) == 0


def test_vocab_flags_refuse_a_slice_that_drops_real_tokens():
    with pytest.raises(train_gpt.ConfigError, match="train_vocab"):
        train_gpt.check_hyperparameters(micro_hp(train_vocab=63), 1)  # bos 63 would fall outside
    with pytest.raises(train_gpt.ConfigError, match="eval_vocab"):
        train_gpt.check_hyperparameters(micro_hp(eval_vocab=65), 1)


# ----------------------------------------------------------------------------------------------- F2 F3 shapes, init

def test_mlp_hidden_sets_the_width_and_the_parameter_count():
    """SwiGLU at d = 16 with mlp_hidden 40: 2 V d + L (4 d^2 + 3 d f) parameters by hand; the public rule
    256 ceil(floor(8 d / 3) / 256) gives 4864 at 1792, which the 1h preset states."""
    hp = micro_hp(mlp="swiglu", mlp_hidden=40)
    assert train_gpt.mlp_hidden_width(hp) == 40
    model = train_gpt.GPT(train_gpt.model_config(hp))
    assert sum(p.numel() for p in model.parameters()) == 2 * 64 * 16 + 2 * (4 * 16 * 16 + 3 * 16 * 40)
    assert train_gpt.PRESETS["1h"]["mlp_hidden"] == 256 * math.ceil(math.floor(8 * 1792 / 3) / 256) == 4864


def test_proj_init_normal_has_std_n_embd_to_the_minus_half():
    """proj_init normal: the attention c_proj (512 x 512) and the MLP c_proj (512 x 128) both ~ N(0, 512^-0.5)
    (the public uses n_embd for both, not the MLP's fan-in 128): std within 2 %, mean within 3 standard errors;
    proj_init zero leaves exact zeros."""
    hp = micro_hp(n_layer=1, n_embd=512, n_head=4, mlp_hidden=128, proj_init="normal")
    torch.manual_seed(0)
    model = train_gpt.GPT(train_gpt.model_config(hp))
    for weight in (model.blocks[0].attn.c_proj.weight, model.blocks[0].mlp.c_proj.weight):
        std = weight.double().std().item()
        assert abs(std / 512**-0.5 - 1) < 0.02, std
        assert abs(weight.double().mean().item()) < 3 * 512**-0.5 / math.sqrt(weight.numel())
    zero = train_gpt.GPT(train_gpt.model_config(dataclasses.replace(hp, proj_init="zero")))
    assert torch.count_nonzero(zero.blocks[0].attn.c_proj.weight) == 0
    assert torch.count_nonzero(zero.blocks[0].mlp.c_proj.weight) == 0


def test_out_gate_reads_its_own_channel_count():
    """out_gate_channels 12: the gate is H x 12 and reads x[..., :12]: y * sigmoid(G x[:12]) by hand."""
    hp = micro_hp(n_embd=32, attn_gate=True, value_proj=True, out_gate_channels=12)
    attn = train_gpt.GPT(train_gpt.model_config(hp)).blocks[1].attn
    assert attn.out_gate.shape == (2, 12) and attn.value_gate.shape == (2, 32)
    with torch.no_grad():
        attn.out_gate.normal_(generator=torch.Generator().manual_seed(0))
        attn.c_proj.weight.copy_(torch.eye(32))
    x = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(1))
    cos, sin = train_gpt.rotary_tables(4, 16, 10000.0)
    with torch.no_grad():
        gated = attn(x, cos, sin, x)
        attn.out_gate.zero_()
        half = attn(x, cos, sin, x)  # sigmoid(0) = 1/2
    g = torch.sigmoid(x[0, :, :12].double() @ torch.randn(2, 12, generator=torch.Generator().manual_seed(0)).double().T)
    expected = (2 * half[0].double().view(4, 2, 16)) * g.unsqueeze(-1)
    assert torch.allclose(gated[0].double().view(4, 2, 16), expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------- F4 F5 optimizers

def one_muon_step(param: torch.Tensor, grad: torch.Tensor, scaled: bool, cautious: bool, lr=0.1, wd=0.5):
    p = trained_param(param)
    p.grad = grad.clone()
    muon = train_gpt.Muon([p], lr=lr, momentum=0.0, nesterov=False, ns_steps=5, weight_decay=wd,
                          cautious_wd=cautious, wd_scaled=scaled)
    muon.step()
    return p.detach()


@pytest.mark.parametrize("cautious", [False, True])
@pytest.mark.parametrize("shape", [(6, 2), (2, 6)])
def test_muon_wd_scaled_multiplies_the_decay_by_the_shape_factor(shape, cautious):
    """The public step p <- p - lr_eff (u + wd p m), lr_eff = lr sqrt(max(1, rows/cols)), m = 1 or (u p >= 0), in
    float64 with u from the same orthogonaliser: sqrt(3) for 6 x 2, 1 for 2 x 6. Unscaled, the decay stays lr wd."""
    generator = torch.Generator().manual_seed(0)
    param, grad = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    factor = math.sqrt(max(1.0, shape[0] / shape[1]))
    u = train_gpt.newton_schulz_orthogonalize(grad, 5).double() * factor
    p = param.double()
    mask = (u * p >= 0).double() if cautious else torch.ones_like(p)
    scaled = one_muon_step(param, grad, True, cautious)
    assert torch.allclose(scaled.double(), p - 0.1 * u - 0.1 * factor * 0.5 * p * mask, atol=1e-6)
    plain = one_muon_step(param, grad, False, cautious)
    assert torch.allclose(plain.double(), p - 0.1 * u - 0.1 * 0.5 * p * mask, atol=1e-6)
    if shape == (6, 2):
        assert not torch.allclose(scaled, plain, atol=1e-4)


RECORD_GROUPS = dict(n_layer=2, n_embd=32, value_proj=True, attn_gate=True, out_gate_channels=12, resid_mix=True,
                     unet_skips=True, head_mix=True, scalar_lr=0.025, muon_lr=0.01, muon_wd=1.3, adam_wd=1.3)


def group_of(optimizers, param):
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            if any(p is param for p in group["params"]):
                return type(optimizer).__name__, group
    raise AssertionError("parameter in no group")


def test_scalar_and_gate_groups_of_the_1h_record():
    """resid lambdas and skips at scalar_lr x 0.01, x0 lambdas with betas (0.96, 0.95), head mixing at scalar_lr,
    all AdamW with weight decay 0; value and output gates in Muon at muon_lr with Muon's weight decay. With the
    flags off: one AdamW scalar group at scalar_lr holding all of them (today's)."""
    hp = micro_hp(**RECORD_GROUPS, gates_muon=True, resid_lr_scale=0.01, x0_beta1=0.96)
    model = train_gpt.build_model(hp, train_gpt.Dist(), seed=0)
    optimizers = train_gpt.build_optimizers(model, hp, train_gpt.Dist())
    attn = model.blocks[1].attn
    expected = [  # parameter, optimizer, lr, betas (None: Muon), weight decay
        (model.resid_lambdas, "AdamW", 0.025 * 0.01, (0.8, 0.95), 0.0),
        (model.skip_weights, "AdamW", 0.025 * 0.01, (0.8, 0.95), 0.0),
        (model.x0_lambdas, "AdamW", 0.025, (0.96, 0.95), 0.0),
        (attn.head_mix, "AdamW", 0.025, (0.8, 0.95), 0.0),
        (attn.value_gate, "Muon", 0.01, None, 1.3),
        (attn.out_gate, "Muon", 0.01, None, 1.3),
        (model.blocks[0].attn.out_gate, "Muon", 0.01, None, 1.3),
        (attn.c_q.weight, "Muon", 0.01, None, 1.3),
    ]
    for param, kind, lr, betas, wd in expected:
        found, group = group_of(optimizers, param)
        assert (found, group["lr"], group["weight_decay"]) == (kind, pytest.approx(lr), wd)
        if betas:
            assert group["betas"] == betas
    plain_hp = micro_hp(**RECORD_GROUPS)
    plain = train_gpt.build_model(plain_hp, train_gpt.Dist(), seed=0)
    adamw, _ = train_gpt.build_optimizers(plain, plain_hp, train_gpt.Dist())
    assert len(adamw.param_groups) == 3 and adamw.param_groups[2]["lr"] == 0.025
    assert {id(p) for p in adamw.param_groups[2]["params"]} == {
        id(p) for n, p in plain.named_parameters() if getattr(p, "scalar_group", False) or p.ndim < 2}


def test_first_adam_step_of_a_resid_lambda_is_one_percent_of_scalar_lr():
    """A first Adam step moves a parameter by lr g / (|g| + eps): with gradient 1, resid_lambdas fall by exactly
    0.025 x 0.01 (to float32 rounding), x0_lambdas by 0.025; a Muon gate with zero gradient decays by lr wd p."""
    hp = micro_hp(**RECORD_GROUPS, gates_muon=True, resid_lr_scale=0.01, x0_beta1=0.96)
    model = train_gpt.build_model(hp, train_gpt.Dist(), seed=0)
    optimizers = train_gpt.build_optimizers(model, hp, train_gpt.Dist())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    model.resid_lambdas.grad.fill_(1.0)
    model.x0_lambdas.grad.fill_(1.0)
    gate = model.blocks[1].attn.out_gate
    with torch.no_grad():
        gate.fill_(0.5)
    for optimizer in optimizers:
        optimizer.step()
    assert torch.allclose(model.resid_lambdas.double(), torch.full((2,), 1 - 0.025 * 0.01, dtype=torch.float64),
                          rtol=0, atol=1e-7)
    assert torch.allclose(model.x0_lambdas.double(), torch.full((2,), 0.1 - 0.025, dtype=torch.float64), atol=1e-7)
    assert torch.allclose(gate.double(), torch.full((2, 12), 0.5 * (1 - 0.01 * 1.3), dtype=torch.float64), atol=1e-7)


# ----------------------------------------------------------------------------------------------- F7 F8a schedules

N, E, K = 110, 11, 3


def public_lr(it: int) -> float:
    """The public get_lr_multiplier (no warmup, warmdown round(0.2 N), power 0.5, final 0) and its SWA cosine."""
    warmdown = round(0.2 * N)
    lrm = 1.0 if it <= N - warmdown else ((N - it) / warmdown) ** 0.5
    spe = N / E
    start = N - K * spe
    if it >= start:
        pos = (it - start) % spe
        lrm = 0.05 + (max(lrm, 0.05) - 0.05) * (1 + math.cos(math.pi * pos / spe)) / 2
    return lrm


def public_wd(it: int) -> float:
    """The public get_wd_multiplier: hold 0.4, 0.65 at the SWA start, 0.65 -> 1.5 within each SWA epoch."""
    spe = N / E
    start = N - K * spe
    if it >= start:
        return 0.65 + 0.85 * ((it - start) % spe) / spe
    t = it / N
    if t < 0.4:
        return 1.0
    return 1.0 - 0.35 * min(max((t - 0.4) / (start / N - 0.4), 0.0), 1.0)


def schedule_hp(**overrides):
    return micro_hp(num_epochs=E, warmdown_frac=0.2, warmdown_shape=0.5, lr_epoch_cosine=K, wd_schedule="slowrun",
                    **overrides)


def ten_step_epochs() -> train_gpt.TrainData:
    """A train set of 20 windows of 5 tokens, 2 per step: 10 steps per epoch, 110 in 11 epochs."""
    tokens = np.arange(100, dtype=np.uint16) % 50
    return train_gpt.TrainData(tokens, 63, seq_len=4, batch_seqs=2, device_batch_size=2, world_size=1, rank=0, seed=0)


def test_final_epoch_cosines_and_wd_schedule_match_the_public_formulas():
    """apply_schedules on a 110-step, 11-epoch run (3 cosine epochs from step 80, sqrt warmdown from step 88): the LR
    factor and the weight-decay factor of every step equal the public script's formulas evaluated in float64 (to
    1e-12); the public formulas themselves at a few steps equal values worked out by hand."""
    hp, data = schedule_hp(), ten_step_epochs()
    param = trained_param(torch.ones(2))
    sgd = torch.optim.SGD([param], lr=1.0, weight_decay=1.0)
    for group in sgd.param_groups:
        group["initial_lr"], group["initial_weight_decay"] = 2.0, 4.0
    for step in range(N):
        factor = train_gpt.apply_schedules([sgd], step, N, data, hp)
        assert abs(factor - public_lr(step)) < 1e-12, step
        assert abs(sgd.param_groups[0]["lr"] - 2.0 * public_lr(step)) < 1e-12, step
        assert abs(sgd.param_groups[0]["weight_decay"] - 4.0 * public_wd(step)) < 1e-12, step
    # by hand: s = 95 lies half-way through the epoch starting at 90, sqrt warmdown (110 - 95)/22
    assert abs(public_lr(95) - (0.05 + (math.sqrt(15 / 22) - 0.05) * 0.5)) < 1e-12
    assert public_lr(80) == 1.0
    assert abs(public_lr(109) - (0.05 + (math.sqrt(1 / 22) - 0.05) * (1 + math.cos(0.9 * math.pi)) / 2)) < 1e-12
    hand_wd = {0: 1.0, 43: 1.0, 60: 1.0 - 0.35 * (60 / 110 - 0.4) / (80 / 110 - 0.4), 80: 0.65, 85: 0.65 + 0.85 * 0.5,
               109: 0.65 + 0.85 * 0.9}
    for step, value in hand_wd.items():
        assert abs(public_wd(step) - value) < 1e-12, step


def test_wd_schedule_slowrun_is_anti_phase_to_todays_sawtooth():
    """Within a final epoch the slowrun decay rises (0.65 -> 1.5) while the LR cosine falls; sawtooth falls 2 -> 0."""
    hp = schedule_hp()
    rising = [train_gpt.wd_multiplier(10 + i / 10, 11.0, 1.0, hp) for i in range(10)]
    assert rising == sorted(rising) and rising[0] == 0.65
    falling = [train_gpt.wd_multiplier(10 + i / 10, 11.0, 1.0, dataclasses.replace(hp, wd_schedule="sawtooth"))
               for i in range(10)]
    assert falling == sorted(falling, reverse=True)


def test_schedule_flags_refuse_conflicts():
    with pytest.raises(train_gpt.ConfigError, match="lr_epoch_cosine"):
        train_gpt.check_hyperparameters(schedule_hp(swa_epochs=2), 1)
    with pytest.raises(train_gpt.ConfigError, match="loop_start_epoch"):
        train_gpt.check_hyperparameters(micro_hp(loop_repeats=1, loop_start_epoch=2, loop_start_frac=0.5), 1)


# ----------------------------------------------------------------------------------------------- F10 loop start

def test_loop_start_epoch_is_the_first_step_of_that_epoch():
    """loop_start_epoch 7 of 11 ten-step epochs: looping is on from step 60 (the public: step >= 6 x N / E)."""
    data = ten_step_epochs()
    hp = micro_hp(loop_repeats=2, num_epochs=11, loop_start_epoch=7)
    assert train_gpt.loop_start_step(hp, data, N) == 60 == 6 * N / E
    assert train_gpt.loop_start_step(dataclasses.replace(hp, loop_start_epoch=0, loop_start_frac=0.5), data, N) == 55


# ----------------------------------------------------------------------------------------------- the 1h preset

MICRO_1H = dict(vocab_size=320, bos_id=255, train_vocab=256, eval_vocab=256, n_layer=4, n_embd=32, n_head=2,
                seq_len=32, mlp_hidden=96, window_short=9, loop_range="2:3", device_batch_size=2, batch_tokens=128,
                val_batch_size=2, device="cpu", compile="off")


def test_1h_preset_states_the_record_and_its_flags():
    """The preset (and its alias slowrun) is the 1h record's shape and recipe; its full-scale model has the public
    1,443,722,775 parameters: the trunk's 1,398,305,571 plus the MTP block (45,417,204 = 2 d^2 + 4 d^2 + 3 d 4864 +
    12 H + 3 H^2, d 1792, H 14)."""
    hp = train_gpt.parse_args(["--preset", "1h"])
    assert train_gpt.parse_args(["--preset", "slowrun"]) == dataclasses.replace(hp, preset="slowrun")
    train_gpt.check_hyperparameters(hp, 8)
    assert (hp.n_layer, hp.n_embd, hp.n_head, hp.mlp_hidden, hp.window_short) == (30, 1792, 14, 4864, 1025)
    n_params = sum(p.numel() for p in train_gpt.build_model_meta(hp).parameters())
    mtp = 2 * 1792**2 + 4 * 1792**2 + 3 * 1792 * 4864 + 12 * 14 + 3 * 14**2
    assert n_params == 1_398_305_571 + mtp == 1_443_722_775
    lines = train_gpt.preset_record_lines(hp, n_params)
    assert "reproduces the 1h record 3.195" in lines[0] and "1,443,722,775 vs 1,443,722,775" in lines[1]
    # FLOPs by the public formula, by hand: 6 (N - wte - 75 scalars) + 12 d (22 x 768.75 + 8 x 1024.5) keys
    flops = 6 * (n_params - 50304 * 1792 - 75) + 12 * 1792 * (22 * 768.75 + 8 * 1024.5)
    assert train_gpt.training_flops_per_token(hp) == pytest.approx(flops, rel=1e-12)


def test_1h_preset_trains_three_steps_at_micro_width_with_every_flag_on():
    """The 1h preset with only its shapes shrunk, in the phase where every schedule flag acts (looped layers on,
    final-epoch cosine, the rising weight decay): three optimizer steps on one batch, loss finite and falling."""
    hp = train_gpt.Hyperparameters(**{**train_gpt.PRESETS["1h"], **MICRO_1H, "preset": "1h"})
    train_gpt.check_hyperparameters(hp, 1)
    model = train_gpt.build_model(hp, train_gpt.Dist(), seed=0)
    optimizers = train_gpt.build_optimizers(model, hp, train_gpt.Dist())
    data = ten_step_epochs()
    idx = torch.randint(0, 256, (2, hp.seq_len + 1), generator=torch.Generator().manual_seed(0))
    losses = []
    for step in (100, 101, 102):  # epoch 11 of 11: loops on, cosine and WD sawtooth active
        train_gpt.apply_schedules(optimizers, step, N, data, hp)
        model.loop_active = step >= train_gpt.loop_start_step(hp, data, N)
        assert model.loop_active and len(model.layer_order()) == 4 + 2
        # the training objective: next-token CE plus the MTP block's term (its parameters learn too)
        ce, objective = train_gpt.training_loss_sums(model, idx[:, :-1], idx[:, 1:], hp.mtp_weight,
                                                     mtp_style=hp.mtp_style)
        loss = ce / idx[:, 1:].numel()
        (objective / idx[:, 1:].numel()).backward()
        for optimizer in optimizers:
            optimizer.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    print(f"1h micro: losses {losses}")
    assert all(math.isfinite(x) for x in losses) and losses[2] < losses[1] < losses[0]


def test_1h_preset_run_logs_the_record_comparison(micro_data, tmp_path):
    """train_gpt.main with --preset 1h at micro width (shapes only): the run section names the record and compares
    parameters and FLOPs per token; the train loss is finite and lower after 3 steps than at the first."""
    log, losses = micro_preset_run("1h", micro_data, tmp_path, vocab_size=320, train_vocab=256, eval_vocab=256,
                                   mlp_hidden=64, window_short=9, loop_range="1:2", val_tokens=256,
                                   val_public_windows=16)
    assert "preset 1h: reproduces the 1h record 3.195 (qlabs-eng/slowrun train.py@fd342f0)" in log
    assert "vs 1,443,722,775 parameters" in log and "FLOPs/token" in log
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_run_sh_takes_the_preset_first_and_names_its_record():
    """run.sh's first argument is the preset (default 1h; a flag first means the default): it prints the record
    before anything else, then (no GPU here, NGPU=0) stops with exit 1. The alias and an unknown preset in-process."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(["bash", os.path.join(root, "run.sh"), "--seed", "1"], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, NGPU="0", OMP_NUM_THREADS="1"))
    output = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 1 and len(output) == 2, output
    assert output[0] == "run.sh: preset 1h: reproduces the 1h record 3.195 (qlabs-eng/slowrun train.py@fd342f0)"
    assert train_gpt.preset_record("slowrun").startswith("preset slowrun is 1h: reproduces the 1h record 3.195")
    with pytest.raises(train_gpt.ConfigError, match="unknown preset 'nope' .known: tiny, mini, mini_bpe, 1h, slowrun"):
        train_gpt.preset_record("nope")


# ------------------------------------------------------------------------------------ training stages as one table

def public_cycle_batches(cycles: int, epochs_per_cycle: int, floor: float) -> str:
    """The unlimited record's batch per cycle, by hand from its formula: full batch where amp = 1 - |2c/(C-1) - 1|
    >= 0.5, `floor` of it elsewhere, each cycle's value for each of its epochs."""
    amps = [1.0 - abs(2.0 * c / (cycles - 1) - 1.0) for c in range(cycles)]
    return ",".join("1" if amp >= 0.5 else f"{floor:g}" for amp in amps for _ in range(epochs_per_cycle))


def test_the_presets_stage_tables_give_the_schedules_the_records_run():
    presets = train_gpt.PRESETS
    # the strings the presets held before they were tables (commit 63b99db), each the record's schedule
    assert presets["1h"]["loop_start_epoch"] == 7
    assert presets["2h"]["loop_start_epoch"] == 14
    assert presets["2h"]["window_schedule"] == "1-6:257,769;7-13:769,1793;14-22:1281,2048"
    assert (presets["15min"]["wd_schedule"], presets["15min"]["wd_points"]) == ("points", "0:1,2:1,8:0.125,15:1.1625")
    assert presets["unlimited"]["batch_schedule"] == public_cycle_batches(96, 2, 0.75)
    assert presets["unlimited"]["batch_schedule"].count("0.75") == 96  # the first and last quarter of 192 epochs


@pytest.mark.parametrize("table, message", [
    ("epochs windows\n1-6 257,769", "back to back from 0"),
    ("epochs windows\n0-6 257,769\n7-9 769,1793", "back to back from 0"),
    ("epochs looped_layers\n0-6 on\n6-9 off", "off, then on"),
    ("epochs weight_decay\n0-2 1->1\n2-8 0.5->0.125", "starts where the one before ends"),
    ("epochs momentum\n0-2 0.9", "no schedule named 'momentum'"),
])
def test_a_stage_table_that_cannot_be_one_schedule_is_refused(table, message):
    with pytest.raises(ValueError, match=message):
        train_gpt.stages(table)


def test_a_stage_table_row_by_row():
    assert train_gpt.stages("""
        epochs  windows  looped_layers  weight_decay  batch
        0-2     65,129   off            1->0.5        0.5
        2-3     -        on             0.5->2        1
    """) == dict(window_schedule="1-2:65,129", loop_start_epoch=3, wd_schedule="points", wd_points="0:1,2:0.5,3:2",
                 batch_schedule="0.5,0.5,1")


@pytest.mark.parametrize("preset", ["1h", "2h", "15min", "unlimited"])
def test_explain_prints_the_stage_table_the_preset_is_written_with(preset):
    """--explain's stage table, read back by stages(), gives the preset's own schedule flags: the table printed is
    the one in the preset (2h's rows checked by hand too)."""
    hp = train_gpt.parse_args(["--preset", preset])
    table = train_gpt.stage_table(hp)
    flags = train_gpt.stages("\n".join(table))
    assert flags and all(train_gpt.PRESETS[preset][name] == value for name, value in flags.items())
    if preset == "2h":
        assert [row.split() for row in table] == [["epochs", "windows", "looped_layers"], ["0-6", "257,769", "off"],
                                                  ["6-13", "769,1793", "off"], ["13-22", "1281,2048", "on"]]
    assert "\n".join(f"  {row}" for row in table) in train_gpt.explain(hp)
    assert train_gpt.stage_table(train_gpt.parse_args(["--preset", "mini"])) == []  # no stages: no table
