"""The 2h record's window schedule and YaRN (issue 15, records/TRACKS.md F15) and the 2h preset: each against a
float64 hand evaluation of the formula qlabs-eng/slowrun two_hour/train.py at fd342f0 uses, the flags at their
defaults leaving the plain model bitwise unchanged, the preset's record and size, three steps at micro width across
a window stage change, and torch.compile across it with a bounded number of graphs."""
import dataclasses
import math
import os
import sys

import numpy as np
import pytest
import torch

import train_gpt
from conftest import micro_flags, read_metrics

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures"))
import make_plain_reference as reference  # noqa: E402

REFERENCE = torch.load(os.path.join(os.path.dirname(__file__), "fixtures", "plain_reference.pt"), weights_only=True)
SCHEDULE_2H = "1-6:257,769;7-13:769,1793;14-22:1281,2048"


def yarn_by_hand(inv_freq: np.ndarray, old: int, new: int) -> np.ndarray:
    """The 2h record's Yarn.apply in float64: ramp over 1..32 rotations of the old window."""
    rotations = old * inv_freq / (2 * math.pi)
    ramp = np.clip((rotations - 1) / 31, 0, 1)
    return inv_freq * (old / new + ramp * (1 - old / new))


def test_yarn_after_768_to_1792_and_1792_to_2048_matches_float64_hand_values():
    """D = 128, base 10000: a model put in stage 2 of the 2h schedule has RoPE tables of the frequencies rescaled by
    the ramp for 768 -> 1792 (public units of our 769 -> 1793 keys) and softmax scale 128^-0.5 (0.2 ln(1792/768) + 1);
    stage 3 compounds 1792 -> 2048 on top. A few hand values: the fastest pair (rotation ~122 turns) keeps its
    frequency, the slowest is divided by 1792/768."""
    base = 10000.0 ** (-np.arange(0, 128, 2) / 128)  # float64
    stage2 = yarn_by_hand(base, 768, 1792)
    stage3 = yarn_by_hand(stage2, 1792, 2048)
    assert stage2[0] == 1.0 and stage2[-1] == pytest.approx(base[-1] * 768 / 1792, rel=1e-15)
    got = train_gpt.yarn_inv_freq(torch.tensor(base, dtype=torch.float32), 768, 1792).double().numpy()
    np.testing.assert_allclose(got, stage2, rtol=1e-6)
    assert train_gpt.yarn_softmax_scale(128**-0.5, 768, 1792) == pytest.approx(
        (0.2 * math.log(1792 / 768) + 1) / math.sqrt(128), rel=1e-15)

    hp = train_gpt.Hyperparameters(vocab_size=64, bos_id=63, n_layer=2, n_embd=128, n_head=1, seq_len=2048,
                                   window_pattern="SL", window_schedule=SCHEDULE_2H, yarn=True)
    model = train_gpt.GPT(train_gpt.model_config(hp))
    assert model.blocks[0].attn.softmax_scale == (128**-0.5,)  # stage 1: passed explicitly, as the record does
    positions = np.array([0, 1, 7, 100, 2047], dtype=np.float64)[:, None]
    for stage, inv_freq, scale in ((1, stage2, (0.2 * math.log(1792 / 768) + 1) / math.sqrt(128)),
                                   (2, stage3, (0.2 * math.log(1792 / 768) + 1) * (0.2 * math.log(2048 / 1792) + 1)
                                    / math.sqrt(128))):
        train_gpt.set_window_schedule_stage(model, stage)
        assert model.blocks[1].attn.softmax_scale == pytest.approx((scale,), rel=1e-15)
        rows = [0, 1, 7, 100, 2047]
        np.testing.assert_allclose(model.rotary_cos[0, rows, 0].double().numpy(), np.cos(positions * inv_freq),
                                   atol=3e-4)  # float32 angles up to 2047 rad
        np.testing.assert_allclose(model.rotary_sin[0, rows, 0].double().numpy(), np.sin(positions * inv_freq),
                                   atol=3e-4)
        np.testing.assert_allclose(model.rotary_sin[0, 1, 0].double().numpy(), np.sin(inv_freq), rtol=1e-6)
    assert model.yarn_growths == [(768, 1792), (1792, 2048)]
    train_gpt.set_window_schedule_stage(model, 0)  # back to epoch 1 (a reloaded stage-1 model): the base tables
    assert model.blocks[0].attn.softmax_scale == (128**-0.5,)
    np.testing.assert_allclose(model.rotary_sin[0, 1, 0].double().numpy(), np.sin(base), rtol=1e-6)


