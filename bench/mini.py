"""
The mini-slowrun bench (issue 17): the reference curve of the `mini` track and the method's tables, on one CPU thread.

    python bench/mini.py curve                    # plain training at 1/16 .. 1 of the track's data, 3 sizes x epochs
    python bench/mini.py curve --build            # records/mini/reference_curve.json + table + plot from finished runs
    python bench/mini.py curve --public           # the public convention: ONE epoch, the preset's recipe, 1/8 .. max
    python bench/mini.py grid NAME --budget 8 --runs 'wd0:--muon_wd 0' 'wd1:--muon_wd 1.0' ...   # any table at 1/8
    python bench/mini.py transfer                 # issue 28: the public leaderboard's techniques on the record's member

Every run is `train_gpt.py --preset mini` plus flags, one after another, with OMP_NUM_THREADS=1 (the machine is
shared), in bench/runs/mini/<run_id>/ ; a run whose result.json exists is not run again, so a killed bench resumes.

Data efficiency, by the public slowrun's own method (github.com/qlabs-eng/slowrun data_eff/README.md): at each train
budget the reference is the best val loss over several model sizes (and, here, epoch counts) of plain training;
a run's loss is placed on that curve by piecewise-linear interpolation between the budgets, which gives the budget B
at which plain training reaches it, and the run's data efficiency is B / (its own budget). `data_efficiency` is
that function; records.py can call it with the points of records/mini/reference_curve.json.

Two conventions (issue 28). The strict curve (reference_curve.json) is plain training tuned per budget: best over
sizes AND epoch counts, budgets 1/16 .. 1. The public slowrun's own curve is nanochat at its defaults for ONE epoch
(200M .. 2B tokens, best of d12/d20/d26), so its multiples count multi-epoch training itself as gain.
`curve --public` builds that convention for the mini track (reference_curve_public.json): the `mini` preset's
recipe unchanged (no tuning per budget), --num_epochs 1, budgets 1/8, 1/4, 1/2, 1, 2 and the whole train shard
(651,409 bytes, ~2.5x the track), best of the sizes s/m/l; same interpolation, same bounds.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt  # noqa: E402
from bench.results_file import write_section  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.path.join(REPO_ROOT, "bench", "runs", "mini")
RESULTS = os.path.join(REPO_ROOT, "bench", "RESULTS.md")
TRACK_BYTES = 262144  # the mini preset's --train_tokens: the track's whole budget ("1" on the curve)
BUDGETS = (16, 8, 4, 2, 1)  # the curve's budgets, as 1/N of the track's data
SIZES = {"s": "--n_layer 2 --n_embd 64 --n_head 2", "m": "--n_layer 3 --n_embd 96 --n_head 3",
         "l": "--n_layer 4 --n_embd 128 --n_head 4"}
# --domain: whose bytes the runs read. fineweb = the mini track itself; shakespeare = issue 17's "does it transfer?"
# (Tiny Shakespeare bytes, data/shakespeare/, same budgets of the first 262,144 train bytes). Per domain: the extra
# train_gpt.py flags, the run folder, the curve folder, the RESULTS.md marker prefix, the tables' title.
DOMAINS = {
    "fineweb": ("", "mini", os.path.join("records", "mini"), "mini", "Mini-slowrun"),
    "shakespeare": ("--train_files data/shakespeare/shakespeare_train.bin --val_files "
                    "data/shakespeare/shakespeare_val.bin --test_files data/shakespeare/shakespeare_test.bin",
                    "shakespeare", os.path.join("records", "mini", "shakespeare"), "mini_shakespeare",
                    "Mini-slowrun, Tiny Shakespeare"),
}
# bytes or a small BPE? (issue 17): the same documents in a BPE; budgets then count the BPE tokens of the documents
# the byte budget keeps, so every budget trains on the same text. bpe = the mini_bpe preset. The comparison BPEs
# (data/mini/make_mini.sh TEXT_DIR bpe): bpe512/bpe1024 learned from the track's 262,144 train bytes, b8bpe512/
# b8bpe1024 from the 1/8 budget's documents only (32,768 bytes), so a 1/8 run's tokenizer has seen no text its model
# may not (the track's BPE carries word statistics of all 262,144 bytes into a 1/8 run).
DOMAINS["bpe"] = ("--preset mini_bpe", "mini_bpe", os.path.join("records", "mini", "bpe"), "mini_bpe",
                  "Mini-slowrun, BPE (the mini_bpe preset)")
for _name, _vocab in (("bpe", 512), ("bpe", 1024), ("b8bpe", 512), ("b8bpe", 1024)):
    _files = " ".join(f"--{split}_files data/mini/mini_{_name}{_vocab}_{split}.bin"
                      for split in ("train", "val", "test"))
    DOMAINS[f"{_name}{_vocab}"] = (f"--tokenizer bpe --bpe_file data/mini/mini_{_name}{_vocab}.tiktoken --vocab_size "
                                   f"{_vocab} {_files}", f"mini_{_name}{_vocab}",
                                   os.path.join("records", "mini", f"{_name}{_vocab}"), f"mini_{_name}{_vocab}",
                                   f"Mini-slowrun, {'BPE of the 1/8 budget' if _name == 'b8bpe' else 'BPE'} {_vocab}")
DOMAIN_FLAGS, CURVE_DIR, SECTION, TITLE = "", os.path.join(REPO_ROOT, "records", "mini"), "mini", "Mini-slowrun"


BYTE_TRAIN = os.path.join("data", "mini", "mini_train.bin")  # the byte track's train shard: budgets are cut on it
# The public convention's budgets (issue 28): label -> --train_tokens (fractions of the track; "max" = the whole train
# shard, 651,409 bytes, the most the bundled text allows); every run is the preset's recipe for ONE epoch.
PUBLIC_BUDGETS = {"1/8": TRACK_BYTES // 8, "1/4": TRACK_BYTES // 4, "1/2": TRACK_BYTES // 2, "1": TRACK_BYTES,
                  "2": 2 * TRACK_BYTES, "max": 0}  # 0: filled in from the shard by public_budget_tokens
PUBLIC_CURVE = "reference_curve_public.json"


def domain_shards() -> tuple[str, bool]:
    """The domain's train shard (relative to the repository) and whether it is a BPE's (else bytes)."""
    flags = DOMAIN_FLAGS.split()
    preset = train_gpt.PRESETS[flags[flags.index("--preset") + 1] if "--preset" in flags else "mini"]
    train = flags[flags.index("--train_files") + 1] if "--train_files" in flags else preset["train_files"]
    tokenizer = flags[flags.index("--tokenizer") + 1] if "--tokenizer" in flags else preset["tokenizer"]
    return train, tokenizer == "bpe"


@functools.lru_cache(maxsize=None)
def shard_documents(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A train shard's tokens and its document starts, read once per process (the tables ask for every run)."""
    tokens = train_gpt.read_shard(os.path.join(REPO_ROOT, path))
    return tokens, train_gpt.document_starts(tokens, train_gpt.BYTE_SEPARATOR)


