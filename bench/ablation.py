"""The mini-slowrun ablation: the tiny preset on the bundled FineWeb-Edu sample, every record technique on, then
each switched off in turn, over 2 seeds; writes a markdown table of final val loss to bench/RESULTS.md.
`--mode add` asks the converse question: plain training, then plain plus each technique alone.

    python bench/ablation.py                           # the ablation (85 min on 2 CPU cores; see bench/README.md)
    python bench/ablation.py --max_steps 2 --seeds 0   # a smoke test of the machinery (seconds per run)
    python bench/ablation.py --only xsa,normuon        # a subset of the techniques
    python bench/ablation.py --mode add                # plain, then plain + one technique at a time
    python bench/ablation.py --rebuild bench/runs/STAMP  # rewrite the table of an earlier (or killed) bench

Each run is `python train_gpt.py --preset tiny <ALL_ON> [--<flag> <off value>] --seed S` in a fresh process; the
runs land in bench/runs/<stamp>/ (git-ignored: delete them freely)."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import train_gpt  # noqa: E402
from bench.results_file import train_run, write_section  # noqa: E402

# Settings shared by every configuration: weight decay the records use heavily (1.3-1.6), so that cautious weight
# decay has something to act on; 0.5 at tiny scale. Not a technique, so never switched off.
COMMON = dict(muon_wd=0.5)

# Each technique with its "on" setting at tiny scale; switching it off means its Hyperparameters default.
TECHNIQUES = dict(
    value_proj=True, unet_skips=True, attn_gate=True, resid_mix=True, xsa="learned", stochastic_depth=0.1,
    mtp_weight=0.3, loop_repeats=1, window_pattern="SSSL", head_mix=True,
    muon_polar_express=True, muon_eq_r=True, normuon=True, cautious_wd=True, ema_decay=0.95,
    window_warmup_frac=0.5, batch_schedule="0.5,1",
)
# Sub-settings that go with a technique (harmless when it is off).
SUB_SETTINGS = dict(loop_start_frac=0.5, ema_start_frac=0.5, ema_every=1)
# Techniques that act on another one: switched off with it, switched on with it.
NEEDS = dict(window_warmup_frac="window_pattern")


def flags_of(settings: dict) -> list[str]:
    flags = []
    for name, value in settings.items():
        flags += [f"--{name}", str(value)]
    return flags


def run_one(name: str, settings: dict, seed: int, folder: str, extra: list[str]) -> dict:
    """One training run in a fresh process; returns its result.json plus the wall time."""
    run_id = f"{name}-seed{seed}"
    result, seconds = train_run(["--preset", "tiny", *flags_of(settings), "--seed", str(seed), "--save_model", "false",
                                 *extra], folder, run_id)
    result["bench_seconds"] = seconds
    print(f"{run_id}: val_loss {result['val_loss']:.4f} ({result['bench_seconds']:.0f}s)", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    parser.add_argument("--only", default="", help="comma-separated techniques to ablate (default: all)")
    parser.add_argument("--mode", choices=("drop", "add"), default="drop",
                        help="drop: all on, then each off (default); add: plain, then each alone on top of plain")
    parser.add_argument("--max_steps", type=int, default=0, help="cap every run at this many steps (0 = the preset's)")
    # The default setting fits the 90 minutes of 2 CPU cores for 19 configurations x 2 seeds (~2 min a run): the
    # tiny track's first quarter of the sample for 4 epochs (16 steps). `--train_tokens 0 --num_epochs 0` is the
    # tiny preset itself (all of the sample, 3 epochs: ~4 min a run, about 2.5 hours for the whole table).
    parser.add_argument("--num_epochs", type=int, default=4, help="epochs per run (0 = the tiny preset's; default 4)")
    parser.add_argument("--train_tokens", type=int, default=35027,
                        help="train on this prefix of the sample (0 = all; default 35027 = the tiny track's quarter)")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "bench", "RESULTS.md"), help="the table's file")
    parser.add_argument("--rebuild", default="",
                        help="a bench/runs/<stamp> folder of an earlier bench (finished or interrupted): rewrite its "
                             "table from the runs' result.json files, training nothing (give its other flags again)")
    args = parser.parse_args(argv)

    seeds = [int(s) for s in args.seeds.split(",") if s]
    ablated = [t for t in args.only.split(",") if t] or list(TECHNIQUES)
    unknown = [t for t in ablated if t not in TECHNIQUES]
    if unknown:
        parser.error(f"unknown technique(s) {', '.join(unknown)}; known: {', '.join(TECHNIQUES)}")
    defaults = {f.name: f.default for f in train_gpt.dataclasses.fields(train_gpt.Hyperparameters)}
    extra = (["--max_steps", str(args.max_steps)] if args.max_steps else []) + \
            (["--num_epochs", str(args.num_epochs)] if args.num_epochs else []) + \
            (["--train_tokens", str(args.train_tokens)] if args.train_tokens else [])

    all_on = {**COMMON, **TECHNIQUES, **SUB_SETTINGS}
    plain = dict(COMMON)
    if args.mode == "drop":
        configs = [("all-on", all_on)] + [
            (f"no-{t}", {**all_on, **{d: defaults[d] for d in [t] + [d for d, n in NEEDS.items() if n == t]}})
            for t in ablated] + [("plain (all off)", plain)]
    else:  # the first row is the reference of the delta column, so plain comes first here
        configs = [("plain (all off)", plain)] + [
            (f"only-{t}", {**plain, **SUB_SETTINGS, **{n: TECHNIQUES[n] for n in [NEEDS.get(t, t), t]}})
            for t in ablated] + [("all-on", all_on)]
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = args.rebuild or os.path.join(REPO_ROOT, "bench", "runs", stamp)
    start = time.time()
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join(shlex.quote(a) for a in ["python", "bench/ablation.py", *given])
    reference, sign_meaning = (("all-on", "switching the technique off hurts (the technique helps)")
                               if args.mode == "drop" else
                               ("plain", "adding the technique alone hurts (negative: it helps)"))
    title = ("every technique on, then each off in turn" if args.mode == "drop"
             else "plain training, then one technique at a time on top")

    results: list[dict] = []  # every run's result.json, for the header's versions and times

    def write_table(rows: list[tuple[str, list[float]]]) -> None:
        """The table so far: rewritten after every configuration, so an interrupted bench keeps what it measured."""
        done = len(rows) == len(configs)
        base_losses = rows[0][1]
        base = statistics.mean(base_losses)
        commits = sorted({r.get("git_commit") or "none" for r in results})
        torch_versions = sorted({r.get("torch", "?") for r in results})
        if args.rebuild:  # the runs' own training time; the bench's wall clock is not in their files
            timing = (f"Table rebuilt {datetime.datetime.now():%Y-%m-%d %H:%M} from the runs in `{folder}`; their "
                      f"wall times add up to {sum(r['wall_seconds'] for r in results) / 60:.1f} min")
        else:
            timing = f"Made {datetime.datetime.now():%Y-%m-%d %H:%M} in {(time.time() - start) / 60:.1f} min"
        lines = [
            f"## Mini-slowrun ablation: {title}", "",
            f"Command: `{command}`  ",
            f"{timing} | torch {', '.join(torch_versions)} | git {', '.join(commits)} (the runs')"
            + ("" if done else f" | **incomplete: {len(rows)} of {len(configs)} configurations so far**") + "  ",
            f"All-on settings: `{' '.join(flags_of(all_on))}` on top of `--preset tiny`"
            + (f" and `{' '.join(extra)}`" if extra else "") + ".", "",
            "Final val loss (nats/token). Spread = max - min over the seeds. "
            f"Delta = mean - {reference} mean: positive means {sign_meaning}. Per seed: the same difference seed by "
            f"seed (same initialisation and data order as the {reference} run of that seed): a seed shifts every "
            "configuration alike, so these paired deltas are the sharper test; where their signs disagree, the "
            "technique's effect is below this setting's noise.", "",
            "| config | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | spread | delta | per seed |",
            "|---|" + "---|" * (len(seeds) + 4),
        ]
        for name, losses in rows:
            mean = statistics.mean(losses)
            paired = " / ".join(f"{v - b:+.4f}" for v, b in zip(losses, base_losses))
            lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in losses) +
                         f" | {mean:.4f} | {max(losses) - min(losses):.4f} | {mean - base:+.4f} | {paired} |")
        write_section(args.out, "ablation" if args.mode == "drop" else "ablation_add", "\n".join(lines))

    rows = []
    for name, settings in configs:
        losses = []
        for seed in seeds:
            if args.rebuild:
                path = os.path.join(folder, f"{name}-seed{seed}", "result.json")
                if not os.path.isfile(path):
                    print(f"{path} missing: the table stops before {name}")
                    break
                with open(path) as handle:
                    results.append(json.load(handle))
                expected = {**settings, **({"num_epochs": args.num_epochs} if args.num_epochs else {}),
                            **({"train_tokens": args.train_tokens} if args.train_tokens else {}),
                            **({"max_steps": args.max_steps} if args.max_steps else {}), "seed": seed}
                ran = results[-1]["hyperparameters"]
                wrong = {k: (v, ran.get(k)) for k, v in expected.items() if ran.get(k) != v}
                if wrong:  # the table's header would describe other runs than these
                    parser.error(f"{path}: these runs did not use the flags given now: " +
                                 ", ".join(f"{k} {v[1]!r} (expected {v[0]!r})" for k, v in wrong.items()))
            else:
                results.append(run_one(name, settings, seed, folder, extra))
            losses.append(results[-1]["val_loss"])
        if len(losses) < len(seeds):
            break
        rows.append((name, losses))
        write_table(rows)
    print(f"wrote {args.out}" if rows else "nothing to write: no configuration has all its runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
