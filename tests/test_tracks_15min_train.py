"""The 15min record's training and evaluation side (records/TRACKS.md F8b, F9, F14f; qlabs-eng/slowrun
tiny/train.py at fd342f0): the multi-offset loss and its gradient against float64 values computed here, its
weights' annealing, the weight-decay knots, the weight average and the EMA candidate against hand values, the public
figure's rules, every flag at its default leaving the plain path bitwise, and a micro run with all of them on."""
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt
from conftest import micro_flags, read_metrics

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures"))
import make_plain_reference as reference  # noqa: E402

REFERENCE = torch.load(os.path.join(os.path.dirname(__file__), "fixtures", "plain_reference.pt"), weights_only=True)


def float64_multi_offset(raw: torch.Tensor, targets: torch.Tensor, weights, softcap: float):
    """Rows (N, V) of raw logits, flat targets (N,): the summed objective sum_r sum_k w_k (lse_r - z_r[y_{r+k}])
    over r + k < N and y_{r+k} >= 0, z = softcap tanh(raw / softcap), in float64, with its gradient by autograd."""
    raw = raw.detach().double().requires_grad_(True)
    z = softcap * torch.tanh(raw / softcap)
    total = torch.zeros((), dtype=torch.float64)
    rows = raw.size(0)
    for r in range(rows):
        lse = torch.logsumexp(z[r], 0)
        for k, w in enumerate(weights):
            if r + k < rows and targets[r + k] >= 0:
                total = total + w * (lse - z[r, targets[r + k]])
    (grad,) = torch.autograd.grad(total, raw)
    return total.item(), grad


# ------------------------------------------------------------------------------------------- F14f multi-offset loss

def test_multi_offset_loss_and_gradient_match_float64():
    """B = 2, T = 5, V = 11, weights (1, 0.5, 0.25): offsets run across the sequence end (row 4 is scored against
    rows 5 and 6 of the other sequence), a -1 target counts for nothing; chunks of 3 rows split the 10."""
    generator = torch.Generator().manual_seed(0)
    raw = 20 * torch.randn(2, 5, 11, generator=generator)  # large enough that the soft-cap bends
    targets = torch.randint(0, 11, (2, 5), generator=generator)
    targets[1, 2] = -1
    flat = targets.reshape(-1)
    weights = (1.0, 0.5, 0.25)
    want, want_grad = float64_multi_offset(raw.reshape(-1, 11), flat, weights, 15.0)
    shifted = torch.stack([F.pad(flat[k:], (0, k), value=-1) for k in range(3)])
    logits = raw.reshape(-1, 11).clone().requires_grad_(True)
    objective, ce = train_gpt.MultiOffsetLoss.apply(logits, None, shifted, weights, 15.0, 3)
    (objective / 10).backward()  # the training loop divides by the step's target count
    assert objective.item() == pytest.approx(want, rel=1e-6)
    assert torch.allclose(logits.grad.double(), want_grad / 10, atol=1e-7, rtol=1e-5)
    want_ce, _ = float64_multi_offset(raw.reshape(-1, 11), flat, (1.0,), 15.0)
    assert ce.item() == pytest.approx(want_ce, rel=1e-6)


class FixedLogits(torch.nn.Module):
    """A stand-in model whose raw logits are a parameter (for multi_offset_loss_sums)."""

    def __init__(self, raw):
        super().__init__()
        self.raw = torch.nn.Parameter(raw.clone())

    def forward(self, idx, raw_logits=False):
        return self.raw


def test_single_offset_equals_the_plain_chunked_loss():
    """mtp_offsets "1" is next-token CE: the same sums and gradient as the existing chunked reference."""
    generator = torch.Generator().manual_seed(1)
    raw, targets = 8 * torch.randn(2, 6, 13, generator=generator), torch.randint(0, 13, (2, 6), generator=generator)
    model = FixedLogits(raw)
    ce, objective = train_gpt.multi_offset_loss_sums(model, None, targets, [1.0], 15.0)
    objective.backward()
    logits = raw.clone().requires_grad_(True)
    plain_objective, plain_ce = train_gpt.fused_loss_sums(logits, targets, 15.0, "chunked")
    plain_objective.backward()
    assert torch.allclose(objective, plain_objective, rtol=1e-6) and torch.allclose(ce, plain_ce, rtol=1e-6)
    assert torch.allclose(model.raw.grad, logits.grad, atol=1e-7)


