"""The unlimited record's snapshot chain (issue 15, records/TRACKS.md F18b, F19): each setting against a hand
computation or a float64 evaluation of the formula qlabs-eng/slowrun unlimited/train.py and gradient_select.py (at
fd342f0) use, each flag at its default leaving today's path bitwise, the preset's record lines, a micro-width run with
every flag on, and the micro model compiled whole."""
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt
from conftest import MICRO_BOS, MICRO_VOCAB, micro_flags, read_metrics


def micro_hp(**overrides) -> train_gpt.Hyperparameters:
    return train_gpt.Hyperparameters(**{**dict(vocab_size=64, bos_id=63, n_layer=2, n_embd=16, n_head=2, seq_len=8,
                                               device="cpu", compile="off"), **overrides})


def uneven_epochs() -> train_gpt.TrainData:
    """20 windows of 5 tokens, 2 per step at the full batch: epochs 0-1 at multiplier 1 (10 steps each), epochs 2-3
    at 2 (5 steps each): 30 steps in 4 epochs."""
    tokens = np.arange(100, dtype=np.uint16) % 50
    return train_gpt.TrainData(tokens, 63, seq_len=4, batch_seqs=2, device_batch_size=2, world_size=1, rank=0,
                               seed=0, batch_schedule=(1.0, 1.0, 2.0, 2.0))


class Groups:
    """An optimizer stand-in: one group whose initial LR and weight decay are 1, so the schedules' factors show."""

    def __init__(self):
        self.param_groups = [dict(initial_lr=1.0, initial_weight_decay=1.0, lr=1.0, weight_decay=1.0)]


# ------------------------------------------------------------------------------------------ F19a, F19b: the schedules

def test_linear_cycles_and_cycle_inverse_wd_equal_hand_values():
    """Two 2-epoch cycles over epochs of 10, 10, 5, 5 steps: they end at the epoch ends 20 and 30 (not 15 and 30, the
    equal split). LR = 0.08 + 0.92 (1 - i/n) at step i of an n-step cycle; WD = 0.7 + 0.3 (1 - LR)/0.92."""
    hp = micro_hp(num_epochs=4, snapshot_cycles=2, snapshot_cycle_epochs=True, snapshot_cycle_shape="linear",
                  lr_cycle_floor=0.08, wd_schedule="cycle_inverse", wd_floor=0.7)
    train_gpt.check_hyperparameters(hp, 1)
    data = uneven_epochs()
    assert train_gpt.snapshot_cycle_bounds(hp, 30, data) == [20, 30]
    off = dataclasses.replace(hp, snapshot_cycle_epochs=False)  # today's equal split of the steps
    assert train_gpt.snapshot_cycle_bounds(off, 30, data) == train_gpt.snapshot_cycle_ends(30, 2) == [15, 30]
    hand_lr = {0: 1.0, 5: 0.77, 19: 0.126, 20: 1.0, 24: 0.632, 29: 0.172}  # 0.08 + 0.92 x (1, .75, .05, 1, .6, .1)
    hand_wd = {0: 0.7, 5: 0.775, 19: 0.985, 20: 0.7, 24: 0.82, 29: 0.97}  # 0.7 + 0.3 x (0, .25, .95, 0, .4, .9)
    for step in hand_lr:
        groups = Groups()
        factor = train_gpt.apply_schedules([groups], step, 30, data, hp)
        assert factor == pytest.approx(hand_lr[step], abs=1e-12), step
        assert groups.param_groups[0]["lr"] == pytest.approx(hand_lr[step], abs=1e-12), step
        assert groups.param_groups[0]["weight_decay"] == pytest.approx(hand_wd[step], abs=1e-12), step


