"""One unattended check of the GPU paths on one GPU (an H100 in about 8 minutes); `bash bench/gpu_check.sh` runs it.

    bash bench/gpu_check.sh                       # on the GPU: every part; results in $OUT (or logs/gpu_check)
    bash bench/gpu_check.sh --dry-run             # on a CPU: the same parts and plumbing at tiny shapes (the tests)
    python bench/gpu_check.py --only model_steps  # one part

Parts, in the order they run (each in its own forked process with its own timeout, inside one overall time budget;
a part that fails, hangs or crashes the GPU is reported as such and the next part runs):
    environment     versions, the device, its memory
    triton_kernels  the Triton loss kernel (each variant a run compiles) and the symmetric Gram kernel, compiled and
                    checked against their PyTorch references
    model_steps     20 steps of the preset's model (train_gpt.py itself) at a reduced batch: ms/step, tokens/s, MFU
                    (the FLOPs-per-token formula printed beside it), peak memory, compile seconds
    memory_plan     train_gpt.memory_plan's prediction for model_steps' flags beside the peak it measured
    fused_loss      soft-capped CE: eager vs chunked reference vs Triton (median ms of forward + backward, peak memory)
    distill_loss    the same with a distillation teacher (alpha 0.5, T 2)
    attention       SDPA with a dense mask vs compiled FlexAttention, forward + backward, windows and document masks
    distill_step    a 2-member run with distillation (8 layers of the preset's width): member 2's step vs member 1's
    fp8_head        the 15min record's multi-offset loss with the fp8 lm_head matmul (fp8_head) vs its bf16 path:
                    loss per row (accepted if within 2e-3), gradient agreement, ms of forward + backward
No network: the token shards are random tokens of the full vocabulary. Writes under the output folder (at most 4
files): GPU_RESULTS.md (the report), gpu_check.json (every figure), gpu_check.log (every part's full output)."""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import multiprocessing
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import traceback

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# dense bf16 tensor-core peaks, the first name found in the device's name wins (SXM unless PCIe is named)
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}
FULL_BATCH_TOKENS, FULL_STEPS = 32768, 20  # model_steps: 4 micro-steps of 4 x 2048 tokens per step, 20 steps
# (part, timeout in seconds on the GPU): the overall budget (--budget) cuts the later ones short if need be
# (most wanted first: the figures of the preset's own steps come before the micro-benchmarks)
PARTS = [("environment", 60), ("triton_kernels", 90), ("model_steps", 300), ("memory_plan", 30), ("fused_loss", 60),
         ("distill_loss", 60), ("attention", 120), ("distill_step", 200), ("fp8_head", 60)]
DRY_VOCAB = 512  # the dry run's vocabulary: CPU steps are dominated by the 50,304-wide lm_head otherwise


def preset_name() -> str:
    """The preset the model parts use: GPU_CHECK_PRESET, else the 1-hour track's if this train_gpt has one."""
    import train_gpt
    return os.environ.get("GPU_CHECK_PRESET") or ("1h" if "1h" in train_gpt.PRESETS else "slowrun")


# ----------------------------------------------------------------------------------------------------------------------
# Parts: each returns (markdown lines, figures); it runs in a child process


def part_environment(dry: bool):
    import numpy
    import torch
    lines = [f"- python {sys.version.split()[0]} | torch {torch.__version__} | numpy {numpy.__version__} | "
             f"CUDA {torch.version.cuda or 'none'}"]
    try:
        import triton
        lines.append(f"- triton {triton.__version__}")
    except ImportError:
        lines.append("- triton: not installed")
    data = dict(torch=torch.__version__, cuda_available=torch.cuda.is_available(), dry_run=dry)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        data.update(device=props.name, memory_bytes=props.total_memory, capability=f"{props.major}.{props.minor}",
                    device_count=torch.cuda.device_count())
        lines.append(f"- device: {props.name}, {props.total_memory / 2**30:.1f} GiB, sm_{props.major}{props.minor}, "
                     f"{torch.cuda.device_count()} visible")
    else:
        lines.append("- device: CPU only (dry run)" if dry else "- device: NO CUDA DEVICE: the GPU parts will fail")
    return lines, data


