"""Integrity (issue 25, ../shared/reviews/reliability-2026-12-06.md): damaged state is one line naming its file,
never a silent NaN or restart; a diverged loss stops the run at a named step; nothing is left behind after a
resume; a run folder is made and locked by one process, and never removed by another. Each review case is named
by its id (r12, r13b, mc1, r14, r15, k06, k14, k15, L6, b48, b49)."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import zipfile

import pytest
import torch

import train_gpt
from conftest import REPO_ROOT, micro_flags, read_metrics, synthetic_documents
from test_reliability import assert_one_line, run_main, tree


def flip_tensor_bytes(path: str) -> str:
    """The review's flip.py `tensor` mode: 16 bytes XOR 0x5A in the middle of the largest tensor record of a torch
    zip (the file stays a valid zip with the same size); returns the record's name."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as handle:
        handle.seek(info.header_offset)
        header = handle.read(30)
        start = (info.header_offset + 30 + int.from_bytes(header[26:28], "little")
                 + int.from_bytes(header[28:30], "little"))
        handle.seek(start + info.file_size // 2)
        data = handle.read(16)
        handle.seek(start + info.file_size // 2)
        handle.write(bytes(b ^ 0x5A for b in data))
    return info.filename


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    base = tmp_path_factory.mktemp("shards")
    paths = {name: str(base / f"{name}.bin") for name in ("train", "val", "test")}
    for seed, (name, count) in enumerate([("train", 120), ("val", 30), ("test", 30)], start=1):
        train_gpt.write_shard(paths[name], synthetic_documents(count, seed=seed))
    return paths


def single_flags(shards, log_dir, run_id, **overrides):
    """A 6-step single model, checkpointed at step 3, model.pt saved (the review's S, micro-sized)."""
    return micro_flags(shards["train"], shards["val"], str(log_dir), run_id, test_files=shards["test"],
                       **{"max_steps": 6, "checkpoint_every": 3, "val_every": -1, "save_model": True, **overrides})


def ensemble_flags(shards, log_dir, run_id, **overrides):
    """A 2-member ensemble of 4 steps each, checkpointed every 2 (the review's E, micro-sized)."""
    return micro_flags(shards["train"], shards["val"], str(log_dir), run_id, test_files=shards["test"],
                       **{"ensemble_size": 2, "max_steps": 4, "checkpoint_every": 2, "val_every": -1, **overrides})


def copy_folder(source: str, tmp_path) -> str:
    folder = str(tmp_path / "logs" / os.path.basename(source))
    shutil.copytree(source, folder)
    return folder


@pytest.fixture(scope="module")
def stopped_single(shards, tmp_path_factory):
    """The single model stopped after step 3 (its step-3 checkpoint on disk)."""
    logs = tmp_path_factory.mktemp("stopped_single") / "logs"
    assert train_gpt.main(single_flags(shards, logs, "s", stop_at_step=3)) == 3
    return str(logs / "s")


@pytest.fixture(scope="module")
def stopped_ensemble(shards, tmp_path_factory):
    """The ensemble stopped at member 1's step 2: members/member_00.pt written, member 1's step-2 checkpoint."""
    logs = tmp_path_factory.mktemp("stopped_ensemble") / "logs"
    assert train_gpt.main(ensemble_flags(shards, logs, "e", stop_at_step=4 + 2)) == 3
    return str(logs / "e")


@pytest.fixture(scope="module")
def reference_ensemble(shards, tmp_path_factory):
    logs = tmp_path_factory.mktemp("reference_ensemble") / "logs"
    assert train_gpt.main(ensemble_flags(shards, logs, "ref")) == 0
    return str(logs / "ref")


# ------------------------------------------------------------------------------------ r12, r13b, mc1: flipped bytes

@pytest.mark.parametrize("case, part", [("r12", 0), ("r13b", 1)])
def test_flipped_checkpoint_bytes_are_one_line_naming_the_file(stopped_single, tmp_path, capsys, case, part):
    """r12: 16 bytes flipped inside a tensor of the shared checkpoint (before: resumed silently, val_loss nan, rc 0);
    r13b: inside the rank-0 shard's Muon momentum (before: resumed silently, slightly wrong numbers, rc 0)."""
    folder = copy_folder(stopped_single, tmp_path)
    path = train_gpt.checkpoint_files(folder, 0, 3, 0)[part]
    flip_tensor_bytes(path)
    log_before = open(os.path.join(folder, "log.txt"), "rb").read()
    status, err = run_main(["--resume", folder], capsys)
    assert_one_line(status, err, path, "CRC-32", "delete it to restart member 0")
    assert open(os.path.join(folder, "log.txt"), "rb").read() == log_before  # refused before the folder is touched
    assert not os.path.exists(os.path.join(folder, "result.json"))


def test_damaged_newest_generation_names_the_older_one_to_fall_back_to(stopped_single, tmp_path, capsys):
    """Two complete generations on disk (a kill while the older was being removed) and the newest damaged: the line
    says that deleting it resumes from the older one, not from the start."""
    folder = copy_folder(stopped_single, tmp_path)
    for new, old in zip(train_gpt.checkpoint_files(folder, 0, 3, 0), train_gpt.checkpoint_files(folder, 0, 2, 0)):
        shutil.copyfile(new, old)
    flip_tensor_bytes(train_gpt.checkpoint_files(folder, 0, 3, 0)[0])
    status, err = run_main(["--resume", folder], capsys)
    assert_one_line(status, err, "member_00_step0000003_shared.pt", "CRC-32",
                    "delete it to resume member 0 from its checkpoint of step 2")


def test_mc1_flipped_member_file_is_one_line(stopped_ensemble, reference_ensemble, tmp_path, capsys):
    """mc1: 16 bytes flipped in members/member_00.pt of a stopped ensemble (before: loaded silently, NaN ensemble
    and test loss, rc 0). As the line says, deleting the file trains member 0 again: the run ends as the reference."""
    folder = copy_folder(stopped_ensemble, tmp_path)
    path = train_gpt.member_path(folder, 0)
    flip_tensor_bytes(path)
    log_before = open(os.path.join(folder, "log.txt"), "rb").read()
    status, err = run_main(["--resume", folder], capsys)
    assert_one_line(status, err, path, "CRC-32", "delete it to train member 0 again")
    assert open(os.path.join(folder, "log.txt"), "rb").read() == log_before
    assert not os.path.exists(os.path.join(folder, "result.json"))
    os.remove(path)
    status, err = run_main(["--resume", folder], capsys)
    assert status == 0, err
    log = open(os.path.join(folder, "log.txt")).read()
    assert "member 0 of 2 | starts over from step 1: checkpoints/ holds no file of it; its steps 1-4" in log
    assert "member 1 of 2 | resumed from" in log
    assert_same_result(folder, reference_ensemble)


def test_flipped_model_pt_is_one_line_under_eval_only(shards, tmp_path, capsys):
    logs = tmp_path / "logs"
    assert train_gpt.main(single_flags(shards, logs, "m")) == 0
    path = str(logs / "m" / "model.pt")
    flip_tensor_bytes(path)
    status, err = run_main(["--eval_only", path, "--val_files", shards["val"], "--device", "cpu"], capsys)
    assert_one_line(status, err, path, "CRC-32")


def nan_in(path: str, key: str, name: str) -> None:
    """Re-saves the file (so its checksums are valid) with one NaN in saved[key][name]."""
    saved = torch.load(path, weights_only=False)
    saved[key][name].view(-1)[0] = float("nan")
    torch.save(saved, path)


def test_non_finite_state_with_valid_checksums_is_one_line(stopped_single, stopped_ensemble, tmp_path, capsys):
    """Weights written as NaN (valid checksums: the file says what was saved) are refused on load, naming the file and
    the tensor: a checkpoint's model, a rank shard's optimizer state, a member file."""
    folder = copy_folder(stopped_single, tmp_path / "a")
    shared = train_gpt.checkpoint_files(folder, 0, 3, 0)[0]
    nan_in(shared, "model", "lm_head.weight")
    status, err = run_main(["--resume", folder], capsys)
    assert_one_line(status, err, shared, "model/lm_head.weight", "not finite")

    folder = copy_folder(stopped_single, tmp_path / "b")
    shard = train_gpt.checkpoint_files(folder, 0, 3, 0)[1]
    saved = torch.load(shard, weights_only=False)
    muon = next(o for o in saved["optimizers"] if o is not None)
    next(iter(muon["state"].values()))["momentum_buffer"].view(-1)[0] = float("inf")
    torch.save(saved, shard)
    status, err = run_main(["--resume", folder], capsys)
    assert_one_line(status, err, shard, "momentum_buffer", "not finite")

    folder = copy_folder(stopped_ensemble, tmp_path / "c")
    member = train_gpt.member_path(folder, 0)
    nan_in(member, "model", "lm_head.weight")
    status, err = run_main(["--resume", folder], capsys)
    assert_one_line(status, err, member, "lm_head.weight", "not finite")


def test_files_without_checksums_still_load(stopped_single, tmp_path, capsys):
    """Files written with torch's CRC-32 off (set_crc32_options(False): every record's CRC field 0) carry no
    checksum: they load as before, checked finite only."""
    folder = copy_folder(stopped_single, tmp_path)
    torch.serialization.set_crc32_options(False)
    try:
        for path in train_gpt.checkpoint_files(folder, 0, 3, 0):
            torch.save(torch.load(path, weights_only=False), path)
            with zipfile.ZipFile(path) as archive:
                assert all(info.CRC == 0 for info in archive.infolist())
    finally:
        torch.serialization.set_crc32_options(True)
    status, err = run_main(["--resume", folder], capsys)
    assert status == 0, err
    assert "at step 3/6" in open(os.path.join(folder, "log.txt")).read()


def test_candidate_file_changed_on_disk_is_one_line(tmp_path):
    """A candidate kept as its file (candidates_on_disk) is checked when its bytes change after it was written or
    verified: 16 flipped bytes are one line naming the file, not a model of garbage."""
    hp = train_gpt.Hyperparameters(n_layer=2, n_embd=32, n_head=2, seq_len=32, vocab_size=256, device="cpu")
    model = train_gpt.build_model(hp, train_gpt.Dist(), 0).for_inference()
    path = str(tmp_path / "members" / "member_00.pt")
    train_gpt.save_candidate(path, model, member=0)
    skeleton = train_gpt.file_candidate(model, path, writer=0)
    with train_gpt.file_candidate_on_device(skeleton, train_gpt.Dist()) as whole:  # as written: read, no re-check
        assert torch.equal(whole.lm_head.weight, model.lm_head.weight)
    flip_tensor_bytes(path)
    with pytest.raises(train_gpt.ConfigError, match="CRC-32") as error:
        with train_gpt.file_candidate_on_device(skeleton, train_gpt.Dist()):
            pass
    assert path in str(error.value) and len(str(error.value).splitlines()) == 1


# ------------------------------------------------------------------------------------------- a diverged train loss

NAN_FROM_STEP = 5
MICRO_STEPS = 384 // (2 * 32)  # batch_tokens / (device_batch_size x seq_len) of micro_flags


@pytest.mark.parametrize("log_every, checkpoint_every, caught_at", [
    (3, 2, "the progress line of step 6"),  # between two progress lines, no checkpoint before the next line
    (3, 1, "the checkpoint of step 5"),  # a checkpoint due before the next progress line: it is not written
])
def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(shards, tmp_path, capsys,
                                                                                   monkeypatch, log_every,
                                                                                   checkpoint_every, caught_at):
    sums, calls = train_gpt.MemberObjective.sums, []

    def diverging(self, model, inputs, targets):
        calls.append(1)
        micro_loss, loss = sums(self, model, inputs, targets)
        if len(calls) > (NAN_FROM_STEP - 1) * MICRO_STEPS:
            return micro_loss * float("nan"), loss * float("nan")
        return micro_loss, loss
    monkeypatch.setattr(train_gpt.MemberObjective, "sums", diverging)
    logs = tmp_path / "logs"
    status, err = run_main(single_flags(shards, logs, "nan", log_every=log_every, checkpoint_every=checkpoint_every),
                           capsys)
    assert_one_line(status, err, f"at step {NAN_FROM_STEP}", "not finite", caught_at)
    folder = str(logs / "nan")
    good = 4 if checkpoint_every == 1 or checkpoint_every == 2 else 3
    assert [name for name in tree(folder) if name.startswith("checkpoints/")] == [
        f"checkpoints/member_00_step{good:07d}_rank0.pt", f"checkpoints/member_00_step{good:07d}_shared.pt"]
    assert f"checkpoint of step {good} stays" in err
    assert not os.path.exists(os.path.join(folder, "result.json"))
    assert all(math.isfinite(row["train_loss"]) for row in read_metrics(folder) if row["kind"] == "train")


# ------------------------------------------------------------------------------ r14, r15: checkpoints gone at resume

@pytest.mark.parametrize("case, remove, why", [
    ("r14", lambda f: os.remove(train_gpt.checkpoint_files(f, 0, 3, 0)[0]),
     "its newest checkpoint, step 3, is incomplete (member_00_step0000003_shared.pt is missing)"),
    ("r15", lambda f: [os.remove(os.path.join(f, "checkpoints", n)) for n in os.listdir(os.path.join(f, "checkpoints"))],
     "checkpoints/ holds no file of it"),
])
def test_member_starting_over_says_why(stopped_single, tmp_path, capsys, case, remove, why):
    """Checkpoint files deleted between the stop and the resume: the member is trained again from step 1 (the run is
    deterministic: it ends as an uninterrupted one) and the log says why, with the steps trained again."""
    folder = copy_folder(stopped_single, tmp_path)
    remove(folder)
    status, err = run_main(["--resume", folder, "--stop_at_step", "0"], capsys)  # else step 3 stops it again
    assert status == 0, err
    log = open(os.path.join(folder, "log.txt")).read().split("==================== resume ")[-1]
    lines = [line for line in log.splitlines() if "starts over from step 1" in line]
    assert len(lines) == 1 and why in lines[0] and "steps 1-3 logged before are trained again" in lines[0], log


# -------------------------------------------------------------------- k06, k14, k15: killed, then resumed to the end

KILLER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import train_gpt
points, argv = sys.argv[1].split(","), sys.argv[2:]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

# the review's atomic_write#10 post: members/member_00.pt on disk, its checkpoint not yet gone; or result.json on disk
ends = [name for point, name in (("member file", os.path.join("members", "member_00.pt")),
                                 ("result file", "result.json")) if point in points]
if ends:
    atomic_write = train_gpt.atomic_write
    def hook(path, *args, **kwargs):
        atomic_write(path, *args, **kwargs)
        if any(path.endswith(end) for end in ends):
            die()
    train_gpt.atomic_write = hook
if "ensemble eval" in points:
    score = train_gpt.score
    def hook(models, *args, **kwargs):
        if all(getattr(model, "parked_on_host", False) for model in models):  # the ensemble's, not a member's own
            die()
        return score(models, *args, **kwargs)
    train_gpt.score = hook
if "loss plot" in points:  # the review's write_loss_plot#1 pre: result.json on disk
    def hook(*args, **kwargs):
        die()
    train_gpt.write_loss_plot = hook
sys.exit(train_gpt.main(argv))
"""


def killed(points: str, argv: list[str]) -> None:
    process = subprocess.run([sys.executable, "-c", KILLER.format(root=REPO_ROOT), points, *argv],
                             capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=REPO_ROOT)
    assert process.returncode == -signal.SIGKILL, process.stderr[-3000:]


def assert_same_result(folder: str, reference: str) -> None:
    result, expected = (json.load(open(os.path.join(f, "result.json"))) for f in (folder, reference))
    for key in ("val_loss", "test_loss", "train_loss", "tokens_seen", "steps", "ensemble_val_losses"):
        assert result[key] == expected[key], key


@pytest.mark.parametrize("case", ["k06", "k15"])
def test_member_finished_before_a_resume_leaves_no_checkpoint(shards, reference_ensemble, tmp_path, capsys, case):
    """k06: killed right after members/member_00.pt was written, before its last checkpoint went; k15: the same, then
    killed again during the resume's ensemble scoring. Before: the member's step-4 checkpoint stayed forever."""
    logs = tmp_path / "logs"
    killed("member file", ensemble_flags(shards, logs, case))
    folder = str(logs / case)
    assert os.path.isfile(train_gpt.checkpoint_files(folder, 0, 4, 0)[0])
    if case == "k15":
        killed("ensemble eval", ["--resume", folder])
    status, err = run_main(["--resume", folder], capsys)
    assert status == 0, err
    assert not [name for name in tree(folder) if name.startswith("checkpoints/") or ".tmp" in name], tree(folder)
    assert not os.path.exists(os.path.join(folder, "checkpoints"))
    assert_same_result(folder, reference_ensemble)


@pytest.mark.parametrize("flags, point", [(ensemble_flags, "loss plot"), (single_flags, "result file")])
def test_k14_resume_after_result_json_completes_the_end(shards, reference_ensemble, tmp_path, capsys, flags, point):
    """k14: killed after result.json, before the loss plot (a single model: right after result.json, its last
    checkpoint still there). Before: --resume said the run had finished, leaving no done line, no loss.png and an
    empty checkpoints/ (or the checkpoint). Now --resume writes what the end lacked, training nothing."""
    logs = tmp_path / "logs"
    killed(point, flags(shards, logs, "k14"))
    folder = str(logs / "k14")
    result_before = open(os.path.join(folder, "result.json"), "rb").read()
    assert "\ndone | " not in open(os.path.join(folder, "log.txt")).read()
    if flags is single_flags:
        assert os.path.isfile(train_gpt.checkpoint_files(folder, 0, 6, 0)[0])
    status, err = run_main(["--resume", folder], capsys)
    assert status == 0, err
    log = open(os.path.join(folder, "log.txt")).read()
    after_resume = log.split("==================== resume ")[-1]
    assert [line for line in after_resume.splitlines() if line.startswith("done | ")], after_resume
    assert not [line for line in after_resume.splitlines() if "step " in line and "/4" in line]  # nothing trained
    assert os.path.isfile(os.path.join(folder, "loss.png"))
    assert not os.path.exists(os.path.join(folder, "checkpoints"))
    assert open(os.path.join(folder, "result.json"), "rb").read() == result_before
    if flags is single_flags:
        status, err = run_main(["--resume", folder], capsys)
        assert_one_line(status, err, "that run finished")
        return
    assert_same_result(folder, reference_ensemble)
    done_line = [line for line in log.splitlines() if line.startswith("done | ")][0]
    reference_done = [line for line in open(os.path.join(reference_ensemble, "log.txt")).read().splitlines()
                      if line.startswith("done | ")][0]
    assert done_line.split(" | ")[:3] == reference_done.split(" | ")[:3]
    # now the run is whole: a further --resume is refused as for any finished run
    status, err = run_main(["--resume", folder], capsys)
    assert_one_line(status, err, "that run finished")


# ------------------------------------------------------------------------------------ L6, b48, b49: the run folder

def test_l6_a_run_never_removes_a_folder_another_process_made(shards, tmp_path, capsys, monkeypatch):
    """L6: a second fresh run on the same --run_id, the first run creating the folder between the second's
    exists-check and its own creation. Before: the second failed and rmtree'd the first's live folder."""
    logs = tmp_path / "logs"
    folder = str(logs / "race")
    real_mkdir, real_makedirs, raced = os.mkdir, os.makedirs, []

    def rival_first(path):  # the other process wins the race: its folder, with a file of its own in it
        if os.path.abspath(path) == os.path.abspath(folder) and not raced:
            raced.append(path)
            real_makedirs(folder)
            open(os.path.join(folder, "rival.txt"), "w").write("the first run's\n")

    def mkdir(path, *args, **kwargs):
        rival_first(path)
        return real_mkdir(path, *args, **kwargs)

    def makedirs(path, *args, **kwargs):
        rival_first(path)
        return real_makedirs(path, *args, **kwargs)
    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "makedirs", makedirs)
    status, err = run_main(single_flags(shards, logs, "race"), capsys)
    monkeypatch.undo()
    assert os.path.isdir(folder) and os.listdir(folder) == ["rival.txt"]  # the first run's folder, untouched
    assert_one_line(status, err, folder, "already exists")


@pytest.mark.parametrize("run_id", ["../escaped", "/abs/path", "a/b", "", ".", ".."])
def test_run_id_must_be_one_path_component(shards, tmp_path, capsys, run_id):
    """b48, b49: --run_id ../x or /abs/path put the run folder outside --log_dir; a/b, '', '.' and '..' are not
    one folder of it either. One line, exit 2, no folder anywhere."""
    logs = tmp_path / "sub" / "logs"
    if run_id.startswith("/"):
        run_id = str(tmp_path / "abs" / "path")
    before = tree(str(tmp_path))
    status, err = run_main(single_flags(shards, logs, run_id), capsys)
    assert_one_line(status, err, "--run_id", "one folder name")
    assert tree(str(tmp_path)) == before and not os.path.exists(logs)