def test_unlimited_batch_schedule_is_the_records_block_triangle():
    """F18b: 96 cycles x 2 epochs; cycle c is at the full 524,288 tokens iff 1 - |2c/95 - 1| >= 0.5, i.e. c = 24..71
    (48 cycles), else 393,216 = 0.75 of it; as a per-epoch list of 192 entries."""
    entries = train_gpt.PRESETS["unlimited"]["batch_schedule"].split(",")
    assert len(entries) == 192
    for epoch, entry in enumerate(entries):
        assert entry == ("1" if 24 <= epoch // 2 <= 71 else "0.75"), epoch
    hp = train_gpt.parse_args(["--preset", "unlimited"])
    assert 393216 / 524288 == 0.75 and (hp.batch_tokens // hp.seq_len) * 0.75 % (hp.device_batch_size * 8) == 0


# ------------------------------------------------------------------------------- F19c: the distillation objective

def distill_setup(mtp_inside: bool, fused_loss: str):
    hp = micro_hp(mtp_weight=0.3, mtp_style="block", distill_alpha=0.45, distill_temperature=1.2,
                  distill_mtp_inside=mtp_inside, fused_loss=fused_loss, snapshot_cycles=2, snapshot_distill=True)
    train_gpt.check_hyperparameters(hp, 1)
    student = train_gpt.build_model(hp, train_gpt.Dist(), seed=0)
    teacher = train_gpt.build_model(hp, train_gpt.Dist(), seed=1).for_inference()
    idx = torch.randint(0, 63, (2, hp.seq_len + 1), generator=torch.Generator().manual_seed(3))
    return hp, student, teacher, idx[:, :-1], idx[:, 1:]


@pytest.mark.parametrize("fused_loss", ["off", "chunked"])
@pytest.mark.parametrize("mtp_inside", [True, False])
def test_distillation_objective_equals_the_float64_formula(mtp_inside, fused_loss):
    """On fixed logits (a student with an MTP block, a frozen teacher): objective / targets equals, in float64,
    (1 - a)(CE + 0.3 MTP) + a T^2 KL(p_T || p_S) with MTP inside (the record's fold), or (1 - a) CE + a T^2 KL +
    0.3 MTP without; CE and KL are means over the 16 targets, MTP over its 14 (T - 1 per row)."""
    hp, student, teacher, inputs, targets = distill_setup(mtp_inside, fused_loss)
    objective = train_gpt.MemberObjective(hp, torch.device("cpu"), [(teacher, 1.0)])
    _, total = objective.sums(student, inputs, targets)
    with torch.no_grad():
        logits, mtp_logits = (z.double() for z in student(inputs, targets=targets))
        teacher_logits = teacher(inputs).double()
    a, t = 0.45, 1.2
    ce = F.cross_entropy(logits.reshape(-1, 64), targets.reshape(-1))
    mtp = F.cross_entropy(mtp_logits.reshape(-1, 64), targets[:, 1:].reshape(-1))
    log_p_t = F.log_softmax(teacher_logits.reshape(-1, 64) / t, -1)
    log_p_s = F.log_softmax(logits.reshape(-1, 64) / t, -1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean() * t**2
    expected = (1 - a) * (ce + 0.3 * mtp) + a * kl if mtp_inside else (1 - a) * ce + a * kl + 0.3 * mtp
    assert (total / targets.numel()).item() == pytest.approx(expected.item(), rel=2e-6)


def test_each_new_flag_refuses_bad_input_in_one_line():
    """Every F19 flag's ConfigError (one line, exit 2 from main)."""
    ok = micro_hp(snapshot_cycles=2, snapshot_distill=True, distill_alpha=0.5, mtp_weight=0.3, snapshot_noise=0.2)
    train_gpt.check_hyperparameters(ok, 1)
    cases = [(dict(snapshot_cycle_shape="step"), "cosine or linear"),
             (dict(snapshot_cycles=0, snapshot_distill=False, snapshot_noise=0.0, snapshot_cycle_shape="linear"),
              "set snapshot_cycles"),
             (dict(wd_schedule="cycle_inverse", lr_cycle_floor=1.0), "lr_cycle_floor < 1"),
             (dict(snapshot_cycle_epochs=True, num_epochs=3), "snapshot_cycles dividing num_epochs"),
             (dict(snapshot_distill=False, snapshot_distill_after=8), "set snapshot_distill"),
             (dict(distill_mtp_inside=True, mtp_weight=0.0), "needs mtp_weight > 0"),
             (dict(distill_mtp_inside=True, distill_alpha=1.0), "0 < distill_alpha < 1"),
             (dict(snapshot_noise=0.0, snapshot_noise_min=0.05), "snapshot_noise_min"),
             (dict(snapshot_noise_stat="var"), "rms or std"),
             (dict(select_lr=0.0), "select_lr must be > 0"),
             (dict(select_clip=-1.0), "select_clip"),
             (dict(select_top_sweep="8"), "set fitness_tokens")]
    for change, match in cases:
        with pytest.raises(train_gpt.ConfigError, match=match) as caught:
            train_gpt.check_hyperparameters(dataclasses.replace(ok, **change), 1)
        assert "\n" not in str(caught.value), change


# ------------------------------------------------------------------------------------------- F19d: weight noise

class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]]))
        self.v = torch.nn.Parameter(torch.tensor([0.2, 0.4, 0.9, -0.3]))
        self.s = torch.nn.Parameter(torch.tensor([5.0]))