def part_triton_kernels(dry: bool):
    import torch
    import train_gpt
    device = torch.device("cpu" if dry else "cuda")
    vocab = 300 if dry else 50304  # the dry run interprets the kernel (TRITON_INTERPRET=1): a small vocabulary
    lines, data = ["| kernel | variant | result |", "|---|---|---|"], {}
    for teacher in (False, True):
        for dtype in ("bfloat16", "float32"):
            start = time.time()
            problem = train_gpt.triton_loss_self_check(str(device), vocab, 10.0, teacher, dtype)
            name = f"loss vocab {vocab} softcap 10 {dtype}{' + teacher' if teacher else ''}"
            data[name] = problem or "ok"
            lines.append(f"| fused loss | {name} | {problem or 'matches the chunked reference'} "
                         f"({time.time() - start:.1f} s incl. compile) |")
    rows, cols = (96, 80) if dry else (2048, 8192)
    a = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)).to(device)
    a = a / a.norm()
    reference = train_gpt.symmetric_gram_torch(a.double()).float()
    fast = train_gpt.symmetric_gram_triton(a)
    error = ((fast - reference).norm() / reference.norm()).item()
    data["gram_relative_error"] = error
    lines.append(f"| symmetric Gram | {rows} x {cols} fp32 (ieee dot) | relative error {error:.2e} vs float64 "
                 f"matmul; exactly symmetric: {bool(torch.equal(fast, fast.T))} |")
    if error > 1e-4:
        raise RuntimeError(f"symmetric Gram kernel differs from the reference by {error:.2e}")
    failed = [name for name, value in data.items() if isinstance(value, str) and value != "ok"]
    if failed:
        raise RuntimeError(f"Triton loss self-check failed for {failed}: {[data[n] for n in failed]}")
    return lines, data


def bench_table(benches: dict, device, repeats: int, bench: str):
    """Times each callable with bench/kernels.timed; markdown rows and figures, the first row the reference."""
    import kernels
    lines, data, reference = [], {}, None
    for path, fn in benches.items():
        ms, peak = kernels.timed(fn, device, repeats)
        data[path] = dict(ms=ms, peak_bytes=peak)
        ratio = "-" if reference is None else f"{reference[0] / ms:.2f}x faster" + (
            f", {reference[1] / peak:.2f}x less memory" if peak and reference[1] else "")
        reference = reference or (ms, peak)
        lines.append(f"| {bench} | {path} | {ms:.2f} | {f'{peak / 2**20:.0f} MiB' if peak is not None else 'n/a'} "
                     f"| {ratio} |")
    return lines, data


def loss_part(dry: bool, distill: bool):
    import torch
    import kernels
    device = torch.device("cpu" if dry else "cuda")
    shape = dict(kernels.FULL)
    if dry:
        shape.update(rows=64, width=64, vocab=DRY_VOCAB)
    header = [f"shape: {shape['rows']} rows{'' if dry else ' (device batch 4 x seq 2048)'} x vocab {shape['vocab']}, "
              f"lm_head width {shape['width']}; median of {2 if dry else 5}", "",
              "| bench | path | ms fwd+bwd | peak memory | vs reference |", "|---|---|---|---|---|"]
    lines, data = bench_table(kernels.loss_benches(shape, device, distill=distill), device, 2 if dry else 5,
                              "distill" if distill else "loss")
    return header + lines, data


def part_fused_loss(dry: bool):
    return loss_part(dry, distill=False)


def part_distill_loss(dry: bool):
    return loss_part(dry, distill=True)