@pytest.mark.parametrize("fraction, fades", [(0.0, (1, 1)), (0.2, (1, 1 - 0.2 / 0.33)),
                                             (0.4, (1 - 0.07 / 0.33, 0)), (0.7, (0, 0))])
def test_offset_weights_fade_furthest_first(fraction, fades):
    """(a_1, a_2) = (1, 1), (1, 0.3939), (0.7879, 0), (0, 0) at f = 0, 0.2, 0.4, 0.7 with A = 0.66."""
    hp = train_gpt.Hyperparameters(mtp_offsets="1,0.5,0.25", mtp_anneal_frac=0.66)
    got = train_gpt.mtp_offset_weights(round(fraction * 1000), 1000, hp)
    assert got == pytest.approx([1.0, 0.5 * fades[0], 0.25 * fades[1]], abs=1e-12)


def test_fp8_head_simulated_on_cpu_matches_the_bf16_formula():
    """The fp8 path's arithmetic (e4m3 inputs scaled by 100/448 and 1.6/448, e5m2 logit gradients scaled by
    448/0.75), its matmuls simulated on CPU: the loss within the GPU acceptance bound (2e-3 per row) of the exact
    formula, the input and weight gradients within e5m2's rounding of the float64 gradients (cosine > 0.995)."""
    generator = torch.Generator().manual_seed(2)
    rows, width, vocab = 64, 32, 96
    features = train_gpt.rms_norm(torch.randn(rows, width, generator=generator)).requires_grad_(True)
    weight = (0.05 * torch.randn(vocab, width, generator=generator)).requires_grad_(True)
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    weights = (1.0, 0.5, 0.25)
    shifted = torch.stack([F.pad(targets[k:], (0, k), value=-1) for k in range(3)])
    objective, _ = train_gpt.MultiOffsetLoss.apply(features, weight, shifted, weights, 15.0, 16)
    (objective / rows).backward()
    x64, w64 = features.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    z = 15 * torch.tanh((x64 @ w64.T) / 15)
    lse = torch.logsumexp(z, -1)
    exact = sum(w * (lse[:rows - k] - z[torch.arange(rows - k), targets[k:]]).sum() for k, w in enumerate(weights))
    (exact / rows).backward()
    assert abs(objective.item() - exact.item()) / rows < 2e-3
    for got, want in ((features.grad, x64.grad), (weight.grad, w64.grad)):  # e5m2 (2 mantissa bits) adds noise
        assert F.cosine_similarity(got.double().flatten(), want.flatten(), dim=0).item() > 0.995
    # the recipe in float64 from torch's own fp8 casts: dequantised inputs, bf16 logits, the per-row gradient in e5m2
    # at 1 / (0.75/448), the two gradient products of the dequantised tensors
    xq = (features.detach() / (100 / 448)).to(torch.float8_e4m3fn).double() * (100 / 448)
    wq = (weight.detach() / (1.6 / 448)).to(torch.float8_e4m3fn).double() * (1.6 / 448)
    tanh = torch.tanh((xq @ wq.T).to(torch.bfloat16).double() / 15)
    p = torch.softmax(15 * tanh, -1)
    grad = torch.zeros_like(p)
    for k, w in enumerate(weights):
        grad[:rows - k] += w * (p[:rows - k] - F.one_hot(targets[k:], vocab).double())
    grad = ((grad * (1 - tanh ** 2)) / (0.75 / 448)).to(torch.float8_e5m2).double() * (0.75 / 448) / rows
    for got, want in ((features.grad, grad @ wq), (weight.grad, grad.T @ xq)):
        assert ((got.double() - want).norm() / want.norm()).item() < 1e-2
    # the quantisation itself: e4m3 of x / (100/448) brought back by the scale is x to e4m3's 3 mantissa bits
    x8 = (features.detach() / train_gpt.FP8_X_SCALE).to(torch.float8_e4m3fn).float() * train_gpt.FP8_X_SCALE
    assert torch.allclose(x8, features.detach(), rtol=2 ** -4, atol=2 ** -9 * train_gpt.FP8_X_SCALE)


def test_fp8_head_is_refused_without_cuda():
    hp = train_gpt.Hyperparameters(mtp_offsets="1,0.5,0.25", fp8_head=True, device="cpu")
    with pytest.raises(train_gpt.ConfigError, match="fp8_head needs a CUDA device"):
        train_gpt.check_hyperparameters(hp, 1)


# ------------------------------------------------------------------------------------------- F8b weight-decay knots

