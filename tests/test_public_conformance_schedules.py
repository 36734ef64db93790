"""Every schedule of the 1h, 2h, 15min and baseline presets, step by step over a whole run, against the public
script's own training loop (issue 23): the step count, the LR, weight decay and Muon momentum of every step, the
steps after which an epoch ends (evaluation, checkpoints), the step the looped layers switch on (1h, 2h), the window
stage of every step (2h), the recurrence passes and MTP weights of every step (15min).

The oracle is the public loop itself, not a re-typing of it: the script's top-level code from "# Training config" to
the end of its `while` loop (public_scripts.public_block) executes with the public DataLoader on a stand-in train file
and stubs for what a schedule does not read (the model's forward and backward, evaluation, logging, checkpoint
files). Its optimizer is a stub that records each step's group settings, its model records the switches. Sizes: the
train file holds the 48,804 whole 2,049-token windows of the 100,000,000 FineWeb train tokens (records/TRACKS.md §0),
each window here of seq_len + 1 = 2 tokens, since the step arithmetic of both loaders counts windows: the public
micro-batch of device batch x 8 GPUs windows and 256 windows a step (524,288 / 2,048), ours the same in windows.
"""
import contextlib
import gc
import math
import types

import numpy as np
import pytest
import torch

import train_gpt
from public_scripts import StubLoss, StubModule, load_public, public_block, require_public

WINDOWS = 48_804  # whole 2,049-token windows in the 100,000,000 FineWeb train tokens (records/TRACKS.md §0)
BOS = 50256


class ModelStub(StubModule):
    """The public's model and orig_model: records the step each switch happens at."""

    def __init__(self, run):
        self.run, self.events, self.passes, self.mtp_weights = run, [], [], []
        self.weight = torch.zeros(1)

    def __call__(self, x, y, num_iterations=None, mtp_weights=None, **kwargs):
        if mtp_weights is None and num_iterations is None:  # 1h, 2h, baseline: (loss, metrics) or the loss
            return StubLoss() if self.run.get("baseline") else (StubLoss(), {})
        if len(self.passes) == len(self.run["optimizer"].steps):  # 15min: the step's first micro-step
            self.passes.append(num_iterations)
            self.mtp_weights.append(mtp_weights.tolist())
        return StubLoss()

    def set_dupe_layers(self, *args):
        self.events.append(("loops", self.run["step"]))

    def set_window_sizes(self, short, long, apply_yarn=False):
        self.events.append(("windows", self.run.get("step", 0), short, long))

    def named_parameters(self):
        return []

    def parameters(self):
        return [self.weight]  # one tensor for the 15min EMA's foreach lerp


    def estimate_flops(self, *args, **kwargs):
        return 1.0

    def _get_attention_softmax_scale(self):
        return 1.0


class OptimizerStub:
    """Two public-style groups (AdamW and Muon) at initial lr 1 and weight decay 1: each step's settings are the
    multipliers themselves."""

    def __init__(self):
        self.param_groups = [dict(kind="adamw", initial_lr=1.0, weight_decay=1.0),
                             dict(kind="muon", initial_lr=1.0, weight_decay=1.0, momentum=0.0)]
        self.steps = []

    def step(self):
        adam, muon = self.param_groups
        self.steps.append((adam["lr"], adam["weight_decay"], muon["momentum"]))


def stand_in_train_file(path, kind: str) -> str:
    """WINDOWS windows of 2 tokens plus a short tail, documents of ~50 tokens, in the public loader's format."""
    tokens = torch.arange(2 * WINDOWS + 1, dtype=torch.int32) % 1000
    tokens[::50] = BOS
    if kind == "chunks":  # 0d49316's prepared windows: rows of sequence_size, in chunks of batch_size
        rows = tokens[:2 * WINDOWS].view(WINDOWS, 2)
        torch.save(dict(chunks=[rows.reshape(-1)], valid_counts=[WINDOWS], batch_size=WINDOWS, sequence_size=2), path)
    else:
        torch.save(dict(tokens=tokens, doc_starts=torch.nonzero(tokens == BOS).flatten(), bos_id=BOS,
                        seq_shuffle_seed=0), path)
    return str(path)


# preset -> (public script, its loader's file format, the last line before the run's post-training code)
PUBLIC_RUNS = {
    "1h": ("1h", "docs", "# Post-training: evaluate checkpoint averages"),
    "2h": ("2h", "docs", "# Post-training: evaluate checkpoint averages"),
    "15min": ("15min", "docs", "if ema_params is not None:"),
    "baseline": ("baseline", "chunks", "# Summary"),
}