def part_attention(dry: bool):
    import torch
    import kernels
    device = torch.device("cpu" if dry else "cuda")
    shape = dict(kernels.FULL)
    if dry:
        shape.update(seq=128, width=64, heads=2, batch=1)
    lines = [f"shape: batch {shape['batch']} x {shape['heads']} heads x seq {shape['seq']} x head_dim "
             f"{shape['width'] // shape['heads']}, a document start every 700 tokens"
             + ("; CPU: forward only" if dry else "; forward + backward"), "",
             "| bench | path | ms | peak memory | vs reference |", "|---|---|---|---|---|"]
    data = {}
    for window in (shape["seq"] // 2, shape["seq"]):  # the short (S) window and the long (L) one, both + documents
        rows, figures = bench_table(kernels.attention_benches(shape, device, window), device, 2 if dry else 5,
                                    f"window {window} + doc mask")
        lines += rows
        data[f"window {window}"] = figures
    return lines, data


def mean_context(seq_len: int, window: int) -> float:
    """Keys a query attends to on average under a causal window: mean over positions i of min(i + 1, window)."""
    return sum(min(i + 1, window) for i in range(seq_len)) / seq_len


def flops_per_token(hp) -> tuple[float, str]:
    """Training FLOPs per token = 6 N + 12 d sum_layers(mean attended keys), N = the parameters that multiply
    (everything but the embedding lookup, the lm_head included): 2 FLOPs per multiply-add, x3 for forward +
    backward; attention's QK^T and AV are 2 x 2 d FLOPs per key in the forward. Returns (value, formula)."""
    import train_gpt
    model = train_gpt.build_model_meta(hp)
    total = sum(p.numel() for p in model.parameters())
    matmul_params = total - model.wte.weight.numel()
    sizes = train_gpt.window_sizes(hp) or [hp.seq_len] * hp.n_layer
    contexts = sum(mean_context(hp.seq_len, w) for w in sizes)
    value = 6 * matmul_params + 12 * hp.n_embd * contexts
    formula = (f"6 N + 12 d sum_l ctx_l = 6 x {matmul_params:,} + 12 x {hp.n_embd} x {contexts:,.1f} "
               f"= {value / 1e9:.3f} GFLOP/token (N: parameters minus the embedding; ctx_l: mean keys attended in "
               f"layer l, windows {sorted(set(sizes))})")
    return value, formula


def random_shards(folder: str, train_tokens: int, val_tokens: int, vocab: int = 50257, bos: int = 50256):
    """Random tokens of the full GPT-2 vocabulary, a document start every ~1000 tokens (no network needed)."""
    import numpy as np
    import train_gpt
    rng = np.random.default_rng(0)
    paths = []
    for name, size in (("train", train_tokens), ("val", val_tokens)):
        tokens = rng.integers(0, vocab - 1, size, dtype=np.int64)
        tokens[::1000] = bos
        path = os.path.join(folder, f"random_{name}.bin")
        train_gpt.write_shard(path, tokens.astype(np.uint16))
        paths.append(path)
    return paths


def model_flags(dry: bool, folder: str, run_id: str, steps: int, batch_tokens: int, extra: list[str]) -> list[str]:
    """train_gpt.py flags of the preset's model at a reduced batch on one device (tiny shapes in the dry run)."""
    seq, vocab = (64, DRY_VOCAB) if dry else (2048, 50257)
    train_path, val_path = random_shards(folder, (steps + 2) * batch_tokens + seq + 1, 4 * (seq + 1), vocab, vocab - 1)
    flags = ["--preset", preset_name(), "--max_steps", str(steps), "--batch_tokens", str(batch_tokens),
             "--train_files", train_path, "--val_files", val_path, "--test_files", "", "--log_dir", folder,
             "--run_id", run_id, "--log_every", "1", "--val_every", "-1", "--checkpoint_every", "-1",
             "--save_model", "false", "--num_epochs", "1",
             # a timing run on a few random windows: no public val windows, no epoch-snapshot averaging, whole-step
             # epochs (the public stepping's epochs need more windows than a few steps hold)
             "--val_public_windows", "0", "--epoch_snapshots", "0", "--epoch_snapshot_weights", "equal",
             "--public_steps", "0"]
    if dry:
        flags += ["--vocab_size", str(DRY_VOCAB), "--bos_id", str(DRY_VOCAB - 1), "--device", "cpu", "--n_layer", "2",
                  "--n_embd", "64", "--n_head", "2", "--seq_len", str(seq),
                  "--device_batch_size", "2", "--val_batch_size", "2", "--compile", "off",
                  # the 1h preset's full-scale sizes, shrunk with the rest (its windows then seq_len // 2)
                  "--train_vocab", "0", "--eval_vocab", "0", "--window_short", "0", "--mlp_hidden", "0",
                  "--loop_range", ""]
    else:
        flags += ["--device", "cuda", "--device_batch_size", "4", "--val_batch_size", "4"]
    return flags + extra


def run_train_gpt(flags: list[str]) -> tuple[list[dict], str]:
    """train_gpt.main(flags) in this process; (metrics.jsonl rows, log.txt) of the run."""
    import train_gpt
    code = train_gpt.main(flags)
    folder = os.path.join(flags[flags.index("--log_dir") + 1], flags[flags.index("--run_id") + 1])
    log_text = open(os.path.join(folder, "log.txt"), encoding="utf-8").read() if os.path.isdir(folder) else ""
    if code != 0:
        raise RuntimeError(f"train_gpt.py exited with {code}; log tail: {log_text[-1500:]}")
    with open(os.path.join(folder, "metrics.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle], log_text


def step_figures(rows: list[dict]) -> dict:
    """Steady-state figures of train rows: the compiled first step and the one after it are left out."""
    train = [r for r in rows if r.get("kind") == "train"]
    steady = [r for r in train if r["step"] > 2] or train
    return dict(ms_per_step=statistics.median(r["ms_per_step"] for r in steady),
                tokens_per_second=statistics.median(r["tokens_per_second"] for r in steady),
                peak_memory_bytes=max(r["peak_memory_bytes"] for r in train), steps=len(train),
                compile_seconds=next((r["compile_seconds"] for r in rows if r.get("kind") == "compile"), None))


def part_model_steps(dry: bool):
    import torch
    import train_gpt
    folder = tempfile.mkdtemp(prefix="gpu_check_")
    try:
        steps, batch_tokens = (3, 256) if dry else (FULL_STEPS, FULL_BATCH_TOKENS)
        flags = model_flags(dry, folder, "model_steps", steps, batch_tokens, [])
        rows, log_text = run_train_gpt(flags)
        figures = step_figures(rows)
        hp = train_gpt.parse_args(flags)
        flops, formula = flops_per_token(hp)
        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
        peak = next((value for key, value in PEAK_BF16_FLOPS.items() if key in name), None)
        mfu = figures["tokens_per_second"] * flops / peak if peak and not dry else None
        paths = [line for line in log_text.splitlines()  # the member's first line: compile, loss and attention paths
                 if "steps/epoch" in line and "| loss " in line and "{" not in line][:1]
        figures.update(flops_per_token=flops, mfu=mfu, device=name, flags=flags, paths=paths,
                       parameters=sum(p.numel() for p in train_gpt.build_model_meta(hp).parameters()))
        lines = [f"`python train_gpt.py {shlex.join(flags)}` (the data paths were temporary)", "",
                 f"- preset {hp.preset}: {figures['parameters']:,} parameters, {steps} steps of {batch_tokens:,} "
                 f"tokens ({hp.device_batch_size} x {hp.seq_len} per micro-step) on {name}",
                 f"- log: {paths[0] if paths else '(no paths line found)'}",
                 f"- compile (first step, compilation included): {figures['compile_seconds']} s",
                 f"- ms/step (median, steps 3+): {figures['ms_per_step']:.1f} | tokens/s: "
                 f"{figures['tokens_per_second']:,.0f} | peak memory: {figures['peak_memory_bytes'] / 2**30:.2f} GiB"
                 + (" (CPU: peak RSS)" if dry else ""),
                 f"- FLOPs/token: {formula}",
                 "- MFU = tokens/s x FLOPs/token / peak = " + (
                     f"{figures['tokens_per_second']:,.0f} x {flops:.4g} / {peak:.4g} = {100 * mfu:.1f}%" if mfu
                     else "n/a (dry run or unknown device peak)")]
        return lines, figures
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def part_memory_plan(dry: bool, results: dict):
    import torch
    import train_gpt
    measured = results.get("model_steps", {}).get("data") or {}
    folder = tempfile.mkdtemp(prefix="gpu_check_")
    try:
        flags = measured.get("flags") or model_flags(dry, folder, "plan", 3, 256 if dry else FULL_BATCH_TOKENS, [])
        hp = train_gpt.parse_args([f for f in flags])
        device_bytes = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 0
        plan = train_gpt.memory_plan(hp, 1, "cpu" if dry else "cuda", device_bytes)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    lines = ["memory plan for model_steps' flags (1 rank):", "", *[f"    {line}" for line in
                                                                  train_gpt.memory_plan_lines(hp, plan)], ""]
    peak = measured.get("peak_memory_bytes")
    if peak:
        ratio = plan["peak_training"] / peak
        lines.append(f"- predicted training peak ~{plan['peak_training'] / 2**30:.2f} GiB | measured "
                     f"{peak / 2**30:.2f} GiB{' (CPU peak RSS: not comparable)' if dry else ''} | predicted / "
                     f"measured = {ratio:.2f}")
    else:
        lines.append("- no measured peak: model_steps did not finish")
    return lines, dict(plan={k: v for k, v in plan.items() if isinstance(v, (int, float, str))}, measured_peak=peak)


def part_distill_step(dry: bool):
    folder = tempfile.mkdtemp(prefix="gpu_check_")
    try:
        steps, batch_tokens = (3, 256) if dry else (6, FULL_BATCH_TOKENS)
        extra = ["--ensemble_size", "2", "--distill_alpha", "0.5", "--distill_temperature", "2"]
        if not dry:
            # the preset's width, fewer layers (and the default loop range for them): two compiles fit the time budget
            extra += ["--n_layer", "8", "--loop_range", ""]
        flags = model_flags(dry, folder, "distill_step", steps, batch_tokens, extra)
        rows, log_text = run_train_gpt(flags)
        members = [step_figures([r for r in rows if r.get("member", 0) == m]) for m in (0, 1)]
        distilling = [line for line in log_text.splitlines() if "distilling from" in line]
        if not distilling:
            raise RuntimeError("member 2 did not log that it distils from a teacher")
        overhead = members[1]["ms_per_step"] / members[0]["ms_per_step"]
        lines = [f"`python train_gpt.py {shlex.join(flags)}` (the data paths were temporary)", "",
                 "| member | ms/step (median) | tokens/s | peak memory | compile s |", "|---|---|---|---|---|"]
        for index, figures in enumerate(members):
            lines.append(f"| {index + 1}{' (teacher: member 1)' if index else ''} | {figures['ms_per_step']:.1f} | "
                         f"{figures['tokens_per_second']:,.0f} | {figures['peak_memory_bytes'] / 2**30:.2f} GiB | "
                         f"{figures['compile_seconds']} |")
        lines += ["", f"- member 2's step / member 1's: {overhead:.2f}x (the teacher's eager forward and its logits)"]
        return lines, dict(members=members, overhead=overhead)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def part_fp8_head(dry: bool):
    """fp8_head (records/TRACKS.md F14f) next to the bf16 path of the same loss: one lm_head of the 15min shape
    (width 1024, vocab 50,304) over 8,192 rows, weights (1, 0.5, 0.25). The dry run simulates the fp8 matmuls on
    CPU (train_gpt.fp8_matmul). Raises when the loss differs by 2e-3 per row or more."""
    import torch
    import torch.nn.functional as F
    import train_gpt
    device = torch.device("cpu" if dry else "cuda")
    rows, width, vocab = (64, 64, DRY_VOCAB) if dry else (8192, 1024, 50304)
    generator = torch.Generator().manual_seed(0)
    features = train_gpt.rms_norm(torch.randn(rows, width, generator=generator)).to(device, torch.bfloat16)
    weight = (0.02 * torch.randn(vocab, width, generator=generator)).to(device)
    targets = torch.randint(0, vocab, (rows,), generator=generator).to(device)
    weights = (1.0, 0.5, 0.25)
    shifted = torch.stack([F.pad(targets[k:], (0, k), value=-1) for k in range(len(weights))])
    results = {}

    def run(fp8: bool):
        x, w = features.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        if fp8:
            objective, _ = train_gpt.MultiOffsetLoss.apply(x, w, shifted, weights, 15.0, 1024)
        else:
            logits = F.linear(x, w.to(x.dtype))  # bf16 logits, as autocast makes them
            objective, _ = train_gpt.MultiOffsetLoss.apply(logits, None, shifted, weights, 15.0, 1024)
        (objective / rows).backward()
        results[fp8] = (objective.item() / rows, x.grad.float(), w.grad.float())

    lines = [f"shape: {rows} rows x width {width} x vocab {vocab}, offsets weighted (1, 0.5, 0.25), soft-cap 15"
             + (" (DRY: fp8 matmuls simulated on CPU)" if dry else ""), "",
             "| bench | path | ms fwd+bwd | peak memory | vs reference |", "|---|---|---|---|---|"]
    rows_md, data = bench_table({"bf16 (reference)": lambda: run(False), "fp8 e4m3/e5m2": lambda: run(True)},
                                device, 2 if dry else 5, "multi-offset loss")
    difference = abs(results[True][0] - results[False][0])
    cosines = [F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
               for a, b in zip(results[True][1:], results[False][1:])]
    data.update(loss_bf16=results[False][0], loss_fp8=results[True][0], loss_difference_per_row=difference,
                grad_input_cosine=cosines[0], grad_weight_cosine=cosines[1])
    lines += rows_md + ["", f"loss per row: bf16 {results[False][0]:.5f}, fp8 {results[True][0]:.5f}, |difference| "
                        f"{difference:.2e} (accepted below 2e-3) | gradient cosine fp8 vs bf16: input "
                        f"{cosines[0]:.4f}, weight {cosines[1]:.4f}"]
    if not difference < 2e-3:
        raise RuntimeError(f"fp8_head loss differs from the bf16 path by {difference:.2e} per row (limit 2e-3)")
    return lines, data


PART_FUNCTIONS = {"environment": part_environment, "triton_kernels": part_triton_kernels,
                  "fused_loss": part_fused_loss, "distill_loss": part_distill_loss, "attention": part_attention,
                  "model_steps": part_model_steps, "memory_plan": part_memory_plan, "distill_step": part_distill_step,
                  "fp8_head": part_fp8_head}


# ----------------------------------------------------------------------------------------------------------------------
# Driver: each part in a forked child (its output to a file, its result as JSON), one timeout each


def run_part_in_child(name: str, dry: bool, results: dict, result_path: str, output_path: str) -> None:
    """The child: stdout and stderr to output_path, the part's (lines, figures) or its error to result_path."""
    with open(output_path, "w", encoding="utf-8") as handle:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
    start = time.time()
    try:
        function = PART_FUNCTIONS[name]
        lines, data = function(dry, results) if name == "memory_plan" else function(dry)
        payload = dict(status="ok", lines=lines, data=data)
    except BaseException as error:  # noqa: BLE001 -- every failure is reported, never raised
        traceback.print_exc()
        payload = dict(status="error", error=f"{type(error).__name__}: {error}"[:2000], lines=[], data={})
    payload["seconds"] = round(time.time() - start, 1)
    with open(result_path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, default=str)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_part(name: str, timeout: float, dry: bool, results: dict, scratch: str, log) -> dict:
    result_path, output_path = os.path.join(scratch, f"{name}.json"), os.path.join(scratch, f"{name}.out")
    child = multiprocessing.get_context("fork").Process(target=run_part_in_child,
                                                        args=(name, dry, results, result_path, output_path))
    start = time.time()
    child.start()
    child.join(timeout)
    if child.is_alive():
        child.kill()
        child.join()
        result = dict(status="timeout", error=f"no result within {timeout:.0f} s: killed", lines=[], data={})
    elif os.path.isfile(result_path):
        with open(result_path, encoding="utf-8") as handle:
            result = json.load(handle)
    else:
        result = dict(status="crashed", error=f"the process died (exit code {child.exitcode}) before reporting",
                      lines=[], data={})
    result["seconds"] = round(time.time() - start, 1)
    output = open(output_path, encoding="utf-8", errors="replace").read() if os.path.isfile(output_path) else ""
    log.write(f"==================== {name}: {result['status']} in {result['seconds']} s\n{output}\n")
    log.flush()
    return result


def report(results: dict, dry: bool, started: str, budget: float) -> str:
    lines = [f"# gpu_check results{' (DRY RUN on CPU: plumbing only, no GPU figure)' if dry else ''}", "",
             f"Made by `bash bench/gpu_check.sh{' --dry-run' if dry else ''}` at {started} (UTC), commit "
             f"{git_commit()}, time budget {budget:.0f} s. Unedited output; full logs in gpu_check.log.", "",
             "| part | status | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {r['status']} | {r['seconds']} |" for name, r in results.items()]
    for name, result in results.items():
        lines += ["", f"## {name}: {result['status']}", ""]
        if result.get("error"):
            lines += ["```", result["error"], "```"]
        lines += result.get("lines", [])
    return "\n".join(lines) + "\n"


def git_commit() -> str:
    try:
        import train_gpt
        return train_gpt.git_commit() or "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes (also GPU_CHECK_DRY_RUN=1)")
    parser.add_argument("--out", default="", help="output folder (default: $OUT, else logs/gpu_check)")
    parser.add_argument("--budget", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET_S", 500)),
                        help="seconds for all parts together (default 500: under 9 minutes with start-up)")
    parser.add_argument("--only", default="", help="comma-separated parts (default: all)")
    args = parser.parse_args(argv)
    dry = args.dry_run or os.environ.get("GPU_CHECK_DRY_RUN") == "1"
    if dry:  # Triton on CPU runs interpreted; set before anything imports triton
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = args.out or os.environ.get("OUT") or os.path.join(REPO_ROOT, "logs", "gpu_check")
    os.makedirs(out, exist_ok=True)
    names = [n for n in args.only.split(",") if n] or [name for name, _ in PARTS]
    unknown = set(names) - set(PART_FUNCTIONS)
    if unknown:
        parser.error(f"unknown part(s) {sorted(unknown)}; known: {', '.join(PART_FUNCTIONS)}")
    import train_gpt  # noqa: F401 -- imported once here (no CUDA call: the children fork from this process)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    deadline = time.time() + args.budget
    results: dict = {}
    scratch = tempfile.mkdtemp(prefix="gpu_check_parts_")
    with open(os.path.join(out, "gpu_check.log"), "w", encoding="utf-8") as log:
        for name, timeout in PARTS:
            if name not in names:
                continue
            left = deadline - time.time()
            if left < 10:
                results[name] = dict(status="skipped", error=f"the {args.budget:.0f} s budget was spent", lines=[],
                                     data={}, seconds=0)
            else:
                results[name] = run_part(name, min(timeout * (0.5 if dry else 1.0), left), dry, results, scratch, log)
            result = results[name]
            summary = result.get("error") or (result["lines"][-1] if result["lines"] else "")
            print(f"gpu_check | {name}: {result['status']} ({result['seconds']} s) | {summary[:300]}", flush=True)
            with open(os.path.join(out, "gpu_check.json"), "w", encoding="utf-8") as handle:  # kept current
                json.dump(dict(dry_run=dry, started=started, parts=results), handle, indent=1, default=str)
            with open(os.path.join(out, "GPU_RESULTS.md"), "w", encoding="utf-8") as handle:
                handle.write(report(results, dry, started, args.budget))
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"gpu_check | wrote {out}/GPU_RESULTS.md, gpu_check.json, gpu_check.log", flush=True)
    return 0 if all(r["status"] == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
