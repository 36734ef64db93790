"""Fault injection (issue 14, ../shared/reviews/reliability.md): a stalled rank, a full disk, leaked data, bad sizes,
damaged resume folders and a second process on a live run each end in one line (exit status 2), leave no partial
files and no half-made run folder behind."""
import errno
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import train_gpt
from conftest import REPO_ROOT, micro_flags, read_metrics, run_script, synthetic_documents, write_micro_shards


def run_main(argv, capsys) -> tuple[int, str]:
    """train_gpt.main in this process: (exit status, stderr)."""
    capsys.readouterr()
    status = train_gpt.main(argv)
    return status, capsys.readouterr().err


def assert_one_line(status: int, err: str, *fragments: str) -> None:
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def tree(folder: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(root, name), folder) for root, _, names in os.walk(folder)
                  for name in names)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A micro run stopped after step 3 of 6 (its step-3 checkpoint on disk): the folder --resume continues."""
    base = tmp_path_factory.mktemp("stopped")
    train_path, val_path = write_micro_shards(base)
    status = train_gpt.main(micro_flags(train_path, val_path, str(base / "logs"), "run", stop_at_step=3,
                                        max_steps=6, val_every=-1))
    assert status == 3
    return str(base / "logs" / "run")


def copy_run(stopped_run: str, tmp_path) -> str:
    folder = str(tmp_path / "logs" / "run")
    shutil.copytree(stopped_run, folder)
    return folder


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# ------------------------------------------------------------------------------------------------- a stalled rank

def stop_one_of_two_ranks(micro_data, tmp_path, victim: int, how: int = signal.SIGSTOP,
                          dist_timeout: float = 3) -> tuple[int, str, float, list]:
    """A 2-rank gloo micro run launched by hand (MASTER_ADDR, RANK set, no torchrun: rank 0's process hosts the
    process group's TCPStore), --dist_timeout 3; once rank 0 prints step 2, rank `victim` is frozen by SIGSTOP (or
    sent `how`).
    Returns the other rank's (exit status, stderr, seconds it ran on after the stop, both processes)."""
    train_path, val_path = micro_data
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    flags = micro_flags(train_path, val_path, str(tmp_path / "logs"), "stall", num_epochs=500, dist_timeout=dist_timeout,
                        log_every=1, val_every=-1, checkpoint_every=-1, batch_tokens=256)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    script = os.path.join(REPO_ROOT, "train_gpt.py")
    ranks = [subprocess.Popen([sys.executable, script, *flags], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE if r == 0 else subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, cwd=REPO_ROOT) for r in range(2)]
    other = ranks[1 - victim]
    try:
        stepping = threading.Event()

        def watch():
            for line in ranks[0].stdout:
                if line.startswith("step 2/"):
                    stepping.set()
        threading.Thread(target=watch, daemon=True).start()
        assert stepping.wait(120), ranks[0].stderr.read() if ranks[0].poll() is not None else "no step 2 line"
        os.kill(ranks[victim].pid, how)
        stopped = time.monotonic()
        try:
            status = other.wait(timeout=60)
        except subprocess.TimeoutExpired:
            status = None  # still running a minute later: the hang of review case g4
        waited = time.monotonic() - stopped
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
            process.wait()
    return status, other.stderr.read(), waited, ranks


def test_stalled_rank_ends_every_rank_within_the_timeout(micro_data, tmp_path):
    """Rank 1 frozen by SIGSTOP mid-training: rank 0 (waiting in a gloo collective) ends within --dist_timeout 3 s,
    one line naming rank 1 and where it was; before, it waited silently for gloo's 30 minutes."""
    status, err, waited, ranks = stop_one_of_two_ranks(micro_data, tmp_path, victim=1)
    assert status == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "rank 1 stopped answering" in lines[0] and "line " in lines[0], err
    assert f"pid {ranks[1].pid}" in lines[0]
    # the timeout, less the beat interval (timeout / 5: the last beat may precede the stop), plus a loaded machine's slack
    assert 3 - 3 / 5 <= waited < 3 + 10, waited


