"""Candidates kept on disk (issues 15 and 16: the unlimited preset's 480 candidates need 3.3 TB of host memory per
8-GPU node even split over the ranks): with --candidates_on_disk on, finished snapshots and members that no longer
teach are their members/ files, read back one at a time to be scored. A micro run with snapshot cycles, chain
distillation, a member that teaches, learned selection with a top-K sweep and the public-window figure gives the
in-memory run's numbers bit for bit, and its scored candidates hold only their RoPE tables (counted from the tensors
they reach); on 2 gloo ranks the file is read by rank 0 alone and broadcast, and the numbers equal world 1's scoring
of the same files; the plan's host and disk bytes equal a hand count and the files' sizes; auto chooses disk exactly
when the in-memory figure exceeds a stated RAM."""
import dataclasses
import datetime
import glob
import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from conftest import micro_flags, write_micro_shards
from test_frozen_sharding import reachable_tensor_bytes
from test_offload_overlap import free_port

import train_gpt

HANG = datetime.timedelta(seconds=120)
ROPE_BYTES = 2 * 32 * 8 * 4  # rotary cos and sin, (1, seq_len 32, 1, head_dim 16 / 2) fp32 each: all a file keeps


def run_flags(data, log_dir: str, run_id: str, mode: str) -> list[str]:
    """2 members x 2 one-epoch snapshot cycles (4 candidates), member 0 teaching member 1, each cycle after the first
    distilled from the member's own latest snapshot, selection on a fitness slice with a top-2 sweep, 4 public
    windows."""
    return micro_flags(*data, log_dir, run_id, test_files="", train_tokens=1500, num_epochs=2, ensemble_size=2,
                       snapshot_cycles=2, snapshot_cycle_epochs=True, snapshot_distill=True, distill_alpha=0.5,
                       fitness_tokens=200, select_top_sweep="2", val_public_windows=4, log_every=50,
                       checkpoint_every=-1, compile="off", candidates_on_disk=mode)