def budget_tokens(n: int) -> int:
    """--train_tokens for 1/n of the track: bytes, or for a BPE domain the BPE tokens of the very documents that
    1/n of the byte track keeps (the BPE shard holds the same documents in the same order)."""
    train, is_bpe = domain_shards()
    if not is_bpe:
        return TRACK_BYTES // n
    byte_track = train_gpt.truncate_to_document(shard_documents(BYTE_TRAIN)[0], TRACK_BYTES // n,
                                                train_gpt.BYTE_SEPARATOR, BYTE_TRAIN)
    documents = train_gpt.document_starts(byte_track, train_gpt.BYTE_SEPARATOR).size
    bpe_tokens, bpe_starts = shard_documents(train)
    return int(bpe_starts[documents]) if documents < bpe_starts.size else int(bpe_tokens.size)


def train_bytes(train_tokens: int) -> int:
    """A run's train budget in byte units (UTF-8 bytes + 1 per document, the byte track's tokens): data efficiency
    is a ratio of text, whatever the tokenizer. For a BPE domain: the byte units of the documents its tokens hold."""
    train, is_bpe = domain_shards()
    if not is_bpe:
        return train_tokens
    documents = int(np.searchsorted(shard_documents(train)[1], train_tokens))  # documents starting before the cut
    byte_tokens, byte_starts = shard_documents(BYTE_TRAIN)
    return int(byte_starts[documents]) if documents < byte_starts.size else int(byte_tokens.size)


def use_domain(name: str) -> None:
    """Points the runs, the curve and the RESULTS.md sections at one domain's data (module state: one per process)."""
    global DOMAIN_FLAGS, RUNS, CURVE_DIR, SECTION, TITLE
    flags, runs, curve_dir, SECTION, TITLE = DOMAINS[name]
    DOMAIN_FLAGS, RUNS, CURVE_DIR = flags, os.path.join(REPO_ROOT, "bench", "runs", runs), os.path.join(REPO_ROOT,
                                                                                                        curve_dir)


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


def public_budget_tokens(label: str) -> int:
    """--train_tokens of a public-convention budget (the byte track only): "max" is the whole train shard."""
    return PUBLIC_BUDGETS[label] or int(shard_documents(BYTE_TRAIN)[0].size)


def public_run_id(label: str, size: str) -> str:
    return f"pub_{label.replace('/', 'of')}_{size}_e1"


def format_efficiency(relation: str, multiple: float, digits: int = 2) -> str:
    return f"{multiple:.{digits}f}x" if relation == "=" else f"{relation} {multiple:.{digits}f}x"


# ----------------------------------------------------------------------------------------------------------------------
# Runs


def run(run_id: str, flags: str, log) -> dict:
    """One train_gpt.py --preset mini run on one thread (skipped when its result.json exists); its result.json."""
    result_path = os.path.join(RUNS, run_id, "result.json")
    if not os.path.isfile(result_path):
        command = [sys.executable, os.path.join(REPO_ROOT, "train_gpt.py"), "--preset", "mini", "--log_dir", RUNS,
                   "--run_id", run_id, "--save_model", "false", "--val_every", "-1", *DOMAIN_FLAGS.split(),
                   *flags.split()]
        if os.path.isfile(os.path.join(RUNS, run_id, "hyperparameters.json")):  # a killed run: continue it
            command = [sys.executable, os.path.join(REPO_ROOT, "train_gpt.py"), "--resume", os.path.join(RUNS, run_id)]
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
# Tables: the reference curve (records/mini/reference_curve.json, its plot, its RESULTS.md section) and any grid


def git_commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                          text=True).stdout.strip()


