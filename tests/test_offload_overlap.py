"""Frozen models off the training device and gradient sync overlapped with backward (issue 16, phase 2): where the
members, snapshots and teachers of a K = 3 distillation run live, one at a time on the device; the overlapped
all-reduce's weights against the plain path's, bit for bit, on 2 and 3 gloo ranks."""
import dataclasses
import gc
import glob
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from conftest import MICRO_BOS, MICRO_VOCAB, micro_flags, synthetic_documents

import train_gpt


def frozen_models() -> list:
    """Every frozen GPT alive now (members, snapshots, teachers: for_inference leaves no parameter trainable)."""
    return [obj for obj in gc.get_objects() if type(obj) is train_gpt.GPT
            and not any(p.requires_grad for p in obj.parameters())]


def on_training_device(model, dist_info) -> bool:
    """A frozen model occupies the training device unless it is parked on the host and not in use there. On CPU the
    host is the device, so the placement is read through the abstraction (park_on_host / frozen_on_device); a model
    that never went through it (253ffad's behaviour: every frozen model stays where it was trained) counts as on the
    device."""
    tensors = list(model.parameters()) + list(model.buffers())
    if any(t.device != getattr(dist_info, "host", dist_info.device) for t in tensors):
        return True
    return not getattr(model, "parked_on_host", False) or model in getattr(train_gpt, "FROZEN_ON_DEVICE", ())


def test_frozen_models_wait_on_the_host_and_come_to_the_device_one_at_a_time(tmp_path, monkeypatch):
    """K = 3 members, each distilled from the ensemble of the earlier ones, each with an epoch snapshot: after each
    member, and at the end, no frozen model is on the training device; while training and scoring, at most one
    frozen model is there at a time. The running ensemble's val loss equals score (the all-on-device
    path) over the saved files."""
    train_path, val_path = str(tmp_path / "train.bin"), str(tmp_path / "val.bin")
    train_gpt.write_shard(train_path, synthetic_documents(40, seed=1))  # 2 steps an epoch: a few seconds in all
    train_gpt.write_shard(val_path, synthetic_documents(10, seed=2))
    flags = micro_flags(train_path, val_path, str(tmp_path), "k3", ensemble_size=3, distill_alpha=0.5,
                        distill_teacher="ensemble", distill_chunk=8, num_epochs=2, epoch_snapshots=2, log_every=50,
                        batch_tokens=512, device_batch_size=4)
    hp = train_gpt.parse_args(flags)
    dist_info = train_gpt.Dist()
    seen = dict(members=[], peak=0, uses=0)
    real_train_member, real_save_json = train_gpt.train_member, train_gpt.RunLog.save_json

    def check(when: str) -> None:
        frozen = frozen_models()
        seen["members"].append((when, len(frozen)))
        on_device = [m for m in frozen if on_training_device(m, dist_info)]
        assert not on_device, f"{when}: {len(on_device)} of {len(frozen)} frozen models on the training device"

    def train_member(hp, dist_info, data, log, member, teachers, *rest):
        check(f"before member {member}")
        return real_train_member(hp, dist_info, data, log, member, teachers, *rest)

    def save_json(self, name, payload):
        if name == "result.json":
            check("at the end")
        return real_save_json(self, name, payload)

    monkeypatch.setattr(train_gpt, "train_member", train_member)
    monkeypatch.setattr(train_gpt.RunLog, "save_json", save_json)
    if hasattr(train_gpt, "frozen_on_device"):
        real_on_device = train_gpt.frozen_on_device

        def counting_on_device(model, dist_info):
            context = real_on_device(model, dist_info)

            class Counted:
                def __enter__(self):
                    value = context.__enter__()
                    seen["uses"] += 1
                    seen["peak"] = max(seen["peak"], len(train_gpt.FROZEN_ON_DEVICE))
                    return value

                def __exit__(self, *exc):
                    return context.__exit__(*exc)
            return Counted()
        monkeypatch.setattr(train_gpt, "frozen_on_device", counting_on_device)
    result = train_gpt.train(hp, dist_info, flags)
    # member 0 has no frozen model before it; member 1: member 0 + its snapshot; member 2: four; the end: six
    assert [count for _, count in seen["members"]] == [0, 2, 4, 6], seen["members"]
    assert seen["uses"] > 0 and seen["peak"] == 1, seen  # teachers and candidates came one at a time
    # the streamed ensemble loss against score with every candidate resident (the path of 253ffad)
    files = sorted(glob.glob(os.path.join(tmp_path, "k3", "members", "*.pt")))
    order = [f for m in range(3) for f in sorted(x for x in files if f"member_{m:02d}_snapshot" in x)
             + [x for x in files if x.endswith(f"member_{m:02d}.pt")]]
    assert len(order) == 6
    models = [train_gpt.load_member(path, torch.device("cpu"))[0] for path in order]
    data = train_gpt.load_run_data(hp)
    reference = train_gpt.score(models, [1 / 6] * 6, data.val_data, dist_info, hp.val_batch_size, "prob")[0]
    assert abs(result["ensemble_val_losses"][-1] - reference) <= 1e-6 * reference, (result, reference)
    alone = train_gpt.score([models[-1]], [1.0], data.val_data, dist_info, hp.val_batch_size)[0]
    assert abs(alone - result["member_val_losses"][-1]) < 1e-6  # the member file is the member
    assert abs(alone - reference) > 1e-3  # and the mixture is not one member's loss


