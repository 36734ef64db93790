"""Each fast path of train_gpt's Kernels section against its reference: time (median ms of forward + backward) and
peak memory, at the full-scale shape (seq 2048, vocab 50,304, width 2048) on CUDA.

    python bench/kernels.py                          # CUDA: full scale, device batch 4 (8,192 rows of the lm_head)
    python bench/kernels.py --small                  # a reduced shape (the default on CPU, and said so in the output)
    python bench/kernels.py --only loss --rows 512   # one bench, a chosen shape

Benches: `loss` (soft-capped CE: eager F.cross_entropy on float32 logits vs the chunked PyTorch reference vs the
Triton kernel), `distill` (the same with a teacher's temperature KL, alpha 0.5, T 2), `attention` (SDPA with the
dense window + document mask vs FlexAttention, and plain causal SDPA for scale). On CPU, peak memory is not
measured (n/a), Triton is skipped (it interprets on CPU: far too slow to time) and FlexAttention has no backward,
so only its forward is timed. Prints a markdown table; --out also writes it with the command that made it."""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402

import train_gpt  # noqa: E402

FULL = dict(rows=4 * 2048, vocab=50304, width=2048, seq=2048, heads=16, batch=4)
SMALL = dict(rows=256, vocab=50304, width=256, seq=512, heads=4, batch=1)


def timed(fn, device: torch.device, repeats: int) -> tuple[float, float | None]:
    """(median ms per call, peak bytes allocated during one call, None on CPU) after one warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(1000 * (time.perf_counter() - start))
    peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
    return statistics.median(times), peak


def loss_benches(shape: dict, device: torch.device, distill: bool, softcap: float = 10.0):
    """name -> a callable running forward + backward of one loss path on the same raw logits (bf16 on CUDA)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator(device=device).manual_seed(0)
    rows, vocab, width = shape["rows"], shape["vocab"], shape["width"]
    raw = (4 * torch.randn(rows, vocab, device=device, generator=generator)).to(dtype).requires_grad_(True)
    targets = torch.randint(0, vocab, (rows,), device=device, generator=generator)
    teachers, features, alpha, temperature = None, None, 0.5, 2.0
    if distill:
        head = torch.nn.Linear(width, vocab, bias=False, device=device, dtype=dtype)

        class Teacher:  # GPT.head's shape: soft-capped float32 logits from final features
            @staticmethod
            def head(feature):
                return softcap * torch.tanh(head(feature).float() / softcap)

        teachers = [(Teacher, 1.0)]
        features = [torch.randn(1, rows, width, device=device, dtype=dtype, generator=generator)]

    def eager():
        logits = raw.float()
        logits = softcap * torch.tanh(logits / softcap)
        if distill:
            loss = train_gpt.distillation_loss_sum(logits.unsqueeze(0), teachers, features, targets.unsqueeze(0),
                                                   alpha, temperature, chunk=512)
        else:
            loss = train_gpt.cross_entropy_sum(logits, targets)
        loss.backward()
        raw.grad = None

    def fused(backend):
        def run():
            extra = dict(teacher_rows=train_gpt.teacher_rows(teachers, features, temperature), alpha=alpha,
                         temperature=temperature, chunk_rows=512) if distill else {}
            objective, _ = train_gpt.fused_loss_sums(raw, targets, softcap, backend, **extra)
            objective.backward()
            raw.grad = None
        return run

    benches = {"eager (reference)": eager, "chunked PyTorch": fused("chunked")}
    if device.type == "cuda" and train_gpt.fused_loss_available(device):
        benches["Triton fused"] = fused("triton")
    return benches