class EpochClock:
    """What apply_schedules reads of TrainData: 190 steps per epoch (the 15min record's)."""

    def epoch_position(self, step):
        return step / 190

    def locate(self, step):
        return step // 190, step % 190


def test_wd_points_at_knots_and_midpoints():
    """15min: 0.8 held to epoch 2 (step 380), down to 0.1 at epoch 8 (1520), up to 0.93 at 15 (2850), as
    multipliers of 0.8; between knots the straight line; the optimizer groups get initial wd times it."""
    hp = train_gpt.Hyperparameters(num_epochs=15, wd_schedule="points", wd_points="0:1,2:1,8:0.125,15:1.1625")
    expected = {0: 1.0, 380: 1.0, 1520: 0.125, 2850: 1.1625, 190: 1.0, 950: 0.5625, 2185: 0.64375, 3000: 1.1625}
    for step, multiplier in expected.items():
        assert train_gpt.points_wd_multiplier(step, 2850, hp) == pytest.approx(multiplier, abs=1e-12)
    assert 0.8 * train_gpt.points_wd_multiplier(2850, 2850, hp) == pytest.approx(0.93)
    parameter = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([dict(params=[parameter], lr=0.1, initial_lr=0.1, weight_decay=0.8,
                                        initial_weight_decay=0.8)])
    train_gpt.apply_schedules([optimizer], 950, 2850, EpochClock(), hp)
    assert optimizer.param_groups[0]["weight_decay"] == pytest.approx(0.8 * 0.5625, abs=1e-12)


# ------------------------------------------------------------------------------------------- F9 averages