def test_frozen_store_host_ends_the_other_ranks_within_the_timeout(micro_data, tmp_path):
    """Review case g4: rank 0 frozen by SIGSTOP in a launch without torchrun, where rank 0's process hosts the store
    the heartbeat lives in: rank 1's own deadline (a timer that does not wait on the store) ends it within
    --dist_timeout 3 s with one line naming rank 0 and where it was last heard; before, rank 1 hung silently (40 s+ in
    the review, until gloo's backstop or for ever)."""
    status, err, waited, ranks = stop_one_of_two_ranks(micro_data, tmp_path, victim=0)
    assert status == 2, (status, err)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "rank 0 stopped answering" in lines[0], err
    assert "hosts the process group's store" in lines[0] and f"pid {ranks[0].pid}" in lines[0], lines[0]
    assert 3 - 3 / 5 <= waited < 3 + 10, waited


def test_a_killed_rank_breaks_the_collective_in_flight_and_the_other_ends_in_one_line(micro_data, tmp_path):
    """Rank 1 killed (kill -9: a node lost) mid-training, --dist_timeout 60: rank 0's collective in flight fails at
    once (gloo: "Connection closed by peer"), long before the watchdog would name the silent rank, and rank 0 ends
    with one line saying so and how to continue; before, a 20-line traceback."""
    status, err, waited, _ = stop_one_of_two_ranks(micro_data, tmp_path, victim=1, how=signal.SIGKILL,
                                                   dist_timeout=60)
    assert status == 2, err
    assert err.strip().startswith("error: a collective failed: another rank's process ended") and \
        len(err.strip().splitlines()) == 1 and "--resume" in err, err
    assert waited < 30, waited  # within the collective, not the 60 s watchdog


# ------------------------------------------------------------------------------------------------- a full disk

def test_free_space_is_checked_before_writing(tmp_path, monkeypatch):
    """A fake free-space figure below the estimated size: one line naming the folder, the need and the free space,
    and nothing written. The estimate covers what torch.save really writes (measured, not assumed)."""
    state = dict(weights=torch.zeros(1000, 1000), step=7)  # 4,000,000 bytes of tensor data
    path = str(tmp_path / "ckpt.pt")
    train_gpt.atomic_torch_save(state, path)
    estimate = train_gpt.saved_size_estimate(state)
    assert estimate == 4_000_000 + 2**20 and 4_000_000 < os.path.getsize(path) <= estimate
    monkeypatch.setattr(train_gpt, "free_disk_bytes", lambda folder: 3 * 2**20)
    with pytest.raises(train_gpt.StorageError) as info:
        train_gpt.atomic_torch_save(state, str(tmp_path / "other.pt"))
    assert str(info.value) == f"{tmp_path}: no room for other.pt: it needs 4.8 MiB, 3.0 MiB free"
    monkeypatch.setattr(train_gpt, "free_disk_bytes", lambda folder: 19)
    with pytest.raises(train_gpt.StorageError, match="result.json: it needs 20 bytes, 19 bytes free"):
        train_gpt.atomic_write_bytes(str(tmp_path / "result.json"), b"{}" * 10)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]


