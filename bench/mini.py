"""
The mini-slowrun bench (issue 17): the reference curve of the `mini` track and the method's tables, on one CPU thread.

    python bench/mini.py curve                    # plain training at 1/16 .. 1 of the track's data, 3 sizes x epochs
    python bench/mini.py curve --build            # records/mini/reference_curve.json + table + plot from finished runs
    python bench/mini.py grid NAME --budget 8 --runs 'wd0:--muon_wd 0' 'wd1:--muon_wd 1.0' ...   # any table at 1/8

Every run is `train_gpt.py --preset mini` plus flags, one after another, with OMP_NUM_THREADS=1 (the machine is
shared), in bench/runs/mini/<run_id>/ ; a run whose result.json exists is not run again, so a killed bench resumes.

Data efficiency, by the public slowrun's own method (github.com/qlabs-eng/slowrun data_eff/README.md): at each train
budget the reference is the best val loss over several model sizes (and, here, epoch counts) of plain training;
a run's loss is placed on that curve by piecewise-linear interpolation between the budgets, which gives the budget B
at which plain training reaches it, and the run's data efficiency is B / (its own budget). `data_efficiency` is
that function; records.py can call it with the points of records/mini/reference_curve.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.path.join(REPO_ROOT, "bench", "runs", "mini")
TRACK_BYTES = 262144  # the mini preset's --train_tokens: the track's whole budget ("1" on the curve)
BUDGETS = (16, 8, 4, 2, 1)  # the curve's budgets, as 1/N of the track's data
SIZES = {"s": "--n_layer 2 --n_embd 64 --n_head 2", "m": "--n_layer 3 --n_embd 96 --n_head 3",
         "l": "--n_layer 4 --n_embd 128 --n_head 4"}


# ----------------------------------------------------------------------------------------------------------------------
# Data efficiency


def reference_budget(points: list[tuple[float, float]], loss: float) -> float | None:
    """The budget at which the reference curve reaches `loss`, linear in the budget between neighbouring points
    (slowrun data_eff). points: (budget, best loss) sorted by budget, losses falling. None when the loss lies off
    the curve (below its last point or above its first): that is a bound, never an extrapolation."""
    if any(b1 <= b0 or l1 >= l0 for (b0, l0), (b1, l1) in zip(points, points[1:])):
        raise ValueError(f"reference points must rise in budget and fall in loss: {points}")
    if not points or loss < points[-1][1] or loss > points[0][1]:
        return None
    for (b0, l0), (b1, l1) in zip(points, points[1:]):
        if l1 <= loss <= l0:
            return b0 + (l0 - loss) / (l0 - l1) * (b1 - b0)
    return points[0][0]  # a single point equal to the loss


def data_efficiency(points: list[tuple[float, float]], loss: float, budget: float) -> tuple[str, float]:
    """(relation, multiple) of a run with this loss trained on `budget`: ("=", B / budget) on the curve; (">", last
    budget / budget) when it beats every reference point; ("<", first budget / budget) when it is worse than all."""
    matched = reference_budget(points, loss)
    if matched is not None:
        return "=", matched / budget
    if loss < points[-1][1]:
        return ">", points[-1][0] / budget
    return "<", points[0][0] / budget


def format_efficiency(relation: str, multiple: float) -> str:
    return f"{multiple:.2f}x" if relation == "=" else f"{relation} {multiple:.2f}x"


# ----------------------------------------------------------------------------------------------------------------------
# Runs


def run(run_id: str, flags: str, log) -> dict:
    """One train_gpt.py --preset mini run on one thread (skipped when its result.json exists); its result.json."""
    result_path = os.path.join(RUNS, run_id, "result.json")
    if not os.path.isfile(result_path):
        command = [sys.executable, os.path.join(REPO_ROOT, "train_gpt.py"), "--preset", "mini", "--log_dir", RUNS,
                   "--run_id", run_id, "--save_model", "false", "--val_every", "-1", *flags.split()]
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        log(f"run {run_id}: {' '.join(command[2:])}")
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            log(f"run {run_id} FAILED rc {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
            return {}
    with open(result_path) as handle:
        result = json.load(handle)
    log(f"  {run_id}: val {result['val_loss']:.4f} test {result['test_loss']:.4f} bpb {result.get('val_bpb')} "
        f"train_tokens {result['train_tokens']} train {result['train_seconds']:.0f}s")
    return result


def curve_runs(epochs: dict[int, list[int]]) -> list[tuple[int, str, int, str]]:
    """(budget N, size, epochs, run_id) of the reference grid."""
    return [(n, size, e, f"ref_b{n}_{size}_e{e}") for size in SIZES for n in BUDGETS for e in epochs[n]]


# ----------------------------------------------------------------------------------------------------------------------
# Main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/mini.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    curve = sub.add_parser("curve", help="the reference curve: plain runs at every budget, size and epoch count")
    curve.add_argument("--epochs", default="16:16,32;8:8,16;4:4,8;2:2,4;1:1,2",
                       help="epoch counts per budget, 'N:e1,e2;...' (1/N of the data)")
    curve.add_argument("--sizes", default="s,m,l")
    curve.add_argument("--build", action="store_true", help="only build the curve, table and plot from finished runs")
    grid = sub.add_parser("grid", help="a list of named runs at one budget")
    grid.add_argument("name")
    grid.add_argument("--budget", type=int, default=8, help="1/N of the track's data (default 8)")
    grid.add_argument("--runs", nargs="+", required=True, help="'label:flags' items")
    args = parser.parse_args(argv)
    os.makedirs(RUNS, exist_ok=True)
    log_path = os.path.join(RUNS, "bench.log")

    def log(text: str) -> None:
        print(text, flush=True)
        with open(log_path, "a") as handle:
            handle.write(text + "\n")

    if args.command == "curve":
        epochs = {int(n): [int(e) for e in es.split(",")]
                  for n, es in (item.split(":") for item in args.epochs.split(";"))}
        sizes = args.sizes.split(",")
        results = {}
        for n, size, e, run_id in curve_runs(epochs):
            if size not in sizes:
                continue
            if args.build and not os.path.isfile(os.path.join(RUNS, run_id, "result.json")):
                continue
            flags = f"--train_tokens {TRACK_BYTES // n} --num_epochs {e} {SIZES[size]}"
            results[run_id] = (n, size, e, run(run_id, flags, log))
        return 0
    for item in args.runs:
        label, _, flags = item.partition(":")
        run(f"{args.name}_{label}", f"--train_tokens {TRACK_BYTES // args.budget} {flags}", log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