def public_run(preset: str, tmp_path_factory) -> dict:
    """Runs the public training loop with stubs; returns its recorded steps and events."""
    track, kind, end = PUBLIC_RUNS[preset]
    require_public(track)
    public = load_public(track)
    path = stand_in_train_file(tmp_path_factory.mktemp(preset) / "train.pt", kind)
    micro = public.args.device_batch_size * 8  # the public micro-batch on 8 GPUs, as one rank's batch here
    loader = public.DataLoader(path, micro, 1, device="cpu") if kind == "chunks" else \
        public.DataLoader(path, micro, 1, device="cpu", doc_shuffle=not public.args.no_doc_shuffle)
    run: dict = {}
    model, optimizer, evaluations = ModelStub(run), OptimizerStub(), []

    def evaluate(*args, **kwargs):
        evaluations.append(run["step"])
        return 1.0, 1.0

    x, y, epoch = next(loader)
    run.update(vars(public))
    run.update(
        MAX_SEQ_LEN=1, TOTAL_BATCH_SIZE=256, ddp_world_size=8, ddp=False, master_process=False, device="cpu",
        train_loader=loader, build_val_loader=lambda: None, TOKENS_PER_EPOCH=loader.total_tokens,
        x=x, y=y, current_epoch=epoch, model=model, orig_model=model, optimizer=optimizer, evaluate_bpb=evaluate,
        print0=lambda *a, **k: None, wandb_run=public.DummyWandb(), synchronize=lambda: None,
        autocast_ctx=contextlib.nullcontext(), token_bytes=None, num_flops_per_token=1.0, gpu_peak_flops=math.inf,
        gc=types.SimpleNamespace(enable=lambda: None, collect=lambda: None, freeze=lambda: None,
                                 disable=lambda: None),
        precompile_iteration_stages=lambda *a, **k: None, schedule_flops_per_token={1: 1.0, 2: 1.0},
        scheduled_iteration_counts=public.iteration_schedule_counts(public.ITERATION_SCHEDULE)
        if track == "15min" else None,
        checkpoints_dir=str(tmp_path_factory.mktemp(preset + "_ckpt")))
    run["baseline"] = preset == "baseline"
    if preset == "2h":  # the stage the public sets before its loop (epoch 1)
        run["active_window_stage"] = public.get_window_schedule_stage(public.args.window_schedule, 1)
    code = public_block(track, "# Training config", end, include_last=False)
    saved_compile = torch.compile
    torch.compile = lambda module=None, **kwargs: module if module is not None else (lambda f: f)
    try:
        exec(compile(code, public.__file__ + " (its training loop)", "exec"), run)
    finally:
        torch.compile = saved_compile
        gc.enable()
    return dict(steps=optimizer.steps, evaluations=evaluations, events=model.events, N=run.get("num_iterations",
                run.get("num_train_steps")), passes=model.passes, mtp_weights=model.mtp_weights,
                windows_per_epoch=loader.total_tokens)


@pytest.fixture(scope="module", params=list(PUBLIC_RUNS))
def both_runs(request, tmp_path_factory):
    """(preset, the public loop's record, our member schedule with its optimizers and micro model)."""
    preset = request.param
    public = public_run(preset, tmp_path_factory)
    # our schedule at the public's sizes in windows: seq_len 1 (windows of 2 tokens), 256 windows a step
    hp = train_gpt.Hyperparameters(**{**train_gpt.PRESETS[preset], "seq_len": 1, "batch_tokens": 256,
                                      "vocab_size": 50304, "bos_id": BOS})
    tokens = (np.arange(2 * WINDOWS + 1) % 1000).astype(np.uint16)
    tokens[::50] = BOS
    schedule = train_gpt.MemberSchedule(hp, train_gpt.Dist(), types.SimpleNamespace(train_tokens=tokens), 0)
    # the optimizers' groups come from a micro model with the preset's flags (the groups do not depend on width)
    micro = dict(n_embd=32, n_head=2, vocab_size=64, bos_id=63, seq_len=16, train_vocab=0, eval_vocab=0,
                 window_short=9 if hp.window_short else 0, window_schedule="", yarn=False, rope_pairs=0,
                 mlp_hidden=64 if hp.mlp_hidden else 0, fp8_head=False)
    model_hp = train_gpt.Hyperparameters(**{**train_gpt.PRESETS[preset], **micro})
    model = train_gpt.GPT(train_gpt.model_config(model_hp))
    optimizers = train_gpt.build_optimizers(model, model_hp, train_gpt.Dist())
    return preset, public, hp, schedule, model, optimizers