def test_disk_full_during_a_checkpoint_is_one_line_and_resume_succeeds(micro_data, tmp_path, monkeypatch, capsys):
    """The second checkpoint's shared file (the 4th file written: step 2's shard and shared file, step 4's shard)
    fails with ENOSPC half-way: one line, no .tmp left to keep the disk full, step 4's shard removed with it, the
    first checkpoint intact; with space back, --resume continues from that checkpoint and finishes."""
    train_path, val_path = micro_data
    real_save, calls = torch.save, []

    def full_disk_save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 4:
            with open(path, "wb") as handle:
                handle.write(b"x" * 1000)  # a partial file, as a real ENOSPC leaves
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, path, *args, **kwargs)
    monkeypatch.setattr(torch, "save", full_disk_save)
    flags = micro_flags(train_path, val_path, str(tmp_path / "logs"), "full", max_steps=5, checkpoint_every=2,
                        val_every=-1)
    status, err = run_main(flags, capsys)
    folder = str(tmp_path / "logs" / "full")
    assert_one_line(status, err, os.path.join(folder, "checkpoints"), "No space left on device",
                    "member_00_step0000004_shared.pt")
    assert [name for name in tree(folder) if "checkpoints" in name] == [
        "checkpoints/member_00_step0000002_rank0.pt", "checkpoints/member_00_step0000002_shared.pt"]
    monkeypatch.setattr(torch, "save", real_save)
    status, err = run_main(["--resume", folder], capsys)
    assert status == 0, err
    log = open(os.path.join(folder, "log.txt")).read()
    assert "resumed from" in log and "at step 2/" in log  # the first checkpoint, not step 1 again
    assert os.path.isfile(os.path.join(folder, "result.json"))


@pytest.mark.parametrize("failure", ["full", "unwritable"])
def test_unwritable_log_dir_is_one_line_and_leaves_no_folder(micro_data, tmp_path, monkeypatch, capsys, failure):
    train_path, val_path = micro_data
    log_dir = tmp_path / "logs"
    if failure == "full":  # the folder is made, then the header's first line finds no space
        def no_space(self, text, echo=True):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(train_gpt.RunLog, "write", no_space)
        expected = "No space left on device"
    else:  # log_dir below a plain file: cannot be created (chmod does not stop root, who runs CI containers)
        (tmp_path / "file").write_text("x")
        log_dir = tmp_path / "file" / "logs"
        expected = "cannot write the run folder"
    status, err = run_main(micro_flags(train_path, val_path, str(log_dir), "r"), capsys)
    assert_one_line(status, err, expected)
    assert not os.path.exists(log_dir / "r")


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    live, dead = os.getppid(), dead_pid()
    for name in [f"a.pt.tmp{dead}", f"b.json.tmp{live}", "c.tmpx", "d.pt"]:
        (tmp_path / name).write_text("x")
    assert train_gpt.remove_stale_temporaries(str(tmp_path)) == [str(tmp_path / f"a.pt.tmp{dead}")]
    assert sorted(os.listdir(tmp_path)) == [f"b.json.tmp{live}", "c.tmpx", "d.pt"]


# ------------------------------------------------------------------------------------------------- data leaks

@pytest.mark.parametrize("case", ["same file", "overlapping glob", "identical copy"])
def test_validation_overlapping_train_is_refused(micro_data, tmp_path, capsys, case):
    train_path, val_path = micro_data
    if case == "same file":
        train, val, message = val_path, val_path, "is both a train file and a validation file"
    elif case == "overlapping glob":
        train, val, message = str(tmp_path / "*.bin"), val_path, "is both a train file and a validation file"
    else:
        shutil.copy(val_path, tmp_path / "copy.bin")
        train, val, message = str(tmp_path / "copy.bin"), val_path, "has the same content as"
    status, err = run_main(micro_flags(train, val, str(tmp_path / "logs"), "leak"), capsys)
    assert_one_line(status, err, message)
    assert not os.path.exists(tmp_path / "logs")