def scored_bytes(monkeypatch) -> dict:
    """Wraps every scorer of the final candidate lists: after each call, the bytes each candidate still reaches."""
    seen = {}
    for name in ("target_probabilities", "score"):
        real = getattr(train_gpt, name)

        def wrapped(models, *args, real=real, name=name, **kwargs):
            out = real(models, *args, **kwargs)
            if not all(getattr(model, "parked_on_host", False) for model in models):
                return out  # a member's own validation while it trains: a live model
            key = name + ("_bytes" if kwargs.get("token_bytes") is not None else "")
            seen.setdefault(key, []).append([reachable_tensor_bytes(model) for model in models])
            assert not list(train_gpt.FROZEN_ON_DEVICE)  # back off the device after each use
            return out
        monkeypatch.setattr(train_gpt, name, wrapped)
    return seen


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same micro run in memory (off) and on disk (on), world 1, each scorer watched."""
    tmp = tmp_path_factory.mktemp("disk")
    data = write_micro_shards(tmp)
    out = {}
    for mode in ("off", "on"):
        with pytest.MonkeyPatch.context() as monkeypatch:
            seen = scored_bytes(monkeypatch)
            teachers = []  # is a teacher in use a file-backed skeleton? (it must stay in memory, as before)
            sums = train_gpt.MemberObjective.sums
            monkeypatch.setattr(train_gpt.MemberObjective, "sums", lambda self, *args: (
                teachers.extend(hasattr(t, "candidate_file") for t, _ in self.teachers), sums(self, *args))[1])
            reads = []
            load = torch.load
            monkeypatch.setattr(torch, "load", lambda path, *a, **k: (reads.append(str(path)), load(path, *a, **k))[1])
            assert train_gpt.main(run_flags(data, str(tmp), mode, mode)) == 0
        result = json.loads((tmp / mode / "result.json").read_text())
        out[mode] = dict(result=result, seen=seen, teachers=teachers, reads=reads, folder=tmp / mode, data=data)
    return out


def test_on_disk_gives_the_in_memory_numbers_bit_for_bit(runs):
    """Selection (learned weights, chosen, weights), ensemble val losses after each member, the final val loss and
    the public figure: equal, not close; every candidate file was read back; a teacher in use is never a file."""
    on, off = runs["on"]["result"], runs["off"]["result"]
    assert on["hyperparameters"]["candidates_on_disk"] == "on" and off["hyperparameters"]["candidates_on_disk"] == "off"
    for key in ("val_loss", "selection", "ensemble_val_losses", "candidate_val_losses", "member_val_losses", "public"):
        assert on[key] == off[key], key
    assert len(on["candidate_val_losses"]) == 4 and len(on["selection"]["chosen"]) == 2
    files = sorted(glob.glob(str(runs["on"]["folder"] / "members" / "*.pt")))
    assert len(files) == 4 and set(files) <= set(runs["on"]["reads"])
    assert not any(path.startswith(str(runs["off"]["folder"] / "members")) for path in runs["off"]["reads"])
    assert runs["on"]["teachers"] and not any(runs["on"]["teachers"])  # host copies, as with off


def test_scored_candidates_hold_only_their_rope_tables(runs):
    """After each use every candidate of the fitness table, the sweep, the selection and the public figure reaches
    ROPE_BYTES of tensors (2,048 B: the hand count) on disk, and at least a whole model (33 k parameters) in memory.
    In both running ensembles member 0 (a teacher of member 1) is still in memory, as before: it becomes its file
    once every member is trained."""
    on, off = runs["on"]["seen"], runs["off"]["seen"]
    assert on["target_probabilities"] == [[ROPE_BYTES] * 4]
    later = on["score"][2:] + on["score_bytes"]
    assert later and all(row == [ROPE_BYTES] * len(row) for row in later)
    first, second = on["score"][:2]  # member 0's snapshot, member 0 (a teacher), member 1's two
    assert first[0] == ROPE_BYTES and first[1] > 100_000
    assert second[0] == second[2] == second[3] == ROPE_BYTES and second[1] == first[1]
    assert min(b for row in off["target_probabilities"] for b in row) > 100_000


# ------------------------------------------------------------------------------------ 2 gloo ranks

def _worker(rank: int, port: int, flags: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2, timeout=HANG)
    load = torch.load
    for mode in ("on", "off"):
        reads = []
        torch.load = lambda path, *a, **k: (reads.append(str(path)), load(path, *a, **k))[1]  # this forked rank only
        result = train_gpt.train(train_gpt.parse_args(flags[mode]), train_gpt.Dist(rank=rank, world_size=2),
                                 flags[mode])
        torch.load = load
        torch.save(dict(result, reads=reads), out.format(rank=rank, mode=mode))
    torch.distributed.destroy_process_group()


def test_two_ranks_read_on_rank_0_and_score_as_world_1(runs, tmp_path):
    """The run on 2 gloo ranks: with its candidates on disk rank 0 reads every candidate file and rank 1 none (it
    gets them by broadcast), and every number equals the 2-rank run in memory bit for bit. The fitness table of its 4
    files scored again on one rank, in memory, gives its learned weights and choice bit for bit (each row is scored
    whole by one rank, on the same batches); its losses agree within 1e-6 (2 ranks score other batches of windows,
    and float32 matmuls of other shapes round differently: not a storage effect)."""
    data = runs["on"]["data"]
    flags = {mode: run_flags(data, str(tmp_path), f"two_{mode}", mode) for mode in ("on", "off")}
    out = str(tmp_path / "result_{mode}_{rank}.pt")
    mp.start_processes(_worker, args=(free_port(), flags, out), nprocs=2, join=True, start_method="fork")
    on, rank1, off = (torch.load(out.format(rank=r, mode=m), weights_only=False)
                      for r, m in ((0, "on"), (1, "on"), (0, "off")))
    for key in ("val_loss", "selection", "ensemble_val_losses", "candidate_val_losses", "member_val_losses", "public"):
        assert on[key] == off[key], key
    files = [os.path.join(str(tmp_path / "two_on" / "members"), name) for name in
             ("member_00_snapshot_00.pt", "member_00.pt", "member_01_snapshot_00.pt", "member_01.pt")]
    assert set(files) <= set(on["reads"]) and not [p for p in rank1["reads"] if "members" in p]
    assert on["hyperparameters"]["candidates_on_disk"] == "on" and on["world_size"] == 2

    hp = train_gpt.parse_args(flags["on"])
    world1 = train_gpt.Dist()
    run_data = train_gpt.load_run_data(hp)
    run_data.public_data = train_gpt.PublicWindows(train_gpt.load_tokens(hp.val_files, hp.vocab_size, "validation"),
                                                   hp.seq_len, hp.val_files, hp.val_public_windows, hp.val_window_seed)
    run_data.token_bytes = train_gpt.token_byte_lengths(hp.tokenizer, hp.vocab_size)
    models = [train_gpt.load_member(path, world1.host)[0] for path in files]  # in memory, candidate order
    probs = train_gpt.target_probabilities(models, run_data.fitness_data, world1, hp.val_batch_size)
    learned = train_gpt.learn_mixture_weights(probs, hp.select_steps, hp.select_lr, hp.select_clip,
                                              hp.select_init_noise)
    assert learned.tolist() == on["selection"]["learned_weights"]
    chosen = train_gpt.select_members(learned, 2)
    assert [i for i, _ in chosen] == on["selection"]["chosen"]
    picked, weights = [models[i] for i, _ in chosen], [w for _, w in chosen]
    loss = train_gpt.score(picked, weights, run_data.val_data, world1, hp.val_batch_size, "prob")[0]
    assert loss == pytest.approx(on["val_loss"], rel=1e-6, abs=0)
    every = train_gpt.score(models, [0.25] * 4, run_data.val_data, world1, hp.val_batch_size, "prob")[0]
    assert every == pytest.approx(on["ensemble_val_losses"][-1], rel=1e-6, abs=0)
    public, _ = train_gpt.score(picked, weights, run_data.public_data, world1, hp.val_batch_size, token_bytes=run_data.token_bytes)
    assert public == pytest.approx(on["public"]["val_loss_public"], rel=1e-6, abs=0)


def test_eval_only_reads_each_member_from_its_file(runs):
    """--eval_only over the run's 4 files with candidates_on_disk on scores as with off, bit for bit."""
    pattern = str(runs["on"]["folder"] / "members" / "*.pt")
    train_path, val_path = runs["on"]["data"]
    scores = {}
    for mode in ("off", "on"):
        hp = train_gpt.parse_args(["--eval_only", pattern, "--val_files", val_path, "--device", "cpu",
                                   "--val_batch_size", "4", "--candidates_on_disk", mode, "--test_files", ""])
        scores[mode] = train_gpt.score_saved_members(hp, train_gpt.Dist())
    assert scores["on"]["member_val_losses"] == scores["off"]["member_val_losses"]
    assert scores["on"]["val_loss"] == scores["off"]["val_loss"] and len(scores["on"]["members"]) == 4


