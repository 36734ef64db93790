"""Ensembles and the distillation chain: combining members, the distillation loss, ensemble runs, resume."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt
from conftest import micro_flags, read_metrics


def micro_model(seed: int) -> train_gpt.GPT:
    hp = train_gpt.Hyperparameters(vocab_size=64, n_layer=1, n_embd=16, n_head=2, seq_len=16)
    torch.manual_seed(seed)
    model = train_gpt.GPT(train_gpt.model_config(hp))
    with torch.no_grad():  # nanochat's init zeroes the output projections and nearly the head: make outputs differ
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def single_rank() -> train_gpt.Dist:
    return train_gpt.Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


# ------------------------------------------------------------------------------------------------ combining members

def test_identical_members_give_the_single_member_loss():
    model = micro_model(0)
    data = train_gpt.EvalData(np.random.default_rng(0).integers(0, 64, 500).astype(np.uint16), 16, "val")
    single = train_gpt.score([model], [1.0], data, single_rank(), 4)[0]
    for mode in ("prob", "logit"):
        ensemble = train_gpt.score([model, model, model], [0.2, 0.5, 0.3], data, single_rank(), 4, mode)[0]
        assert ensemble == pytest.approx(single, rel=1e-6)


def test_two_members_with_known_distributions():
    # member A puts probabilities (0.7, 0.2, 0.1) on three tokens, member B (0.1, 0.3, 0.6); the target is token 1
    prob_a, prob_b = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.1, 0.3, 0.6])
    logits = [prob_a.log().view(1, 1, 3), prob_b.log().view(1, 1, 3)]
    prob_avg = train_gpt.ensemble_log_probs(logits, [0.5, 0.5], "prob")[0, 0, 1].item()
    assert -prob_avg == pytest.approx(-math.log(0.5 * 0.2 + 0.5 * 0.3), rel=1e-6)  # -log 0.25 = 1.3863
    geometric = np.sqrt(prob_a.numpy() * prob_b.numpy())  # logit averaging = normalised geometric mean
    logit_avg = train_gpt.ensemble_log_probs(logits, [0.5, 0.5], "logit")[0, 0, 1].item()
    assert -logit_avg == pytest.approx(-math.log(geometric[1] / geometric.sum()), rel=1e-6)
    weighted = train_gpt.ensemble_log_probs(logits, [0.25, 0.75], "prob")[0, 0, 1].item()
    assert -weighted == pytest.approx(-math.log(0.25 * 0.2 + 0.75 * 0.3), rel=1e-6)


# --------------------------------------------------------------------------------------------- the distillation loss

class FixedTeacher(torch.nn.Module):
    """A teacher whose features are its logits: head() is the identity, so the test controls the logits exactly."""

    def head(self, features):
        return features.float()


@pytest.mark.parametrize("alpha, temperature, chunk", [(0.5, 2.0, 3), (1.0, 1.0, 7), (0.3, 0.7, 1)])
def test_distillation_loss_and_gradient_match_float64_reference(alpha, temperature, chunk):
    torch.manual_seed(0)
    batch, steps, vocab = 2, 7, 11  # odd sizes: the last chunk is partial
    student = torch.randn(batch, steps, vocab, requires_grad=True)
    teacher_logits = [torch.randn(batch, steps, vocab) * 2, torch.randn(batch, steps, vocab)]
    teachers = [(FixedTeacher(), 0.6), (FixedTeacher(), 0.4)]
    targets = torch.randint(0, vocab, (batch, steps))
    targets[1, -2:] = -1  # padding takes no part
    loss = train_gpt.distillation_loss_sum(student, teachers, teacher_logits, targets, alpha, temperature, chunk)
    loss.backward()

    student64 = student.detach().double().requires_grad_(True)
    valid = targets >= 0
    ce = F.cross_entropy(student64[valid], targets[valid], reduction="sum")
    teacher_probs = 0.6 * F.softmax(teacher_logits[0].double() / temperature, -1) + \
        0.4 * F.softmax(teacher_logits[1].double() / temperature, -1)
    student_log_probs = F.log_softmax(student64 / temperature, -1)
    kl = (teacher_probs * (teacher_probs.log() - student_log_probs)).sum(-1)[valid].sum()
    reference = (1 - alpha) * ce + alpha * temperature**2 * kl
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    torch.testing.assert_close(student.grad.double(), student64.grad, rtol=1e-4, atol=1e-6)


def test_student_approaches_a_fixed_teacher():
    """alpha = 1, T = 1: pure distillation drives the student's distribution towards the teacher's."""
    teacher, student = micro_model(1), micro_model(2)
    student.train()
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, 64, (8, 16), generator=generator)
    targets = torch.randint(0, 64, (8, 16), generator=generator)

    def kl_per_token():
        with torch.no_grad():
            return train_gpt.distillation_loss_sum(student(inputs), [(teacher, 1.0)], [teacher.features(inputs)],
                                                   targets, 1.0, 1.0, 5).item() / targets.numel()
    start = kl_per_token()
    for _ in range(300):
        optimizer.zero_grad()
        loss = train_gpt.distillation_loss_sum(student(inputs), [(teacher, 1.0)], [teacher.features(inputs).detach()],
                                               targets, 1.0, 1.0, 5)
        (loss / targets.numel()).backward()
        optimizer.step()
    end = kl_per_token()
    print(f"KL(teacher || student) per token: {start:.4f} -> {end:.4f}")
    assert end < 0.1 * start


# --------------------------------------------------------------------------------------------------- ensemble runs

def run_in_process(flags):
    return train_gpt.main(flags)


def result_of(folder):
    with open(os.path.join(folder, "result.json")) as handle:
        return json.load(handle)


def test_ensemble_run_scores_members_and_eval_only_agrees(micro_data, tmp_path, capsys):
    train_path, val_path = micro_data
    logs = str(tmp_path / "logs")
    assert run_in_process(micro_flags(train_path, val_path, logs, "ens", ensemble_size=3, distill_alpha=0.5,
                                      distill_temperature=2.0, distill_chunk=5, log_every=5)) == 0
    result = result_of(os.path.join(logs, "ens"))
    members, ensembles = result["member_val_losses"], result["ensemble_val_losses"]
    assert len(members) == 3 and len(ensembles) == 3
    assert ensembles[0] == pytest.approx(members[0])
    for k in range(1, 3):  # probability averaging never loses to the members' mean loss (Jensen's inequality)
        assert ensembles[k] < np.mean(members[:k + 1])
    assert result["val_loss"] == ensembles[-1]
    assert len({m["member"] for m in read_metrics(os.path.join(logs, "ens")) if m["kind"] == "train"}) == 3
    log_text = open(os.path.join(logs, "ens", "log.txt")).read()
    assert "ensemble size -> val loss" in log_text and "distilling from 1 teacher(s)" in log_text
    assert not os.path.exists(os.path.join(logs, "ens", "checkpoints"))  # finished members leave no checkpoints, nor their folder

    capsys.readouterr()
    member_files = os.path.join(logs, "ens", "members", "member_*.pt")
    assert run_in_process(["--eval_only", member_files, "--val_files", val_path, "--vocab_size", "256",
                           "--device", "cpu", "--val_batch_size", "4"]) == 0  # seq_len: the members'
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scored["val_loss"] == pytest.approx(result["val_loss"], rel=1e-6)
    assert scored["member_val_losses"] == pytest.approx(members, rel=1e-6)


def test_resume_after_a_kill_does_not_retrain_finished_members(micro_data, tmp_path):
    train_path, val_path = micro_data
    logs = str(tmp_path / "logs")
    # a batch-size schedule too: the resumed step must map to the same (epoch, step in epoch)
    common = dict(ensemble_size=2, distill_alpha=0.5, log_every=1, dropout=0.1, batch_schedule="0.5,1")
    assert run_in_process(micro_flags(train_path, val_path, logs, "whole", **common)) == 0
    whole = result_of(os.path.join(logs, "whole"))
    steps_per_member = whole["steps"] // 2

    # killed 3 steps into member 2 (mid-epoch), then resumed
    assert run_in_process(micro_flags(train_path, val_path, logs, "cut", stop_at_step=steps_per_member + 3,
                                      **common)) == 3
    folder = os.path.join(logs, "cut")
    first_member = os.path.join(folder, "members", "member_00.pt")
    before = (os.path.getmtime(first_member), open(first_member, "rb").read())
    assert not os.path.exists(os.path.join(folder, "result.json"))
    assert run_in_process(micro_flags(train_path, val_path, logs, "cut", **common)[:0] +
                          ["--resume", folder]) == 0
    assert (os.path.getmtime(first_member), open(first_member, "rb").read()) == before  # member 1 never retrained
    resumed = result_of(folder)
    assert resumed["member_val_losses"] == whole["member_val_losses"]  # bitwise: same weights, data, dropout
    assert resumed["ensemble_val_losses"] == whole["ensemble_val_losses"]
    whole_lines = [(m["member"], m["step"], m["train_loss"]) for m in read_metrics(os.path.join(logs, "whole"))
                   if m["kind"] == "train"]
    cut_lines = [(m["member"], m["step"], m["train_loss"]) for m in read_metrics(folder) if m["kind"] == "train"]
    assert cut_lines == whole_lines  # every train-loss line, before and after the kill, equals the uninterrupted run
    log_text = open(os.path.join(folder, "log.txt")).read()
    assert "loaded finished before the resume" in log_text and "resumed from" in log_text


@pytest.mark.parametrize("overrides, world_size, message", [
    (dict(ensemble_size=2, ensemble_weights="0,1"), 1, "finite weights > 0"),  # a zero weight: log(0), 0/0 later
    (dict(ensemble_size=1, parallel_members=2), 2, "leaves groups idle"),
    (dict(ensemble_size=2, fitness_tokens=64, ensemble_mode="logit"), 1, "probability mixture"),
    (dict(num_epochs=2, swa_epochs=3), 1, "swa_epochs <= num_epochs"),
    (dict(num_epochs=4, swa_epochs=2, max_steps=10), 1, "no max_steps"),
    (dict(ensemble_size=3, select_top=2), 1, "set fitness_tokens"),  # would silently keep all three
    (dict(snapshot_noise=0.01), 1, "set snapshot_cycles or epoch_snapshots"),  # would silently do nothing
])
def test_combinations_that_would_break_later_are_refused_up_front(overrides, world_size, message):
    hp = train_gpt.Hyperparameters(vocab_size=256, bos_id=255, n_layer=1, n_embd=16, n_head=2, seq_len=16,
                                   batch_tokens=128, device_batch_size=2, **overrides)
    with pytest.raises(train_gpt.ConfigError, match=message):
        train_gpt.check_hyperparameters(hp, world_size)


def test_eval_only_keeps_the_order_given_for_the_weights(micro_data, tmp_path, capsys):
    """--ensemble_weights pair with the files in the order they are named, not in sorted order."""
    train_path, val_path = micro_data
    hp = train_gpt.Hyperparameters(vocab_size=256, n_layer=1, n_embd=16, n_head=2, seq_len=16)
    paths = []
    for name, seed in (("b.pt", 0), ("a.pt", 1)):
        torch.manual_seed(seed)
        path = str(tmp_path / "members" / name)
        train_gpt.save_candidate(path, train_gpt.GPT(train_gpt.model_config(hp)))
        paths.append(path)
    capsys.readouterr()
    assert run_in_process(["--eval_only", ",".join(paths), "--ensemble_weights", "0.9,0.1", "--val_files", val_path,
                           "--vocab_size", "256", "--device", "cpu", "--val_batch_size", "4"]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scored["members"] == paths and scored["weights"] == pytest.approx([0.9, 0.1])


def test_resume_rejects_changed_hyperparameters(micro_data, tmp_path, capsys):
    train_path, val_path = micro_data
    logs = str(tmp_path / "logs")
    assert run_in_process(micro_flags(train_path, val_path, logs, "r", stop_at_step=2)) == 3
    capsys.readouterr()
    assert run_in_process(["--resume", os.path.join(logs, "r"), "--n_layer", "3"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --resume continues") and "--n_layer" in error and "\n" not in error
    # finished, a run is never trained again from scratch by a second --resume
    assert run_in_process(["--resume", os.path.join(logs, "r")]) == 0
    capsys.readouterr()
    assert run_in_process(["--resume", os.path.join(logs, "r")]) == 2
    assert "that run finished" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------------- selection

def test_learned_weights_find_the_one_good_candidate():
    rng = np.random.default_rng(0)
    bad = rng.uniform(0.001, 0.05, size=(4, 2000))  # four candidates that give the right token little mass
    good = rng.uniform(0.3, 0.9, size=(1, 2000))
    probs = torch.tensor(np.concatenate([bad[:2], good, bad[2:]]))
    weights = train_gpt.learn_mixture_weights(probs, steps=300)
    print(f"learned weights: {[round(w, 4) for w in weights.tolist()]}")
    assert weights[2] > 0.97
    assert train_gpt.select_members(weights, 1) == [(2, 1.0)]
    kept = train_gpt.select_members(weights, 2)
    assert kept[0][0] == 2 and sum(w for _, w in kept) == pytest.approx(1.0)


def test_target_probabilities_match_the_loss():
    model = micro_model(3)
    data = train_gpt.EvalData(np.random.default_rng(1).integers(0, 64, 300).astype(np.uint16), 16, "fitness")
    probs = train_gpt.target_probabilities([model, model], data, single_rank(), 4)
    assert probs.shape == (2, data.num_targets)
    assert (-probs[0].log().mean()).item() == pytest.approx(train_gpt.score([model], [1.0], data, single_rank(), 4)[0], rel=1e-5)


def test_run_with_fitness_selection(micro_data, tmp_path):
    train_path, val_path = micro_data
    logs = str(tmp_path / "logs")
    assert run_in_process(micro_flags(train_path, val_path, logs, "sel", ensemble_size=2, fitness_tokens=600,
                                      select_top=1, log_every=5)) == 0
    result = result_of(os.path.join(logs, "sel"))
    selection = result["selection"]
    assert len(selection["learned_weights"]) == 2 and sum(selection["learned_weights"]) == pytest.approx(1.0)
    assert len(selection["chosen"]) == 1 and selection["weights"] == [1.0]
    # one member kept: the final loss is that member's own val loss
    assert result["val_loss"] == pytest.approx(result["member_val_losses"][selection["chosen"][0]], rel=1e-6)
    full = train_gpt.read_shard(train_path).size
    assert result["train_tokens"] == full  # the data budget counts the fitness slice (records divide by it)
    log_text = open(os.path.join(logs, "sel", "log.txt")).read()
    trained = int(log_text.split("\ntrain: ")[1].split(" tokens")[0].replace(",", ""))
    assert trained < full - 600  # ...which is never trained on


# ------------------------------------------------------------------------------------------------- snapshot ensembles

def test_snapshot_lr_cycles_restart_and_end_at_the_floor():
    hp = train_gpt.Hyperparameters(snapshot_cycles=3, lr_cycle_floor=0.1, warmdown_frac=0.2)
    factors = [train_gpt.lr_multiplier(step, 30, hp) for step in range(30)]
    for end in (9, 19, 29):  # the last step of each cycle runs at the floor, the next starts near the peak
        assert factors[end] == pytest.approx(0.1)
        assert factors[end - 1] > factors[end]
    for start in (10, 20):
        assert factors[start] > 0.95
    # step counts the cycles do not divide: every snapshot is still taken after a step at the floor
    for total, cycles in ((1000, 3), (1234, 3), (1234, 5), (7, 3)):
        hp = train_gpt.Hyperparameters(snapshot_cycles=cycles, lr_cycle_floor=0.1, warmup_steps=0)
        for end in train_gpt.snapshot_cycle_ends(total, cycles):
            assert train_gpt.lr_multiplier(end - 1, total, hp) == pytest.approx(0.1), (total, cycles, end)
            if end < total:
                assert train_gpt.lr_multiplier(end, total, hp) > 0.5  # the next cycle restarts high


def test_more_snapshot_cycles_than_steps_is_refused(micro_data, tmp_path, capsys):
    """3 steps cannot hold 4 cycles: two would end on the same step and the candidate count would be wrong."""
    train_path, val_path = micro_data
    assert run_in_process(micro_flags(train_path, val_path, str(tmp_path), "few", max_steps=3,
                                      snapshot_cycles=4)) == 2
    assert "snapshot_cycles 4: this run has 3 steps" in capsys.readouterr().err


def test_snapshot_run_and_resume_across_a_cycle(micro_data, tmp_path, capsys):
    train_path, val_path = micro_data
    logs = str(tmp_path / "logs")
    common = dict(num_epochs=3, dropout=0.1, snapshot_cycles=3, snapshot_noise=0.01, snapshot_distill=True,
                  distill_alpha=0.3, log_every=1)
    assert run_in_process(micro_flags(train_path, val_path, logs, "snap", **common)) == 0
    result = result_of(os.path.join(logs, "snap"))
    assert len(result["candidate_val_losses"]) == 3 and len(result["member_val_losses"]) == 1
    members_dir = os.path.join(logs, "snap", "members")
    assert sorted(os.listdir(members_dir)) == ["member_00.pt", "member_00_snapshot_00.pt", "member_00_snapshot_01.pt"]
    assert result["val_loss"] < np.mean(result["candidate_val_losses"])  # Jensen: the average beats the mean
    snapshot_rows = [m for m in read_metrics(os.path.join(logs, "snap")) if m["kind"] == "snapshot"]
    assert [row["cycle"] for row in snapshot_rows] == [0, 1]

    # killed two steps after the first snapshot, resumed: the same run, step for step (dropout on: the reloaded
    # snapshot must not shift the random stream)
    first_end = snapshot_rows[0]["step"]
    assert run_in_process(micro_flags(train_path, val_path, logs, "cut", stop_at_step=first_end + 2, **common)) == 3
    assert run_in_process(["--resume", os.path.join(logs, "cut")]) == 0
    resumed = result_of(os.path.join(logs, "cut"))
    assert resumed["candidate_val_losses"] == result["candidate_val_losses"]
    assert resumed["val_loss"] == result["val_loss"]

    capsys.readouterr()
    assert run_in_process(["--eval_only", os.path.join(members_dir, "*.pt"), "--val_files", val_path,
                           "--vocab_size", "256", "--device", "cpu", "--val_batch_size", "4", "--seq_len", "32"]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scored["val_loss"] == pytest.approx(result["val_loss"], rel=1e-6)


# ------------------------------------------------------------------ averaging over the final epochs: SWA, epoch snapshots

def test_swa_cycles_per_final_epoch():
    hp = train_gpt.Hyperparameters(swa_epochs=2, lr_cycle_floor=0.05, warmdown_frac=0.0)
    params = [torch.nn.Parameter(torch.zeros(2, 2))]
    optimizer = torch.optim.SGD(params, lr=1.0)
    optimizer.param_groups[0]["initial_lr"] = 1.0
    tokens = np.ones(50, dtype=np.uint16)  # one document of 50 tokens: 10 windows of 5, one per step
    tokens[0] = 0
    train_data = train_gpt.TrainData(tokens, 0, 4, 1, 1, 1, 0, 0)
    assert train_data.steps_in(0) == 10
    factors = [train_gpt.apply_schedules([optimizer], step, 30, train_data, hp) for step in range(30)]
    assert factors[:10] == [1.0] * 10  # before the SWA epochs: the usual schedule
    for end in (19, 29):  # each SWA epoch is one cosine cycle ending at the floor
        assert factors[end] == pytest.approx(0.05) and factors[end - 9] > 0.95


class _EpochSchedule:
    """A member schedule of 3 epochs of 4 steps, as CheckpointAverage reads one."""
    total_steps = 12

    class train_data:
        @staticmethod
        def epoch_position(step):
            return step / 4

    @staticmethod
    def epoch_end(done):
        return done % 4 == 0


class _Log:
    def __init__(self):
        self.lines = []

    def write(self, line):
        self.lines.append(line)


def test_swa_ends_the_run_on_the_equal_average_of_its_final_epoch_ends(tmp_path):
    """swa_epochs 2 over 3 epochs: the weights after the last step are (theta_8 + theta_12) / 2 by hand, whatever came
    before; an SWA state of earlier versions ((sum, count)) resumes to the same average."""
    hp = train_gpt.Hyperparameters(swa_epochs=2)
    log = _Log()
    swa = train_gpt.CheckpointAverage(hp, _EpochSchedule(), final=True, log=log)
    model = torch.nn.Linear(3, 2, bias=False)
    seen = {}
    for done in range(1, 13):
        with torch.no_grad():
            model.weight.copy_(torch.randn(2, 3, generator=torch.Generator().manual_seed(done), dtype=torch.float32))
        seen[done] = model.weight.detach().clone()
        swa.after_step(done, model)
    assert torch.allclose(model.weight, (seen[8] + seen[12]) / 2, rtol=0, atol=1e-7)
    assert log.lines == ["swa | weights averaged over the ends of the final 2 epochs"]
    old = train_gpt.CheckpointAverage(hp, _EpochSchedule(), final=True, log=_Log())
    old.restore({"swa": ([seen[8].clone()], 1)}, model)  # the earlier (sum, count) layout, saved after epoch 2
    with torch.no_grad():
        model.weight.copy_(seen[12])
    old.after_step(12, model)
    assert torch.allclose(model.weight, (seen[8] + seen[12]) / 2, rtol=0, atol=1e-7)


def test_swa_and_epoch_snapshots_runs(micro_data, tmp_path):
    train_path, val_path = micro_data
    logs = str(tmp_path / "logs")
    assert run_in_process(micro_flags(train_path, val_path, logs, "swa", num_epochs=3, swa_epochs=2, log_every=5,
                                      save_model=True)) == 0
    log_text = open(os.path.join(logs, "swa", "log.txt")).read()
    assert "swa | weights averaged over the ends of the final 2 epochs" in log_text
    assert run_in_process(micro_flags(train_path, val_path, logs, "swa_cut", num_epochs=3, swa_epochs=2,
                                      stop_at_step=13, log_every=5)) == 3
    assert run_in_process(["--resume", os.path.join(logs, "swa_cut")]) == 0  # the running average survives a kill
    assert result_of(os.path.join(logs, "swa_cut"))["val_loss"] == result_of(os.path.join(logs, "swa"))["val_loss"]

    assert run_in_process(micro_flags(train_path, val_path, logs, "epochs", num_epochs=3, epoch_snapshots=3,
                                      log_every=5)) == 0
    result = result_of(os.path.join(logs, "epochs"))
    assert len(result["candidate_val_losses"]) == 3  # the ends of epochs 1, 2 and 3
    vals = [m["val_loss"] for m in read_metrics(os.path.join(logs, "epochs")) if m["kind"] == "val"]
    assert result["candidate_val_losses"] == pytest.approx(vals, rel=1e-9)  # each candidate is that epoch's model
    assert result["val_loss"] < np.mean(result["candidate_val_losses"])


# ------------------------------------------------------------------------------- distilling a finished run (distill_from)

def test_distill_from_a_finished_run_trains_the_student_the_chain_trains(micro_data, tmp_path):
    """--distill_from RUN: the finished run's model, read from its file, teaches as the chain's member 0 teaches
    member 1 in memory: the student (seed + 1000, member 1's seed) equals the chain's member 1 to the last bit."""
    train_path, val_path = micro_data
    logs = str(tmp_path / "logs")
    common = dict(distill_alpha=0.5, distill_temperature=2.0, distill_chunk=5, dropout=0.1)
    assert run_in_process(micro_flags(train_path, val_path, logs, "chain", ensemble_size=2, **common)) == 0
    assert run_in_process(micro_flags(train_path, val_path, logs, "teacher", save_model=True, **common)) == 0
    chain, teacher = result_of(os.path.join(logs, "chain")), result_of(os.path.join(logs, "teacher"))
    assert teacher["val_loss"] == chain["member_val_losses"][0]  # the same independent first model
    assert run_in_process(micro_flags(train_path, val_path, logs, "student", seed=1000,
                                      distill_from=os.path.join(logs, "teacher"), **common)) == 0
    student = result_of(os.path.join(logs, "student"))
    assert student["val_loss"] == chain["member_val_losses"][1]
    assert chain["member_val_losses"][1] != teacher["val_loss"]
    log_text = open(os.path.join(logs, "student", "log.txt")).read()
    assert "distilling from 1 teacher(s)" in log_text

    # an ensemble of two teachers (the chain's members files): the student differs from the one-teacher student
    assert run_in_process(micro_flags(train_path, val_path, logs, "student2", seed=1000,
                                      distill_from=os.path.join(logs, "chain"), **common)) == 0
    assert "distilling from 2 teacher(s)" in open(os.path.join(logs, "student2", "log.txt")).read()
    assert result_of(os.path.join(logs, "student2"))["val_loss"] != student["val_loss"]


def test_distill_from_refuses_what_cannot_teach(micro_data, tmp_path, capsys):
    train_path, val_path = micro_data
    logs = str(tmp_path / "logs")
    assert run_in_process(micro_flags(train_path, val_path, logs, "teacher", save_model=True)) == 0
    cases = [(dict(distill_from=str(tmp_path / "nowhere"), distill_alpha=0.5), "no such run folder"),
             (dict(distill_from=str(tmp_path), distill_alpha=0.5), "neither members/member_NN.pt nor model.pt"),
             (dict(distill_from=os.path.join(logs, "teacher")), "set it > 0"),
             (dict(distill_from=os.path.join(logs, "teacher"), distill_alpha=0.5, vocab_size=300),
              "predicts 256 tokens")]
    for index, (overrides, message) in enumerate(cases):
        capsys.readouterr()
        assert run_in_process(micro_flags(train_path, val_path, logs, f"bad{index}", **overrides)) == 2
        assert message in capsys.readouterr().err
        assert not os.path.exists(os.path.join(logs, f"bad{index}"))  # refused before the run folder