def test_noise_increment_with_a_fixed_draw_equals_the_hand_value(monkeypatch):
    """The RNG replaced by a fixed tensor z: each tensor with more than one element moves by z x std(p) x s (torch.std
    unbiased, the record's p.float().std()); the one-element tensor keeps its value. Hand stds: w sqrt(14.875 / 5),
    v sqrt(0.74 / 3) (squared deviations from the means 0.25 and 0.3)."""
    fixed = {6: torch.tensor([0.5, -1.0, 0.25, 2.0, -0.75, 1.5]), 4: torch.tensor([1.0, -0.5, 0.0, 0.3])}
    monkeypatch.setattr(train_gpt.torch, "randn", lambda shape, generator=None: fixed[math.prod(shape)].view(shape))
    model = Tiny()
    before = {name: p.detach().double().clone() for name, p in model.named_parameters()}
    train_gpt.perturb_weights(model, 0.2, seed=7, stat="std")
    stds = dict(w=math.sqrt(14.875 / 5), v=math.sqrt(0.74 / 3))
    for name in ("w", "v"):
        hand = before[name] + fixed[before[name].numel()].double().view_as(before[name]) * stds[name] * 0.2
        assert torch.allclose(getattr(model, name).double(), hand, atol=1e-6), name
    assert model.s.item() == 5.0


def test_noise_scale_runs_a_cosine_from_max_to_min_over_the_cycle_boundaries():
    """s_c = 0.05 + 0.2 (1 + cos(pi (c-1)/(C-2)))/2 for c = 1..C-1, C = 96: s_1 = 0.25 (max), s_95 = 0.05 (min), s_48 =
    0.15 (the middle: cos(pi/2) = 0); with snapshot_noise_min 0 every boundary gets snapshot_noise."""
    hp = micro_hp(snapshot_noise=0.25, snapshot_noise_min=0.05, snapshot_noise_stat="std", snapshot_cycles=96)
    assert train_gpt.snapshot_noise_scale(1, 96, hp) == 0.25
    assert train_gpt.snapshot_noise_scale(95, 96, hp) == pytest.approx(0.05, abs=1e-15)
    assert train_gpt.snapshot_noise_scale(48, 96, hp) == pytest.approx(0.15, abs=1e-15)
    values = [train_gpt.snapshot_noise_scale(c, 96, hp) for c in range(1, 96)]
    assert max(values) == values[0] and min(values) == values[-1] and values == sorted(values, reverse=True)
    assert {train_gpt.snapshot_noise_scale(c, 96, micro_hp(snapshot_noise=0.3)) for c in range(1, 96)} == {0.3}


# ------------------------------------------------------------------------------------- F19e: learned selection

def fitness_table() -> torch.Tensor:
    """Candidate i gives the correct token probability 0.7 on tokens of type i and 0.1 elsewhere; types in shares
    f = (0.5, 0.3, 0.2) of 10 tokens. The mixture gives c w_i + u on type i (c = 0.6, u = 0.1), so -sum f_i log(c w_i
    + u) is minimised at c w_i + u = f_i (c + 3u): w_i = 1.5 f_i - 1/6 = (0.58333, 0.28333, 0.13333)."""
    types = [0] * 5 + [1] * 3 + [2] * 2
    table = torch.full((3, 10), 0.1, dtype=torch.float64)
    for column, kind in enumerate(types):
        table[kind, column] = 0.7
    return table


def test_learned_selection_reaches_the_closed_form_optimum():
    """The record's fit (300 steps, lr 0.5, clip 1, logits from 1e-4 N(0, 1)) ends within 1e-4 of the optimum."""
    weights = train_gpt.learn_mixture_weights(fitness_table(), 300, lr=0.5, clip=1.0, init_noise=1e-4)
    optimum = torch.tensor([1.5 * 0.5 - 1 / 6, 1.5 * 0.3 - 1 / 6, 1.5 * 0.2 - 1 / 6], dtype=torch.float64)
    assert torch.allclose(weights, optimum, atol=1e-4), weights