def attention_benches(shape: dict, device: torch.device, window: int):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch, heads, seq, head_dim = shape["batch"], shape["heads"], shape["seq"], shape["width"] // shape["heads"]
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype, generator=generator)
               .requires_grad_(device.type == "cuda") for _ in range(3))
    idx = torch.randint(0, 50000, (batch, seq), device=device, generator=generator)
    idx[:, ::700] = 50256  # a document start every 700 tokens
    documents = train_gpt.document_ids(idx, 50256)
    dense = train_gpt.attention_mask_dense(seq, window, documents, device)
    block = train_gpt.flex_block_mask(seq, window, documents, device)
    backward = device.type == "cuda"

    def run(mask, attend=train_gpt.attend):
        def call():
            with torch.set_grad_enabled(backward):
                out = attend(q, k, v, mask)
                if backward:
                    out.float().sum().backward()
                    for t in (q, k, v):
                        t.grad = None
        return call

    benches = {"SDPA, dense window+document mask (reference)": run(dense),
               "SDPA causal, no mask (for scale)": run(None)}
    if device.type == "cuda":
        from torch.nn.attention.flex_attention import flex_attention
        compiled = torch.compile(flex_attention)
        benches["FlexAttention (compiled), same mask"] = run(block, lambda q, k, v, m: compiled(q, k, v, block_mask=m))
    else:
        benches["FlexAttention (eager, forward only on CPU)"] = run(block)
    return benches


def muon_benches(shape: dict, device: torch.device, steps: int = 5):
    """One orthogonalisation (Polar Express, 5 steps) of a width x 4 width MLP matrix: plain matmuls, compiled, and
    the symmetric Gram kernel (CUDA only: interpreted Triton on CPU is far too slow to time)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator(device=device).manual_seed(0)
    grad = torch.randn(shape["width"], 4 * shape["width"], device=device, dtype=dtype, generator=generator)
    orthogonalize = train_gpt.polar_express_orthogonalize
    benches = {"Polar Express, plain matmuls (reference)": lambda: orthogonalize(grad, steps)}
    if device.type == "cuda":
        compiled = torch.compile(orthogonalize, dynamic=False)
        benches["Polar Express, torch.compile (--muon_compile on)"] = lambda: compiled(grad, steps)
        benches["Polar Express, symmetric Gram kernel (--muon_gram triton)"] = lambda: orthogonalize(
            grad, steps, gram=train_gpt.symmetric_gram_triton)
    return benches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="the reduced shape (the default on CPU)")
    parser.add_argument("--only", default="loss,distill,attention,muon", help="comma-separated benches to run")
    parser.add_argument("--rows", type=int, default=0, help="lm_head rows (batch x seq) for the loss benches")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--window", type=int, default=1024, help="the short window of the attention bench")
    parser.add_argument("--out", default="", help="also write the table (markdown) here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = args.small or device.type == "cpu"
    shape = dict(SMALL if small else FULL)
    if args.rows:
        shape["rows"] = args.rows
    window = min(args.window, shape["seq"] // 2)
    lines = [f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'} | torch "
             f"{torch.__version__} | shape: {'REDUCED (' + ('--small' if args.small else 'CPU default') + ')' if small else 'full scale'} "
             f"{shape} | window {window}", "",
             "| bench | path | ms (median fwd+bwd) | peak memory | vs the first (reference) row |", "|---|---|---|---|---|"]
    for name in args.only.split(","):
        if name in ("loss", "distill"):
            benches = loss_benches(shape, device, distill=name == "distill")
        elif name == "attention":
            benches = attention_benches(shape, device, window)
        elif name == "muon":
            benches = muon_benches(shape, device)
        else:
            parser.error(f"unknown bench {name!r}")
        reference = None
        for path, fn in benches.items():
            ms, peak = timed(fn, device, args.repeats)
            ratio = "-" if reference is None else f"speed {reference[0] / ms:.2f}x" + (
                f", memory / {reference[1] / peak:.2f}" if peak else "")
            reference = reference or (ms, peak)
            lines.append(f"| {name} | {path} | {ms:.1f} | {f'{peak / 2**20:.0f} MiB' if peak is not None else 'n/a'} "
                         f"| {ratio} |")
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(f"    python {' '.join(shlex.quote(a) for a in ['bench/kernels.py', *(argv or sys.argv[1:])])}\n\n"
                         f"{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