# ------------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("case, overrides, message", [
    ("zero-token shard", {}, "the header is valid but the shard holds 0 tokens"),
    ("no endoftext", {}, "no <|endoftext|> (bos_id 255)"),
    ("train_tokens 1", dict(train_tokens=1), "1 train tokens after --train_tokens 1, fewer than one sequence"),
    ("train_tokens -5", dict(train_tokens=-5), "train_tokens must be >= 0"),
    ("val_tokens -100", dict(val_tokens=-100), "val_tokens must be >= 0"),
    ("batch_tokens 0", dict(batch_tokens=0), "batch_tokens must be >= 1, got 0"),
    ("batch_tokens -8192", dict(batch_tokens=-8192), "batch_tokens must be >= 1, got -8192"),
    ("mlp_ratio 0", dict(mlp_ratio=0), "mlp_ratio must be > 0 and finite, got 0.0"),
])
def test_bad_sizes_and_shards_are_one_line(micro_data, tmp_path, capsys, case, overrides, message):
    train_path, val_path = micro_data
    if case == "zero-token shard":
        train_gpt.write_shard(str(tmp_path / "empty.bin"), np.zeros(0, np.uint16))
        train_path = str(tmp_path / "empty.bin")
    if case == "no endoftext":
        train_gpt.write_shard(str(tmp_path / "plain.bin"), np.arange(2000, dtype=np.uint16) % 200)
        train_path = str(tmp_path / "plain.bin")
    status, err = run_main(micro_flags(train_path, val_path, str(tmp_path / "logs"), "bad", **overrides), capsys)
    assert_one_line(status, err, message)
    assert not os.path.exists(tmp_path / "logs")


def test_bare_preset_says_it_needs_a_value(capsys):
    status, err = run_main(["--n_layer", "2", "--preset"], capsys)
    assert_one_line(status, err, "flag --preset needs a value (one of ")


def test_bundled_sample_passes_the_shard_checks():
    hp = train_gpt.parse_args(["--preset", "tiny"])
    train_gpt.check_data_files(hp)  # GPT-2 shards: every file holds <|endoftext|>, val is not train


# ------------------------------------------------------------------------------------------------- damaged resume

def edit_json(folder, change):
    path = os.path.join(folder, "hyperparameters.json")
    saved = json.load(open(path))
    change(saved)
    json.dump(saved, open(path, "w"))


def truncate(path, keep):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:int(len(data) * keep)])


def shared_file(folder):
    return train_gpt.checkpoint_files(folder, 0, 3, 0)[0]


def shard_file(folder):
    return train_gpt.checkpoint_files(folder, 0, 3, 0)[1]


def edit_json_and_log(folder):
    """batch_tokens edited in hyperparameters.json and in log.txt's hyperparameters section alike: only the value
    stored in the checkpoint itself still tells."""
    edit_json(folder, lambda s: s.update(batch_tokens=768))
    path = os.path.join(folder, "log.txt")
    text = open(path).read()
    assert text.count("\nbatch_tokens = 384\n") == 1
    open(path, "w").write(text.replace("\nbatch_tokens = 384\n", "\nbatch_tokens = 768\n"))


def other_shape(folder):
    path = shared_file(folder)
    saved = torch.load(path, weights_only=False)
    saved["model"]["lm_head.weight"] = torch.zeros(7, 3)
    torch.save(saved, path)


@pytest.mark.parametrize("case, damage, message", [
    ("truncated json", lambda f: truncate(os.path.join(f, "hyperparameters.json"), 0.5),
     "hyperparameters.json is damaged (JSONDecodeError"),
    ("unknown key", lambda f: edit_json(f, lambda s: s.update(n_layers=3)), "unknown field(s) n_layers"),
    ("edited batch size", lambda f: edit_json(f, lambda s: s.update(batch_tokens=768)),
     "hyperparameters.json says batch_tokens = 768 but the run started with 384"),
    ("edited json and log", edit_json_and_log,
     "member_00_step0000003_shared.pt was trained with batch_tokens = 384, the run's hyperparameters now say 768"),
    ("truncated checkpoint", lambda f: truncate(shared_file(f), 0.6), "member_00_step0000003_shared.pt is damaged"),
    ("truncated shard", lambda f: truncate(shard_file(f), 0.6), "member_00_step0000003_rank0.pt is damaged"),
    ("checkpoint of another shape", other_shape, "lm_head.weight has shape (7, 3) in the checkpoint, (256, 32)"),
])
def test_damaged_resume_folder_is_one_line_and_log_untouched(stopped_run, tmp_path, capsys, case, damage, message):
    folder = copy_run(stopped_run, tmp_path)
    damage(folder)
    log_before = open(os.path.join(folder, "log.txt"), "rb").read()
    status, err = run_main(["--resume", folder], capsys)
    assert_one_line(status, err, message)
    assert open(os.path.join(folder, "log.txt"), "rb").read() == log_before  # no resume section for a failed resume