def test_selection_steps_follow_a_hand_adam_with_clipping_and_the_initial_draw():
    """Three steps in float64 by hand: logits from 1e-4 x randn(3) (generator seeded 0), gradient of -mean log(w.p)
    clipped to norm 0.05, then Adam (betas 0.9, 0.999, eps 1e-8, bias-corrected) at lr 0.5."""
    table = fitness_table()
    theta = (1e-4 * torch.randn(3, generator=torch.Generator().manual_seed(0))).double()
    m, v = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for step in range(1, 4):
        w = torch.softmax(theta, 0)
        q = w @ table
        grad_w = -(table / q).mean(1)  # d loss / d w
        grad = w * (grad_w - (w * grad_w).sum())  # through the softmax
        grad = grad * min(1.0, 0.05 / (grad.norm().item() + 1e-6))
        m, v = 0.9 * m + 0.1 * grad, 0.999 * v + 0.001 * grad**2
        theta = theta - 0.5 * (m / (1 - 0.9**step)) / ((v / (1 - 0.999**step)).sqrt() + 1e-8)
    learned = train_gpt.learn_mixture_weights(table, 3, lr=0.5, clip=0.05, init_noise=1e-4)
    assert torch.allclose(learned, torch.softmax(theta, 0), atol=1e-12)
    unclipped = train_gpt.learn_mixture_weights(table, 3, lr=0.5, init_noise=1e-4)
    assert not torch.allclose(unclipped, learned, atol=1e-6)  # the clip acts at this norm


def test_top_sweep_keeps_the_ks_below_the_candidate_count():
    """The record's k_values: sorted, each 0 < K < candidates (480: all six; 100: 8..64; 8: none)."""
    hp = micro_hp(fitness_tokens=100, select_top_sweep="8,16,32,64,128,256")
    train_gpt.check_hyperparameters(hp, 1)
    assert train_gpt.top_sweep(hp, 480) == [8, 16, 32, 64, 128, 256]
    assert train_gpt.top_sweep(hp, 100) == [8, 16, 32, 64]
    assert train_gpt.top_sweep(hp, 8) == []
    for bad, match in (("8,x", "whole numbers > 0"), ("0,8", "whole numbers > 0")):
        with pytest.raises(train_gpt.ConfigError, match=match):
            train_gpt.check_hyperparameters(dataclasses.replace(hp, select_top_sweep=bad), 1)
    with pytest.raises(train_gpt.ConfigError, match="drop select_top"):
        train_gpt.check_hyperparameters(dataclasses.replace(hp, select_top=2), 1)


# ------------------------------------------------------------------------------------------ defaults are today's

def test_flags_at_default_are_todays_path_bitwise():
    """With every F19 flag at its default: the cosine snapshot cycles' LR is today's formula bitwise (and the cycles
    of a run without a batch schedule end where they did), the RMS noise is today's arithmetic, the selection fit is
    today's Adam, and the MTP weight the objective uses is mtp_weight."""
    hp = micro_hp(snapshot_cycles=3, lr_cycle_floor=0.1, num_epochs=6)
    for step in range(30):
        ends = [round((c + 1) * 30 / 3) for c in range(3)]
        cycle = next(c for c, end in enumerate(ends) if step < end)
        start = ends[cycle - 1] if cycle else 0
        phase = (step + 1 - start) / (ends[cycle] - start)
        assert train_gpt.lr_multiplier(step, 30, hp) == 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * phase))
    tokens = np.arange(120, dtype=np.uint16) % 50  # 24 windows, 2 per step: 12 steps per epoch, 72 in 6
    even = train_gpt.TrainData(tokens, 63, 4, 2, 2, 1, 0, 0)
    assert train_gpt.snapshot_cycle_bounds(hp, 72, even) == train_gpt.snapshot_cycle_ends(72, 3) == [24, 48, 72]
    aligned = dataclasses.replace(hp, snapshot_cycle_epochs=True)  # equal epochs: the same ends with the flag on
    assert train_gpt.snapshot_cycle_bounds(aligned, 72, even) == [24, 48, 72]
    model, copy = Tiny(), Tiny()
    train_gpt.perturb_weights(model, 0.1, seed=5)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in copy.parameters():  # today's lines
            noise = torch.randn(p.shape, generator=generator).to(p.device, p.dtype)
            p.add_(noise * 0.1 * p.float().square().mean().sqrt().to(p.dtype))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), copy.parameters()))
    table = fitness_table()
    logits = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=0.05)
    for _ in range(20):
        optimizer.zero_grad()
        (-torch.log(torch.softmax(logits, 0) @ table + 1e-300).mean()).backward()
        optimizer.step()
    assert torch.equal(train_gpt.learn_mixture_weights(table, 20), torch.softmax(logits.detach(), 0))
    hp, student, teacher, inputs, targets = distill_setup(False, "off")
    objective = train_gpt.MemberObjective(hp, torch.device("cpu"), [(teacher, 1.0)])
    torch.manual_seed(0)
    ours = objective.sums(student, inputs, targets)[1]
    distill = train_gpt.functools.partial(train_gpt.distillation_loss_sum, teachers=[(teacher, 1.0)],
                                          teacher_features=[teacher.features(inputs)], targets=targets, alpha=0.45,
                                          temperature=1.2, chunk=hp.distill_chunk)
    torch.manual_seed(0)
    plain = train_gpt.training_loss_sums(student, inputs, targets, 0.3, distill, None, "block")[1]
    assert torch.equal(ours, plain)


