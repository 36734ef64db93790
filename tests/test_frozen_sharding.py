"""Frozen models split over the ranks (issue 16: 8 members with 3 epoch snapshots each took ~1 TB of pinned host memory
per 8-GPU node when every rank held every frozen model): on 2 and 3 gloo ranks each rank's host holds ceil(numel / n)
elements of each tensor (counted from the tensors the model reaches, not from our bookkeeping), the gathered model is
the original bit for bit, evaluation, distillation and the fitness table give the numbers of unsplit models bit for
bit, and the memory plan's host bytes are the real allocation."""
import copy
import dataclasses
import datetime
import math
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from conftest import MICRO_BOS, MICRO_VOCAB, micro_flags, synthetic_documents
from test_offload_overlap import free_port

import train_gpt

WEIGHTS = [0.5, 0.3, 0.2]
HANG = datetime.timedelta(seconds=120)  # a gather some rank never joins fails the test instead of hanging it


def micro_hp(**overrides) -> train_gpt.Hyperparameters:
    return train_gpt.Hyperparameters(vocab_size=MICRO_VOCAB, bos_id=MICRO_BOS, n_layer=2, n_embd=32, n_head=2,
                                     seq_len=16, device="cpu", muon_compile="off", dropout=0.0, logit_softcap=15.0,
                                     **overrides)