def test_recency_weight_average_of_two_state_dicts():
    generator = torch.Generator().manual_seed(3)
    first, second = ([torch.randn(3, 4, generator=generator, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
                     for _ in range(2))
    average = train_gpt.CheckpointAverage(train_gpt.Hyperparameters(ckpt_avg_epochs=2))
    average.add(first)
    assert average.average() is None  # the record averages from two checkpoints on
    average.add(second)
    for got, a, b in zip(average.average(), first, second):
        assert torch.allclose(got, (a + 2 * b) / 3, rtol=1e-15, atol=1e-15)
    equal = train_gpt.CheckpointAverage(train_gpt.Hyperparameters(ckpt_avg_epochs=2, ckpt_avg_weights="equal"))
    equal.add(first)
    equal.add(second)
    assert all(torch.allclose(got, (a + b) / 2, rtol=1e-15) for got, a, b in zip(equal.average(), first, second))


def test_checkpoint_average_survives_a_checkpoint(tmp_path):
    """state() through torch.save and restore(): the resumed average equals the uninterrupted one."""
    hp = train_gpt.Hyperparameters(ckpt_avg_epochs=3)
    thetas = [[torch.full((2, 2), float(i)), torch.full((3,), -float(i))] for i in (1, 2, 3)]
    whole, resumed = train_gpt.CheckpointAverage(hp), train_gpt.CheckpointAverage(hp)
    for theta in thetas:
        whole.add(theta)
    resumed.add(thetas[0])
    torch.save({"ckpt_avg": resumed.state()}, tmp_path / "c.pt")
    resumed = train_gpt.CheckpointAverage(hp)
    resumed.restore(torch.load(tmp_path / "c.pt", weights_only=False), None)
    for theta in thetas[1:]:
        resumed.add(theta)
    for got, want, sign in zip(resumed.average(), whole.average(), (1, -1)):  # recency: (1 + 2 x 2 + 3 x 3) / 6
        assert torch.equal(got, want) and torch.allclose(got, torch.full_like(got, sign * 14 / 6))


def test_ema_candidate_from_zero_bias_corrected_and_never_blended():
    """decay 0.5, every 2 steps over 5 steps: updates after steps 0, 2, 4 (weights 1, 3, 5):
    e = 0.5 (0.25 x 1 + 0.5 x 3 + 5) = 3.375, corrected by 1 / (1 - 0.5^3): 3.857142857..."""
    hp = train_gpt.Hyperparameters(ema_decay=0.5, ema_every=2, ema_candidate=True)
    model = torch.nn.Linear(1, 1, bias=False)
    ema = train_gpt.EMAAveraging(hp, 5)
    for done in range(1, 6):
        with torch.no_grad():
            model.weight.fill_(float(done))
        ema.after_step(done, model)
    assert ema.candidate_weights(5)[0].item() == pytest.approx(3.375 / 0.875, rel=1e-7)
    assert model.weight.item() == 5.0  # the model keeps its last weights


def test_weight_candidates_are_scored_as_their_own_models(tmp_path):
    """score_weight_candidates: the EMA and the checkpoint average each scored as a model holding those weights
    (evaluated here independently), while the trained model keeps its own weights."""
    hp = train_gpt.Hyperparameters(vocab_size=16, bos_id=15, n_layer=1, n_embd=8, n_head=2, seq_len=6,
                                   ema_decay=0.5, ema_candidate=True, ckpt_avg_epochs=2, val_batch_size=2)
    model = train_gpt.build_model(hp, train_gpt.Dist(), seed=0)
    tokens = np.random.RandomState(0).randint(0, 16, 50).astype(np.uint16)
    data = train_gpt.RunData(tokens, tokens, train_gpt.EvalData(tokens, 6, "val"), None)
    ema, average = train_gpt.EMAAveraging(hp, 1), train_gpt.CheckpointAverage(hp)
    ema.after_step(1, model)  # e = 0.5 theta, corrected by 1 / (1 - 0.5): theta
    shifted = [p.detach() + 0.1 for p in model.parameters()]
    average.add(shifted)
    average.add(shifted)
    before = [p.detach().clone() for p in model.parameters()]
    log = train_gpt.RunLog(str(tmp_path / "run"), True)
    rows = train_gpt.score_weight_candidates(hp, train_gpt.Dist(), data, log, "", model, ema, average, 1)
    log.close()
    assert [row["label"][:3] for row in rows] == ["EMA", "che"] and [row["rule"] for row in rows] == ["bpb", "loss"]
    plain = train_gpt.score([model], [1.0], data.val_data, train_gpt.Dist(), 2)[0]
    assert rows[0]["val_loss"] == pytest.approx(plain, rel=1e-6)
    other = train_gpt.build_model(hp, train_gpt.Dist(), seed=0)
    with torch.no_grad():
        for p, w in zip(other.parameters(), shifted):
            p.copy_(w)
    assert rows[1]["val_loss"] == pytest.approx(train_gpt.score([other], [1.0], data.val_data, train_gpt.Dist(), 2)[0],
                                                rel=1e-6)
    assert rows[1]["val_loss"] != pytest.approx(plain, rel=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ------------------------------------------------------------------------------------------- F22 the public figure

def test_public_figure_rules_of_the_15min_candidates():
    """Epoch rows at less than full depth are never chosen; the EMA replaces the best epoch when its bpb is lower
    (even with a higher loss), the checkpoint average when its loss is lower than the best so far."""
    data = train_gpt.RunData(None, None, None, None, public_data=type("W", (), dict(num_windows=4))())
    hp = train_gpt.Hyperparameters()
    epochs = [dict(step=10, epoch=1.0, val_loss=2.0, val_bpb=1.0, full_depth=False),
              dict(step=20, epoch=2.0, val_loss=3.0, val_bpb=1.5)]
    ema = dict(label="EMA", rule="bpb", val_loss=3.1, val_bpb=1.4)
    average = dict(label="average", rule="loss", val_loss=3.05, val_bpb=1.3)
    figure = train_gpt.public_figure_rows(hp, train_gpt.Dist(), data, epochs, {}, [ema])
    assert figure["chosen"] == "EMA" and figure["val_loss_public"] == 3.1 and len(figure["evaluations"]) == 3
    figure = train_gpt.public_figure_rows(hp, train_gpt.Dist(), data, epochs, {}, [ema, average])
    assert figure["chosen"] == "average" and figure["val_loss_public"] == 3.05
    worse = dict(average, val_loss=3.2, val_bpb=0.1)  # a lower bpb does not count for the loss rule
    assert train_gpt.public_figure_rows(hp, train_gpt.Dist(), data, epochs, {}, [worse])["chosen"] == \
        "epoch end, step 20"


# ------------------------------------------------------------------------------------------- defaults and errors

@pytest.mark.stored_bitwise
def test_flags_at_default_leave_the_plain_path_bitwise():
    """The new flags at their defaults: the fixture's optimizer step bitwise; the objective has no multi-offset
    weights (training_loss_sums' path); a flat weight decay stays untouched by apply_schedules."""
    hp = train_gpt.Hyperparameters(**reference.MICRO, mtp_offsets="", mtp_anneal_frac=0.66, fp8_head=False,
                                   wd_points="", ckpt_avg_epochs=0, ckpt_avg_weights="recency", ema_candidate=False)
    step = reference.optimizer_step(hp)
    assert all(torch.equal(step[name], REFERENCE["step"][name]) for name in REFERENCE["step"])
    objective = train_gpt.MemberObjective(hp, torch.device("cpu"), [])
    objective.start_step(0, 10)
    assert objective.offset_weights is None and objective.backend == "eager"
    model = train_gpt.build_model(hp, train_gpt.Dist(), seed=0)
    idx = torch.randint(0, hp.vocab_size, (2, hp.seq_len + 1), generator=torch.Generator().manual_seed(1))
    got = objective.sums(model, idx[:, :-1], idx[:, 1:])
    want = train_gpt.training_loss_sums(model, idx[:, :-1], idx[:, 1:], 0.0)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    features = model(idx[:, :-1], raw_logits="features")
    assert torch.equal(model.head(features, raw=True), model(idx[:, :-1], raw_logits=True))


@pytest.mark.parametrize("flags", [dict(mtp_offsets="1,x"), dict(mtp_offsets="1,-0.5"), dict(mtp_offsets="0,1"),
                                   dict(mtp_offsets="1,0.5", mtp_anneal_frac=0.0), dict(fp8_head=True),
                                   dict(mtp_offsets="1,0.5", mtp_weight=0.3), dict(wd_schedule="points"),
                                   dict(wd_points="0:1,2:1"), dict(wd_schedule="points", wd_points="2:1,1:1"),
                                   dict(wd_schedule="points", wd_points="0:1,2"), dict(ckpt_avg_epochs=-1),
                                   dict(ckpt_avg_weights="linear"), dict(ema_candidate=True),
                                   dict(ema_candidate=True, ema_decay=0.9, ema_start_frac=0.5)])
def test_bad_values_are_one_line_errors(flags):
    hp = train_gpt.Hyperparameters(vocab_size=16, bos_id=15, n_layer=2, n_embd=8, n_head=2, seq_len=6, **flags)
    with pytest.raises(train_gpt.ConfigError) as error:
        train_gpt.check_hyperparameters(hp, 1)
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------------- a micro run

def test_micro_run_with_every_15min_training_flag(micro_data, tmp_path):
    """train_gpt.main with the multi-offset loss, the weight-decay knots, the EMA candidate and the checkpoint
    average on, stopped after step 15 (the average holds the first epoch end, the EMA is mid-way) and resumed: the
    log and metrics show both candidates, result.json's public figure lists them, the train loss is finite and
    falls."""
    train_path, val_path = micro_data
    flags = micro_flags(train_path, val_path, str(tmp_path), "m15", mtp_offsets="1,0.5,0.25", mtp_anneal_frac=0.66,
                        wd_schedule="points", wd_points="0:1,0.5:1,1:0.5,2:1.2", muon_wd=0.1, adam_wd=0.1,
                        ema_decay=0.8, ema_every=3, ema_candidate=True, ckpt_avg_epochs=2, val_public_windows=8,
                        val_every=-1, checkpoint_every=-1)
    folder = tmp_path / "m15"
    assert train_gpt.main(flags + ["--stop_at_step", "15"]) == 3  # stopped as asked, its checkpoint written
    assert train_gpt.main(["--resume", str(folder)]) == 0
    log = open(folder / "log.txt").read()
    assert "loss multi-offset (chunked PyTorch)" in log
    assert "candidate | EMA | val_loss" in log and "candidate | checkpoint average of the last 2 epoch ends" in log
    rows = read_metrics(str(folder))
    kinds = {row["kind"] for row in rows}
    assert {"ema_candidate", "ckpt_avg_candidate"} <= kinds
    result = json.load(open(folder / "result.json"))
    labels = [row["label"] for row in result["public"]["evaluations"]]
    assert "EMA" in labels and any(label.startswith("checkpoint average") for label in labels)
    evaluations = result["public"]["evaluations"]  # the record's order: epoch ends, the EMA, the average
    best = min(evaluations[:-2], key=lambda row: row["val_bpb"])
    best = evaluations[-2] if evaluations[-2]["val_bpb"] < best["val_bpb"] else best
    best = evaluations[-1] if evaluations[-1]["val_loss"] < best["val_loss"] else best
    assert result["public"]["chosen"] == best["label"] and result["public"]["val_loss_public"] == best["val_loss"]
    losses = [row["train_loss"] for row in rows if "train_loss" in row]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
