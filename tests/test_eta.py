"""The whole run's ETA, the epoch's short last step, and members counted from 0 in the log (issue 18).

The ETA tests run on a fake clock: every forward pass of a model advances it by a fixed cost per token (training
forwards 3x an evaluation forward, as forward + backward against forward alone), so the run's remaining time is
known exactly and does not depend on how busy the machine is."""
import os
import re
import types
import time

import pytest

import train_gpt
from conftest import micro_flags, read_metrics, synthetic_documents, write_micro_shards

TRAIN_COST, EVAL_COST = 0.03, 0.01  # fake seconds per token forwarded in training / in evaluation


class FakeClock:
    """time.time() for train_gpt that only moves when a model forwards tokens."""

    def __init__(self):
        self.now = 1000.0
        self.row_times = []  # (metrics row, fake time when written)

    def time(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def fake_clock_run(tmp_path_factory):
    """A 2-member micro run (2 epochs of 11 steps, each epoch's last step half padding) on the fake clock."""
    tmp = tmp_path_factory.mktemp("eta")
    train_path, val_path = write_micro_shards(tmp)
    logs = str(tmp / "logs")
    clock = FakeClock()
    forward, metrics = train_gpt.GPT.forward, train_gpt.RunLog.metrics

    def timed_forward(self, idx, *args, **kwargs):
        clock.now += (TRAIN_COST if self.training else EVAL_COST) * idx.numel()
        return forward(self, idx, *args, **kwargs)

    def timed_metrics(self, row):
        clock.row_times.append((row, clock.now))
        metrics(self, row)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_gpt, "time", types.SimpleNamespace(time=clock.time, monotonic=time.monotonic,
                                                                sleep=time.sleep))
        patch.setattr(train_gpt.GPT, "forward", timed_forward)
        patch.setattr(train_gpt.RunLog, "metrics", timed_metrics)
        assert train_gpt.main(micro_flags(train_path, val_path, logs, "ens", ensemble_size=2, n_layer=1)) == 0
    folder = os.path.join(logs, "ens")
    with open(os.path.join(folder, "log.txt")) as handle:
        lines = handle.read().splitlines()
    return dict(clock=clock, end=clock.now, folder=folder, lines=lines, rows=read_metrics(folder))


def test_eta_at_the_end_of_member_0_covers_member_1_and_the_evaluations(fake_clock_run):
    run = fake_clock_run
    train_rows = [(row, at) for row, at in run["clock"].row_times if row["kind"] == "train"]
    last_of_0, at = [(row, at) for row, at in train_rows if row["member"] == 0][-1]
    actual = run["end"] - at  # member 0's last val, member 1 (train + 2 vals), the ensemble scored twice
    member_0_train = last_of_0["train_seconds"]
    # by hand: member 1 trains as long as member 0 did; 3 single-model val passes + 1 + 2 ensemble candidates
    val_targets = 33 * 32
    by_hand = member_0_train + (3 + 1 + 2) * val_targets * EVAL_COST
    assert by_hand == pytest.approx(actual, rel=1e-6)  # the fake clock is what the hand computation says
    assert last_of_0["eta_seconds"] == pytest.approx(actual, rel=0.01), (last_of_0["eta_seconds"], actual)
    assert last_of_0["eta_seconds"] > member_0_train  # not just the member in progress (it has 0 steps left)
    # every progress line's ETA against the actual time left, once val has been timed (before: an estimate)
    first_val = next(at for row, at in run["clock"].row_times if row["kind"] == "val")
    for row, at in train_rows:
        if at > first_val:
            assert row["eta_seconds"] == pytest.approx(run["end"] - at, rel=0.01, abs=0.05), row


def eta_of(line: str) -> int:
    minutes, seconds = re.search(r"\| eta (\d+)m(\d\d)s \|", line).groups()
    return 60 * int(minutes) + int(seconds)