# --------------------------------------------------------------------------------------------------- the preset

def test_unlimited_preset_states_the_record_and_its_flags():
    """The preset is the unlimited record's shape and recipe; its full-scale model has the public 1,870,172,811
    parameters (counted on the meta device): 2 V d + 30 (4 d^2 + 3 d 5632 + 12 H + 3 H^2) + 15 (32 H + d^2) + 75
    scalars + the MTP block's 2 d^2 + (4 d^2 + 3 d 5632 + 12 H + 3 H^2), d 2048, H 16, V 50,304."""
    hp = train_gpt.parse_args(["--preset", "unlimited"])
    train_gpt.check_hyperparameters(hp, 8)
    assert (hp.n_layer, hp.n_embd, hp.n_head, hp.mlp_hidden, hp.logit_softcap, hp.stochastic_depth) == \
        (30, 2048, 16, 5632, 15.0, 0.0)
    assert (hp.ensemble_size, hp.snapshot_cycles, hp.num_epochs, hp.loop_repeats, hp.loop_range) == \
        (5, 96, 192, 4, "15:25")
    assert (hp.snapshot_distill_after, hp.distill_alpha, hp.distill_temperature, hp.snapshot_noise,
            hp.snapshot_noise_min, hp.select_lr, hp.select_clip, hp.select_init_noise, hp.fitness_tokens) == \
        (8, 0.45, 1.2, 0.25, 0.05, 0.5, 1.0, 1e-4, 132000)
    d, h, v, f = 2048, 16, 50304, 5632
    block = 4 * d**2 + 3 * d * f + 12 * h + 3 * h**2
    hand = 2 * v * d + 30 * block + 15 * (32 * h + d**2) + 75 + 2 * d**2 + block
    n_params = sum(p.numel() for p in train_gpt.build_model_meta(hp).parameters())
    assert n_params == hand == 1_870_172_811
    lines = train_gpt.preset_record_lines(hp, n_params)
    assert "reproduces the unlimited record 2.987 (qlabs-eng/slowrun unlimited/train.py@fd342f0)" in lines[0]
    assert "1,870,172,811 vs 1,870,172,811" in lines[1] and "vs 11.22 G (24.89 G looped)" in lines[1]
    # the public formula by hand: 6 (N - wte - 75) + 12 d (22 short x 768.75 + 8 long x 1024.5 keys); looped adds
    # 4 passes of layers 15-24 (10 blocks, 5 with a value projection d^2 + 32 H; 3 long, 7 short windows each)
    flops = 6 * (n_params - v * d - 75) + 12 * d * (22 * 768.75 + 8 * 1024.5)
    looped = flops + 4 * (6 * (10 * block + 5 * (d**2 + 32 * h)) + 12 * d * (7 * 768.75 + 3 * 1024.5))
    assert train_gpt.training_flops_per_token(hp) == pytest.approx(flops, rel=1e-12)
    assert train_gpt.training_flops_per_token(hp, True) == pytest.approx(looped, rel=1e-12)
    assert round(flops / 1e7) == 1122 and round(looped / 1e7) == 2489