def test_attention_with_the_yarn_scale_equals_softmax_of_scaled_scores_by_hand():
    """attend with a scale, causal and windowed, equals float64 softmax(scale q k^T + mask) v; and the attention
    module passes its softmax_scale: its output equals the whole forward written out by hand in float64."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=gen) for _ in range(3))
    scale = 0.9
    allowed = train_gpt.attention_mask_dense(6, 3, None, torch.device("cpu"))
    for mask in (None, allowed):
        scores = scale * q.double() @ k.double().transpose(-1, -2)
        keep = allowed if mask is not None else torch.ones(6, 6, dtype=torch.bool).tril()
        expected = torch.softmax(scores.masked_fill(~keep, -math.inf), -1) @ v.double()
        got = train_gpt.attend(q, k, v, mask, scale)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)

    config = train_gpt.model_config(train_gpt.Hyperparameters(vocab_size=64, bos_id=63, n_layer=1, n_embd=8,
                                                              n_head=2, seq_len=6))
    torch.manual_seed(0)
    attn = train_gpt.CausalSelfAttention(config)
    torch.nn.init.normal_(attn.c_proj.weight)
    attn.softmax_scale = (scale,)
    x = torch.randn(1, 6, 8, generator=gen)
    angles = torch.arange(6, dtype=torch.float64)[:, None] * torch.tensor([1.0, 0.01], dtype=torch.float64)
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]

    def heads(weight):  # (1, 6, 2 heads, 4), rotated, rms-normed (QK-norm after RoPE)
        t = (x.double() @ weight.double().T).view(1, 6, 2, 4)
        t1, t2 = t[..., :2], t[..., 2:]
        t = torch.cat([t1 * cos + t2 * sin, t2 * cos - t1 * sin], -1)
        return t / t.square().mean(-1, keepdim=True).add(torch.finfo(torch.float32).eps).sqrt()

    hq, hk = heads(attn.c_q.weight).transpose(1, 2), heads(attn.c_k.weight).transpose(1, 2)
    hv = (x.double() @ attn.c_v.weight.double().T).view(1, 6, 2, 4).transpose(1, 2)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    y = torch.softmax((scale * hq @ hk.transpose(-1, -2)).masked_fill(~causal, -math.inf), -1) @ hv
    expected = y.transpose(1, 2).reshape(1, 6, 8) @ attn.c_proj.weight.double().T
    got = attn(x, cos.float(), sin.float())
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)
    attn.softmax_scale = ()  # the default: SDPA's 4^-0.5, a different output
    assert not torch.allclose(attn(x, cos.float(), sin.float()), got, atol=1e-3)


def test_each_epoch_has_its_stage_and_each_layer_its_window():
    """The 2h schedule: epochs 1-6 stage 1, 7-13 stage 2, 14-22 stage 3 (and past the end, the last); SSSL over 30
    layers puts the long window on layers 3, 7, ..., 27 and on the last layer, at every stage (769 at stage 1)."""
    stages = train_gpt.parse_window_schedule(SCHEDULE_2H, 2048)
    assert stages == [(1, 6, 257, 769), (7, 13, 769, 1793), (14, 22, 1281, 2048)]
    assert [train_gpt.window_schedule_stage(stages, epoch) for epoch in range(1, 24)] == [0] * 6 + [1] * 7 + [2] * 10
    hp = train_gpt.parse_args(["--preset", "2h"])
    model = train_gpt.build_model_meta(hp)
    long_layers = {3, 7, 11, 15, 19, 23, 27, 29}
    for stage, (_, _, short, long) in enumerate(stages):
        train_gpt.set_window_schedule_stage(model, stage)
        assert model.window_sizes == [long if layer in long_layers else short for layer in range(30)]
    assert train_gpt.yarn_growths(stages, 2, 2048) == [(768, 1792), (1792, 2048)]  # public units, 2048 = full
    # the training loop's view: the stage of a step is its epoch's, from the epoch's first step
    data = ten_step_epochs()
    assert [train_gpt.window_schedule_stage(stages, data.locate(step)[0] + 1) for step in (59, 60, 129, 130)] == \
        [0, 1, 1, 2]


@pytest.mark.parametrize("bad, message", [
    ("1-6:257,769;8-13:769,1793", "should start at epoch 7"),  # a gap
    ("1-6:257,769;5-13:769,1793", "should start at epoch 7"),  # an overlap
    ("2-6:257,769", "should start at epoch 1"),
    ("1-6:257", "must look like 'a-b:short,long'"),
    ("1-6:257,769;", "must look like 'a-b:short,long'"),
    ("1-6:900,769", "0 < short <= long <= seq_len .2048."),
    ("1-6:257,4096", "0 < short <= long <= seq_len .2048."),
])
def test_a_malformed_window_schedule_is_one_line(bad, message):
    with pytest.raises(train_gpt.ConfigError, match=message):
        train_gpt.check_hyperparameters(train_gpt.parse_args(["--preset", "2h", "--window_schedule", bad]), 8)


@pytest.mark.parametrize("flags, message", [
    (["--window_warmup_frac", "0.5"], "window_schedule and window_warmup_frac both schedule the windows"),
    (["--window_pattern", ""], "set window_pattern too"),
    (["--window_schedule", ""], "yarn rescales RoPE when the window schedule's long window grows"),
    (["--window_schedule", "1-6:257,1793;7-22:257,769"], "must not shrink"),
])
def test_window_schedule_conflicts_are_one_line(flags, message):
    with pytest.raises(train_gpt.ConfigError, match=message):
        train_gpt.check_hyperparameters(train_gpt.parse_args(["--preset", "2h", *flags]), 8)
    assert train_gpt.main(["--preset", "2h", *flags]) == 2


@pytest.mark.stored_bitwise
def test_defaults_are_the_plain_model_bitwise_and_a_one_stage_schedule_is_the_pattern_bitwise():
    """window_schedule "" and yarn False: the stored plain logits and gradients, bitwise. A one-stage schedule with
    the windows of window_pattern (SSSL, 8 and 16 keys) gives the stored window_pattern logits bitwise; with yarn on
    and no growth the only change is the explicit softmax scale 8^-0.5 (equal to SDPA's default up to rounding)."""
    plain = reference.model_outputs(train_gpt.Hyperparameters(**reference.MICRO, window_schedule="", yarn=False))
    assert torch.equal(plain["logits"][0], REFERENCE["plain"]["logits"][0])
    for name, grad in plain["grads"].items():
        assert torch.equal(grad, REFERENCE["plain"]["grads"][name]), name
    staged = dict(reference.MICRO, window_pattern="SSSL", window_schedule="1-3:8,16")
    assert torch.equal(reference.model_outputs(train_gpt.Hyperparameters(**staged))["logits"][0],
                       REFERENCE["flags"]["window_pattern"][0])
    scaled = reference.model_outputs(train_gpt.Hyperparameters(**staged, yarn=True))["logits"][0]
    torch.testing.assert_close(scaled, REFERENCE["flags"]["window_pattern"][0], rtol=1e-5, atol=1e-5)


def test_2h_preset_states_its_record_its_size_and_the_public_settings():
    """The preset is the 1h preset plus exactly what two_hour/train.py changes (--num-epochs 22, --dupe-start-epoch
    14, --swa-last-epochs 8, --logit-avg 11, --window-schedule, YaRN, and its own bf16 sites: q, k, v cast to bf16
    for attention, attn_qkv_bf16, and its Yarn tables' bf16 values in float32, rope_tables "bf16_values"; the 1h
    preset's muon_bf16 and public stepping are inherited); 1,443,722,775 parameters (the 1h model: YaRN
    adds none); FLOPs per token by the public formula at each stage, by hand: 6 (N - wte - 75 scalars) + 12 d x mean
    keys (22 S layers, 8 L layers), m - m(m - 1)/(2T) keys for a window of m keys, (T + 1)/2 for a full one."""
    hp = train_gpt.parse_args(["--preset", "2h"])
    train_gpt.check_hyperparameters(hp, 8)
    one_hour = train_gpt.parse_args(["--preset", "1h"])
    changed = {f.name: getattr(hp, f.name) for f in dataclasses.fields(hp) if getattr(hp, f.name) !=
               getattr(one_hour, f.name)}
    assert changed == dict(preset="2h", num_epochs=22, loop_start_epoch=14, lr_epoch_cosine=8, epoch_snapshots=11,
                           window_schedule=SCHEDULE_2H, yarn=True, attn_qkv_bf16=True, rope_tables="bf16_values")
    assert (hp.muon_bf16, hp.public_steps) == (True, 32)  # the 1h preset's, unchanged
    n_params = sum(p.numel() for p in train_gpt.build_model_meta(hp).parameters())
    assert n_params == 1_443_722_775
    lines = train_gpt.preset_record_lines(hp, n_params)
    assert lines[0] == "preset 2h: reproduces the 2h record 3.139 (qlabs-eng/slowrun two_hour/train.py@fd342f0)"
    assert "1,443,722,775 vs 1,443,722,775 parameters" in lines[1]

    def keys(m):
        return 1024.5 if m >= 2048 else m - m * (m - 1) / (2 * 2048)

    dense = 6 * (n_params - 50304 * 1792 - 75)
    by_stage = [dense + 12 * 1792 * (22 * keys(s) + 8 * keys(w)) for s, w in ((257, 769), (769, 1793), (1281, 2048))]
    assert [round(f / 1e6) for f in by_stage] == [8343, 8591, 8714]
    for stage, flops in enumerate(by_stage):
        assert train_gpt.training_flops_per_token(hp, stage=stage) == pytest.approx(flops, rel=1e-12)
    assert lines[2] == "window stages: 8.34 / 8.59 / 8.71 G FLOPs/token"
    record = train_gpt.PUBLIC_RECORDS["2h"]
    assert record["flops"] == round(by_stage[0] / 1e7) * 1e7  # what the public prints at its start (stage 1)
    # looped (stage 3): layers 15..20 twice more, each 4 d^2 + 3 d 4864 + 14 x 12 gate + 3 x 14^2 IHA, the odd ones
    # (15, 17, 19) + d^2 + 14 x 32 (value projection); their attention: 15 and 19 long (full), the others 1281 keys
    replayed = 6 * (4 * 1792**2 + 3 * 1792 * 4864 + 14 * 12 + 3 * 14**2) + 3 * (1792**2 + 14 * 32)
    looped = by_stage[2] + 2 * (6 * replayed + 12 * 1792 * (2 * keys(2048) + 4 * keys(1281)))
    assert train_gpt.training_flops_per_token(hp, True) == pytest.approx(looped, rel=1e-12)
    assert record["flops_looped"] == round(looped / 1e7) * 1e7 == 11.88e9
    import subprocess  # run.sh's first argument picks the preset; its first line names the record (no GPU: exit 1)
    done = subprocess.run(["bash", os.path.join(os.path.dirname(__file__), "..", "run.sh"), "2h"], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, NGPU="0", OMP_NUM_THREADS="1"))
    assert done.returncode == 1 and done.stdout.splitlines()[0] == f"run.sh: {lines[0]}", done.stdout + done.stderr