def test_streamed_teachers_give_the_resident_teachers_loss():
    """Two parked teachers streamed through the device (their bodies one at a time, their lm_heads kept) give the
    distillation objective of the same teachers used directly, bit for bit, with its gradient."""
    hp = train_gpt.Hyperparameters(vocab_size=MICRO_VOCAB, bos_id=MICRO_BOS, n_layer=2, n_embd=32, n_head=2,
                                   seq_len=16, device="cpu", distill_alpha=0.6, distill_temperature=2.0,
                                   distill_chunk=4, fused_loss="chunked", mtp_weight=0.0)
    dist_info = train_gpt.Dist()
    teachers = [train_gpt.build_model(hp, dist_info, seed).for_inference() for seed in (1, 2)]
    student = train_gpt.build_model(hp, dist_info, 3)
    idx = torch.randint(0, MICRO_VOCAB, (2, hp.seq_len + 1), generator=torch.Generator().manual_seed(0))
    inputs, targets = idx[:, :-1], idx[:, 1:]
    mix = [(teacher, 0.5) for teacher in teachers]
    direct = train_gpt.training_loss_sums(student, inputs, targets, 0.0, dict(
        teacher_rows=train_gpt.teacher_rows(mix, [t.features(inputs) for t in teachers], 2.0), alpha=0.6,
        temperature=2.0, chunk_rows=8), ("chunked", hp.logit_softcap))[1]
    direct_grad = torch.autograd.grad(direct, student.lm_head.weight)[0]
    parked = [(train_gpt.park_on_host(teacher, dist_info), 0.5) for teacher in teachers]
    objective = train_gpt.MemberObjective(hp, dist_info.device, parked, dist_info)
    streamed = objective.sums(student, inputs, targets)[1]
    assert not train_gpt.FROZEN_ON_DEVICE  # both bodies went back to the host
    assert torch.equal(streamed, direct)
    assert torch.equal(torch.autograd.grad(streamed, student.lm_head.weight)[0], direct_grad)


def test_memory_plan_places_frozen_models_on_the_host():
    """The README's 8-member ensemble at the slowrun shape now fits 79 GiB: 16 frozen models (7.15 GB each) on the
    host, one teacher on the device (snapshots go straight to the host); EMA/SWA accumulators that would not fit go to
    the host by themselves (averaging_on_host auto)."""
    hp = dataclasses.replace(train_gpt.parse_args(["--preset", "slowrun"]), ensemble_size=8, epoch_snapshots=2,
                             distill_alpha=0.5)
    plan = train_gpt.memory_plan(hp, 8, "cuda", 79 * 2**30)
    # every one of the 16 candidates on the host at the end, each split over the 8 ranks (frozen_shards)
    assert plan["frozen_host_models"] == 16 and plan["host_bytes"] == 16 * plan["frozen_host_model_bytes"]
    assert plan["frozen_models"] == 1 and plan["frozen_bytes"] == plan["param_bytes"]  # the teacher alone
    assert train_gpt.memory_plan_refusal(hp, plan) == ""
    fits = train_gpt.memory_plan(dataclasses.replace(hp, swa_epochs=2, ema_decay=0.99), 8, "cuda", 79 * 2**30)
    assert not fits["averaging_on_host"] and fits["average_copies"] == 2  # EMA + SWA's running sum: 10.8 GiB fit
    averaged = dataclasses.replace(hp, swa_epochs=2, ema_decay=0.99, ckpt_avg_epochs=2)  # 3 fp32 copies: 16.1 GiB
    plan = train_gpt.memory_plan(averaged, 8, "cuda", 79 * 2**30)
    assert plan["averaging_on_host"] and plan["average_copies"] == 0
    assert plan["host_bytes"] == 15 * plan["frozen_host_model_bytes"] + 3 * plan["param_bytes"]  # the last member's
    assert train_gpt.memory_plan_refusal(averaged, plan) == ""
    per_node = 8 * plan["host_bytes"]  # 8 ranks on one machine (the 3 accumulators whole on each)
    assert train_gpt.host_memory_refusal(plan, 8, int(per_node / 0.9) + 1) == ""
    refusal = train_gpt.host_memory_refusal(plan, 8, 128 * 2**30)
    assert "host memory" in refusal and "--ensemble_size" in refusal and "\n" not in refusal
    forced = train_gpt.memory_plan(dataclasses.replace(averaged, averaging_on_host="off"), 8, "cuda", 79 * 2**30)
    assert not forced["averaging_on_host"] and "--averaging_on_host on" in train_gpt.memory_plan_refusal(
        dataclasses.replace(averaged, averaging_on_host="off"), forced)