def micro_unlimited_flags(train_path, val_path, log_dir, run_id):
    """The unlimited preset with its shapes shrunk: 2 members x 3 one-epoch cycles (batch 0.5, 1, 0.5 of 12
    sequences), every F19 flag as the preset sets it, distillation from cycle 1, a top-2/4 sweep of 6 candidates."""
    flags = ["--preset", "unlimited"] + micro_flags(
        train_path, val_path, log_dir, run_id, test_files="", train_tokens=2000, n_layer=2, mlp_hidden=0,
        window_short=0, train_vocab=0, eval_vocab=0, loop_range="1:2", device_batch_size=2, val_batch_size=4,
        num_epochs=3, ensemble_size=2, snapshot_cycles=3, batch_schedule="0.5,1,0.5",
        snapshot_distill_after=1, fitness_tokens=200, select_top_sweep="2,4", val_public_windows=8, compile="off",
        log_every=1)
    return flags


def test_unlimited_micro_run_with_every_flag_on(tmp_path, micro_data, monkeypatch):
    """train_gpt.main on the micro shapes with every flag of the preset on: both members train (loss finite and
    falling within each); the snapshots are taken at the cycle ends (the preset's public stepping: epochs of 48 whole
    windows, a multiple of 16, and cycles of round(48 / batch) steps: 8/4/8 at batch 6/12/6); neither member has a teacher in cycle 0 (snapshot_distill_after 1: member 0 does not teach member
    1) and each distils from its own snapshot afterwards; the selection fits and sweeps K = 2, 4; the result is finite."""
    teachers = []  # (objective, teacher count) per micro-step
    sums = train_gpt.MemberObjective.sums
    monkeypatch.setattr(train_gpt.MemberObjective, "sums", lambda self, *args: (
        teachers.append((id(self), len(self.teachers))), sums(self, *args))[1])
    flags = micro_unlimited_flags(*micro_data, str(tmp_path), "unl")
    assert train_gpt.main(flags) == 0
    rows = read_metrics(str(tmp_path / "unl"))
    assert [row["step"] for row in rows if row.get("kind") == "snapshot"] == [8, 12, 8, 12]
    per_member = [[count for key, count in teachers if key == member] for member in dict.fromkeys(k for k, _ in teachers)]
    assert len(per_member) == 2
    for counts in per_member:  # cycle 0: 8 steps of 3 micro-steps (no padding under public stepping), then 1 teacher
        first = counts.index(1)
        assert first == 24 and counts[:first] == [0] * first and set(counts[first:]) == {1}, counts
    for member in (0, 1):
        losses = [row["train_loss"] for row in rows if row.get("kind") == "train" and row.get("member") == member]
        assert len(losses) >= 10 and all(math.isfinite(x) for x in losses)
        assert np.mean(losses[-3:]) < losses[0], (member, losses)
    assert sum(row.get("kind") == "snapshot" for row in rows) == 4
    assert [row["top"] for row in rows if row.get("kind") == "selection_sweep"] == [2, 4]
    log = (tmp_path / "unl" / "log.txt").read_text()
    assert "preset unlimited: reproduces the unlimited record 2.987" in log
    result = train_gpt.json.loads((tmp_path / "unl" / "result.json").read_text())
    assert math.isfinite(result["val_loss"]) and len(result["selection"]["chosen"]) == 4


def test_unlimited_micro_model_compiles_whole_on_cpu():
    """The preset's micro model (MTP block, 5 passes of its looped layer, gates, IHA) compiles with fullgraph=True
    (aot_eager: the graph capture of inductor without its C++ codegen) and its training objective and gradients match
    eager."""
    torch._dynamo.reset()
    settings = {**train_gpt.PRESETS["unlimited"], **dict(vocab_size=MICRO_VOCAB, bos_id=MICRO_BOS, n_layer=2,
                n_embd=32, n_head=2, seq_len=32, mlp_hidden=0, window_short=0, train_vocab=0, eval_vocab=0,
                loop_range="1:2", dropout=0.0, device="cpu", compile="off")}
    hp = train_gpt.Hyperparameters(**settings)
    model = train_gpt.build_model(hp, train_gpt.Dist(), seed=0)
    model.loop_active = True
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    idx = torch.randint(0, MICRO_VOCAB - 1, (2, hp.seq_len + 1), generator=torch.Generator().manual_seed(0))
    results = []
    for module in (compiled, model):
        _, objective = train_gpt.training_loss_sums(module, idx[:, :-1], idx[:, 1:], hp.mtp_weight,
                                                    mtp_style=hp.mtp_style)
        objective.backward()
        results.append((objective.detach(), [p.grad.clone() for p in model.parameters()]))
        model.zero_grad(set_to_none=True)
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