def ten_step_epochs() -> train_gpt.TrainData:
    """20 windows of 5 tokens, 2 per step: 10 steps per epoch, 220 in 22 epochs."""
    tokens = np.arange(100, dtype=np.uint16) % 50
    return train_gpt.TrainData(tokens, 63, seq_len=4, batch_seqs=2, device_batch_size=2, world_size=1, rank=0, seed=0)


# the preset's shapes shrunk (windows too: 257/769, 769/1793, 1281/2048 keys of 2048 -> 5/9, 9/17, 13/32 of 32)
MICRO_2H = dict(vocab_size=320, bos_id=255, train_vocab=256, eval_vocab=256, n_layer=4, n_embd=32, n_head=2,
                seq_len=32, mlp_hidden=96, loop_range="2:3", device_batch_size=2, batch_tokens=128,
                val_batch_size=2, device="cpu", compile="off", window_schedule="1-6:5,9;7-13:9,17;14-22:13,32")
N_2H = 220


def test_2h_preset_trains_three_steps_at_micro_width_across_a_window_stage_change(tmp_path):
    """The 2h preset with only its shapes shrunk: step 129 (epoch 13: stage 2, no loops), step 130 (epoch 14: stage
    3, YaRN 16 -> 32, looped layers on, logged as a stage change) and step 141 (epoch 15: the final-epoch cosine and
    the rising weight decay on too). Three optimizer steps on one batch with the training objective (CE + MTP block):
    loss finite and falling; the stage change is in the log."""
    hp = train_gpt.Hyperparameters(**{**train_gpt.PRESETS["2h"], **MICRO_2H, "preset": "2h"})
    train_gpt.check_hyperparameters(hp, 1)
    model = train_gpt.build_model(hp, train_gpt.Dist(), seed=0)
    optimizers = train_gpt.build_optimizers(model, hp, train_gpt.Dist())
    data, log = ten_step_epochs(), train_gpt.RunLog(str(tmp_path / "run"), True)
    idx = torch.randint(0, 256, (2, hp.seq_len + 1), generator=torch.Generator().manual_seed(0))
    losses, states = [], []
    for step in (129, 130, 141):
        factor = train_gpt.apply_schedules(optimizers, step, N_2H, data, hp)
        model.loop_active = step >= train_gpt.loop_start_step(hp, data, N_2H)
        train_gpt.window_schedule_step(model, data, step, log, "", compiled=True)
        states.append((model.window_stage, model.loop_active, model.window_sizes, round(factor, 4)))
        ce, objective = train_gpt.training_loss_sums(model, idx[:, :-1], idx[:, 1:], hp.mtp_weight,
                                                     mtp_style=hp.mtp_style)
        (objective / idx[:, 1:].numel()).backward()
        for optimizer in optimizers:
            optimizer.step()
        model.zero_grad(set_to_none=True)
        losses.append((ce / idx[:, 1:].numel()).item())
    log.close()
    print(f"2h micro: losses {losses}, states {states}")
    assert [s[:3] for s in states] == [(1, False, [9, 9, 9, 17]), (2, True, [13, 13, 13, 32]),
                                       (2, True, [13, 13, 13, 32])]
    assert states[2][3] < states[1][3]  # the cosine of epoch 15 is under way
    assert model.mtp_block.attn.softmax_scale == model.blocks[0].attn.softmax_scale == pytest.approx(
        ((0.2 * math.log(16 / 8) + 1) * (0.2 * math.log(32 / 16) + 1) / math.sqrt(16),), rel=1e-12)
    assert all(math.isfinite(x) for x in losses) and losses[2] < losses[1] < losses[0]
    text = open(tmp_path / "run" / "log.txt").read()
    assert "window stage 2/3 (epochs 7-13) from step 129: short 9, long 17 keys | YaRN 8 -> 16" in text
    assert ("window stage 3/3 (epochs 14-22) from step 130: short 13, long 32 keys | YaRN 16 -> 32 | softmax scale "
            "0.324119") in text and "torch.compile: new windows, so a recompile" in text