# ------------------------------------------------------------------------------------------------- run lock

def test_live_run_folder_is_locked_and_a_dead_holder_taken_over(stopped_run, tmp_path, capsys):
    """While another process holds the run folder, --resume is refused (its pid and host named) and log.txt is left
    alone; once that process is dead (kill -9, so nothing released it), --resume takes the lock over, clears the
    dead process's partial checkpoint and finishes."""
    folder = copy_run(stopped_run, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", f"import sys, time; sys.path.insert(0, {REPO_ROOT!r}); "
                               f"import train_gpt; train_gpt.lock_run_folder({folder!r}); print('locked', flush=True); "
                               f"time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        log_before = open(os.path.join(folder, "log.txt"), "rb").read()
        status, err = run_main(["--resume", folder], capsys)
        assert_one_line(status, err, f"is in use by pid {holder.pid} on {socket.gethostname()}")
        assert open(os.path.join(folder, "log.txt"), "rb").read() == log_before
        partial = train_gpt.checkpoint_path(folder, 0, 0) + f".tmp{holder.pid}"
        open(partial, "wb").write(b"half a checkpoint")
    finally:
        holder.kill()
        holder.wait()
    status, err = run_main(["--resume", folder], capsys)
    assert status == 0, err
    log = open(os.path.join(folder, "log.txt")).read()
    assert f"removed a partial file of a killed process: {partial}" in log and "at step 3/" in log
    assert not os.path.exists(partial) and os.path.isfile(os.path.join(folder, "result.json"))


# ----------------------------------------------------------------------------------------------- killed after training
# Issue 14, finding 1: the checkpoint went as soon as the member returned, before the test pass, model.pt and
# result.json, and the last step was never checkpointed. Now a kill at any moment after the last step resumes
# straight into what was left (the final validation, the test pass, model.pt, result.json), no step retrained.

KILLER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import train_gpt
point, argv = sys.argv[1], sys.argv[2:]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if point == "final validation":
    validate = train_gpt.MemberProgress.validate
    def hook(self, model, val_data, done):
        if done == self.schedule.total_steps:
            die()
        return validate(self, model, val_data, done)
    train_gpt.MemberProgress.validate = hook
elif point == "test evaluation":
    load_run_data, test_data = train_gpt.load_run_data, []
    def load_hook(*args, **kwargs):
        data = load_run_data(*args, **kwargs)
        test_data.append(data.test_data)
        return data
    score = train_gpt.score
    def hook(models, weights, data, *args, **kwargs):  # the test pass
        if data is test_data[0]:
            die()
        return score(models, weights, data, *args, **kwargs)
    train_gpt.load_run_data = load_hook
    train_gpt.score = hook
sys.exit(train_gpt.main(argv))
"""


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """Shards with a held-out test file, the flags of a 6-step run (checkpoint at step 3, model.pt saved), and that
    run uninterrupted: the reference every interrupted run must reproduce."""
    base = tmp_path_factory.mktemp("finished")
    paths = {name: str(base / f"{name}.bin") for name in ("train", "val", "test")}
    for seed, (name, count) in enumerate([("train", 120), ("val", 30), ("test", 30)], start=1):
        train_gpt.write_shard(paths[name], synthetic_documents(count, seed=seed))

    def flags(log_dir, run_id):
        return micro_flags(paths["train"], paths["val"], str(log_dir), run_id, test_files=paths["test"],
                           max_steps=6, checkpoint_every=3, val_every=-1, save_model=True)
    assert train_gpt.main(flags(base / "logs", "ref")) == 0
    return flags, str(base / "logs" / "ref")


def progress_rows(folder):
    """(kind, step, loss, tokens) of every train and val row: what an interruption must not change."""
    return [(row["kind"], row["step"], row[f"{row['kind']}_loss"], row["tokens_seen"])
            for row in read_metrics(folder) if row["kind"] in ("train", "val")]


def assert_same_run_without_retraining(folder, reference, resumed_at):
    """The resumed run: trained nothing after the resume, and ends exactly as the reference (result, model.pt,
    metrics rows, one each), with no checkpoint or partial file left and wall >= train seconds."""
    log = open(os.path.join(folder, "log.txt")).read()
    after_resume = log.split("==================== resume ")[-1].splitlines()
    assert not [line for line in after_resume if line.startswith("step ")], after_resume  # no step retrained
    assert f"at step {resumed_at}/6" in log
    result, expected = (json.load(open(os.path.join(f, "result.json"))) for f in (folder, reference))
    for key in ("val_loss", "test_loss", "train_loss", "tokens_seen", "steps"):
        assert result[key] == expected[key], key
    assert result["wall_seconds"] >= result["train_seconds"] > 0
    weights, expected_weights = (torch.load(os.path.join(f, "model.pt"))["model"] for f in (folder, reference))
    assert all(torch.equal(weights[name], expected_weights[name]) for name in expected_weights)
    assert progress_rows(folder) == progress_rows(reference)
    assert not [name for name in tree(folder) if name.startswith("checkpoints/") or ".tmp" in name], tree(folder)


@pytest.mark.parametrize("point", ["final validation", "test evaluation"])
def test_kill_after_the_last_step_resumes_without_retraining(finished_run, tmp_path, capsys, point):
    flags, reference = finished_run
    folder = str(tmp_path / "logs" / "k")
    killer = [sys.executable, "-c", KILLER.format(root=REPO_ROOT), point, *flags(tmp_path / "logs", "k")]
    killed = subprocess.run(killer, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            cwd=REPO_ROOT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not os.path.exists(os.path.join(folder, "result.json"))
    status, err = run_main(["--resume", folder], capsys)
    assert status == 0, err
    assert_same_run_without_retraining(folder, reference, resumed_at=6)


def test_disk_full_after_training_is_one_line_and_resume_goes_straight_to_scoring(finished_run, tmp_path, monkeypatch,
                                                                                   capsys):
    """ENOSPC half-way through model.pt: one line, no .tmp, the last step's checkpoint kept; with space back,
    --resume scores the trained weights and writes model.pt and result.json, training nothing."""
    flags, reference = finished_run
    real_save = torch.save

    def full_disk_save(obj, path, *args, **kwargs):
        if ".pt.tmp" in str(path) and os.path.basename(str(path)).startswith("model.pt"):
            open(path, "wb").write(b"x" * 1000)  # a partial file, as a real ENOSPC leaves
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, path, *args, **kwargs)
    monkeypatch.setattr(torch, "save", full_disk_save)
    folder = str(tmp_path / "logs" / "full")
    status, err = run_main(flags(tmp_path / "logs", "full"), capsys)
    assert_one_line(status, err, f"{folder}: writing model.pt", "No space left on device")
    assert [name for name in tree(folder) if name.startswith("checkpoints/") or ".tmp" in name] == [
        "checkpoints/member_00_step0000006_rank0.pt", "checkpoints/member_00_step0000006_shared.pt"]
    monkeypatch.setattr(torch, "save", real_save)
    status, err = run_main(["--resume", folder], capsys)
    assert status == 0, err
    assert_same_run_without_retraining(folder, reference, resumed_at=6)


def test_replayed_steps_leave_one_metrics_row_each(stopped_run, tmp_path, capsys):
    """Killed after step 5 with its rows written but its checkpoint at step 3: the resumed run replays steps 4 and 5;
    metrics.jsonl keeps one row per step (the replayed one), as the uninterrupted run has."""
    folder = copy_run(stopped_run, tmp_path)
    with open(os.path.join(folder, "metrics.jsonl"), "a") as handle:  # what the killed process had written
        for step in (4, 5):
            handle.write(json.dumps(dict(kind="train", step=step, train_loss=99.0, tokens_seen=0)) + "\n")
        handle.write('{"kind": "train", "st')  # a row cut by the kill
    status, err = run_main(["--resume", folder], capsys)
    assert status == 0, err
    rows = [(row["kind"], row["step"]) for row in read_metrics(folder)]
    assert rows == [("train", step) for step in range(1, 7)] + [("val", 6), ("bits_per_byte", 6)]
    assert 99.0 not in [row.get("train_loss") for row in read_metrics(folder)]
    result = json.load(open(os.path.join(folder, "result.json")))
    assert result["wall_seconds"] >= result["train_seconds"]


# ------------------------------------------------------------------------------------------------- sharded checkpoints

def old_layout_bytes(shared: dict, shard: dict, path: str) -> int:
    """What the single-file layout wrote on this rank (before issue 14): the whole state, weights and AdamW
    included, on every rank. Written out to measure it."""
    merged = dict(model=shared["model"], optimizers=[own if own is not None else common for own, common in
                                                     zip(shard["optimizers"], shared["optimizers"])],
                  progress=shard["progress"], rng=shard["rng"], cuda_rng=None, world_size=shard["world_size"])
    torch.save(merged, path)
    return os.path.getsize(path)


def test_sharded_checkpoint_bytes_per_rank_and_resume_on_two_ranks(micro_data, tmp_path, capsys):
    """2 gloo ranks stopped at step 3: rank 0 writes the replicated state once, each rank only its own shard (its
    Muon momentum, RNG); the log line states the bytes. The figures against the old layout (the same state, one
    whole copy per rank) are printed for the README. Then --resume on 2 ranks ends where a 1-rank run ends."""
    train_path, val_path = micro_data
    logs = str(tmp_path / "logs")
    flags = micro_flags(train_path, val_path, logs, "two", max_steps=6, checkpoint_every=3, val_every=-1)
    stopped = run_script(flags + ["--stop_at_step", "3"], nproc=2)
    assert stopped.returncode != 0 and "stopped after step 3" in stopped.stdout, stopped.stderr[-3000:]
    folder = os.path.join(logs, "two")
    shared_path, shard0_path = train_gpt.checkpoint_files(folder, 0, 3, 0)
    shard1_path = train_gpt.checkpoint_files(folder, 0, 3, 1)[1]
    assert sorted(os.listdir(os.path.join(folder, "checkpoints"))) == sorted(
        os.path.basename(p) for p in (shared_path, shard0_path, shard1_path))
    shared, shard0, shard1 = (torch.load(p, weights_only=False) for p in (shared_path, shard0_path, shard1_path))
    assert shared["optimizers"][1] is None and shard0["optimizers"][0] is None  # AdamW once, Muon per rank
    momentum = [len(shard["optimizers"][1]["state"]) for shard in (shard0, shard1)]
    # 12 Muon matrices (2 layers x q, k, v, o, fc, proj), split within each shape: 8 of 32x32, 2 + 2 of the MLP's
    assert momentum == [6, 6]
    sizes = {name: os.path.getsize(p) for name, p in [("shared", shared_path), ("shard0", shard0_path),
                                                      ("shard1", shard1_path)]}
    new = [sizes["shared"] + sizes["shard0"], sizes["shard1"]]
    old = [old_layout_bytes(shared, shard, str(tmp_path / f"old{r}.pt")) for r, shard in enumerate((shard0, shard1))]
    print(f"\ncheckpoint bytes per rank, 2 ranks, micro model: sharded {new} (total {sum(new):,}) | "
          f"single-file {old} (total {sum(old):,})")
    assert new[1] < 0.5 * old[1] and sum(new) < 0.75 * sum(old)
    log = open(os.path.join(folder, "log.txt")).read()
    assert (f"checkpoint | step 3 | {train_gpt.format_bytes(sum(sizes.values()))} on 2 rank(s): "
            f"{train_gpt.format_bytes(sizes['shared'])} shared (rank 0)") in log
    resumed = run_script(["--resume", folder], nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at step 3/6" in resumed.stdout
    assert train_gpt.main(micro_flags(train_path, val_path, logs, "one", max_steps=6, checkpoint_every=3,
                                      val_every=-1)) == 0
    two, one = (json.load(open(os.path.join(logs, run, "result.json"))) for run in ("two", "one"))
    assert two["ranks_agree"] and two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5, abs=0)


def test_old_single_file_checkpoint_is_read(stopped_run, tmp_path, capsys):
    """A run folder checkpointed by the single-file layout (member_00_rank0.pt holding everything) resumes as the
    sharded one does, to the same result."""
    sharded = copy_run(stopped_run, tmp_path / "a")
    status, err = run_main(["--resume", sharded], capsys)
    assert status == 0, err
    folder = copy_run(stopped_run, tmp_path / "b")
    shared, shard = (torch.load(p, weights_only=False) for p in train_gpt.checkpoint_files(folder, 0, 3, 0))
    old_layout_bytes(shared, shard, train_gpt.checkpoint_path(folder, 0, 0))
    for path in train_gpt.checkpoint_files(folder, 0, 3, 0):
        os.remove(path)
    status, err = run_main(["--resume", folder], capsys)
    assert status == 0, err
    assert f"resumed from {train_gpt.checkpoint_path(folder, 0, 0)} at step 3/6" in open(
        os.path.join(folder, "log.txt")).read()
    results = [json.load(open(os.path.join(f, "result.json"))) for f in (sharded, folder)]
    assert results[0]["val_loss"] == results[1]["val_loss"] and results[0]["train_loss"] == results[1]["train_loss"]
    assert not os.path.exists(os.path.join(folder, "checkpoints"))  # emptied, and the empty folder removed


# ----------------------------------------------------------------------------------------------- data/fineweb.py output

def load_fineweb():
    spec = importlib.util.spec_from_file_location("fineweb", os.path.join(REPO_ROOT, "data", "fineweb.py"))
    module = sys.modules["fineweb"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("failure", ["not a folder", "full"])
def test_fineweb_unwritable_output_is_one_line(tmp_path, monkeypatch, capsys, failure):
    """data/fineweb.py cutting local shards into an output folder that cannot take them: one line naming it, exit
    status 2, no partial file left (root ignores chmod, so a path below a plain file stands in for read-only)."""
    fineweb = load_fineweb()
    source = tmp_path / "shards"
    source.mkdir()
    rng = np.random.default_rng(0)
    stream = np.concatenate([np.concatenate([[50256], rng.integers(0, 50256, n - 1)]) for n in [300] * 16])
    for index in range(4):
        train_gpt.write_shard(str(source / fineweb.source_shard_name(index)), stream[1200 * index:1200 * (index + 1)])
    out_dir = tmp_path / "out"
    if failure == "not a folder":
        (tmp_path / "file").write_text("x")
        out_dir, expected = tmp_path / "file" / "out", "Not a directory"
    else:
        write_shard = fineweb.write_shard

        def full_disk(path, tokens):
            if path.endswith("fineweb_train.bin"):
                open(f"{path}.tmp{os.getpid()}", "wb").write(b"x" * 100)  # the partial a real ENOSPC leaves
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return write_shard(path, tokens)
        monkeypatch.setattr(fineweb, "write_shard", full_disk)
        expected = "No space left on device"
    capsys.readouterr()
    status = fineweb.main(["--out_dir", str(out_dir), "--source_dir", str(source), "--val_tokens", "1000",
                           "--train_tokens", "1500", "--test_tokens", "800"])
    err = capsys.readouterr().err  # progress bars aside (stderr), one error line and no traceback
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert status == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "cannot write the output there" in errors[0] and expected in errors[0], errors[0]
    if failure == "full":
        assert sorted(os.listdir(out_dir)) == ["fineweb_val.bin"]  # no .tmp, no manifest claiming a finished cut
