"""The slowrun baseline record (issue 15, records/TRACKS.md section 1.2, F17, F18a; qlabs-eng/slowrun train.py and
prepare_data.py at 0d49316, 3.402): the value-embedding tables against a float64 hand computation, the value gates'
Muon group, the fixed data order against numpy's permutation, the flags at default leaving the plain model bitwise,
and the baseline preset: its record lines, its exact full-scale parameter count, three steps at micro width with
every flag on, a compiled (fullgraph) training step, and a micro run through main."""
import dataclasses
import math
import os
import sys

import numpy as np
import pytest
import torch

import train_gpt
from conftest import assert_bitwise_plain_reference, micro_preset_run

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures"))
import make_plain_reference as reference  # noqa: E402

REFERENCE = torch.load(os.path.join(os.path.dirname(__file__), "fixtures", "plain_reference.pt"), weights_only=True)

# the baseline preset with only its full-scale sizes shrunk (vocabulary, width, MLP, window, batch)
MICRO_BASELINE = dict(vocab_size=320, bos_id=255, train_vocab=256, eval_vocab=256, n_layer=4, n_embd=32, n_head=2,
                      seq_len=32, mlp_hidden=128, window_short=9, device_batch_size=2, batch_tokens=128,
                      val_batch_size=2, device="cpu", compile="off")


def micro_baseline(**overrides) -> train_gpt.Hyperparameters:
    return train_gpt.Hyperparameters(**{**train_gpt.PRESETS["baseline"], **MICRO_BASELINE, "preset": "baseline",
                                        **overrides})