def test_a_frozen_or_saved_model_keeps_its_stage_and_snapshots_take_the_final_state(tmp_path):
    """frozen_host_copy and save_candidate/load_member keep the stage (windows, YaRN tables, softmax scale): the
    same logits bitwise. final_window_stage is the stage of the run's last epoch, and final_inference_state puts the
    model in the last step's state while an epoch-13 snapshot is copied (stage 3, looped layers on: the 2h record
    loads each averaged checkpoint into its final model), then back in its own, exactly."""
    hp = train_gpt.Hyperparameters(**{**train_gpt.PRESETS["2h"], **MICRO_2H, "n_layer": 2, "loop_range": "1:2",
                                      "mtp_weight": 0.0})
    model = train_gpt.build_model(hp, train_gpt.Dist(), seed=0).eval()
    train_gpt.set_window_schedule_stage(model, 1)
    idx = torch.randint(0, 256, (1, hp.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(idx)
        frozen = train_gpt.frozen_host_copy(model, train_gpt.Dist())
        assert torch.equal(frozen(idx), expected)
        path = str(tmp_path / "members" / "m.pt")
        train_gpt.save_candidate(path, model)
        loaded, _ = train_gpt.load_member(path, torch.device("cpu"))
        assert loaded.window_stage == 1 and torch.equal(loaded(idx), expected)
        assert loaded.blocks[0].attn.softmax_scale == model.blocks[0].attn.softmax_scale != (16**-0.5,)
    schedule = dataclasses.make_dataclass("S", ["train_data", "total_steps", "schedule_steps"])(ten_step_epochs(), N_2H,
                                                                                          N_2H)
    assert train_gpt.final_window_stage(hp, schedule) == 2
    assert not model.loop_active and model.window_stage == 1
    windows, scale = model.window_sizes, model.blocks[0].attn.softmax_scale
    with train_gpt.final_inference_state(model, hp, schedule):  # what a snapshot is saved and copied in
        assert model.loop_active and model.window_stage == 2 and model.window_sizes == [13, 32]
        assert model.yarn_growths == [(8, 16), (16, 32)]
        final = train_gpt.frozen_host_copy(model, train_gpt.Dist())
    assert final.loop_active and final.window_stage == 2 and final.yarn_growths == [(8, 16), (16, 32)]
    # the training model is back in its own stage: the same logits bitwise
    assert not model.loop_active and model.window_stage == 1 and model.window_sizes == windows
    assert model.blocks[0].attn.softmax_scale == scale
    with torch.no_grad():
        assert torch.equal(model(idx), expected)
    assert train_gpt.final_window_stage(hp, schedule.__class__(ten_step_epochs(), 95, 95)) == 1  # ends in epoch 10


def test_compiled_step_across_a_stage_change_compiles_a_bounded_number_of_graphs():
    """torch.compile(fullgraph=True) of the micro 2h model with dynamo's CompileCounter backend over epochs 13-15:
    training in (stage 2, no loops) and (stage 3, loops), an evaluation in each: 4 graphs, no more (the later steps
    reuse them; a float softmax scale would cost a fifth, retraced as a symbolic float); after the stage change the
    compiled output equals the eager one, so the graph reads the new RoPE tables and the new softmax scale."""
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    hp = train_gpt.Hyperparameters(**{**train_gpt.PRESETS["2h"], **MICRO_2H, "n_layer": 2, "loop_range": "0:1",
                                      "dropout": 0.0, "stochastic_depth": 0.0})
    model = train_gpt.build_model(hp, train_gpt.Dist(), seed=0)
    counter = CompileCounter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    data = ten_step_epochs()
    idx = torch.randint(0, 256, (2, hp.seq_len + 1), generator=torch.Generator().manual_seed(0))
    visited = set()
    for step in (128, 129, 130, 140):
        model.loop_active = step >= train_gpt.loop_start_step(hp, data, N_2H)
        train_gpt.set_window_schedule_stage(model, train_gpt.window_schedule_stage(
            train_gpt.parse_window_schedule(hp.window_schedule, hp.seq_len), data.locate(step)[0] + 1))
        visited.add((model.window_stage, model.loop_active))
        loss = train_gpt.cross_entropy_sum(compiled(idx[:, :-1], targets=idx[:, 1:])[0], idx[:, 1:])
        loss.backward()
        model.zero_grad(set_to_none=True)
        if step in (129, 140):  # the epoch-end evaluation of each state
            model.eval()
            with torch.no_grad():
                compiled_logits, eager_logits = compiled(idx[:, :-1]), model(idx[:, :-1])
            model.train()
            torch.testing.assert_close(compiled_logits, eager_logits, rtol=1e-5, atol=1e-5)
    assert visited == {(1, False), (2, True)}
    assert counter.frame_count == 2 * len(visited), f"{counter.frame_count} graphs for {len(visited)} training states"


def test_2h_preset_run_switches_stages_in_the_loop_and_averages_in_the_final_state(micro_data, tmp_path):
    """train_gpt.main with --preset 2h at micro width, three epochs with a stage each (the epochs shrink with the data,
    so the stages and the 14/8/11 epoch counts shrink too; the preset's public stepping makes each epoch 64 windows
    of the 90, 12 a step, so epochs start at steps 0, ceil(64/12) = 6 and ceil(128/12) = 11 of 16): the log has each
    stage from its epoch's first step with YaRN's scale, the metrics a window_stage row per stage, and the epoch-2
    snapshot file is in the final state (stage 3, looped layers on), as the record scores its averaged checkpoints."""
    train_path, val_path = micro_data
    flags = ["--preset", "2h"] + micro_flags(train_path, val_path, str(tmp_path), "micro2h", vocab_size=320,
                                             train_vocab=256, eval_vocab=256, mlp_hidden=64, loop_range="1:2",
                                             num_epochs=3, window_schedule="1:5,9;2:9,17;3:13,32", epoch_snapshots=2,
                                             loop_start_epoch=3, lr_epoch_cosine=2, train_tokens=3000,
                                             checkpoint_every=-1, test_files="", val_tokens=256, val_public_windows=4,
                                             save_model=True)
    assert train_gpt.main(flags) == 0
    folder = tmp_path / "micro2h"
    log = open(folder / "log.txt").read()
    assert "window stage 1/3 (epochs 1-1) from step 0: short 5, long 9 keys | softmax scale 0.250000" in log
    assert "window stage 2/3 (epochs 2-2) from step 6: short 9, long 17 keys | YaRN 8 -> 16 | softmax scale 0.284657" \
        in log
    assert "window stage 3/3 (epochs 3-3) from step 11: short 13, long 32 keys | YaRN 16 -> 32" in log
    assert [row["stage"] for row in read_metrics(str(folder)) if row.get("kind") == "window_stage"] == [1, 2, 3]
    snapshot = torch.load(folder / "members" / "member_00_snapshot_00.pt", weights_only=True)
    assert snapshot["inference_state"] == dict(loop_active=True, window_sizes=[13, 32], recurrence_active=True,
                                                 window_stage=2)
