"""GPU readiness checked on CPU (issue 16): the memory plan against real allocations, its refusal, bf16 tensors into
attention under autocast, the parallel_members refusal, the compiled training step (fullgraph, bounded recompiles
over the schedule changes) and bench/gpu_check.sh's dry run."""
import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import MICRO_BOS, MICRO_VOCAB, REPO_ROOT, micro_flags

import train_gpt

MICRO = dict(vocab_size=MICRO_VOCAB, bos_id=MICRO_BOS, n_layer=4, n_embd=32, n_head=2, seq_len=32, batch_tokens=128,
             device_batch_size=2, val_batch_size=2, device="cpu", compile="off",
             # the 1h preset's shapes that name full-scale sizes, shrunk too (default rules at micro width)
             mlp_hidden=0, window_short=0, train_vocab=0, eval_vocab=0, loop_range="")


def micro_hp(preset: str = "slowrun", **overrides) -> train_gpt.Hyperparameters:
    """A preset's flags at micro width (its tricks kept, its shapes shrunk)."""
    settings = {**train_gpt.PRESETS[preset], **MICRO, **overrides}
    known = {field.name for field in dataclasses.fields(train_gpt.Hyperparameters)}
    settings = {k: v for k, v in settings.items() if k in known}
    return train_gpt.Hyperparameters(**settings)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def test_memory_plan_counts_exactly_what_one_step_allocates():
    """Parameters, gradients and optimizer state (AdamW moments and step counters, Muon momentum, NorMuon second
    moments) of the plan, from a meta-device model, equal a real model's after one optimizer step, byte for byte."""
    hp = micro_hp(mtp_weight=0.0)
    model = train_gpt.build_model(hp, train_gpt.Dist(), seed=0)
    optimizers = train_gpt.build_optimizers(model, hp, train_gpt.Dist())
    idx = torch.randint(0, MICRO_VOCAB, (2, hp.seq_len), generator=torch.Generator().manual_seed(0))
    logits = model(idx)
    F.cross_entropy(logits[:, :-1].reshape(-1, MICRO_VOCAB), idx[:, 1:].reshape(-1)).backward()
    for optimizer in optimizers:
        optimizer.step()
    plan = train_gpt.memory_plan(hp, world_size=1, device_type="cpu")
    params = list(model.parameters())
    assert all(p.grad is not None for p in params)  # every parameter trains: a gradient each
    assert plan["param_bytes"] == tensor_bytes(params)
    assert plan["grad_bytes"] == tensor_bytes(p.grad for p in params)
    real_optimizer = sum(tensor_bytes(state.values()) for optimizer in optimizers for state in optimizer.state.values())
    assert plan["optimizer_bytes"] == real_optimizer
    adamw, muon = optimizers
    assert plan["muon_bytes"] == sum(tensor_bytes(state.values()) for state in muon.state.values())
    assert plan["activation_bytes"] > 0 and plan["peak"] > plan["param_bytes"] * 2


def test_memory_plan_full_scale_figures_and_refusals():
    """At the slowrun (= 1h) preset's shape: its parameter count (the 1h record's 1,443,722,775, MTP block
    included); the plain run fits 8 x 79 GiB; so does the README's 8-member ensemble (frozen members wait on the
    host); 24 candidates mixed by logits all at once do not and are refused naming --ensemble_size; a 30 GiB card is
    refused naming --device_batch_size; 10 GiB names the model itself."""
    hp = train_gpt.parse_args(["--preset", "slowrun"])
    plan = train_gpt.memory_plan(hp, 8, "cuda", 79 * 2**30)
    assert plan["parameters"] == 1_443_722_775
    assert plan["param_bytes"] == plan["grad_bytes"] == 4 * 1_443_722_775
    assert train_gpt.memory_plan_refusal(hp, plan) == ""
    ensemble = dataclasses.replace(hp, ensemble_size=8)  # frozen members wait on the host: it fits (phase 2)
    assert train_gpt.memory_plan_refusal(ensemble, train_gpt.memory_plan(ensemble, 8, "cuda", 79 * 2**30)) == ""
    together = dataclasses.replace(ensemble, ensemble_mode="logit", epoch_snapshots=3)  # 24 candidates at once
    refusal = train_gpt.memory_plan_refusal(together, train_gpt.memory_plan(together, 8, "cuda", 79 * 2**30))
    assert refusal.startswith("memory plan:") and "--ensemble_size" in refusal and "\n" not in refusal
    assert "--device_batch_size" in train_gpt.memory_plan_refusal(hp, train_gpt.memory_plan(hp, 8, "cuda", 30 * 2**30))
    assert "--n_layer" in train_gpt.memory_plan_refusal(hp, train_gpt.memory_plan(hp, 8, "cuda", 10 * 2**30))


