"""The ensemble bench on the CPU mini-slowrun: ensemble val loss against K, chain-distilled against independent
members, a snapshot ensemble against independent members at the same compute, and a held-out test split beside
val. Writes its section of bench/RESULTS.md with the commands that made it.

    python bench/ensemble.py                    # the full bench (2 CPU cores: see bench/README.md for the time)
    python bench/ensemble.py --max_steps 4 --max_k 2 --chain_k 2 --out /tmp/r.md   # a smoke test of the machinery

Members are the tiny preset trained for --epochs epochs each. The bundled sample has no test split, so the bench
cuts the bundled val file at a document boundary into a val half (scored after every member) and a test half
(scored once at the end), written to bench/runs/<stamp>/data/. Runs land in bench/runs/<stamp>/ (git-ignored)."""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import train_gpt  # noqa: E402
from bench.results_file import train_run, write_section  # noqa: E402


def split_val_for_test(val_path: str, out_dir: str, bos_id: int) -> tuple[str, str]:
    """The bundled val file cut at the document start nearest its middle: (val half, test half)."""
    tokens = train_gpt.read_shard(val_path)
    starts = train_gpt.document_starts(tokens, bos_id)
    cut = int(starts[np.argmin(np.abs(starts - tokens.size // 2))])
    os.makedirs(out_dir, exist_ok=True)
    paths = os.path.join(out_dir, "val_half.bin"), os.path.join(out_dir, "test_half.bin")
    train_gpt.write_shard(paths[0], tokens[:cut])
    train_gpt.write_shard(paths[1], tokens[cut:])
    return paths


def run(name: str, flags: list[str], folder: str) -> tuple[dict, str]:
    result, seconds = train_run(["--preset", "tiny", *flags], folder, name)
    print(f"{name}: val {result['val_loss']:.4f} test {result['test_loss']:.4f} ({seconds:.0f} s)",
          flush=True)
    shown = " ".join(shlex.quote(a) for a in ["python", "train_gpt.py", "--preset", "tiny", *flags])
    return result, shown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2, help="epochs per member (default 2)")
    parser.add_argument("--max_k", type=int, default=8, help="members of the independent ensemble (default 8)")
    parser.add_argument("--chain_k", type=int, default=4, help="members of the distillation chain (default 4)")
    parser.add_argument("--alpha", type=float, default=0.5, help="distillation alpha of the chain")
    parser.add_argument("--temperature", type=float, default=2.0, help="distillation temperature of the chain")
    parser.add_argument("--max_steps", type=int, default=0, help="cap each member's steps (smoke tests; 0 = off)")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "bench", "RESULTS.md"))
    args = parser.parse_args(argv)
    os.chdir(REPO_ROOT)  # paths below are relative to the repository, so the commands shown work in any clone

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = os.path.join("bench", "runs", f"ensemble-{stamp}")  # relative to the repo: the commands shown work anywhere
    preset = train_gpt.PRESETS["tiny"]
    val_half, test_half = (os.path.relpath(path, REPO_ROOT) for path in split_val_for_test(
        os.path.join(REPO_ROOT, preset["val_files"]), os.path.join(folder, "data"), train_gpt.Hyperparameters.bos_id))
    common = ["--num_epochs", str(args.epochs), "--val_files", val_half, "--test_files", test_half,
              "--save_model", "false", "--checkpoint_every", "-1"]
    cap = ["--max_steps", str(args.max_steps)] if args.max_steps else []
    start = time.time()
    independent, independent_cmd = run("independent", common + cap + ["--ensemble_size", str(args.max_k)], folder)
    chain, chain_cmd = run("chain", common + cap + ["--ensemble_size", str(args.chain_k), "--distill_alpha",
                                              str(args.alpha), "--distill_temperature", str(args.temperature)], folder)
    # the same compute as chain_k independent members: one member trained chain_k times as long, in chain_k cycles
    snapshot_flags = ["--num_epochs", str(args.epochs * args.chain_k), "--snapshot_cycles", str(args.chain_k),
                      *common[2:], *(["--max_steps", str(args.max_steps * args.chain_k)] if args.max_steps else [])]
    snapshot, snapshot_cmd = run("snapshot", snapshot_flags, folder)
    minutes = (time.time() - start) / 60

    k_losses = independent["ensemble_val_losses"]
    lines = [
        "## Ensembles on the CPU mini-slowrun", "",
        f"Made {datetime.datetime.now():%Y-%m-%d %H:%M} in {minutes:.0f} min by `python bench/ensemble.py "
        f"{' '.join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))}` | torch "
        f"{train_gpt.torch.__version__} | git {train_gpt.git_commit() or 'none'}. Members: the tiny preset, "
        f"{args.epochs} epochs each, seeds seed + 1000 k. Val = the first half of the bundled val file, test = its "
        f"second half (cut at a document boundary; scored once, at the end). Loss in nats/token.", "",
        "### Ensemble size (independent members, probability averaging)", "",
        "| K | ensemble val | member K alone |", "|---|---|---|",
        *[f"| {k + 1} | {loss:.4f} | {independent['member_val_losses'][k]:.4f} |" for k, loss in enumerate(k_losses)],
        "", f"Test split, K = {args.max_k}: {independent['test_loss']:.4f} (val {independent['val_loss']:.4f}).",
        f"Command: `{independent_cmd}`", "",
        f"### Chain distillation vs independent members, K = {args.chain_k}", "",
        "| ensemble | val | test | members alone (val) |", "|---|---|---|---|",
        f"| independent (first {args.chain_k} of the run above) | {k_losses[args.chain_k - 1]:.4f} | - | "
        + ", ".join(f"{v:.4f}" for v in independent["member_val_losses"][:args.chain_k]) + " |",
        f"| chain, alpha {args.alpha}, T {args.temperature}, teacher = previous member | {chain['val_loss']:.4f} | "
        f"{chain['test_loss']:.4f} | " + ", ".join(f"{v:.4f}" for v in chain["member_val_losses"]) + " |",
        "", f"Command: `{chain_cmd}`", "",
        f"### Snapshot ensemble vs independent members at the same compute ({args.chain_k} x {args.epochs} epochs)",
        "",
        "| ensemble | val | test | candidates alone (val) |", "|---|---|---|---|",
        f"| {args.chain_k} independent members | {k_losses[args.chain_k - 1]:.4f} | - | "
        + ", ".join(f"{v:.4f}" for v in independent["member_val_losses"][:args.chain_k]) + " |",
        f"| 1 member, {args.chain_k} snapshot cycles | {snapshot['val_loss']:.4f} | {snapshot['test_loss']:.4f} | "
        + ", ".join(f"{v:.4f}" for v in snapshot["candidate_val_losses"]) + " |",
        "", f"Command: `{snapshot_cmd}`",
    ]
    write_section(args.out, "ensemble", "\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