def best_points(by_budget: dict, order: list, label) -> tuple[list[dict], list[dict], list[dict]]:
    """The best run per budget (chosen on val, never on test), smallest budget first: (points, used, dropped). A
    budget whose best loss does not beat a smaller budget's adds no point: plain training with B bytes could use only
    the smaller budget's bytes, and interpolation needs losses that fall. Such budgets are kept apart."""
    points = []
    for key in order:
        val, run_id, size, epochs, result = min(by_budget[key])
        points.append(dict(budget=label(key), train_tokens=result["train_tokens"],
                           train_bytes=train_bytes(result["train_tokens"]), val_loss=val,
                           test_loss=result["test_loss"], val_bpb=result["val_bpb"], test_bpb=result["test_bpb"],
                           size=size, epochs=epochs, run=run_id, runs_tried=len(by_budget[key])))
    used, dropped = [], []
    for point in points:
        (used if not used or point["val_loss"] < used[-1]["val_loss"] else dropped).append(point)
    return points, used, dropped


def curve_table_row(point: dict, cells: list[str]) -> str:
    return (f"| {point['budget']} | {point['train_bytes']:,} | " + " | ".join(cells) +
            f" | {point['val_loss']:.4f} / {point['test_loss']:.4f} ({point['val_bpb']:.3f} / {point['test_bpb']:.3f}) |")


def not_on_curve(dropped: list[dict]) -> list[str]:
    return ["", "Not on the curve (their best val loss does not beat a smaller budget's): "
            + ", ".join(f"{p['budget']} ({p['val_loss']:.4f})" for p in dropped) + "."] if dropped else []


def build_curve(results: dict, command: str) -> dict:
    """The best run per budget (chosen on val, never on test) -> the curve; writes the json, the plot, the table."""
    by_budget = {}
    for run_id, (n, size, epochs, result) in results.items():
        if result:
            by_budget.setdefault(n, []).append((result["val_loss"], run_id, size, epochs, result))
    points, used, dropped = best_points(by_budget, sorted(by_budget, reverse=True), lambda n: f"1/{n}")
    unigram = results[used[-1]["run"]][3]  # train's byte frequencies at the largest budget, scored on val
    curve = dict(track="mini" if SECTION == "mini" else SECTION.replace("_", "/"), domain_flags=DOMAIN_FLAGS,
                 what="best val loss of plain `--preset mini` training over model sizes and epoch counts at each train "
                 "budget (bytes); test loss of the same run; data efficiency = the budget at which "
                 "the curve reaches a loss (piecewise linear in the budget, slowrun data_eff) / the run's own budget; "
                 "budgets in train_bytes (byte units: UTF-8 bytes + 1 per document) whatever the tokenizer",
                 interpolation="linear in train_bytes" if domain_shards()[1] else "linear in train_tokens",
                 command=command, git_commit=git_commit(),
                 sizes=SIZES, unigram_val_loss=unigram.get("unigram_val_loss"),
                 unigram_val_bpb=unigram.get("unigram_val_bpb"), points=used, not_falling=dropped,
                 runs=curve_run_rows(results))
    out_dir = CURVE_DIR
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "reference_curve.json"), "w") as handle:
        json.dump(curve, handle, indent=2)
        handle.write("\n")
    plot_curve(results, used, os.path.join(out_dir, "reference_curve.png"))
    sizes = sorted({size for _, size, _, _ in results.values()}, key=list(SIZES).index)
    lines = [f"Command: `{command}` (git {git_commit()}; one thread each, OMP_NUM_THREADS=1, on a shared 2-core "
             f"machine). Cell: val / test loss in nats per byte of the best epoch count (chosen on val) for that "
             f"size; `e` = epochs. Unigram baseline on val: {curve['unigram_val_loss']:.4f} nats/byte "
             f"({curve['unigram_val_bpb']:.3f} bits/byte).", "",
             "| budget | train bytes | " + " | ".join(f"{s} ({SIZES[s]})" for s in sizes) + " | best: val / test (bits/byte) |",
             "|---|---|" + "---|" * len(sizes) + "---|"]
    for point in points:
        n = int(point["budget"].split("/")[1])
        cells = []
        for size in sizes:
            runs = [(r["val_loss"], r["test_loss"], e) for rid, (nn, ss, e, r) in results.items()
                    if nn == n and ss == size and r]
            tried = ",".join(str(e) for e in sorted({e for _, _, e in runs} | {
                e for nn, ss, _, r in results.values() if nn == n and ss == size and r for e in r.get("epochs_tried", [])}))
            cells.append("—" if not runs else f"{min(runs)[0]:.4f} / {min(runs)[1]:.4f} (e{min(runs)[2]} of {tried})")
        lines.append(curve_table_row(point, cells))
    return curve, "\n".join(lines + not_on_curve(dropped))


def curve_run_rows(results: dict) -> list[dict]:
    """Every curve run's numbers, stored in the json, so a later rebuild needs no run folder (stored_curve_runs)."""
    keys = ("train_tokens", "val_loss", "test_loss", "val_bpb", "test_bpb", "unigram_val_loss", "unigram_val_bpb",
            "epochs_tried", "note")
    return [dict(run=run_id, budget=n, size=size, epochs=epochs, **{k: r[k] for k in keys if k in r})
            for run_id, (n, size, epochs, r) in sorted(results.items(), key=lambda item: item[1][:3]) if r]