# ------------------------------------------------------------------------------------ the memory plan

def micro_hp(**overrides) -> train_gpt.Hyperparameters:
    return train_gpt.Hyperparameters(vocab_size=256, bos_id=255, n_layer=2, n_embd=32, n_head=2, seq_len=32,
                                     device="cpu", ensemble_size=2, snapshot_cycles=3, snapshot_distill=True,
                                     distill_alpha=0.5, **overrides)


def test_plan_host_and_disk_bytes_are_the_hand_count(runs):
    """On 2 ranks, 2 members x 3 snapshot cycles: each of the 6 candidates keeps its RoPE tables (2,048 B) in host
    memory; while the last member trains 2 snapshot teachers are split over the 2 ranks (ceil(numel / 2) of each of a
    real model's tensors) and member 0 teaches member 1 (split over the 2 as well), with 5 candidates' tables. Disk:
    6 files of 4 bytes per parameter, each within 64 KiB of a real file of this shape (its config and outcome)."""
    hp = micro_hp(candidates_on_disk="on")
    model = train_gpt.GPT(train_gpt.model_config(hp))
    half = sum(-(-t.numel() // 2) * t.element_size() for t in (*model.parameters(), *model.buffers()))
    params = 4 * sum(p.numel() for p in model.parameters())
    plan = train_gpt.memory_plan(hp, 2, "cpu")
    assert plan["candidates_on_disk"] and plan["file_candidate_host_bytes"] == ROPE_BYTES
    assert plan["host_training_bytes"] == half + 2 * half + 5 * ROPE_BYTES
    assert plan["host_final_bytes"] == 6 * ROPE_BYTES and plan["host_bytes"] == 3 * half + 5 * ROPE_BYTES
    assert plan["host_node_bytes"] == 2 * plan["host_bytes"]
    assert plan["candidate_file_bytes"] == params and plan["candidate_disk_bytes"] == 6 * params
    for path in glob.glob(str(runs["on"]["folder"] / "members" / "*.pt")):
        assert 0 < os.path.getsize(path) - params < 65536
    chained = train_gpt.memory_plan(dataclasses.replace(hp, snapshot_distill_after=1), 2, "cpu")  # no member teaches
    assert chained["host_bytes"] == 2 * half + 5 * ROPE_BYTES
    lines = train_gpt.memory_plan_lines(hp, plan)
    host = next(line for line in lines if line.startswith("host"))
    disk = next(line for line in lines if line.startswith("disk"))
    assert f"{plan['host_bytes']:,} B" in host and f"{6 * params:,} B" in disk and "6 candidate files" in disk
    memory = train_gpt.memory_plan(dataclasses.replace(hp, candidates_on_disk="off"), 2, "cpu")
    assert not memory["candidates_on_disk"] and not any(line.startswith("disk")
                                                       for line in train_gpt.memory_plan_lines(hp, memory))


def test_auto_chooses_disk_exactly_when_the_in_memory_figure_is_refused(capsys):
    """The unlimited preset on 8 ranks: in memory 8 x 418 GiB per node, refused by a node of 2,048 GiB of RAM; auto
    then keeps the 480 candidates on disk (the host figure fits) and --plan_only with that RAM says so and exits 0;
    --candidates_on_disk off is refused in one line naming --candidates_on_disk on. With 4,096 TiB stated, or none,
    auto keeps them in memory; the 1h preset's 3 candidates stay in memory on 2,048 GiB."""
    hp = train_gpt.parse_args(["--preset", "unlimited"])
    ram = 2048 * 2**30
    memory = train_gpt.memory_plan(dataclasses.replace(hp, candidates_on_disk="off"), 8, "cuda", 79 * 2**30, ram)
    assert not memory["candidates_on_disk"] and train_gpt.host_memory_refusal(memory, 8, ram)
    auto = train_gpt.memory_plan(hp, 8, "cuda", 79 * 2**30, ram)
    assert auto["candidates_on_disk"] and train_gpt.host_memory_refusal(auto, 8, ram) == ""
    assert 8 * auto["host_bytes"] < 0.9 * ram < 8 * memory["host_bytes"]
    assert not train_gpt.memory_plan(hp, 8, "cuda", 79 * 2**30, 4096 * 2**40)["candidates_on_disk"]
    assert not train_gpt.memory_plan(hp, 8, "cuda", 79 * 2**30)["candidates_on_disk"]
    one_hour = train_gpt.parse_args(["--preset", "1h"])
    assert not train_gpt.memory_plan(one_hour, 8, "cuda", 79 * 2**30, ram)["candidates_on_disk"]
    resolved = train_gpt.resolve_candidates_on_disk(dataclasses.replace(hp, plan_world_size=8, host_memory_gb=2048),
                                                    train_gpt.Dist())
    assert resolved.candidates_on_disk == "on"
    flags = ["--preset", "unlimited", "--plan_only", "--plan_world_size", "8", "--memory_budget_gb", "79.1",
             "--host_memory_gb", "2048"]
    assert train_gpt.main(flags) == 0
    printed = capsys.readouterr().out
    assert "480 candidates kept as their files" in printed and "\ndisk " in printed
    assert train_gpt.main(flags + ["--candidates_on_disk", "off"]) == 2
    error = capsys.readouterr().err
    assert "--candidates_on_disk on" in error and error.count("\n") == 1


def test_a_resumed_run_keeps_its_finished_candidates_as_files(runs, tmp_path):
    """Killed in member 1 after its snapshot, resumed: member 0 and its snapshot come back as their files, member
    1's snapshot as the teacher it still is (in memory, with its file beside it); every number equals the run that
    was not interrupted."""
    data = runs["on"]["data"]
    flags = run_flags(data, str(tmp_path), "cut", "on")
    flags[flags.index("--checkpoint_every") + 1] = "2"
    assert train_gpt.main(flags + ["--stop_at_step", "14"]) == 3  # member 1's step 6 of 8, its snapshot at 4
    with pytest.MonkeyPatch.context() as monkeypatch:
        seen = scored_bytes(monkeypatch)
        assert train_gpt.main(["--resume", str(tmp_path / "cut")]) == 0
    resumed = json.loads((tmp_path / "cut" / "result.json").read_text())
    for key in ("val_loss", "selection", "ensemble_val_losses", "candidate_val_losses", "public"):
        assert resumed[key] == runs["on"]["result"][key], key
    assert seen["target_probabilities"] == [[ROPE_BYTES] * 4]
    log = (tmp_path / "cut" / "log.txt").read_text()
    assert "loaded finished before the resume" in log and "member 1 of 2 | resumed from" in log and "at step 6/8" in log