def rms_norm64(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt(x.square().mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)


# ----------------------------------------------------------------------------------------------- defaults are plain

@pytest.mark.stored_bitwise
def test_baseline_flags_at_default_leave_the_plain_model_and_step_bitwise():
    """value_embed_tables, value_gate_muon, train_order at their defaults: the stored plain logits, gradients and
    optimizer step come out bitwise, and so do value_proj's logits (its attention path now shares the gate code)."""
    defaults = dict(value_embed_tables=False, value_gate_muon=False, train_order="docs")
    assert all(getattr(train_gpt.Hyperparameters(), name) == value for name, value in defaults.items())
    hp = train_gpt.Hyperparameters(**reference.MICRO, **defaults)
    assert_bitwise_plain_reference(hp)
    value_proj = reference.model_outputs(dataclasses.replace(hp, value_proj=True))["logits"]
    assert torch.equal(value_proj[0], REFERENCE["flags"]["value_proj"][0])


def test_baseline_flags_refuse_bad_values_and_conflicts():
    hp = train_gpt.Hyperparameters(n_layer=2, n_embd=16, n_head=2, vocab_size=64, bos_id=63)
    for overrides, message in [
            (dict(value_embed_tables=True, value_proj=True), "value_embed_tables and value_proj"),
            (dict(value_proj=True, value_gate_muon=True, gates_muon=True), "gates_muon already trains"),
            (dict(value_gate_muon=True), "value_gate_muon trains the value gates"),
            (dict(train_order="shuffled"), "train_order must be docs or fixed")]:
        with pytest.raises(train_gpt.ConfigError, match=message):
            train_gpt.check_hyperparameters(dataclasses.replace(hp, **overrides), 1)


# ----------------------------------------------------------------------------------------------- F17 value tables

def test_value_embed_tables_add_the_gated_table_row_by_hand():
    """A 1-layer d = 8 model (2 heads of 4), its layer a value layer: V = c_v x + 2 sigmoid(G x[..., :32]) E[idx] per
    head, x the attention's input (the normed block input), as the baseline's CausalSelfAttention computes it. With
    q = k = 0 every query attends uniformly to its prefix, c_proj = I and the MLP's output zero, so the residual
    stream is x_in + cumulative-mean(V): checked against float64 by hand."""
    hp = train_gpt.Hyperparameters(vocab_size=16, bos_id=15, n_layer=1, n_embd=8, n_head=2, seq_len=5,
                                   value_embed_tables=True)
    model = train_gpt.build_model(hp, train_gpt.Dist(), seed=0)
    attn, table = model.blocks[0].attn, model.value_embeds["0"].weight
    assert attn.c_x0v is None and attn.value_gate.shape == (2, 8) and table.shape == (16, 8)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        attn.c_q.weight.zero_()
        attn.c_k.weight.zero_()
        attn.c_proj.weight.copy_(torch.eye(8))
        attn.value_gate.copy_(torch.randn(2, 8, generator=generator))  # zero-init would make the gate 1 everywhere
        table.copy_(torch.randn(16, 8, generator=generator))
    idx = torch.tensor([[15, 3, 7, 3, 12], [15, 0, 1, 2, 9]])
    got = model.residual_stream(idx).double()

    wte, c_v, gate_w, e = (t.detach().double() for t in (model.wte.weight, attn.c_v.weight, attn.value_gate, table))
    x_in = rms_norm64(wte[idx])  # the embedding, normed
    x = rms_norm64(x_in)  # the attention's input
    gate = 2 * torch.sigmoid(x[..., :8] @ gate_w.T)  # (B, T, H)
    v = (x @ c_v.T).view(2, 5, 2, 4) + gate[..., None] * e[idx].view(2, 5, 2, 4)
    prefix_mean = v.cumsum(1) / torch.arange(1, 6, dtype=torch.float64).view(1, 5, 1, 1)
    assert torch.allclose(got, x_in + prefix_mean.reshape(2, 5, 8), rtol=0, atol=1e-5)


def test_value_tables_sit_on_alternating_layers_and_train_in_the_embedding_group():
    """Tables on layers l with l % 2 == (L - 1) % 2 (L = 4: layers 1 and 3), U(+-sqrt(3 / d)) at init; AdamW at
    embed_lr with adam_wd beside wte; with value_gate_muon the value gates go to Muon with its weight decay while an
    output gate stays in AdamW's scalar group (the 15min record's split); the FLOPs formula leaves the tables out."""
    hp = train_gpt.Hyperparameters(vocab_size=64, bos_id=63, n_layer=4, n_embd=32, n_head=2, seq_len=8,
                                   value_embed_tables=True, value_gate_muon=True, attn_gate=True, embed_lr=0.075,
                                   adam_wd=1.6, muon_lr=0.02, muon_wd=1.6, scalar_lr=0.125)
    model = train_gpt.build_model(hp, train_gpt.Dist(), seed=0)
    assert sorted(model.value_embeds) == ["1", "3"]
    assert [block.attn.value_gate is not None for block in model.blocks] == [False, True, False, True]
    bound = math.sqrt(3 / 32)
    table = model.value_embeds["3"].weight
    assert table.abs().max() <= bound and table.abs().max() > 0.95 * bound and abs(table.mean()) < 0.02
    adamw, muon = train_gpt.build_optimizers(model, hp, train_gpt.Dist())

    def group_of(param):
        for optimizer in (adamw, muon):
            for group in optimizer.param_groups:
                if any(p is param for p in group["params"]):
                    return type(optimizer).__name__, group["lr"], group["weight_decay"]
    assert group_of(table) == group_of(model.wte.weight) == ("AdamW", 0.075, 1.6)
    assert group_of(model.blocks[1].attn.value_gate) == ("Muon", 0.02, 1.6)
    assert group_of(model.blocks[1].attn.out_gate) == ("AdamW", 0.125, 0.0)
    plain_flops = train_gpt.training_flops_per_token(dataclasses.replace(hp, value_embed_tables=False))
    gates = 2 * 2 * 32  # the two value gates, the only parameters the tables add that the formula counts
    assert train_gpt.training_flops_per_token(hp) == pytest.approx(plain_flops + 6 * gates, rel=1e-12)


# ----------------------------------------------------------------------------------------------- F18a fixed order

def test_fixed_order_is_numpys_permutation_the_same_every_epoch():
    """23 windows of 5 tokens (+ 2 tokens of a partial one); 2 ranks x device batch 2: the public DataLoader keeps
    23 - 23 % 4 = 20. Window id i of every epoch is stream window p[i], p = RandomState(43).permutation(23) (which is
    prepare_data.py's np.random.seed(43) + shuffle of the window rows); epochs 0 and 1 are identical; the 20 windows
    are split over ranks as the public (micro-batch m, rank r: ids (2 m + r) 2 + 0..1); the dropped ones never occur."""
    window = 5
    stream = (np.arange(23 * window + 2) * 7 % 251).astype(np.uint16)
    p = np.random.RandomState(43).permutation(23)
    rows = stream[:23 * window].reshape(23, window).copy()
    np.random.seed(43)
    np.random.shuffle(rows)  # the public preparation
    assert np.array_equal(rows, stream[:23 * window].reshape(23, window)[p])
    ranks = [train_gpt.FixedOrderTrainData(stream, 250, seq_len=4, batch_seqs=8, device_batch_size=2, world_size=2,
                                           rank=rank, seed=0) for rank in (0, 1)]
    assert ranks[0].windows_per_epoch == 20 and ranks[0].steps_in(0) == 3
    first_inputs, first_targets = ranks[0].micro_batch(0, 0, 0)
    assert np.array_equal(first_inputs[0].numpy(), stream[p[0] * window:p[0] * window + 4])
    assert np.array_equal(first_targets[0].numpy(), stream[p[0] * window + 1:p[0] * window + 5])
    seen = {0: [], 1: []}
    for epoch in (0, 1):
        for step in range(3):
            for micro in range(2):
                for rank, data in enumerate(ranks):
                    inputs, targets = data.micro_batch(epoch, step, micro)
                    ids = (step * 4 + micro * 2 + rank) * 2 + np.arange(2)
                    for row, window_id in enumerate(ids):
                        expected = stream[p[window_id] * window:(p[window_id] + 1) * window].astype(np.int64) \
                            if window_id < 20 else np.full(window, -1)
                        assert np.array_equal(targets[row].numpy(), expected[1:])
                        seen[epoch].append(tuple(targets[row].numpy()))
    assert seen[0] == seen[1]
    assert ranks[0].step_target_count(0, 0) == 8 * 4 and ranks[0].step_target_count(0, 2) == 4 * 4


def test_member_schedule_builds_the_order_the_flag_names():
    """train_order picks the data class of a member's schedule (docs: today's TrainData, untouched)."""
    tokens = np.arange(400, dtype=np.uint16) % 200
    data = train_gpt.RunData(tokens, tokens, train_gpt.EvalData(tokens, 8, "val"), None)
    hp = train_gpt.Hyperparameters(vocab_size=256, bos_id=255, seq_len=8, batch_tokens=32, device_batch_size=2)
    for order, kind in (("docs", train_gpt.TrainData), ("fixed", train_gpt.FixedOrderTrainData)):
        schedule = train_gpt.MemberSchedule(dataclasses.replace(hp, train_order=order), train_gpt.Dist(), data, 0)
        assert type(schedule.train_data) is kind
    assert schedule.train_data.windows_per_epoch == 44  # 400 // 9 = 44 windows, a multiple of 2 already


# ----------------------------------------------------------------------------------------------- the preset

def test_baseline_preset_states_the_record_and_its_flags():
    """The preset is the baseline record's shape and recipe; its full-scale model has the public 2,688,522,876
    parameters = 2 V d + L (4 d^2 + 2 d 7168) + 15 (32 H + V d) + 2 L (V 50,304, d 1792, L 30, H 14)."""
    hp = train_gpt.parse_args(["--preset", "baseline"])
    train_gpt.check_hyperparameters(hp, 8)
    assert (hp.n_layer, hp.n_embd, hp.n_head, hp.mlp, hp.mlp_hidden, hp.logit_softcap, hp.dropout, hp.num_epochs) == \
        (30, 1792, 14, "relu2", 7168, 15.0, 0.1, 12)
    assert (hp.value_embed_tables, hp.value_gate_muon, hp.train_order, hp.value_proj, hp.muon_eq_r) == \
        (True, True, "fixed", False, False)
    assert (hp.window_pattern, hp.window_short, hp.train_vocab, hp.eval_vocab, hp.val_public_windows) == \
        ("SSSL", 1025, 50257, 50257, 4864)
    assert (hp.muon_polar_express, hp.normuon, hp.cautious_wd, hp.muon_wd_scaled, hp.muon_momentum_warmup,
            hp.resid_mix, hp.resid_lr_scale, hp.x0_beta1, hp.proj_init, hp.wd_schedule) == \
        (True, True, True, True, 300, True, 0.01, 0.96, "zero", "flat")
    assert (hp.muon_lr, hp.embed_lr, hp.head_lr, hp.scalar_lr, hp.muon_wd, hp.adam_wd, hp.warmdown_frac) == \
        (0.08 * 0.25, 0.3 * 0.25, 0.004 * 0.25, 0.5 * 0.25, 1.6, 1.6, 0.5)
    n_params = sum(p.numel() for p in train_gpt.build_model_meta(hp).parameters())
    V, d, L, H = 50304, 1792, 30, 14
    assert n_params == 2 * V * d + L * (4 * d * d + 2 * d * 7168) + 15 * (32 * H + V * d) + 2 * L == 2_688_522_876
    lines = train_gpt.preset_record_lines(hp, n_params)
    assert lines[0] == "preset baseline: reproduces the baseline record 3.402 (qlabs-eng/slowrun train.py@0d49316)"
    assert "2,688,522,876 vs 2,688,522,876 parameters" in lines[1] and "vs 8.31 G" in lines[1]
    # FLOPs by our (causal-mean) formula, by hand: 6 (N - wte - tables - 60 scalars) + 12 d (22 x 768.75 + 8 x 1024.5)
    flops = 6 * (n_params - 16 * V * d - 60) + 12 * d * (22 * 768.75 + 8 * 1024.5)
    assert train_gpt.training_flops_per_token(hp) == pytest.approx(flops, rel=1e-12)
    # the baseline's own estimate_flops counts min(w, T) keys: 1024 on the 22 short layers, 2048 on the 8 long ones
    assert 6 * (n_params - 16 * V * d - 60) + 12 * d * (22 * 1024 + 8 * 2048) == pytest.approx(8.31e9, rel=1e-3)


def test_baseline_preset_trains_three_steps_at_micro_width_with_every_flag_on():
    """The baseline preset with only its shapes shrunk, in the momentum warmup and the warmdown: three optimizer
    steps on one batch of the fixed-order data, loss finite and falling."""
    hp = micro_baseline()
    train_gpt.check_hyperparameters(hp, 1)
    model = train_gpt.build_model(hp, train_gpt.Dist(), seed=0)
    optimizers = train_gpt.build_optimizers(model, hp, train_gpt.Dist())
    tokens = (np.arange(20 * 33) * 5 % 256).astype(np.uint16)
    data = train_gpt.FixedOrderTrainData(tokens, 255, 32, 4, 2, 1, 0, seed=0)
    inputs, targets = data.micro_batch(0, 0, 0)
    losses = []
    for step in (5, 6, 7):  # of 10: momentum warming up, the LR in its linear warmdown (1, 0.8, 0.6)
        factor = train_gpt.apply_schedules(optimizers, step, 10, data, hp)
        assert factor == pytest.approx((10 - step) / 5) and optimizers[1].param_groups[0]["momentum"] == \
            pytest.approx(0.85 + 0.1 * step / 300)
        ce, objective = train_gpt.training_loss_sums(model, inputs, targets, hp.mtp_weight)
        (objective / targets.numel()).backward()
        for optimizer in optimizers:
            optimizer.step()
        model.zero_grad(set_to_none=True)
        losses.append(ce.item() / targets.numel())
    print(f"baseline micro: losses {losses}")
    assert all(math.isfinite(x) for x in losses) and losses[2] < losses[1] < losses[0]


def test_baseline_micro_model_compiles_whole():
    """torch.compile(fullgraph=True) of the micro baseline model (value tables looked up inside the layer loop): a
    training step's loss and gradients equal the eager ones (aot_eager: the graph capture without C++ codegen)."""
    torch._dynamo.reset()
    hp = micro_baseline(n_layer=1, dropout=0.0, proj_init="normal")  # normal c_proj: V reaches the loss at init
    model = train_gpt.build_model(hp, train_gpt.Dist(), seed=0)
    idx = torch.randint(0, 256, (2, hp.seq_len + 1), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    losses, grads = [], []
    for runner in (compiled, model):
        loss = train_gpt.cross_entropy_sum(runner(idx[:, :-1]), idx[:, 1:])
        loss.backward()
        losses.append(loss.detach())
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
        model.zero_grad(set_to_none=True)
    assert torch.allclose(losses[0], losses[1], rtol=1e-5)
    assert grads[1]["value_embeds.0.weight"].abs().sum() > 0  # the table trains
    for name, eager_grad in grads[1].items():
        assert torch.allclose(grads[0][name], eager_grad, rtol=1e-4, atol=1e-6), name


def test_baseline_preset_run_logs_the_record_and_trains(micro_data, tmp_path):
    """train_gpt.main with --preset baseline at micro width (shapes only): the run names the record and its
    parameter count, trains on the fixed order, and its train loss falls over 3 steps."""
    log, losses = micro_preset_run("baseline", micro_data, tmp_path, vocab_size=320, train_vocab=256, eval_vocab=256,
                                   mlp_hidden=128, window_short=9, val_tokens=256, val_public_windows=4)
    assert "preset baseline: reproduces the baseline record 3.402 (qlabs-eng/slowrun train.py@0d49316)" in log
    assert "vs 2,688,522,876 parameters" in log and "train_order" in log
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