def test_plan_only_prints_and_a_plan_that_cannot_fit_is_refused_before_any_work(capsys, tmp_path):
    """--plan_only prints the plan and exits 0 without data; a stated budget too small exits 2 with one line, and a
    training run with that budget stops before it makes a run folder."""
    flags = ["--preset", "slowrun", "--plan_only", "--memory_budget_gb", "79", "--plan_world_size", "8",
             "--train_files", str(tmp_path / "missing.bin")]
    assert train_gpt.main(flags) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "1,443,722,775" in out and "fits" in out
    assert train_gpt.main(flags + ["--ensemble_size", "8", "--ensemble_mode", "logit", "--epoch_snapshots", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--ensemble_size" in err[0]
    hp = micro_hp(memory_budget_gb=1e-4, log_dir=str(tmp_path), run_id="refused", train_files=str(tmp_path / "no.bin"))
    with pytest.raises(train_gpt.ConfigError, match="does not fit"):
        train_gpt.train(hp, train_gpt.Dist(), [])
    assert not os.path.exists(tmp_path / "refused")


@pytest.mark.parametrize("autocast", [False, True])
def test_activation_estimate_is_within_15_percent_of_what_autograd_saves(autocast):
    """The plan's activation estimate (layers and eager loss head; under autocast also the bf16 weight copies) against
    an independent count: the bytes of every distinct storage autograd saves for backward in one forward of the
    slowrun preset's micro model, parameters excluded, in fp32 and under CPU bf16 autocast."""
    hp = micro_hp(n_layer=4, n_embd=128, seq_len=128, vocab_size=512, bos_id=511, fused_loss="off")
    model = train_gpt.build_model(hp, train_gpt.Dist(), seed=0)
    model.loop_active = bool(hp.loop_repeats)  # the plan counts the looped phase (the 1h preset's last epochs)
    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(0, hp.vocab_size, (hp.device_batch_size, hp.seq_len), generator=generator)
    saved = {}

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        train_gpt.cross_entropy_sum(model(idx), idx)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    counted = sum(size for pointer, size in saved.items() if pointer not in parameters)
    estimate = train_gpt.memory_plan(hp, 1, "cuda" if autocast else "cpu")["activation_bytes"]
    assert abs(estimate / counted - 1) < 0.15, (estimate, counted)


def test_a_run_logs_its_memory_plan_once_at_startup(micro_data, tmp_path):
    """The plan's lines are in the log's run section, once, before the first step; its parameter line is the run's
    count."""
    train_path, val_path = micro_data
    assert train_gpt.main(micro_flags(train_path, val_path, str(tmp_path), "planned", num_epochs=1)) == 0
    log = open(tmp_path / "planned" / "log.txt").read()
    parameters = int(re.search(r"^model: ([\d,]+) parameters per member", log, re.M).group(1).replace(",", ""))
    plan_lines = re.findall(r"^memory \| parameters .*$", log, re.M)
    assert len(plan_lines) == 1 and f"{parameters:,} fp32 master weights" in plan_lines[0]
    assert log.index(plan_lines[0]) < log.index("\nstep 1/")
    assert re.search(r"^memory \| device +not checked", log, re.M)  # CPU, no --memory_budget_gb


def test_tensors_entering_attention_are_bf16_under_autocast(monkeypatch):
    """Under bf16 autocast q, k and v enter attention in bf16 even where rms_norm returns fp32 (CUDA autocast does
    so from torch 2.12; simulated here by patching rms_norm to upcast, as CPU autocast does not), and the loss stays
    within 2% of the fp32 loss (bf16 keeps 8 mantissa bits: ~0.4% per rounding)."""
    hp = micro_hp(dropout=0.0)
    model = train_gpt.build_model(hp, train_gpt.Dist(), seed=0)
    with torch.no_grad():  # c_proj starts at zero: give the blocks something to add so attention matters
        for block in model.blocks:
            block.attn.c_proj.weight.normal_(std=0.05)
            block.mlp.c_proj.weight.normal_(std=0.05)
    idx = torch.randint(0, MICRO_VOCAB, (2, hp.seq_len), generator=torch.Generator().manual_seed(1))
    targets = torch.roll(idx, -1, dims=1)
    seen = []
    attend = train_gpt.attend

    def recording_attend(q, k, v, mask):
        seen.append((q.dtype, k.dtype, v.dtype))
        return attend(q, k, v, mask)

    monkeypatch.setattr(train_gpt, "attend", recording_attend)
    reference = F.cross_entropy(model(idx).reshape(-1, MICRO_VOCAB), targets.reshape(-1)).item()
    assert seen and all(dtypes == (torch.float32,) * 3 for dtypes in seen)  # fp32 stays fp32
    plain_rms_norm = train_gpt.rms_norm
    monkeypatch.setattr(train_gpt, "rms_norm", lambda x: plain_rms_norm(x.float()))  # CUDA autocast's fp32 policy
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = F.cross_entropy(model(idx).float().reshape(-1, MICRO_VOCAB), targets.reshape(-1)).item()
    assert len(seen) == hp.n_layer and all(dtypes == (torch.bfloat16,) * 3 for dtypes in seen), seen
    assert abs(mixed - reference) / reference < 2e-2, (mixed, reference)


@pytest.mark.parametrize("ensemble_size, parallel_members, world_size, refused", [
    (3, 2, 4, True),  # round 2 trains one member: group 2 would wait at the barrier for a whole member
    (4, 2, 4, False),
    (6, 3, 6, False),
    (5, 5, 5, False),
])
def test_parallel_members_that_would_leave_a_group_idle_are_refused(ensemble_size, parallel_members, world_size,
                                                                    refused):
    hp = micro_hp(ensemble_size=ensemble_size, parallel_members=parallel_members, batch_tokens=32 * 2 * 6 * 2)
    if refused:
        with pytest.raises(train_gpt.ConfigError, match="must divide ensemble_size"):
            train_gpt.check_hyperparameters(hp, world_size)
    else:
        train_gpt.check_hyperparameters(hp, world_size)


def training_step(model, idx):
    """Forward + backward of the next-token loss: what train_member compiles (the model), plus its loss."""
    output = model(idx[:, :-1], targets=idx[:, 1:])  # targets: the MTP block (1h) reads the next tokens
    logits = output[0] if isinstance(output, tuple) else output
    loss = train_gpt.cross_entropy_sum(logits, idx[:, 1:])
    if isinstance(output, tuple):  # the multi-token head's output too, so its parameters get gradients
        loss = loss + 1e-3 * output[1].float().logsumexp(-1).sum()
    loss.backward()
    return loss


@pytest.mark.parametrize("preset", sorted(name for name in train_gpt.PRESETS if name not in train_gpt.PRESET_ALIASES))
def test_compiled_training_step_has_no_graph_break(preset):
    """Each preset's model at micro width compiles whole (fullgraph=True: a graph break is an error) for a training
    step, forward and backward. aot_eager traces forward and backward as inductor would, without generating C++
    (inductor's CPU codegen takes minutes on this machine); the graph capture is the same."""
    torch._dynamo.reset()
    shrunk = dict(rope_pairs=4) if train_gpt.PRESETS[preset].get("rope_pairs") else {}  # 15min: half of head_dim 16
    hp = micro_hp(preset, n_layer=2, **shrunk)
    model = train_gpt.build_model(hp, train_gpt.Dist(), seed=0)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    idx = torch.randint(0, MICRO_VOCAB, (2, hp.seq_len), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    loss = training_step(compiled, idx)
    compiled_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout masks
    eager = training_step(model, idx)
    assert torch.allclose(loss, eager, rtol=1e-5)
    for compiled_grad, p in zip(compiled_grads, model.parameters()):
        assert torch.allclose(compiled_grad, p.grad, rtol=1e-4, atol=1e-6)


def test_recompiles_stay_within_the_schedule_bound():
    """A run that crosses every schedule change (3 window stages, then looped layers switching on) compiles one
    graph per (window stage, loop state) it trains in, 4 here, plus one per state it evaluates in (eval mode, another
    batch size), 2 here, and no more: the later steps reuse them."""
    torch._dynamo.reset()
    stages, total_steps = 3, 12
    hp = micro_hp(n_layer=2, window_pattern="SL", window_warmup_frac=0.5, window_warmup_stages=stages, loop_repeats=1,
                  loop_start_frac=0.75)
    model = train_gpt.build_model(hp, train_gpt.Dist(), seed=0)
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compiled = torch.compile(model, fullgraph=True, backend=counting_backend)
    idx = torch.randint(0, MICRO_VOCAB, (2, hp.seq_len), generator=torch.Generator().manual_seed(0))
    visited, evaluated = set(), set()
    for step in range(total_steps):
        model.loop_active = step >= hp.loop_start_frac * total_steps
        stage = train_gpt.window_stage(step, total_steps, hp)
        model.set_window_stage(stage, stages)
        visited.add((stage, model.loop_active))
        training_step(compiled, idx)
        model.zero_grad(set_to_none=True)
        if step in (5, total_steps - 1):  # validation mid-run and at the end, with the eval batch size (3, not 2)
            model.eval()
            with torch.no_grad():
                compiled(torch.cat([idx, idx[:1]]))
            model.train()
            evaluated.add((stage, model.loop_active))
    assert len(visited) == stages + 1 and len(evaluated) == 2
    assert len(graphs) == len(visited) + len(evaluated), \
        f"{len(graphs)} graphs for {len(visited)} training and {len(evaluated)} evaluation states"


def run_gpu_check(out, *args, **env):
    return subprocess.run(["bash", os.path.join(REPO_ROOT, "bench", "gpu_check.sh"), *args], capture_output=True,
                          text=True, timeout=600, cwd=REPO_ROOT,
                          env=dict(os.environ, OUT=str(out), OMP_NUM_THREADS="1", **env))


def test_gpu_check_dry_run_reports_every_part(tmp_path):
    """bench/gpu_check.sh --dry-run runs every part on CPU at tiny shapes through the same plumbing (a forked
    process per part, its timeout, the report files under $OUT): each part reports ok with its figures, and the
    FLOPs per token of model_steps equal a hand count for its 2-layer model (windows 32 and 64 of seq 64: mean keys
    (528 + 32 x 32) / 64 = 24.25 and 65 / 2 = 32.5)."""
    sys.path.insert(0, os.path.join(REPO_ROOT, "bench"))
    import gpu_check
    done = run_gpu_check(tmp_path, "--dry-run", GPU_CHECK_PRESET="slowrun")  # the preset the hand count is for
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["GPU_RESULTS.md", "gpu_check.json", "gpu_check.log"]
    results = json.load(open(tmp_path / "gpu_check.json"))
    assert results["dry_run"] is True
    assert list(results["parts"]) == [name for name, _ in gpu_check.PARTS]
    for name, part in results["parts"].items():
        assert part["status"] == "ok" and part["lines"], (name, part)
        assert f"gpu_check | {name}: ok" in done.stdout
    model = results["parts"]["model_steps"]["data"]
    assert model["ms_per_step"] > 0 and model["tokens_per_second"] > 0 and model["steps"] == 3
    width, vocab = 64, gpu_check.DRY_VOCAB
    assert model["flops_per_token"] == pytest.approx(6 * (model["parameters"] - vocab * width)
                                                     + 12 * width * (24.25 + 32.5))
    assert results["parts"]["memory_plan"]["data"]["measured_peak"] == model["peak_memory_bytes"]
    distill = results["parts"]["distill_step"]["data"]
    assert len(distill["members"]) == 2 and distill["overhead"] > 0
    report = open(tmp_path / "GPU_RESULTS.md").read()
    assert "DRY RUN" in report and all(f"## {name}: ok" in report for name, _ in gpu_check.PARTS)


def test_gpu_check_reports_a_failing_part_and_goes_on(tmp_path):
    """A part that fails (here: an unknown preset) is reported with its error, the next part still runs, and the
    exit status says something failed."""
    done = run_gpu_check(tmp_path, "--dry-run", "--only", "model_steps,memory_plan,fused_loss",
                         GPU_CHECK_PRESET="no_such")
    assert done.returncode == 1, done.stdout + done.stderr
    parts = json.load(open(tmp_path / "gpu_check.json"))["parts"]
    assert parts["model_steps"]["status"] == "error" and "exited with 2" in parts["model_steps"]["error"]
    assert parts["memory_plan"]["status"] == "error"  # it needs the preset too
    assert parts["fused_loss"]["status"] == "ok"
    assert "unknown preset 'no_such'" in open(tmp_path / "gpu_check.log").read()