def stored_curve_runs(present: set[str]) -> dict:
    """The runs of the stored reference_curve.json whose folders are not here (run_id -> (N, size, epochs, numbers)):
    its `runs`, else (a curve written before they were kept) its points, with the unigram of the curve."""
    path = os.path.join(CURVE_DIR, "reference_curve.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as handle:
        curve = json.load(handle)
    unigram = dict(unigram_val_loss=curve.get("unigram_val_loss"), unigram_val_bpb=curve.get("unigram_val_bpb"))
    rows = curve.get("runs") or [dict(p, budget=int(p["budget"].split("/")[1])) for p in curve["points"]]
    return {row["run"]: (row["budget"], row["size"], row["epochs"], {**unigram, **row}) for row in rows
            if row["run"] not in present}


def plot_curve(results: dict, points: list[dict], path: str, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for size in SIZES:
        rows = sorted((train_bytes(r["train_tokens"]), r["val_loss"]) for _, (n, s, e, r) in results.items()
                      if s == size and r)
        best = {}
        for tokens, loss in rows:
            best[tokens] = min(loss, best.get(tokens, loss))
        if best:
            axis.plot(list(best), list(best.values()), "o--", alpha=0.6, label=f"size {size}: {SIZES[size]}")
    axis.plot([p["train_bytes"] for p in points], [p["val_loss"] for p in points], "k-", lw=2, label="reference (best)")
    axis.set_xscale("log")
    axis.set_xlabel("train budget (bytes)")
    axis.set_ylabel("val loss (nats/byte)")
    axis.set_title(title or f"{TITLE}: plain training, best over sizes and epochs")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def build_public_curve(results: dict, command: str) -> tuple[dict, str]:
    """The public convention's curve (issue 28) from its runs (run_id -> (label, size, 1, result)): per budget the
    best size on val (its test loss beside it), the same schema as build_curve's with `convention` named inside;
    writes reference_curve_public.json and .png; returns it and its RESULTS.md table."""
    by_budget = {}
    for run_id, (label, size, epochs, result) in results.items():
        if result:
            by_budget.setdefault(label, []).append((result["val_loss"], run_id, size, epochs, result))
    points, used, dropped = best_points(by_budget, sorted(by_budget, key=public_budget_tokens), str)
    unigram = results[used[-1]["run"]][3]
    keys = ("train_tokens", "val_loss", "test_loss", "val_bpb", "test_bpb", "unigram_val_loss", "unigram_val_bpb",
            "steps", "train_seconds", "wall_seconds")
    rows = [dict(run=run_id, budget=label, size=size, epochs=epochs, **{k: r[k] for k in keys if k in r})
            for run_id, (label, size, epochs, r) in sorted(results.items(), key=lambda item: (
                public_budget_tokens(item[1][0]), list(SIZES).index(item[1][1]))) if r]
    curve = dict(track="mini", convention="public",
                 convention_note="the public slowrun's data_eff convention (data_eff/README.md: nanochat at its "
                 "defaults, ONE epoch, best of d12/d20/d26 at each token count): here the `--preset mini` recipe "
                 "unchanged (no tuning per budget) for ONE epoch at each budget, best of the sizes; the strict "
                 "convention (reference_curve.json) also tunes the epoch count per budget",
                 domain_flags=DOMAIN_FLAGS,
                 what="best val loss over model sizes of `--preset mini --num_epochs 1` (the preset's recipe, one "
                 "epoch) at each train budget (bytes), 1/8 of the track to the whole train shard; test loss of the "
                 "same run; data efficiency = the budget at which the curve reaches a loss (piecewise linear in the "
                 "budget, slowrun data_eff) / the run's own budget; below the last point: a bound",
                 interpolation="linear in train_tokens", recipe="python train_gpt.py --preset mini --num_epochs 1 "
                 "--train_tokens B <size flags>", command=command, git_commit=git_commit(), sizes=SIZES,
                 unigram_val_loss=unigram.get("unigram_val_loss"), unigram_val_bpb=unigram.get("unigram_val_bpb"),
                 points=used, not_falling=dropped, runs=rows)
    with open(os.path.join(CURVE_DIR, PUBLIC_CURVE), "w") as handle:
        json.dump(curve, handle, indent=2)
        handle.write("\n")
    plot_curve(results, used, os.path.join(CURVE_DIR, PUBLIC_CURVE.replace(".json", ".png")),
               f"{TITLE}: public convention (the preset's recipe, one epoch, best of sizes)")
    sizes = sorted({size for _, size, _, _ in results.values()}, key=list(SIZES).index)
    lines = [f"Command: `{command}` (git {git_commit()}; one thread each, OMP_NUM_THREADS=1, nice 10, on a shared "
             f"2-core machine). Every run: `{curve['recipe']}`. Cell: val / test loss in nats per byte (train "
             f"seconds). Curve: {os.path.relpath(CURVE_DIR, REPO_ROOT)}/{PUBLIC_CURVE}.", "",
             "| budget | train bytes | " + " | ".join(f"{s} ({SIZES[s]})" for s in sizes) +
             " | best: val / test (bits/byte) |", "|---|---|" + "---|" * len(sizes) + "---|"]
    for point in points:
        cells = []
        for size in sizes:
            found = [r for label, ss, _, r in results.values() if label == point["budget"] and ss == size and r]
            cells.append("—" if not found else f"{found[0]['val_loss']:.4f} / {found[0]['test_loss']:.4f} "
                         f"({found[0].get('train_seconds', float('nan')):.0f} s)")
        lines.append(curve_table_row(point, cells))
    return curve, "\n".join(lines + not_on_curve(dropped))


def load_curve_points(kind: str = "val_loss", name: str = "reference_curve.json") -> list[tuple[float, float]] | None:
    path = os.path.join(CURVE_DIR, name)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return [(p.get("train_bytes", p["train_tokens"]), p[kind]) for p in json.load(handle)["points"]]


def efficiency_text(points, loss: float, budget: int, digits: int = 2) -> str:
    if not points:
        return "—"
    try:
        return format_efficiency(*data_efficiency(points, loss, budget), digits)
    except ValueError:  # a curve whose best losses do not fall with the budget: no single answer
        return "n/a"


def both_conventions_text(strict, public, loss: float, budget: int) -> str:
    """A multiple in both conventions (issue 28), as records.py's leaderboard writes it: '1.87x strict, 9.9x public'
    (the public one to one decimal, as the public figures are quoted; '— public' where the domain has no such curve)."""
    return f"{efficiency_text(strict, loss, budget)} strict, {efficiency_text(public, loss, budget, 1)} public"


def grid_table(rows: list[tuple[str, str, dict]], command: str) -> str:
    val_points, test_points = load_curve_points("val_loss"), load_curve_points("test_loss")
    public_val, public_test = (load_curve_points(kind, PUBLIC_CURVE) for kind in ("val_loss", "test_loss"))
    lines = [f"Command: `{command}` (git {git_commit()}; one thread each). Data efficiency against "
             f"{os.path.relpath(CURVE_DIR, REPO_ROOT)}/reference_curve.json (strict) and {PUBLIC_CURVE} (public "
             f"convention, where the domain has one) (val on the val curves, test on the test curves).", "",
             "| run | flags | val | test | val bits/byte | train s | data eff. (val) | data eff. (test) |",
             "|---|---|---|---|---|---|---|---|"]
    for label, flags, r in rows:
        if not r:
            lines.append(f"| {label} | `{flags}` | failed | | | | | |")
            continue
        lines.append(f"| {label} | `{flags}` | {r['val_loss']:.4f} | {r['test_loss']:.4f} | {r['val_bpb']:.3f} | "
                     f"{r['train_seconds']:.0f} | "
                     f"{both_conventions_text(val_points, public_val, r['val_loss'], train_bytes(r['train_tokens']))}"
                     f" | {both_conventions_text(test_points, public_test, r['test_loss'], train_bytes(r['train_tokens']))}"
                     " |")
    ensembles = [(label, r["ensemble_val_losses"]) for label, _, r in rows if len(r.get("ensemble_val_losses") or []) > 1]
    if ensembles:
        width = max(len(losses) for _, losses in ensembles)
        lines += ["", "Val loss of the running ensemble (probability average) after each member:", "",
                  "| run | " + " | ".join(f"K={k + 1}" for k in range(width)) + " |", "|---|" + "---|" * width]
        lines += [f"| {label} | " + " | ".join(f"{loss:.4f}" for loss in losses) + " |" * (width - len(losses) + 1)
                  for label, losses in ensembles]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# The transfer table (issue 28): does the laptop predict the node?

# The public leaderboard's val losses, step by step (qlabs-eng/slowrun README.md at fd342f0; index 0 = step 1).
LEADERBOARD = {
    "1h": (3.402, 3.376, 3.349, 3.335, 3.314, 3.295, 3.285, 3.278, 3.276, 3.270, 3.252, 3.248, 3.236, 3.230, 3.227,
           3.222, 3.214, 3.211, 3.204, 3.195),
    "15min": (3.428, 3.410, 3.395, 3.385, 3.383, 3.374, 3.365, 3.353, 3.345, 3.332, 3.329, 3.324, 3.315, 3.307),
    "unlimited": (3.402, 3.264, 3.218, 3.185, 3.166, 3.126, 3.089, 3.081, 3.045, 3.024, 3.001, 2.987),
}
# The mini record's member (records/mini/2026-11-26_m-wd1-lr08-sd01-e16-ens8), one member, at 1/8 of the data.
TRANSFER_BASE = "--num_epochs 16 --n_layer 3 --n_embd 96 --n_head 3 --muon_wd 1.0 --muon_lr 0.08 --stochastic_depth 0.1"
TRANSFER_SEEDS = (0, 1, 2)
# config label -> flags added to the base; run one after another in this order (the ensembles, the costly ones, last)
TRANSFER_CONFIGS = {  # larger public deltas first, the ensembles before the smallest (a run is ~100 s of a busy thread)
    "base": "", "swiglu": "--mlp swiglu", "unet": "--unet_skips", "gate": "--attn_gate --out_gate_channels 12",
    "vproj": "--value_proj", "ema": "--ema_decay 0.9", "swa3": "--swa_epochs 3", "order_fixed": "--train_order fixed",
    "loop": "--loop_repeats 1 --loop_range 1:2 --loop_start_epoch 14",
    "wdsched": "--wd_schedule points --wd_points 0:1,2.13:1,8.53:0.125,16:1.1625",
    "ens2_logit": "--ensemble_size 2 --ensemble_mode logit",
    "ens2_distill": "--ensemble_size 2 --ensemble_mode logit --distill_alpha 0.5",
    "projnormal": "--proj_init normal", "iha": "--head_mix --head_mix_lr 0.02", "mtp": "--mtp_weight 0.3 --mtp_style block",
    "recur2": "--recurrence 2 --recurrence_start_frac 0.7", "snap3": "--epoch_snapshots 3 --epoch_snapshot_weights recency",
    "sd0": "--stochastic_depth 0", "muoneqr": "--muon_eq_r", "xsa": "--xsa learned",
    "ens2_prob": "--ensemble_size 2 --ensemble_mode prob", "vtables": "--value_embed_tables",
}
# (technique, kind, config WITH it, config WITHOUT it, public track, step, note). Delta = with - without, so a
# negative delta means the technique helps, on the laptop as on the board; a removal (the base has the technique)
# is the base against the base without it.
TRANSFER_ROWS = [
    ("per-epoch shuffling (removal)", "data order", "base", "order_fixed", "1h", 2,
     "board: per-epoch reshuffle added to a fixed order; ours reshuffles whole documents each epoch (1h #2 and #19 "
     "together), removed to the baseline record's fixed order"),
    ("value projections from x0", "architecture", "vproj", "vtables", "1h", 3,
     "the board's own comparison: #3 replaced value embedding tables (--value_embed_tables) by x0 projections"),
    ("SwiGLU", "architecture", "swiglu", "base", "1h", 4, ""),
    ("U-Net skips", "architecture", "unet", "base", "1h", 5, "3 layers: one skip (layer 0 -> layer 2)"),
    ("attention head gate", "architecture", "gate", "base", "1h", 6, ""),
    ("looping layers (last 3 epochs)", "architecture", "loop", "base", "1h", 7,
     "board: bundled with a shorter warmdown (not measured here)"),
    ("XSA (learned)", "architecture", "xsa", "base", "15min", 11, ""),
    ("EMA of weights", "averaging", "ema", "base", "15min", 8,
     "decay 0.9 per step (~1.5 epochs of 7 steps); the EMA replaces the weights at the end"),
    ("average of last 3 epoch checkpoints", "averaging", "snap3", "base", "1h", 12,
     "probability average of the last 3 epochs' weights, recency weights (the 1h preset's reading of #12)"),
    ("SWA (3 epochs)", "averaging", "swa3", "base", "1h", 13, ""),
    ("c_proj init normal", "initialisation", "projnormal", "base", "1h", 14, ""),
    ("stochastic depth (removal)", "regularisation", "base", "sd0", "1h", 15,
     "ours p 0.1 per sequence; the board's 0.05 per batch"),
    ("multi-token prediction", "objective", "mtp", "base", "1h", 16, ""),
    ("IHA (head mixing)", "architecture", "iha", "base", "1h", 17, ""),
    ("MuonEq-R", "optimizer", "muoneqr", "base", "1h", 18, ""),
    ("weight-decay schedule", "schedule", "wdsched", "base", "15min", 7,
     "the 15min record's knots 0:1,2:1,8:0.125,15:1.1625 stretched to 16 epochs"),
    ("2x recurrence", "architecture", "recur2", "base", "15min", 12, ""),
    ("ensemble of 2, logit averaging", "ensembling", "ens2_logit", "base", "unlimited", 2,
     "board: 8 members; here 2 (member 0 is the base run itself)"),
    ("chain distillation", "ensembling", "ens2_distill", "ens2_logit", "unlimited", 6,
     "member 1 distils member 0 (alpha 0.5, T 1), logit averaging as the board then had; 2 members"),
    ("probability vs logit averaging", "ensembling", "ens2_prob", "ens2_logit", "unlimited", 10,
     "board: bundled with 20 models instead of 12; here 2 members both ways"),
    ("value projections, against no value path", "architecture", "vproj", "base", "1h", 3,
     "shown, not counted (1h #3 counts once, as the row above): the base has no value tables"),
]


def public_delta(track: str, step: int) -> float:
    """The leaderboard step's val loss minus the previous step's on its track."""
    losses = LEADERBOARD[track]
    if not 2 <= step <= len(losses):
        raise ValueError(f"{track} has steps 2..{len(losses)} with a previous step; got {step}")
    return round(losses[step - 1] - losses[step - 2], 6)


def paired_deltas(with_losses: list[float], without_losses: list[float]) -> dict:
    """Per-seed deltas (with - without, the same seed both ways), their mean, sample std (n - 1), standard error,
    spread (max - min) and whether the mean lies outside seed noise: |mean| > 2 standard errors (n >= 2)."""
    if len(with_losses) != len(without_losses) or not with_losses:
        raise ValueError(f"paired deltas need equal, non-empty lists; got {len(with_losses)} and {len(without_losses)}")
    deltas = [a - b for a, b in zip(with_losses, without_losses)]
    n, mean = len(deltas), sum(deltas) / len(deltas)
    std = (sum((d - mean) ** 2 for d in deltas) / (n - 1)) ** 0.5 if n > 1 else float("nan")
    se = std / n ** 0.5 if n > 1 else float("nan")
    return dict(deltas=deltas, n=n, mean=mean, std=std, se=se, spread=max(deltas) - min(deltas),
                significant=n > 1 and abs(mean) > 2 * se)


def sign_agreement(laptop: list[float], public: list[float]) -> tuple[int, int]:
    """(pairs whose deltas have the same sign, pairs): a zero delta agrees only with a zero."""
    if len(laptop) != len(public):
        raise ValueError(f"sign agreement needs paired lists; got {len(laptop)} and {len(public)}")
    sign = lambda x: (x > 0) - (x < 0)  # noqa: E731
    return sum(sign(a) == sign(b) for a, b in zip(laptop, public)), len(laptop)


def average_ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation with ties: Pearson's correlation of the average ranks (nan when a side is
    constant or there are fewer than 2 pairs)."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs paired lists; got {len(x)} and {len(y)}")
    if len(x) < 2:
        return float("nan")
    rx, ry = average_ranks(x), average_ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / (sxx * syy) ** 0.5 if sxx > 0 and syy > 0 else float("nan")


