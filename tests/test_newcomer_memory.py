"""CPU memory in proportion to the model (issue 18): the chunked CPU loss is the eager loss bit for bit and keeps the
peak resident memory of a 50k-vocabulary run low; member, snapshot and selection log lines count from 0."""
import json
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import MICRO_BOS, micro_flags, read_metrics, run_script, train_gpt, write_micro_shards


def eager_loss_and_grads(features, weight, targets, softcap, grad_scale):
    """The eager path written out (GPT.head's cap, then F.cross_entropy summed): the reference."""
    features, weight = features.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = F.linear(features, weight).float()
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                           reduction="sum")
    (loss * grad_scale).backward()
    return loss.detach(), features.grad, weight.grad


def chunked_loss_and_grads(features, weight, targets, softcap, grad_scale, rows):
    features, weight = features.clone().requires_grad_(), weight.clone().requires_grad_()
    raw = F.linear(features, weight)
    loss = train_gpt.ChunkedSoftcapCE.apply(raw.reshape(-1, raw.size(-1)), targets.reshape(-1), softcap, rows)
    (loss * grad_scale).backward()
    return loss.detach(), features.grad, weight.grad


@pytest.mark.parametrize("softcap,rows", [(15.0, 7), (15.0, 64), (0.0, 10)])
def test_chunked_loss_is_the_eager_loss_bitwise(softcap, rows):
    """Loss and both gradients equal the eager ones exactly: rows that do not divide the 48 positions (a short last
    chunk), ignored targets, a gradient scale that is not a power of two (1/37: the step's target count)."""
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(2, 24, 16, generator=generator) * 3
    weight = torch.randn(1000, 16, generator=generator)
    targets = torch.randint(0, 1000, (2, 24), generator=generator)
    targets[0, 5] = targets[1, 23] = -1
    expected = eager_loss_and_grads(features, weight, targets, softcap, 1 / 37)
    got = chunked_loss_and_grads(features, weight, targets, softcap, 1 / 37, rows)
    for name, want, have in zip(("loss", "features grad", "weight grad"), expected, got):
        assert torch.equal(want, have), f"{name}: max difference {(want - have).abs().max().item():.3g}"
    assert expected[0].item() > 0 and expected[2].abs().sum() > 0


def test_chunked_loss_trains_the_plain_path_bitwise(tmp_path):
    """Through the training code (MemberObjective, the model's raw lm_head output): every parameter's gradient with
    --cpu_loss_rows 16 equals the eager path's (--cpu_loss_rows 0), and the eager path is what multi-token
    prediction keeps."""
    train_path, val_path = write_micro_shards(tmp_path)
    flags = micro_flags(train_path, val_path, str(tmp_path), "x")
    grads, losses = {}, {}
    for rows in (0, 16):
        hp = train_gpt.parse_args(flags + ["--cpu_loss_rows", str(rows)])
        dist_info = train_gpt.Dist(device=torch.device("cpu"))
        model = train_gpt.build_model(hp, dist_info, seed=0)
        objective = train_gpt.MemberObjective(hp, dist_info.device, [], dist_info)
        assert objective.chunk_rows == rows
        inputs = torch.randint(0, MICRO_BOS, (2, hp.seq_len), generator=torch.Generator().manual_seed(1))
        targets = torch.roll(inputs, -1, 1)
        targets[1, -3:] = -1
        loss, total = objective.sums(model, inputs, targets)
        (total / 61).backward()
        losses[rows] = loss.item()
        grads[rows] = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert losses[0] == losses[16]
    assert grads[0].keys() == grads[16].keys() and "lm_head.weight" in grads[0]
    different = [name for name in grads[0] if not torch.equal(grads[0][name], grads[16][name])]
    assert not different, f"gradients differ: {different}"
    mtp = train_gpt.parse_args(flags + ["--mtp_weight", "0.3"])
    assert train_gpt.chunked_loss_rows(mtp, torch.device("cpu")) == 0
    assert train_gpt.chunked_loss_rows(train_gpt.parse_args(flags), torch.device("cuda")) == 0