def reachable_tensor_bytes(root) -> int:
    """Bytes of every distinct tensor storage reachable from a module through its attributes, dicts, lists and
    tuples: what the model really holds, whatever structure keeps it."""
    seen, storages, total, stack = set(), set(), 0, [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in storages:
                storages.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(obj, nn.Module):
            stack.append(vars(obj))
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
    return total


def tensors_of(model) -> list[torch.Tensor]:
    return [t.detach().clone() for t in (*model.parameters(), *model.buffers())]


def eval_data(seq_len: int) -> train_gpt.EvalData:
    return train_gpt.EvalData(synthetic_documents(12, seed=5).astype("int64"), seq_len, "val")


def teachers_and_inputs(hp, rank: int):
    teachers = [train_gpt.build_model(hp, train_gpt.Dist(), seed=seed).for_inference() for seed in (1, 2, 3)]
    generator = torch.Generator().manual_seed(50 + rank)  # each rank its own micro-batch
    idx = torch.randint(0, MICRO_VOCAB, (2, hp.seq_len + 1), generator=generator)
    return teachers, idx[:, :-1], idx[:, 1:]


def distill_step(hp, teachers, dist_info, inputs, targets) -> list[torch.Tensor]:
    """One micro-step's (loss, objective, student gradients) against these teachers (one held, or an ensemble
    streamed through the device), from the same student."""
    student = train_gpt.build_model(hp, train_gpt.Dist(), seed=7)
    objective = train_gpt.MemberObjective(hp, dist_info.device, [(t, 1.0 / len(teachers)) for t in teachers],
                                          dist_info)
    loss, total = objective.sums(student, inputs, targets)
    objective.release()
    return [loss.detach(), total.detach(), *torch.autograd.grad(total, list(student.parameters()))]


def _worker(rank: int, port: int, out: str) -> None:
    """Three gloo ranks; ranks 0-1 also form a 2-rank group (as --parallel_members makes). In each, three frozen
    models are split over the ranks (park_on_host) and, beside them, the same models parked whole (a 1-rank store)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=3, timeout=HANG)
    pair = torch.distributed.new_group([0, 1])  # every rank makes every group
    hp = micro_hp()
    distill = dataclasses.replace(hp, distill_alpha=0.5, distill_teacher="ensemble", distill_chunk=4)
    for world, group in ((3, None), (2, pair)):
        if rank >= world:
            continue
        dist_info = train_gpt.Dist(rank=rank, world_size=world, group=group)
        teachers, inputs, targets = teachers_and_inputs(hp, rank)
        results = dict(reference=[tensors_of(t) for t in teachers])
        split = [train_gpt.park_on_host(copy.deepcopy(t), dist_info) for t in teachers]
        whole = [train_gpt.park_on_host(copy.deepcopy(t), train_gpt.Dist()) for t in teachers]
        results["split_bytes"] = [reachable_tensor_bytes(m) for m in split]
        results["whole_bytes"] = [reachable_tensor_bytes(m) for m in whole]
        results["buffer_bytes"] = [buffer.untyped_storage().nbytes()
                                   for buffers in split[0].frozen_shards["host"].values() for _, buffer in buffers]
        results["empty_while_parked"] = all(t.numel() == 0 for m in split for t in (*m.parameters(), *m.buffers()))
        results["gathered"] = []
        for model in split:
            with train_gpt.frozen_on_device(model, dist_info):
                results["gathered"].append(tensors_of(model))
                results["in_use"] = model in train_gpt.FROZEN_ON_DEVICE
        results["empty_after_use"] = all(t.numel() == 0 for t in split[0].parameters())
        data = eval_data(hp.seq_len)
        for mode in ("prob", "logit"):
            for name, models in (("split", split), ("whole", whole)):
                results[f"eval_{mode}_{name}"] = train_gpt.score(models, WEIGHTS, data, dist_info, 4, mode)[0]
        token_bytes = np.arange(MICRO_VOCAB) % 4  # a quarter of the tokens have no bytes
        results["bytes_split"] = train_gpt.score(split, WEIGHTS, data, dist_info, 4, token_bytes=token_bytes)
        results["bytes_all_at_once"] = train_gpt.score(teachers, WEIGHTS, data, dist_info, 4, token_bytes=token_bytes)
        for name, models in (("split", split), ("whole", whole)):
            results[f"fitness_{name}"] = train_gpt.target_probabilities(models, data, dist_info, 4)
            results[f"held_{name}"] = distill_step(distill, models[:1], dist_info, inputs, targets)
            results[f"streamed_{name}"] = distill_step(distill, models, dist_info, inputs, targets)
        training = train_gpt.build_model(hp, train_gpt.Dist(), seed=9)  # a snapshot straight from a training model
        training.loop_active = True
        snapshot = train_gpt.frozen_host_copy(training, dist_info)
        results["snapshot_bytes"] = reachable_tensor_bytes(snapshot)
        results["snapshot_loop_active"] = snapshot.loop_active
        with train_gpt.frozen_on_device(snapshot, dist_info):
            results["snapshot_equal"] = all(torch.equal(a, b) for a, b in zip(tensors_of(snapshot),
                                                                              tensors_of(training)))
        if world == 3:  # a teacher split over its group of 2 (rank 2: a group of 1, whole) goes over all 3 ranks
            group_store = train_gpt.Dist(rank=rank, world_size=2, group=pair) if rank < 2 else train_gpt.Dist()
            moved = train_gpt.park_on_host(copy.deepcopy(teachers[0]), group_store)
            train_gpt.reshard_on_host(moved, dist_info, dist_info)
            results["resharded_bytes"] = reachable_tensor_bytes(moved)
            with train_gpt.frozen_on_device(moved, dist_info):
                results["resharded"] = tensors_of(moved)
        torch.save(results, out.format(world=world, rank=rank))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """One run of three forked ranks for both world sizes: {world: [each rank's results]}."""
    out = str(tmp_path_factory.mktemp("frozen") / "world{world}_rank{rank}.pt")
    hp = micro_hp()  # the first optimizer built imports torch._dynamo (seconds): here, once, for the forked ranks
    train_gpt.build_optimizers(train_gpt.build_model(hp, train_gpt.Dist(), seed=0), hp, train_gpt.Dist())
    mp.start_processes(_worker, args=(free_port(), out), nprocs=3, join=True, start_method="fork")
    return {world: [torch.load(out.format(world=world, rank=rank)) for rank in range(world)] for world in (2, 3)}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                       b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_holds_its_share_and_gathers_the_original_bits(world, results):
    for rank_results in results[world]:
        reference = rank_results["reference"]
        whole = [sum(t.numel() * t.element_size() for t in tensors) for tensors in reference]
        share = [sum(math.ceil(t.numel() / world) * t.element_size() for t in tensors) for tensors in reference]
        assert rank_results["whole_bytes"] == whole  # the counter sees a whole parked model's every byte
        assert rank_results["split_bytes"] == share  # ceil(numel / n) elements of each tensor, nothing more
        for count, tensors in zip(share, reference):  # ~1/n of the flattened model: at most n - 1 padding per tensor
            numel = sum(t.numel() for t in tensors)
            assert count <= 4 * (math.ceil(numel / world) + len(tensors)) and count < 0.6 * 4 * numel
        # the pinned allocator rounds each allocation up to a power of two bytes: the buffers are powers of two already
        buffers = rank_results["buffer_bytes"]
        assert sum(buffers) == share[0] and all(size & (size - 1) == 0 for size in buffers)
        assert rank_results["empty_while_parked"] and rank_results["empty_after_use"] and rank_results["in_use"]
        for gathered, original in zip(rank_results["gathered"], reference):
            assert len(gathered) == len(original) and all(same_bits(a, b) for a, b in zip(gathered, original))
        assert rank_results["snapshot_equal"] and rank_results["snapshot_loop_active"]
        assert rank_results["snapshot_bytes"] == share[0]
        if world == 3:
            assert rank_results["resharded_bytes"] == share[0]
            assert all(same_bits(a, b) for a, b in zip(rank_results["resharded"], reference[0]))


@pytest.mark.parametrize("world", [2, 3])
def test_split_models_give_the_same_numbers_bit_for_bit(world, results):
    """Ensemble evaluation (prob and logit; with bytes, one model at a time against all at once), the fitness table
    and a distillation micro-step (one held teacher, an
    ensemble streamed) with split models equal those with whole models bit for bit on every rank; the evaluation
    equals one process's within 1e-6 (each rank sums its own pieces' float32 losses)."""
    hp = micro_hp()
    teachers = [train_gpt.park_on_host(t, train_gpt.Dist()) for t in teachers_and_inputs(hp, 0)[0]]
    for rank_results in results[world]:
        for mode in ("prob", "logit"):
            assert rank_results[f"eval_{mode}_split"] == rank_results[f"eval_{mode}_whole"]
            alone = train_gpt.score(teachers, WEIGHTS, eval_data(hp.seq_len), train_gpt.Dist(), 4, mode)[0]
            assert abs(rank_results[f"eval_{mode}_split"] - alone) < 1e-6 * alone, (mode, alone)
        assert same_bits(rank_results["fitness_split"], rank_results["fitness_whole"])
        assert rank_results["bytes_split"] == rank_results["bytes_all_at_once"]  # one model at a time, same bits
        for kind in ("held", "streamed"):
            split, whole = rank_results[f"{kind}_split"], rank_results[f"{kind}_whole"]
            assert len(split) == len(whole) and all(same_bits(a, b) for a, b in zip(split, whole)), kind
    assert results[world][0]["held_split"][0] != results[world][1]["held_split"][0]  # ranks saw their own batches
    for mode in ("prob", "logit"):  # one loss on every rank
        assert len({rank_results[f"eval_{mode}_split"] for rank_results in results[world]}) == 1, mode


@pytest.mark.parametrize("world", [2, 3])
def test_memory_plan_host_bytes_are_the_real_allocation(world, results):
    """The plan's per-rank share of a frozen model is the bytes a rank really holds (counted above on 2 and 3 ranks);
    the host line is every candidate's share, per rank and per node; --frozen_shards false is the whole model on
    every rank."""
    hp = micro_hp(ensemble_size=3)
    plan = train_gpt.memory_plan(hp, world, "cpu")
    counted = results[world][0]["split_bytes"][0]
    assert plan["frozen_host_shards"] == world and plan["frozen_host_model_bytes"] == counted
    assert plan["frozen_host_models"] == 3 and plan["host_bytes"] == 3 * counted
    assert plan["host_node_bytes"] == world * plan["host_bytes"]
    line = next(line for line in train_gpt.memory_plan_lines(hp, plan) if line.startswith("host"))
    assert f"{plan['host_bytes']:,} B" in line and f"{plan['host_node_bytes']:,} B" in line
    unsplit = train_gpt.memory_plan(dataclasses.replace(hp, frozen_shards=False), world, "cpu")
    assert unsplit["frozen_host_model_bytes"] == results[2][0]["whole_bytes"][0]


def test_memory_plan_per_node_counts_the_ranks_of_one_node(monkeypatch):
    """On several nodes "per node" is the ranks torchrun starts on one node (LOCAL_WORLD_SIZE), not the world: 16
    ranks on 2 nodes of 8 hold 8 ranks' shares per node (each rank 1/16 of every frozen model)."""
    hp = micro_hp(ensemble_size=3)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    plan = train_gpt.memory_plan(hp, 16, "cpu")
    assert plan["frozen_host_shards"] == 16 and plan["host_node_bytes"] == 8 * plan["host_bytes"]
    line = next(line for line in train_gpt.memory_plan_lines(hp, plan) if line.startswith("host"))
    assert f"x8 ranks = " in line and f"({8 * plan['host_bytes']:,} B) per node" in line
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert train_gpt.memory_plan(hp, 16, "cpu")["host_node_bytes"] == 16 * plan["host_bytes"]  # one node of 16


def test_memory_plan_with_parallel_members(results):
    """6 ranks, 3 members at once (groups of 2), 6 members with an epoch snapshot each: at the end the 12 candidates
    are split over all 6 ranks (counted on 3 ranks above: the same share); with distillation the 3 members of the
    first round teach the second and stay split over their group (2 ranks: counted above) until it has trained."""
    hp = micro_hp(ensemble_size=6, parallel_members=3, num_epochs=2, epoch_snapshots=2)
    world3, pair = results[3][0]["split_bytes"][0], results[2][0]["split_bytes"][0]
    six = sum(math.ceil(t.numel() / 6) * t.element_size() for t in results[2][0]["reference"][0])
    plan = train_gpt.memory_plan(hp, 6, "cpu")
    assert plan["frozen_host_models"] == 12 and plan["frozen_host_model_bytes"] == six < world3
    # while the last round trains: the first round's 3 members and 3 snapshots, 1 snapshot of its own (over its pair)
    assert plan["host_bytes"] == max(3 * six + 3 * six + pair, 12 * six) == 12 * six
    taught = train_gpt.memory_plan(dataclasses.replace(hp, distill_alpha=0.5), 6, "cpu")
    assert taught["frozen_group_model_bytes"] == pair
    assert taught["host_bytes"] == max(3 * pair + 3 * six + pair, 3 * pair + 9 * six) == 3 * pair + 9 * six
    assert taught["host_node_bytes"] == 6 * taught["host_bytes"]


def test_host_refusal_uses_the_split_figures():
    """The 1h preset's 8 members with 3 epoch snapshots each on 8 ranks: 24 candidates x 5.38 GiB. Split over the 8
    ranks a node needs 129 GiB and a 256 GiB machine takes it; whole on every rank (--frozen_shards false) it needs
    over 1 TB and is refused, naming the settings to change."""
    hp = dataclasses.replace(train_gpt.parse_args(["--preset", "1h"]), ensemble_size=8)
    plan = train_gpt.memory_plan(hp, 8, "cuda", 79 * 2**30)
    assert plan["frozen_host_models"] == 24 and plan["frozen_host_shards"] == 8
    assert train_gpt.host_memory_refusal(plan, 8, 256 * 2**30) == ""
    whole = train_gpt.memory_plan(dataclasses.replace(hp, frozen_shards=False), 8, "cuda", 79 * 2**30)
    assert whole["host_node_bytes"] > 2**40  # a node of split copies holds what one rank held whole
    assert abs(plan["host_node_bytes"] - whole["host_bytes"]) < 1e-6 * whole["host_bytes"]
    refusal = train_gpt.host_memory_refusal(whole, 8, 256 * 2**30)
    assert "host memory" in refusal and "--ensemble_size" in refusal and "\n" not in refusal


# ------------------------------------------------------------------------------------ a whole run on 4 ranks

def _run_worker(rank: int, port: int, flags: list[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=4, timeout=HANG)
    gathers = []  # the process group of every gather of a split frozen model
    real_gathered = train_gpt.gathered_on_device

    def counting(model, device):
        gathers.append(model.frozen_shards["ranks"])
        return real_gathered(model, device)
    train_gpt.gathered_on_device = counting  # this forked rank's module only
    result = train_gpt.train(train_gpt.parse_args(flags), train_gpt.Dist(rank=rank, world_size=4), flags)
    torch.save(dict(result, gathers=gathers), out.format(rank=rank))
    torch.distributed.destroy_process_group()


def test_a_run_with_split_frozen_models_gives_the_same_result(tmp_path):
    """4 ranks, 2 members at once (--parallel_members 2: groups of 2), 4 members, the second round distilled from
    the first two streamed through the device (split over each group's 2 ranks while they teach), an epoch snapshot
    each (over all 4 once their member is trained), members chosen on a fitness slice, samples: with the frozen
    models split (the default) every loss, the selection and the samples equal the run that keeps them whole."""
    train_path, val_path = str(tmp_path / "train.bin"), str(tmp_path / "val.bin")
    train_gpt.write_shard(train_path, synthetic_documents(40, seed=1))
    train_gpt.write_shard(val_path, synthetic_documents(12, seed=2))
    results = {}
    for shards in ("true", "false"):
        flags = micro_flags(train_path, val_path, str(tmp_path / "logs"), f"split_{shards}", ensemble_size=4,
                            parallel_members=2, distill_alpha=0.5, distill_teacher="ensemble", distill_chunk=8,
                            num_epochs=2, epoch_snapshots=2, batch_tokens=512, device_batch_size=4, log_every=50,
                            sample_tokens=3, fitness_tokens=300, select_top=2, frozen_shards=shards)
        out = str(tmp_path / f"result_{shards}_{{rank}}.pt")
        mp.start_processes(_run_worker, args=(free_port(), flags, out), nprocs=4, join=True, start_method="fork")
        results[shards] = torch.load(out.format(rank=0), weights_only=False)
    split, whole = results["true"], results["false"]
    assert split["hyperparameters"]["frozen_shards"] and not whole["hyperparameters"]["frozen_shards"]
    for key in ("val_loss", "member_val_losses", "ensemble_val_losses", "candidate_val_losses", "selection",
                "samples"):
        assert split[key] == whole[key], key
    assert len(split["candidate_val_losses"]) == 8 and split["samples"] and split["selection"]["chosen"]
    assert not whole["gathers"] and set(split["gathers"]) == {2, 4}  # teachers over a group, the rest over all 4