def test_the_run_has_the_public_step_count_and_schedule_length(both_runs):
    preset, public, hp, schedule, _, _ = both_runs
    assert schedule.train_data.windows_per_epoch == public["windows_per_epoch"]  # 48,800 (15min: 48,640)
    assert schedule.total_steps == len(public["steps"])  # 1h 2,097; 2h 4,194; 15min 2,850; baseline 2,288
    assert schedule.schedule_steps == public["N"]


def test_every_epoch_ends_where_the_public_evaluates(both_runs):
    """The public evaluates (and checkpoints) after the step where its loader moves to the next epoch: ours ends the
    epoch after the same steps (1h: ... 1,716, 1,907, 2,097)."""
    preset, public, hp, schedule, _, _ = both_runs
    ours = [done for done in range(1, schedule.total_steps + 1) if schedule.epoch_end(done)]
    if ours[-1] != schedule.total_steps:
        ours.append(schedule.total_steps)  # the last step ends the run's last epoch
    assert public["evaluations"][0] == 0 and ours == public["evaluations"][1:]
    assert len(ours) == hp.num_epochs


def test_every_step_has_the_public_lr_weight_decay_and_momentum(both_runs):
    """Each step's LR multiplier (warmdown of round(frac N) steps, the final-epoch cosines), weight-decay multiplier
    and Muon momentum, for every one of our optimizer groups, against what the public loop set on its groups."""
    preset, public, hp, schedule, model, optimizers = both_runs
    worst = dict(lr=0.0, wd=0.0, momentum=0.0)
    for step, (lr, wd, momentum) in enumerate(public["steps"]):
        schedule.start_step(step, optimizers, model)
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                worst["lr"] = max(worst["lr"], abs(group["lr"] / group["initial_lr"] - lr))
                if group["initial_weight_decay"]:
                    worst["wd"] = max(worst["wd"], abs(group["weight_decay"] / group["initial_weight_decay"] - wd))
                if isinstance(optimizer, train_gpt.Muon):
                    worst["momentum"] = max(worst["momentum"], abs(group["momentum"] - momentum))
    # float64 arithmetic in both, in a different order (e.g. our cosine's phase from epoch positions): 1e-12
    assert worst == pytest.approx(dict(lr=0, wd=0, momentum=0), abs=1e-12), worst


def test_the_looped_layers_and_window_stages_switch_at_the_public_steps(both_runs):
    preset, public, hp, schedule, model, optimizers = both_runs
    switches = []
    loop_was, stage_was = False, None
    stages = train_gpt.parse_window_schedule(hp.window_schedule) if hp.window_schedule else None
    for step in range(schedule.total_steps):
        schedule.start_step(step, optimizers, model)
        if hp.loop_repeats and model.loop_active and not loop_was:
            switches.append(("loops", step))
        loop_was = model.loop_active
        if stages:
            stage = train_gpt.window_schedule_stage(stages, schedule.train_data.locate(step)[0] + 1)
            if stage_was is not None and stage != stage_was:
                switches.append(("windows", step, *stages[stage][2:]))
            stage_was = stage
    # the public FA3 window w admits w + 1 keys; its full-length window is the sequence (2,048 keys)
    expected = [event if event[0] == "loops" else (*event[:2], event[2] + 1, min(event[3] + 1, 2048))
                for event in public["events"]]
    assert sorted(switches, key=lambda e: (e[1], e[0])) == sorted(expected, key=lambda e: (e[1], e[0]))
    if preset in ("1h", "2h"):
        assert switches  # 1h: loops at 1,144; 2h: windows at 1,144 and 2,479, loops at 2,479


def test_15min_recurrence_and_mtp_weights_of_every_step(both_runs):
    preset, public, hp, schedule, model, optimizers = both_runs
    if preset != "15min":
        pytest.skip("the 15min record's schedules")
    passes, weights = [], []
    for step in range(schedule.total_steps):
        schedule.start_step(step, optimizers, model)
        passes.append(hp.recurrence if model.recurrence_active else 1)
        weights.append(train_gpt.mtp_offset_weights(step, schedule.schedule_steps, hp))
    assert passes == public["passes"]  # 2 from step 1,995 of 2,850
    # the public's weights are a float32 tensor: compared at float32's resolution
    np.testing.assert_allclose(np.array(weights), np.array(public["mtp_weights"]), rtol=1e-6, atol=1e-7)