def test_50k_vocabulary_run_peak_memory(tmp_path):
    """A run with the GPT-2 vocabulary at the tiny preset's micro-batch (4 x 256 positions: (positions, vocab)
    float32 tensors of 206 MB), default settings: the true peak resident memory (the done line's mem, ru_maxrss)
    stays under 1.0 GiB. Before the chunked loss the eager loss's (positions, vocab) tensors and the heap's kept
    copies took this run to 1.93 GiB; now 0.87 GiB (one thread, torch 2.13)."""
    train_path, val_path = write_micro_shards(tmp_path)
    flags = micro_flags(train_path, val_path, str(tmp_path), "vocab50k", vocab_size=50304, n_layer=1, n_embd=32,
                        seq_len=256, batch_tokens=2048, device_batch_size=4, val_batch_size=4, max_steps=2,
                        num_epochs=1, log_every=1)
    completed = run_script(flags, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    with open(os.path.join(tmp_path, "vocab50k", "result.json")) as handle:
        peak = json.load(handle)["peak_memory_bytes"]
    assert 0.2 * 2**30 < peak < 1.0 * 2**30, f"peak RSS {peak / 2**30:.2f} GiB"


@pytest.mark.parametrize("weights", [[1.0], [0.3, 0.7]])
def test_cpu_evaluation_is_the_whole_vocabulary_evaluation_bitwise(tmp_path, weights):
    """score and score on CPU ("prob": each member's target log-probabilities, 64
    positions at a time) equal the whole-vocabulary computation written out: log-softmax of the capped logits +
    log weight, logaddexp over the members, F.nll_loss summed per piece in float64 (vocabulary 300)."""
    train_path, val_path = write_micro_shards(tmp_path)
    hp = train_gpt.parse_args(micro_flags(train_path, val_path, str(tmp_path), "x", vocab_size=300))
    dist_info = train_gpt.Dist(device=torch.device("cpu"))
    models = [train_gpt.build_model(hp, dist_info, seed=seed).eval() for seed in range(len(weights))]
    data = train_gpt.EvalData(train_gpt.read_shard(val_path), hp.seq_len, "val")
    totals = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for batch in data.batches(0, 1, hp.val_batch_size):
            for inputs, targets in train_gpt.eval_pieces(*batch, dist_info.device):
                mixture = None
                for model, weight in zip(models, weights):
                    log_probs = F.log_softmax(model(inputs).float(), dim=-1) + math.log(weight)
                    mixture = log_probs if mixture is None else torch.logaddexp(mixture, log_probs)
                totals[0] += F.nll_loss(mixture.reshape(-1, 300), targets.reshape(-1), ignore_index=-1,
                                        reduction="sum").double()
                totals[1] += (targets >= 0).sum()
    expected = (totals[0] / totals[1]).item()
    got = train_gpt.score(models, weights, data, dist_info, hp.val_batch_size, "prob")[0]
    assert got == expected and 4.0 < got < 8.0
    parked = [train_gpt.park_on_host(model, dist_info) for model in models]  # --eval_only's and the ensembles' path
    assert train_gpt.score(parked, weights, data, dist_info, hp.val_batch_size, "prob")[0] == expected


def test_members_snapshots_and_candidates_count_from_0(tmp_path):
    """The log counts as the files and result.json do: `member k of 2` for k = 0, 1, `snapshot j of 2` for the file
    member_0k_snapshot_0j.pt, the selection line's c0..c3 (member 0's snapshot, member 0, member 1's snapshot,
    member 1) with its kept candidates result.json's chosen indices, and the size table's `member k alone`."""
    train_path, val_path = write_micro_shards(tmp_path)
    flags = micro_flags(train_path, val_path, str(tmp_path), "count", ensemble_size=2, snapshot_cycles=2,
                        num_epochs=2, fitness_tokens=600, select_top=2, log_every=5)
    completed = run_script(flags, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    folder = os.path.join(tmp_path, "count")
    with open(os.path.join(folder, "log.txt")) as handle:
        log = handle.read()
    members = sorted({int(m) for m in re.findall(r"^member (\d+) of 2 \|", log, re.M)})
    assert members == [0, 1]
    snapshots = re.findall(r"^member (\d+) of 2 \| snapshot (\d+) of 2 \|", log, re.M)
    assert sorted(snapshots) == [("0", "0"), ("1", "0")]
    for member, cycle in snapshots:
        assert os.path.exists(os.path.join(folder, "members", f"member_{int(member):02d}_snapshot_{int(cycle):02d}.pt"))
    rows = [row for row in read_metrics(folder) if row["kind"] == "snapshot"]
    assert [(row["member"], row["cycle"]) for row in rows] == [(0, 0), (1, 0)]
    line = re.search(r"^selection \|.*$", log, re.M).group(0)
    assert re.findall(r"c(\d+)=", line) == ["0", "1", "2", "3"]
    with open(os.path.join(folder, "result.json")) as handle:
        chosen = json.load(handle)["selection"]["chosen"]
    assert [int(c) for c in re.findall(r"c(\d+)", line.split("kept")[1])] == chosen
    assert re.findall(r"members \| [\d.]+ \| member (\d+) alone", log) == ["0", "1"]