# ------------------------------------------------------------------------------------------- overlapped gradient sync

def sync_hp() -> train_gpt.Hyperparameters:
    """A 3-layer micro model; buckets of 10 KB, so overlap_flat sends several."""
    return train_gpt.Hyperparameters(vocab_size=MICRO_VOCAB, bos_id=MICRO_BOS, n_layer=3, n_embd=32, n_head=2,
                                     seq_len=16, device="cpu", muon_compile="off", grad_bucket_mb=0.01, dropout=0.0)


def _sync_worker(rank: int, port: int, out: str) -> None:
    """Three gloo ranks; ranks 0-1 also form a 2-rank group. On each group, each grad_sync mode trains the same micro
    model 3 steps of 2 micro-steps (rank-specific data) from the same start; the group's rank 0 saves the final
    weights of each, and the first step's summed gradients beside a float64 sum of every rank's local gradients."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=3)
    pair = torch.distributed.new_group([0, 1])  # every rank makes every group
    hp = sync_hp()
    for world, group in ((3, None), (2, pair)):
        if rank >= world:
            continue
        dist_info = train_gpt.Dist(rank=rank, world_size=world, group=group)
        results = {}
        variants = {mode: dataclasses.replace(hp, grad_sync=mode) for mode in ("after", "overlap", "overlap_flat")}
        variants["bf16"] = dataclasses.replace(hp, muon_gather_bf16=True)
        for mode, variant in variants.items():
            model = train_gpt.build_model(variant, dist_info, seed=0)
            optimizers = train_gpt.build_optimizers(model, variant, dist_info)
            sync = train_gpt.GradientSync(variant, model, dist_info)
            generator = torch.Generator().manual_seed(100 + rank)
            for step in range(3):
                for micro_step in range(2):
                    idx = torch.randint(0, MICRO_VOCAB, (2, hp.seq_len + 1), generator=generator)
                    loss = train_gpt.cross_entropy_sum(model(idx[:, :-1]), idx[:, 1:]) / (2 * 2 * hp.seq_len * world)
                    sync.arm(micro_step == 1)
                    loss.backward()
                if step == 0 and mode == "after":  # every rank's local gradients, summed in float64: the reference
                    local = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
                    gathered = [torch.empty_like(local) for _ in range(world)]
                    torch.distributed.all_gather(gathered, local, group=group)
                    results["sum64"] = torch.stack(gathered).sum(0)
                sync.wait()
                if step == 0:
                    results[f"grads_{mode}"] = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()
                for optimizer in optimizers:
                    optimizer.step()
                model.zero_grad(set_to_none=True)
            sync.remove()
            results[mode] = [p.detach().clone() for p in model.parameters()]
            results[f"buckets_{mode}"] = len(sync.buckets)
            results[f"agree_{mode}"] = train_gpt.ranks_agree(model, dist_info)
        if rank == 0:
            torch.save(results, out.format(world=world))
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def sync_results(tmp_path_factory):
    """One run of three forked ranks (fork: no second import of torch) for both world sizes."""
    out = str(tmp_path_factory.mktemp("sync") / "world{world}.pt")
    # the first optimizer built imports torch._dynamo (seconds): here, once, so the forked ranks inherit it
    hp = sync_hp()
    train_gpt.build_optimizers(train_gpt.build_model(hp, train_gpt.Dist(), seed=0), hp, train_gpt.Dist())
    mp.start_processes(_sync_worker, args=(free_port(), out), nprocs=3, join=True, start_method="fork")
    return {world: torch.load(out.format(world=world)) for world in (2, 3)}


@pytest.mark.parametrize("world", [2, 3])
def test_overlapped_gradient_sync_gives_the_same_weights_bit_for_bit(world, sync_results):
    results = sync_results[world]
    assert results["buckets_overlap_flat"] > 3  # several buckets, each launched on its own
    reference = results["sum64"]
    assert all(results[f"agree_{mode}"] for mode in ("after", "overlap", "overlap_flat", "bf16"))
    for mode in ("after", "overlap", "overlap_flat"):  # the summed gradients are the float64 sum, rounded
        assert torch.allclose(results[f"grads_{mode}"].double(), reference, rtol=1e-6, atol=1e-9), mode
    assert all(torch.equal(a, b) for a, b in zip(results["after"], results["overlap"]))  # the same collectives
    flat_equal = all(torch.equal(a, b) for a, b in zip(results["after"], results["overlap_flat"]))
    if world == 2:  # a + b == b + a: two ranks sum in one order whatever the buffer
        assert flat_equal
    else:  # gloo's ring sums an element in an order set by its position in the buffer: close, not identical
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(results["after"], results["overlap_flat"]))


@pytest.mark.parametrize("world", [2, 3])
def test_muon_updates_gathered_in_bf16_keep_the_ranks_identical(world, sync_results):
    """muon_gather_bf16: every rank applies the same bf16-rounded updates (the ranks agree bit for bit), which move
    the Muon matrices within bf16's rounding (2^-8 of an update of size lr) of the fp32 path's after 3 steps."""
    results = sync_results[world]
    muon = [(a, b) for a, b in zip(results["after"], results["bf16"]) if a.ndim == 2 and a.shape[0] == a.shape[1]]
    assert muon and any(not torch.equal(a, b) for a, b in muon)  # the rounding is real
    assert max((a - b).abs().max().item() for a, b in muon) < 3 * 0.02 * 2**-8 * 4  # 3 steps, |update| <= ~4


def test_muon_bf16_update_matches_a_hand_computed_step():
    """One Muon step on one matrix with muon_gather_bf16: p (1 - lr wd) - lr * bf16(NS(nesterov momentum) * scale)."""
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(8, 16))
    param.grad = torch.randn(8, 16)
    start, grad = param.detach().clone(), param.grad.clone()
    optimizer = train_gpt.Muon([param], lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.1,
                               gather_bf16=True)
    optimizer.step()
    direction = grad.lerp((1 - 0.95) * grad, 0.95)  # momentum buffer from zero: (1 - beta) g
    update = train_gpt.newton_schulz_orthogonalize(direction, 5) * max(1.0, 8 / 16) ** 0.5
    expected = start * (1 - 0.02 * 0.1) - 0.02 * update.to(torch.bfloat16).float()
    assert torch.allclose(param.detach(), expected, rtol=0, atol=1e-7)
    assert not torch.allclose(param.detach(), start * (1 - 0.02 * 0.1) - 0.02 * update, rtol=0, atol=1e-7)


def test_ema_on_the_host_equals_the_closed_form():
    """averaging_on_host on: the EMA's averages are copies (not the weights themselves) and after three updates of
    known weights hold the closed form d^3 w0 + (1-d)(d^2 w1 + d w2 + w3), blended into the model at the end."""
    hp = train_gpt.Hyperparameters(ema_decay=0.5, averaging_on_host="on")
    model = torch.nn.Linear(3, 2, bias=False)
    weights = [torch.full((2, 3), float(value)) for value in (1, 2, 4, 8)]
    ema = train_gpt.EMAAveraging(hp, total_steps=4)
    for done, weight in enumerate(weights, start=1):
        with torch.no_grad():
            model.weight.copy_(weight)
        ema.after_step(done, model)
    assert ema.ema.averages[0].data_ptr() != model.weight.data_ptr()
    expected = 0.125 * 1 + 0.5 * (0.25 * 2 + 0.5 * 4 + 8)  # the blend (ema_blend 1) puts the EMA into the model
    assert torch.equal(model.weight.detach(), torch.full((2, 3), expected))
