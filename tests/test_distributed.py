"""Several ranks compute the same training as one: torchrun on CPU with the gloo backend."""
import json
import os

import pytest

from conftest import micro_flags, read_metrics, run_script


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same micro run on 1, 2 and 3 ranks: 24 sequences per step = 2 per rank x 12, 6 or 4 accumulation steps,
    halved in the first epoch by the batch-size schedule. Three layers make each Muon shape group hold 3 matrices,
    so 2 ranks exercise the padded last chunk."""
    import train_gpt
    from conftest import synthetic_documents
    root = tmp_path_factory.mktemp("dist")
    train_path, val_path = str(root / "train.bin"), str(root / "val.bin")
    train_gpt.write_shard(train_path, synthetic_documents(100, seed=1))
    train_gpt.write_shard(val_path, synthetic_documents(25, seed=2))
    folders = {}
    for nproc in (1, 2, 3):
        flags = micro_flags(train_path, val_path, str(root), f"world{nproc}", n_layer=3, batch_tokens=768,
                            device_batch_size=2, num_epochs=3, batch_schedule="0.5,1")
        result = run_script(flags, nproc=nproc)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        folders[nproc] = os.path.join(root, f"world{nproc}")
    return folders


@pytest.mark.parametrize("nproc", [2, 3])
def test_ranks_follow_the_single_rank_loss_curve(runs, nproc):
    single, multi = read_metrics(runs[1]), read_metrics(runs[nproc])
    assert [row["kind"] for row in single] == [row["kind"] for row in multi]
    assert len(single) >= 20  # 9 + 5 + 5 steps and one validation per epoch
    for one, many in zip(single, multi):
        assert one["step"] == many["step"] and one["tokens_seen"] == many["tokens_seen"]
        key = "train_loss" if one["kind"] == "train" else "val_loss"
        # Same windows, same normalisation: only the order of float additions differs.
        assert abs(one[key] - many[key]) < 2e-4 * abs(one[key]), (one, many)
    first, last = single[0]["train_loss"], [r for r in single if r["kind"] == "train"][-1]["train_loss"]
    assert last < first - 1.0  # the curve being compared is a real learning curve


@pytest.mark.parametrize("nproc", [2, 3])
def test_ranks_end_with_identical_weights(runs, nproc):
    result = json.load(open(os.path.join(runs[nproc], "result.json")))
    assert result["world_size"] == nproc and result["ranks_agree"] is True
    log = open(os.path.join(runs[nproc], "log.txt")).read()
    assert f"= 2 per rank x {nproc} ranks x {12 // nproc} accumulation" in log


def test_batch_schedule_reads_each_epoch_once_in_fewer_larger_steps(runs):
    """batch_schedule 0.5,1: the first epoch takes about twice the steps of the later ones, and every epoch still
    trains on the same number of targets (the whole train set once)."""
    ends = [row for row in read_metrics(runs[1]) if row["kind"] == "val"]
    steps = [ends[0]["step"]] + [b["step"] - a["step"] for a, b in zip(ends, ends[1:])]
    tokens = [ends[0]["tokens_seen"]] + [b["tokens_seen"] - a["tokens_seen"] for a, b in zip(ends, ends[1:])]
    assert [round(row["epoch"], 6) for row in ends] == [1.0, 2.0, 3.0]
    assert steps[1] == steps[2] and 2 * steps[1] - 1 <= steps[0] <= 2 * steps[1], steps
    assert tokens[0] == tokens[1] == tokens[2] > 0


def test_parallel_members_train_different_members_like_a_sequential_run(tmp_path):
    """4 ranks with --parallel_members 2: two process groups of 2 ranks train members 1 and 2 at once. Each member
    must equal the same member trained on 2 ranks one after another (same group size, so the same arithmetic)."""
    import train_gpt
    from conftest import synthetic_documents
    train_path, val_path = str(tmp_path / "train.bin"), str(tmp_path / "val.bin")
    train_gpt.write_shard(train_path, synthetic_documents(80, seed=1))
    train_gpt.write_shard(val_path, synthetic_documents(20, seed=2))
    common = dict(ensemble_size=2, batch_tokens=256, device_batch_size=2, num_epochs=2, log_every=4)
    parallel = run_script(micro_flags(train_path, val_path, str(tmp_path), "parallel", parallel_members=2, **common),
                          nproc=4)
    assert parallel.returncode == 0, parallel.stdout[-3000:] + parallel.stderr[-3000:]
    sequential = run_script(micro_flags(train_path, val_path, str(tmp_path), "sequential", **common), nproc=2)
    assert sequential.returncode == 0, sequential.stdout[-3000:] + sequential.stderr[-3000:]
    par = json.load(open(tmp_path / "parallel" / "result.json"))
    seq = json.load(open(tmp_path / "sequential" / "result.json"))
    assert par["member_val_losses"][0] != par["member_val_losses"][1]  # two different members
    for a, b in zip(par["member_val_losses"], seq["member_val_losses"]):
        assert abs(a - b) < 1e-6 * abs(b), (par["member_val_losses"], seq["member_val_losses"])
    assert abs(par["val_loss"] - seq["val_loss"]) < 1e-6 * seq["val_loss"] and par["ranks_agree"]
    log = open(tmp_path / "parallel" / "log.txt").read()
    assert "2 members at once" in log and "trained by another group" in log
    rows = [r for r in read_metrics(str(tmp_path / "parallel")) if r["kind"] == "train"]
    assert {r["member"] for r in rows} == {0, 1}  # both groups wrote their progress lines
    # group 1 wrote files of its own (no two nodes append to one file), merged into the run's at the round's end
    assert not [name for name in os.listdir(tmp_path / "parallel") if "_group" in name]
    assert len([r for r in rows if r["member"] == 1]) == len([r for r in rows if r["member"] == 0])
    lines = log.splitlines()
    member_1 = [i for i, line in enumerate(lines) if line.startswith("member 1 of 2 | step")]
    loaded = [i for i, line in enumerate(lines) if "loaded trained by another group" in line]
    assert member_1 and len(loaded) == 1 and member_1[-1] < loaded[0]  # merged at the round's end, before scoring


def test_ranks_share_one_run_folder_and_refuse_an_existing_one(micro_data, tmp_path):
    """Without --run_id every rank must use rank 0's generated id (one folder); an existing folder stops every rank
    with one error line instead of leaving the others waiting at a barrier."""
    train_path, val_path = micro_data
    flags = micro_flags(train_path, val_path, str(tmp_path / "logs"), "", max_steps=2)
    flags = [f for i, f in enumerate(flags) if not (f == "--run_id" or (i and flags[i - 1] == "--run_id"))]
    first = run_script(flags, nproc=2)
    assert first.returncode == 0, first.stderr[-3000:]
    folders = os.listdir(tmp_path / "logs")
    assert len(folders) == 1  # one run folder, not one per rank
    again = run_script(flags + ["--run_id", folders[0]], nproc=2, timeout=120)
    assert again.returncode != 0 and f"{folders[0]} already exists" in again.stderr