def test_eta_does_not_jump_at_an_epoch_end(fake_clock_run):
    """Each epoch's last step trains on 6 of its 12 windows. Counted in targets trained on, that step's rate
    halved and the ETA doubled right after it; counted in tokens computed, the ETA only falls."""
    lines = [line for line in fake_clock_run["lines"] if re.search(r"step \d+/\d+ \| epoch", line)
             and "| eta " in line]
    assert len(lines) == 44
    etas = [eta_of(line) for line in lines]
    for before, after, line in zip(etas, etas[1:], lines[1:]):
        assert after <= max(1.05 * before, before + 1), f"ETA {before}s -> {after}s at: {line}"
    assert etas[0] > 1.5 * etas[21] > 0  # it does fall: at member 0's end about half the run is left


def test_epoch_last_step_skips_micro_steps_of_padding_only(fake_clock_run):
    """The last step of each epoch costs what its real windows cost: 3 of 6 micro-steps of 64 tokens."""
    train = [row for row in fake_clock_run["rows"] if row["kind"] == "train" and row["member"] == 0]
    full, last = train[9], train[10]  # steps 10 and 11 of 11 per epoch (log_every 1: one step per row)
    assert (full["step"], last["step"]) == (10, 11)
    assert full["ms_per_step"] == pytest.approx(1000 * 6 * 64 * TRAIN_COST)
    assert last["ms_per_step"] == pytest.approx(1000 * 3 * 64 * TRAIN_COST)


def test_members_count_from_0_in_the_log(fake_clock_run):
    """Member k's lines say 'member k', as its file members/member_0k.pt and its metrics rows do."""
    lines, rows = fake_clock_run["lines"], fake_clock_run["rows"]
    for member in (0, 1):
        assert os.path.isfile(os.path.join(fake_clock_run["folder"], "members", f"member_{member:02d}.pt"))
        steps = [row["step"] for row in rows if row["kind"] == "train" and row["member"] == member]
        logged = [int(m.group(1)) for line in lines
                  if (m := re.match(rf"member {member} of 2 \| step (\d+)/22 ", line))]
        assert logged == steps == list(range(1, 23))
    assert not any(line.startswith("member 2") for line in lines)
    ensemble = [line for line in lines if line.startswith("ensemble | ")]
    assert [re.search(r"\| member (\d) alone", line).group(1) for line in ensemble] == ["0", "1"]


def test_live_micro_steps_against_the_window_ids():
    """live_micro_steps against a count of the micro-steps whose window ids reach a real window, on 1-4 ranks."""
    tokens = synthetic_documents(60, seed=3)
    for world_size in (1, 2, 4):
        for rank in range(world_size):
            data = train_gpt.TrainData(tokens, 255, 16, 16, 2, world_size, rank, seed=0, batch_schedule=(1.0, 0.5))
            for epoch in (0, 1):
                for step in range(data.steps_in(epoch)):
                    real = [micro for micro in range(data.grad_accum_steps(epoch))
                            if (data.window_ids(epoch, step, micro, rank) < data.windows_per_epoch).any()]
                    assert real == list(range(len(real)))  # the padding is at the end
                    expected = max(1, len(real))
                    assert train_gpt.live_micro_steps(data, epoch, step, rank) == expected, (world_size, rank, step)


def test_skipping_padding_changes_no_weight(tmp_path, monkeypatch):
    """Training through an epoch's short last step (with MTP) with its padding micro-steps run, or skipped: the same
    losses to the last bit."""
    train_path, val_path = write_micro_shards(tmp_path)
    losses = {}
    for name in ("skip", "all"):
        if name == "all":  # every micro-step, as before live_micro_steps
            monkeypatch.setattr(train_gpt, "live_micro_steps", lambda data, epoch, step, rank:
                                data.grad_accum_steps(epoch))
        flags = micro_flags(train_path, val_path, str(tmp_path / "logs"), name, n_layer=1, max_steps=13,
                            mtp_weight=0.5)
        assert train_gpt.main(flags) == 0
        losses[name] = [(row["kind"], row["step"], row.get("train_loss", row.get("val_loss")))
                        for row in read_metrics(str(tmp_path / "logs" / name)) if row["kind"] in ("train", "val")]
    assert [kind for kind, _, _ in losses["skip"]].count("val") == 2  # after the epoch end (step 11), at the end
    assert losses["skip"] == losses["all"]  # every loss to the last bit