def transfer_run_id(config: str, seed: int) -> str:
    return f"transfer_{config}_s{seed}"


def merge_flags(base: str, extra: str) -> str:
    """base's '--name value' pairs with extra's flags appended, a flag extra also sets dropped from base
    (train_gpt.py refuses a flag given twice)."""
    words, names = base.split(), {w for w in extra.split() if w.startswith("--")}
    kept, i = [], 0
    while i < len(words):
        if words[i] in names:
            i += 2  # the flag and its value
            continue
        kept.append(words[i])
        i += 1
    return " ".join(kept + extra.split())


def transfer_flags(config: str, seed: int) -> str:
    return f"--train_tokens {budget_tokens(8)} " + merge_flags(TRANSFER_BASE, f"{TRANSFER_CONFIGS[config]} --seed {seed}")


def transfer_tables(results: dict, command: str) -> str:
    """results: (config, seed) -> result.json ({} when failed or missing). The raw rows, the public delta beside
    each, then sign agreement and Spearman over the techniques with all seeds, overall and outside seed noise."""
    def losses(config: str) -> dict[int, float]:
        return {seed: r["val_loss"] for (c, seed), r in results.items() if c == config and r}

    commits = sorted({r.get("git_commit", "?")[:7] + ("-dirty" if r.get("git_commit", "").endswith("-dirty") else "")
                      for r in results.values() if r})
    lines = [f"Command: `{command}` (table written at git {git_commit()}; every run one member of `--preset mini {TRANSFER_BASE}` "
             f"at 1/8 of the data (`--train_tokens {budget_tokens(8)}`) plus the row's flags and `--seed s`, s = "
             f"{', '.join(map(str, TRANSFER_SEEDS))}; ensembles: members s and s+1000; one run at a time, "
             f"OMP_NUM_THREADS=1, nice 10, on a shared 2-core machine). Val loss in nats/byte. Delta = with - without "
             f"on the same seed (negative: the technique helps), mean ± sample std over seeds [smallest, largest]; `*` = "
             f"outside seed noise (|mean| > 2 standard errors). The runs' commits (train_gpt.py's result.json, "
             f"-dirty: the tree had uncommitted edits): {', '.join(commits) or '—'}. Public delta = the leaderboard step's val minus the previous "
             f"step's on its track (slowrun README at fd342f0).", "",
             "| technique | kind | with (flags added to the base) | without | val with, per seed | val without, per "
             "seed | laptop delta | public step | public delta | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    laptop, board, noisy_free, counted = [], [], [], set()
    for name, kind, with_c, without_c, track, step, note in TRANSFER_ROWS:
        a, b = losses(with_c), losses(without_c)
        seeds = [s for s in TRANSFER_SEEDS if s in a and s in b]
        pub = public_delta(track, step)
        flags = lambda c: f"`{TRANSFER_CONFIGS[c]}`" if TRANSFER_CONFIGS[c] else "(base)"  # noqa: E731
        cells = lambda d: ", ".join(f"{d[s]:.4f}" if s in d else "—" for s in TRANSFER_SEEDS)  # noqa: E731
        if seeds:
            stats = paired_deltas([a[s] for s in seeds], [b[s] for s in seeds])
            delta = (f"{stats['mean']:+.4f} ± {stats['std']:.4f}{' *' if stats['significant'] else ''} "
                     f"[{min(stats['deltas']):+.3f}, {max(stats['deltas']):+.3f}]" if stats["n"] > 1
                     else f"{stats['mean']:+.4f}")
            if stats["n"] == len(TRANSFER_SEEDS) and (track, step) not in counted:  # a public step counts once
                counted.add((track, step))
                laptop.append(stats["mean"])
                board.append(pub)
                noisy_free.append(stats["significant"])
            if stats["n"] < len(TRANSFER_SEEDS):
                delta += f" ({stats['n']} seed{'s' * (stats['n'] > 1)})"
        else:
            delta = "missing"
        lines.append(f"| {name} | {kind} | {flags(with_c)} | {flags(without_c)} | {cells(a)} | {cells(b)} | {delta} | "
                     f"{track} #{step} | {pub:+.3f} | {note} |")
    base = losses("base")
    if base:
        values = list(base.values())
        lines += ["", f"Base (the record's member alone): val {', '.join(f'{v:.4f}' for v in values)} "
                  f"(mean {sum(values) / len(values):.4f})."]
    agree, total = sign_agreement(laptop, board)
    sig = [i for i, s in enumerate(noisy_free) if s]
    agree_sig, total_sig = sign_agreement([laptop[i] for i in sig], [board[i] for i in sig])
    rho = spearman(laptop, board)
    rho_sig = spearman([laptop[i] for i in sig], [board[i] for i in sig])
    steps = len({(row[4], row[5]) for row in TRANSFER_ROWS})
    lines += ["", f"Public steps with all {len(TRANSFER_SEEDS)} seeds: {total} of {steps} (a step measured twice counts "
              f"once: its first row with all seeds). Sign agreement "
              f"(laptop delta and public delta of the same sign): **{agree} of {total}** overall; **{agree_sig} of "
              f"{total_sig}** among those whose laptop delta is outside seed noise. Spearman rank correlation of "
              f"laptop and public deltas: **{rho:+.3f}** overall (n = {total}), {rho_sig:+.3f} outside seed noise "
              f"(n = {total_sig}). Every public delta is negative (each step was a record), so sign agreement here "
              f"counts the techniques that help on the laptop too."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/mini.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    curve = sub.add_parser("curve", help="the reference curve: plain runs at every budget, size and epoch count")
    curve.add_argument("--epochs", default="16:16,32;8:8,16;4:4,8;2:2,4;1:1,2",
                       help="epoch counts per budget, 'N:e1,e2;...' (1/N of the data)")
    curve.add_argument("--sizes", default="s,m,l")
    curve.add_argument("--build", action="store_true", help="only build the curve, table and plot from finished runs")
    curve.add_argument("--command", default="", help="with --build: the commands that made the runs, for the table")
    curve.add_argument("--public", action="store_true", help="the public convention (issue 28): the preset's recipe "
                       "for ONE epoch at 1/8, 1/4, 1/2, 1, 2 and the whole train shard, best of --sizes; writes "
                       f"{PUBLIC_CURVE} (--epochs is ignored)")
    grid = sub.add_parser("grid", help="a list of named runs at one budget")
    grid.add_argument("name")
    grid.add_argument("--budget", type=int, default=8, help="1/N of the track's data (default 8)")
    grid.add_argument("--runs", nargs="+", required=True, help="'label:flags' items")
    grid.add_argument("--title", default="", help="the table's title in RESULTS.md")
    transfer = sub.add_parser("transfer", help="issue 28's transfer table: the public leaderboard's techniques on "
                              "the mini record's member, 3 paired seeds, against the public deltas")
    transfer.add_argument("--build", action="store_true", help="only write the table from finished runs")
    transfer.add_argument("--only", default="", help="comma-separated configs to run (default: all, in order)")
    parser.add_argument("--domain", choices=DOMAINS, default="fineweb",
                        help="whose bytes: the mini track's FineWeb-Edu "
                        "(default), Tiny Shakespeare (data/shakespeare/), or the mini track's text in a BPE of 512 or "
                        "1,024 ids (bpe512, bpe1024: data/mini/make_mini.sh bpe)")
    args = parser.parse_args(argv)
    use_domain(args.domain)
    os.makedirs(RUNS, exist_ok=True)
    log_path = os.path.join(RUNS, "bench.log")

    def log(text: str) -> None:
        print(text, flush=True)
        with open(log_path, "a") as handle:
            handle.write(text + "\n")

    if args.action == "transfer":
        if args.domain != "fineweb":
            parser.error("transfer: the byte track only (--domain fineweb)")
        command = "python bench/mini.py transfer"
        only = [c for c in args.only.split(",") if c]
        unknown = [c for c in only if c not in TRANSFER_CONFIGS]
        if unknown:
            parser.error(f"--only: unknown configs {unknown}; known: {', '.join(TRANSFER_CONFIGS)}")
        results = {}
        for config in TRANSFER_CONFIGS:
            for seed in TRANSFER_SEEDS:
                run_id = transfer_run_id(config, seed)
                done = os.path.isfile(os.path.join(RUNS, run_id, "result.json"))
                if args.build or (only and config not in only):
                    results[config, seed] = json.load(open(os.path.join(RUNS, run_id, "result.json"))) if done else {}
                    continue
                results[config, seed] = run(run_id, transfer_flags(config, seed), log)
                write_section(RESULTS, f"{SECTION}_transfer", "### Mini-slowrun: the transfer table (does the "
                              "laptop predict the node?)\n\n" + transfer_tables(results, command))
        write_section(RESULTS, f"{SECTION}_transfer", "### Mini-slowrun: the transfer table (does the laptop predict "
                      "the node?)\n\n" + transfer_tables(results, command))
        return 0
    if args.action == "curve" and args.public:
        if args.domain != "fineweb":
            parser.error("--public: the byte track only (--domain fineweb)")
        results = {}
        for label in PUBLIC_BUDGETS:
            for size in args.sizes.split(","):
                run_id = public_run_id(label, size)
                if args.build and not os.path.isfile(os.path.join(RUNS, run_id, "result.json")):
                    continue
                flags = f"--train_tokens {public_budget_tokens(label)} --num_epochs 1 {SIZES[size]}"
                results[run_id] = (label, size, 1, run(run_id, flags, log))
        path = os.path.join(CURVE_DIR, PUBLIC_CURVE)  # runs kept in the stored curve, their folders gone
        for row in (json.load(open(path)).get("runs", []) if os.path.isfile(path) else []):
            if not results.get(row["run"], (0, 0, 0, {}))[3]:
                results[row["run"]] = (row["budget"], row["size"], row["epochs"], row)
        _, table = build_public_curve(results, args.command or "python bench/mini.py " + " ".join(
            shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]) if a != "--build"))
        write_section(RESULTS, f"{SECTION}_curve_public", f"### {TITLE}: the public-convention reference curve (the "
                      f"preset's recipe, one epoch)\n\n" + table)
        return 0
    if args.action == "curve":
        epochs = {int(n): [int(e) for e in es.split(",") if e]
                  for n, es in (item.split(":") for item in args.epochs.split(";"))}
        sizes = args.sizes.split(",")
        results = {}
        for n, size, e, run_id in curve_runs(epochs):
            if size not in sizes:
                continue
            if args.build and not os.path.isfile(os.path.join(RUNS, run_id, "result.json")):
                continue
            flags = f"--train_tokens {budget_tokens(n)} --num_epochs {e} {SIZES[size]}"
            results[run_id] = (n, size, e, run(run_id, flags, log))
        results.update(stored_curve_runs(set(results)))  # runs kept in the stored curve, their folders gone
        _, table = build_curve(results, args.command or "python bench/mini.py " + " ".join(
            shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]) if a != "--build"))
        write_section(RESULTS, f"{SECTION}_curve", f"### {TITLE}: the reference curve (plain training)\n\n" + table)
        return 0
    rows = []
    for item in args.runs:
        label, _, flags = item.partition(":")
        rows.append((label, flags, run(f"{args.name}_{label}", f"--train_tokens {budget_tokens(args.budget)} {flags}",
                                       log)))
        command = "python bench/mini.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        write_section(RESULTS, f"{SECTION}_{args.name}", f"### {TITLE}: {args.title or args.name} at 1/{args.budget} "
                      f"of the data\n\n" + grid_table(rows, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
