"""
records: make, check, tabulate and plot slowrun records, and place them on a data-efficiency reference curve
(records/README.md describes the layout, the tracks and the checks).

    python records/records.py new logs/run_s0 logs/run_s1 logs/run_s2 --track tiny --slug my-trick --title "..."
    python records/records.py new logs/student_s0 logs/student_s1 ... --teachers logs/teacher_s0 logs/teacher_s1 ...
    python records/records.py verify records/tiny/2025-01-01_my-trick [--rerun --steps 10]
    python records/records.py reproduce records/mini/2026-12-07_... --out remade --seeds 0  # teachers first, whole
    python records/records.py table                      # rewrites the leaderboard in README.md (between markers)
    python records/records.py plot logs/run_s0 records/tiny/2025-01-01_my-trick --out loss.png
    python records/records.py reference plan --track tiny  # prints the baseline runs of the reference curve
    python records/records.py reference build logs/ref_tiny_* --track tiny
    python records/records.py efficiency records/tiny/2025-01-01_my-trick
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace

RECORDS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(RECORDS_DIR)
sys.path.insert(0, REPO_ROOT)

import train_gpt  # noqa: E402  (the formats the runs were written in, atomic writes, marker replacement)

LEADERBOARD_START, LEADERBOARD_END = "<!-- leaderboard:start -->", "<!-- leaderboard:end -->"
RUN_FILES = ("log.txt", "metrics.jsonl", "result.json")
# Hyperparameters that may differ between the seeds of one record (everything else must be equal).
PER_SEED_FIELDS = {"seed", "run_id", "log_dir"}
# A distilled record's runs (--distill_from RUN) carry their teachers, the finished runs that taught them, in
# <record>/teachers/<run_id>/: each seed's student names its own teacher, so distill_from differs by seed too
# (check_teachers checks what it names).
TEACHERS = "teachers"
RECORD_FREE_FIELDS = PER_SEED_FIELDS | {"distill_from"}


class RecordError(Exception):
    """A problem the user must fix: printed as `error: ...`, exit status 1."""


class UnreadableFile(RecordError):
    """A run file that cannot be read at all (a cut metrics.jsonl line, result.json not JSON): exit status 2."""


# ----------------------------------------------------------------------------------------------------------------------
# Tracks: the rules a record must follow to be compared with the others of its track


@dataclass(frozen=True)
class Track:
    name: str
    summary: str  # one line for the leaderboard heading
    device: str  # "cpu" or "cuda"
    world_size: int | None  # ranks required (None = any)
    train_seconds: float | None  # training-time limit (result.json train_seconds: evaluation excluded); None = none
    train_file: str  # basename of the train shard(s) the record must read (the fixed data budget)
    val_file: str  # basename of the validation shard(s): all of it is scored (val_tokens = 0)
    train_tokens: int  # the --train_tokens a record must use (0 = the whole train set)
    baseline: tuple[str, ...]  # the command of the track's single-model baseline (reference curve), before flags


def _gpu_track(name: str, seconds: float | None, label: str) -> Track:
    return Track(name, f"8 GPUs, {label}, ~100M FineWeb tokens", "cuda", 8, seconds,
                 "fineweb_train.bin", "fineweb_val.bin", 0,
                 ("torchrun", "--standalone", "--nproc_per_node=8", "train_gpt.py", "--preset", "slowrun"))


TRACKS: dict[str, Track] = {
    # tiny: records train on a quarter of the bundled sample, so the reference baselines (same compute at every
    # budget: compute is nearly free, data is the constraint) go up to 4x more data (records/README.md).
    "tiny": Track("tiny", "CPU, the first quarter (35k tokens) of the bundled FineWeb-Edu sample, any wall time",
                  "cpu", None, None, "fineweb_edu_train.bin", "fineweb_edu_val.bin", 35027,
                  ("python", "train_gpt.py", "--preset", "tiny", "--num_epochs", "1000", "--max_steps", "54",
                   "--val_every", "-1")),
    # mini: the CPU data-efficiency track (issue 17): FineWeb-Edu as bytes; a record trains on 1/8 of the track's
    # 262,144 bytes, so its reference curve (plain training at 1/16 .. 1, bench/mini.py curve) can show up to 8x.
    "mini": Track("mini", "CPU, FineWeb-Edu as bytes, 1/8 (27k bytes) of the track's data, any wall time", "cpu",
                  None, None, "mini_train.bin", "mini_val.bin", 32768, ("python", "train_gpt.py", "--preset", "mini")),
    **{name: _gpu_track(name, seconds, label) for name, seconds, label in (
        ("8gpu-15min", 15 * 60, "15 minutes of training"), ("8gpu-1h", 3600, "1 hour of training"),
        ("8gpu-2h", 7200, "2 hours of training"), ("8gpu-unlimited", None, "no time limit"))},
}


def get_track(name: str) -> Track:
    if name not in TRACKS:
        raise RecordError(f"unknown track {name!r} (known: {', '.join(TRACKS)})")
    return TRACKS[name]


def track_violations(track: Track, result: dict) -> list[str]:
    """Why a finished run does not qualify for the track ([] when it does)."""
    hp, get, limit = result["hyperparameters"], result.get, track.train_seconds
    return [message for broken, message in [
        (not str(get("device", "")).startswith(track.device), f"ran on {get('device')}, track {track.name} is "
                                                               f"{track.device}"),
        (track.world_size not in (None, get("world_size")), f"ran on {get('world_size')} ranks, track {track.name} "
                                                             f"needs {track.world_size}"),
        (limit is not None and get("train_seconds", math.inf) > limit,
         f"trained {get('train_seconds')} s, over the track's {limit or 0:.0f} s"),
        *[(os.path.basename(hp.get(f"{kind}_files", "")) != name,
           f"{kind}_files {hp.get(f'{kind}_files')!r} is not the track's {name}")
          for kind, name in (("train", track.train_file), ("val", track.val_file))],
        (hp.get("val_tokens", 0) != 0, f"val_tokens = {hp.get('val_tokens')}: a record scores the whole validation "
                                       f"set"),
        (hp.get("train_tokens", 0) != track.train_tokens,
         f"train_tokens = {hp.get('train_tokens')}, the track's budget is {track.train_tokens}"),
        (get("ranks_agree") is False, "ranks ended with different weights (ranks agree: NO)")] if broken]


# ----------------------------------------------------------------------------------------------------------------------
# Reading a run: the numbers from metrics.jsonl and result.json; from log.txt the source, the command, the sections

HEADER = "==================== "  # train_gpt.RunLog.section: the title, then "=" up to column 100
PROGRESS_KINDS = (("train", "step "), ("val", "val  step "))  # metrics.jsonl kind, and how its log line begins


@dataclass
class Run:
    """One run folder: the numbers from metrics.jsonl and result.json, the source and the command from log.txt."""
    folder: str
    source: str  # the training script exactly as it ran (log.txt's first section)
    sections: dict[str, list[str]]  # log.txt's sections after the source, by title (a title repeated: one list)
    resumed: bool  # the log holds more than one run section (--resume appended to it)
    metrics: list[dict]  # metrics.jsonl's rows
    result: dict  # result.json

    def __post_init__(self):
        self.path, self.name = os.path.join(self.folder, "log.txt"), os.path.basename(os.path.normpath(self.folder))
        self.hyperparameters = self.result.get("hyperparameters", {})
        self.command = self.sections.get("command", [""])[0]
        self.train, self.val = ([row for row in self.metrics if row.get("kind") == kind] for kind in ("train", "val"))
        # what the run wrote after its header sections: progress, ensembles, test, done
        self.lines = [line for title, lines in self.sections.items()
                      if title not in ("command", "environment", "hyperparameters") for line in lines]


def read_log(path: str) -> tuple[str, dict[str, list[str]], bool]:
    """(the embedded source, the sections after it by title, whether the run was resumed)."""
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    titles = [line[len(HEADER):].rstrip("=").strip() if line.startswith(HEADER) else None for line in lines]
    if not lines or not (titles[0] or "").startswith("source"):
        raise RecordError(f"{path}: does not start with the source section (not a train_gpt.py log.txt?)")
    # The source may itself contain header-like lines; the real command header is the last one in the file.
    command_at = max((i for i, title in enumerate(titles) if title == "command"), default=None)
    if command_at is None:
        raise RecordError(f"{path}: no command section after the source")
    sections: dict[str, list[str]] = {}
    for line, title in zip(lines[command_at:], titles[command_at:]):
        if title is not None:
            current = sections.setdefault(title, [])  # a resumed run repeats its headers: one list per title
        else:
            current.append(line)
    return "\n".join(lines[1:command_at]) + "\n", sections, titles.count("run") > 1


def read_json(path: str):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise RecordError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UnreadableFile(f"{path}: not valid JSON ({error}): the file is damaged or cut short") from None


def read_metrics(path: str, whole_lines_only: bool = False) -> list[dict]:
    """metrics.jsonl's rows. whole_lines_only: skip a last line still being written (a run in progress)."""
    if not os.path.isfile(path):
        raise RecordError(f"{path}: missing")
    with open(path, encoding="utf-8") as handle:
        lines = handle.readlines()
    rows, cut = [], whole_lines_only and lines and not lines[-1].endswith("\n")  # the last line is still being written
    for number, line in [(number, line) for number, line in enumerate(lines[:-1] if cut else lines, 1) if line.strip()]:
        try:
            rows.append(json.loads(line))
            kind = rows[-1].get("kind")  # the rows every check reads: their step, loss and tokens are numbers
            usable = kind not in ("train", "val") or all(type(rows[-1].get(key)) in (int, float)
                                                         for key in ("step", f"{kind}_loss", "tokens_seen"))
        except (ValueError, AttributeError):
            usable = False
        if not usable:
            raise UnreadableFile(f"{path}: line {number} is cut short or not a metrics row: {line.strip()[:80]}")
    return rows


def read_run(folder: str) -> Run:
    source, sections, resumed = read_log(os.path.join(folder, "log.txt"))
    if missing := [title for title in ("hyperparameters", "run") if title not in sections]:
        raise RecordError(f"{os.path.join(folder, 'log.txt')}: no {missing[0]} section (the run did not start)")
    return Run(folder, source, sections, resumed, read_metrics(os.path.join(folder, "metrics.jsonl")),
               read_json(os.path.join(folder, "result.json")))


def run_folder_of(path: str) -> str:
    """Accepts a run folder or its log.txt."""
    folder = os.path.dirname(path) if os.path.basename(path) == "log.txt" else path
    if not os.path.isfile(os.path.join(folder, "log.txt")):
        raise RecordError(f"{path}: no log.txt (expected a run folder such as logs/<run_id>)")
    return folder


def sha256_text(text: str, from_file: bool = False) -> str:
    """sha256 of the text, or of the bytes of the file it names (from_file)."""
    with open(text, "rb") if from_file else contextlib.nullcontext() as handle:
        return hashlib.sha256(handle.read() if from_file else text.encode("utf-8")).hexdigest()


def write_json(path: str, payload: dict) -> None:
    train_gpt.atomic_write_bytes(path, (json.dumps(payload, indent=2) + "\n").encode("utf-8"))


def copy_run(folder: str, target: str, exist_ok: bool) -> None:
    os.makedirs(target, exist_ok=exist_ok)
    for name in RUN_FILES:
        shutil.copyfile(os.path.join(folder, name), os.path.join(target, name))


def same_val_set(a: dict, b: dict) -> bool:
    """Whether two runs (or a run and a reference curve) scored the same validation set: its unigram entropy."""
    return abs(a.get("unigram_val_entropy", 0.0) - b.get("unigram_val_entropy", 0.0)) <= 1e-6


def loss_text(value) -> str:
    return "nan" if value is None else f"{value:.4f}"


# ----------------------------------------------------------------------------------------------------------------------
# Consistency: metrics.jsonl and result.json agree with each other, and log.txt says what they say

def progress_line_problems(run: Run, totals: dict) -> list[str]:
    """Each train and val line of log.txt against its metrics.jsonl row (step/total, loss, tokens), member by member
    (with --parallel_members their lines interleave); no line without a row, no row without a line."""
    size, problems, count = run.hyperparameters.get("ensemble_size", 1), [], train_gpt.format_count
    tags = {None: "", **{m: train_gpt.member_tag(SimpleNamespace(ensemble_size=size), m)
                         for m in range(size if size > 1 else 0)}}
    for kind, start in PROGRESS_KINDS:
        rows = getattr(run, kind)
        for member in dict.fromkeys([*tags, *(row.get("member") for row in rows)]):  # "" also finds stray lines
            tag = tags.get(member, f"(member {member} has no tag) ")
            lines = [line for line in run.lines if line.startswith(tag + start)]
            expected = [(f"{tag}{start}{row['step']}/{totals.get(member)} | ",
                         f"| {kind}_loss {loss_text(row[kind + '_loss'])} | tokens {count(row['tokens_seen'])} |")
                        for row in rows if row.get("member") == member]
            wrong = next((f"metrics.jsonl: {head}...{numbers}; log.txt: {line}" for (head, numbers), line in
                          zip(expected, lines) if not (line.startswith(head) and numbers in line)), None)
            if wrong or len(lines) != len(expected):
                problems.append(f"{kind} loss lines disagree with metrics.jsonl "
                                f"({wrong or f'{tag}{len(lines)} log lines, {len(expected)} metrics rows'})")
    return problems


def epoch_end_steps(run: Run, tag: str, total: int) -> set[int] | None:
    """The steps below `total` that end an epoch, from the member's `seed S | a/b/c steps/epoch x E epochs` line (a
    batch_schedule's per-epoch counts, the last repeating); None where it cannot be told: public stepping (epoch
    ends fall inside steps) or no such line."""
    line = next((line for line in run.lines if line.startswith(tag + "seed ") and " steps/epoch x " in line), None)
    if line is None or run.hyperparameters.get("public_steps"):
        return None
    try:
        counts = [int(part) for part in line[len(tag):].split(" | ")[1].split(" steps/epoch")[0].split("/")]
    except (IndexError, ValueError):
        return None
    if not counts or min(counts) < 1:
        return None
    ends, step = set(), 0
    for epoch in itertools.count():
        step += counts[min(epoch, len(counts) - 1)]
        if step >= total:
            return ends
        ends.add(step)


def step_gaps(run: Run, totals: dict) -> list[str]:
    """Step continuity (review v08): every step the run's own settings log is in metrics.jsonl (progress_line_problems
    holds log.txt to the same rows): train at step 1, every log_every-th and the last; val at every val_every-th and
    the last, and at each epoch end unless val_every is -1. A step dropped from both files would otherwise pass."""
    hp, gaps = run.hyperparameters, []
    every, val_every = hp.get("log_every", 10), hp.get("val_every", 0)
    size = hp.get("ensemble_size", 1)
    if not all(type(value) is int for value in (every, val_every, size, *totals.values())) or every < 1 or \
            val_every < -1:  # what train_gpt.py writes: a hand-made file is refused here, not with a traceback
        return [f"log_every {every!r}, val_every {val_every!r} or a last step {list(totals.values())} is not a whole "
                f"number train_gpt.py would write"]
    for member, total in totals.items():
        tag = "" if member is None else train_gpt.member_tag(SimpleNamespace(ensemble_size=size), member)
        ends = epoch_end_steps(run, tag, total) if val_every >= 0 else set()
        val_rule = ", ".join([*([f"each multiple of val_every {val_every}"] if val_every > 0 else []),
                              *(["each epoch end"] if ends else []), "the last"])
        train_rule = f"step 1, each multiple of log_every {every}, the last"
        for kind, wanted, rule in [
                ("train", {1, total, *range(every, total + 1, every)}, train_rule),
                ("val", {total, *(range(val_every, total + 1, val_every) if val_every > 0 else ()), *(ends or ())},
                 val_rule)]:
            have = {row["step"] for row in getattr(run, kind) if row.get("member") == member}
            if missing := sorted(wanted - have):
                shown = ", ".join(map(str, missing[:5])) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
                gaps.append(f"{'' if member is None else f'member {member}: '}{kind} rows skip step"
                            f"{'s' if len(missing) > 1 else ''} {shown}, which the run "
                            f"{'logs' if kind == 'train' else 'validates'} ({rule})")
    return gaps


def log_problems(run: Run) -> list[str]:
    """log.txt against result.json: the hyperparameters section, where it ran, the test line and the done line."""
    get = run.result.get
    test_line = next((line + " |" for line in reversed(run.lines) if line.startswith("test ")), None)
    done = next((line for line in reversed(run.lines) if line.startswith("done | ")), "")
    return [message for agrees, message in [
        (run.sections["hyperparameters"] == [f"{key} = {value!r}" for key, value in run.hyperparameters.items()],
         "result.json hyperparameters differ from the log's hyperparameters section"),
        (any(line.startswith(f"world_size {get('world_size')} | device {get('device')} | ")
             for line in run.sections.get("environment", [])),
         f"result.json world_size {get('world_size')} / device {get('device')} differ from the log's environment "
         f"section"),
        ((test_line is None) == (get("test_loss") is None) and (
            test_line is None or f"| test_loss {loss_text(get('test_loss'))} |" in test_line),
         f"result.json test_loss {get('test_loss')} != the log's test line ({test_line})"),
        *[(text in done, f"result.json {field} {get(field)} disagrees with the done line ({done})") for field, text in [
            ("val_loss", f"done | val_loss {loss_text(get('val_loss'))}"),
            ("tokens_seen", f" tokens trained on {train_gpt.format_count(get('tokens_seen', -1))} "),
            ("ranks_agree", f" ranks agree: {'yes' if get('ranks_agree') else 'NO'}")]]] if not agrees]


def run_problems(folder: str) -> tuple[list[str], Run | None, dict | None]:
    """Checks one run folder; returns (problems, the run, result.json). A file that cannot be read at all
    (UnreadableFile) is raised, not listed: bad input, not a failed check."""
    try:
        run = read_run(folder)
    except UnreadableFile:
        raise
    except RecordError as error:
        return [str(error)], None, None
    result, hp, problems = run.result, run.hyperparameters, []

    def need(condition: bool, message: str) -> None:
        if not condition:
            problems.append(f"{run.name}: {message}")

    need(any(line.startswith("done | ") for line in run.lines), "log.txt has no final `done` line (the run did not "
                                                                "finish)")
    need(bool(run.train) and bool(run.val), "metrics.jsonl has no train or no val rows")
    need(not run.resumed, "the run was resumed (--resume): a record is one uninterrupted run, so that its log is "
                          "the whole story and --rerun can replay it")
    if problems:
        return problems, run, result
    try:
        compile(run.source, "train_gpt.py", "exec")
    except SyntaxError as error:
        problems.append(f"{run.name}: the embedded source does not compile ({error.msg}, line {error.lineno})")
    # metrics.jsonl member by member (None: a single model): steps rise to the member's total, its last train row
    # (train_gpt always logs the last step); the totals add up to result.json's steps, the members to ensemble_size
    last = {row.get("member"): row for row in run.train}
    totals = {member: row["step"] for member, row in last.items()}
    for (member, total), kind in itertools.product(totals.items(), ("train", "val")):
        steps = [row["step"] for row in getattr(run, kind) if row.get("member") == member]
        need(steps == sorted(set(steps)) and max(steps, default=0) <= total,
             f"{'' if member is None else f'member {member}: '}{kind} rows' steps do not rise to {total}: {steps}")
    need(sum(totals.values()) == result.get("steps"),
         f"metrics.jsonl's steps add up to {sum(totals.values())}, result.json says {result.get('steps')}")
    need(len(totals) == hp.get("ensemble_size", 1),
         f"metrics.jsonl shows {len(totals)} member(s), result.json's ensemble_size is {hp.get('ensemble_size')}")
    # result.json against the last rows: a single model's ranked loss is its last val (not so for ensembles and
    # snapshots), the train loss the last member's; tokens and training time add up over the members
    single = list(totals) == [None] and not hp.get("snapshot_cycles") and not hp.get("epoch_snapshots")
    final_train = last[max(last, key=lambda member: member or 0)]["train_loss"]
    tokens = sum(row["tokens_seen"] for row in last.values())
    trained = sum(row.get("train_seconds", math.nan) for row in last.values())
    for field, theirs, agree in [
            ("val_loss", run.val[-1]["val_loss"], not single or loss_text(run.val[-1]["val_loss"]) == loss_text(
                result.get("val_loss"))),
            ("train_loss", final_train, loss_text(final_train) == loss_text(result.get("train_loss"))),
            ("tokens_seen", tokens, tokens == result.get("tokens_seen")),
            # result.json rounds the sum to 0.01 s, each metrics row its own time to 0.001 s
            ("train_seconds", f"{trained:.2f}",
             abs(trained - result.get("train_seconds", -1)) <= 0.006 + 0.0005 * len(last))]:
        need(agree, f"result.json {field} {result.get(field)} != {theirs}, metrics.jsonl's")
    problems += [f"{run.name}: {problem}" for problem in progress_line_problems(run, totals) + step_gaps(run, totals)
                 + log_problems(run)]
    return problems, run, result


# ----------------------------------------------------------------------------------------------------------------------
# Statistics: mean, std and the one-sided Welch t-test (the t distribution via the regularised incomplete beta)

def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Lentz's method for the continued fraction of I_x(a, b) (Numerical Recipes, betacf)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    h = d = 1.0 / (d if abs(d) > tiny else tiny)
    for m in range(1, 1000):
        m2 = 2 * m
        for numerator in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def student_t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df degrees of freedom (df need not be an integer: Welch): half the regularised
    incomplete beta I_x(df/2, 1/2) at x = df / (df + t^2)."""
    a, b, x = df / 2.0, 0.5, (df / (df + t * t) if math.isfinite(t) else 0.0)
    if x <= 0.0 or x >= 1.0:
        beta = x
    else:
        log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
        if x < (a + 1.0) / (a + b + 2.0):  # the continued fraction converges fast on this side; else use symmetry
            beta = math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
        else:
            beta = 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b
    return 0.5 * beta if t > 0 else 1.0 - 0.5 * beta


def improvement_p_value(new: list[float], old: list[float]) -> float | None:
    """One-sided p-value of "the new runs' mean loss is lower than the old ones'": Welch's t-test; against a single
    old run, a one-sample t-test of the new runs against its value. None when the new record has one seed."""
    if len(new) < 2:
        return None
    new_mean, new_std = mean_std(new)
    old_mean, old_std = mean_std(old)
    new_var, old_var = new_std ** 2 / len(new), (old_std ** 2 / len(old)) if old_std is not None else 0.0
    if (spread := new_var + old_var) == 0.0:
        return 0.0 if new_mean < old_mean else 1.0
    df = len(new) - 1 if old_std is None else (  # Welch-Satterthwaite
        spread ** 2 / (new_var ** 2 / (len(new) - 1) + old_var ** 2 / (len(old) - 1)))
    return student_t_sf((old_mean - new_mean) / math.sqrt(spread), df)


# ----------------------------------------------------------------------------------------------------------------------
# Records on disk: the seeds' results, the track's other records

def record_runs(record: str) -> list[str]:
    """The run folders of a record (sub-folders holding a log.txt), in name order."""
    if not os.path.isdir(record):
        raise RecordError(f"{record}: not a folder")
    if not (runs := subfolders(record, "log.txt")):
        raise RecordError(f"{record}: holds no run folders (<run_id>/log.txt)")
    return runs


def teacher_runs(record: str) -> list[str]:
    """A distilled record's teacher run folders (<record>/teachers/<run_id>/), in name order; [] for others."""
    return subfolders(os.path.join(record, TEACHERS), "log.txt")


def teacher_name(run: Run) -> str:
    """The run_id of the finished run a distilled run's --distill_from names (its folder's name)."""
    return os.path.basename(os.path.normpath(run.hyperparameters["distill_from"]))


def check_teachers(students: list[Run], teacher_folders: list[str]) -> tuple[list[str], list[Run], list[dict]]:
    """The teachers of distilled runs (issue 28), generation by generation: the runs the students' --distill_from
    name, then the runs those name when they were distilled too, and so on; returned in the order they were made
    (the first generation first, as a reader re-makes them). Each run names its teacher by run_id,
    each seed its own (a record whose seeds shared one teacher would hide the teacher's own seed-to-seed spread);
    each generation is one experiment (one recipe, seeds that differ); every teacher given is used."""
    by_id, problems, logs, results = {}, [], [], []
    for folder in teacher_folders:
        by_id.setdefault(read_json(os.path.join(folder, "result.json")).get("run_id"), folder)
    generation, level = list(students), 0
    while generation and not problems:
        taught = [bool(run.hyperparameters.get("distill_from")) for run in generation]
        if level == 0 and not all(taught):
            problems += [f"{run.name}: not distilled (--distill_from is empty), yet the record has teachers"
                         for run, was in zip(generation, taught) if not was]
        elif any(taught) and not all(taught):
            problems.append(f"teachers {', '.join(run.name for run in generation)}: some were distilled, some not "
                            f"(one generation is one recipe)")
        named = {}
        for run in generation if all(taught) else []:
            source, name = run.hyperparameters["distill_from"], teacher_name(run)
            if name not in by_id:
                problems.append(f"{run.name}: its teacher {source} is not among the teachers given "
                                f"({', '.join(sorted(map(str, by_id))) or 'none'})")
            elif name in named:
                problems.append(f"{run.name} and {named[name]} share the teacher {name}: each seed needs its own")
            elif any(result["run_id"] == name for result in results):
                problems.append(f"{run.name}: its teacher {name} is also its own teacher's teacher (a cycle)")
            named.setdefault(name, run.name)
        if problems or not named:
            break
        found, generation, found_results = check_runs_together([by_id[name] for name in named], RECORD_FREE_FIELDS,
                                                               "teacher recipe")
        problems += [f"teacher {problem}" for problem in found]
        logs, results, level = generation + logs, found_results + results, level + 1  # the first teachers first
    if not problems and (unused := sorted(set(map(str, by_id)) - {result["run_id"] for result in results})):
        problems.append(f"teacher(s) no run names: {', '.join(unused)}")
    return problems, logs, results


def run_results(folders: list[str]) -> list[dict]:
    return [read_json(os.path.join(run, "result.json")) for run in folders]


def record_results(record: str) -> list[dict]:
    return run_results(record_runs(record))


def subfolders(folder: str, holding: str) -> list[str]:
    """The sub-folders of folder that hold the file `holding`, in name order (records: oldest first, by date)."""
    return sorted(os.path.join(folder, entry) for entry in os.listdir(folder)
                  if os.path.isfile(os.path.join(folder, entry, holding))) if os.path.isdir(folder) else []


def track_records(records_dir: str, track: str) -> list[str]:
    return subfolders(os.path.join(records_dir, track), "record.json")


def made_order(record: str) -> tuple[str, str, str]:
    """When a record was made, for "older": its date, then (same date) record.json's `made` time (records made before
    the field existed have none and count as earlier), then its folder name."""
    name = os.path.basename(os.path.normpath(record))
    if not os.path.isfile(os.path.join(record, "record.json")):  # being made now (new): after every record made
        return name[:10], "~", name
    summary = read_json(os.path.join(record, "record.json"))
    return summary.get("date", name[:10]), summary.get("made", ""), name


def previous_record(record: str, records_dir: str, track: str) -> str | None:
    """The track's standing record just before this one: the lowest mean val loss among the records made before it
    (two of one date are told apart by when they were made, not by their slugs' alphabetical order)."""
    this = made_order(record)
    older = [r for r in track_records(records_dir, track) if made_order(r) < this]
    return min(older, key=lambda r: mean_std([res["val_loss"] for res in record_results(r)])[0], default=None)


def losses_of(results: list[dict], key: str = "val_loss") -> list[float]:
    return [result[key] for result in results if result.get(key) is not None]


def format_mean_std(values: list[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def format_tokens(count: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= size:
            return f"{count / size:.3g}{unit}"
    return f"{count:.0f}"


def device_hours(result: dict) -> float:
    """Compute of one run: ranks x wall time (evaluation and start-up included)."""
    return result.get("world_size", 1) * result.get("wall_seconds", 0.0) / 3600


def short_command(log: Run, world_size: int) -> str:
    """The logged command with the interpreter and absolute script path replaced by the portable form."""
    words = shlex.split(log.command)
    launcher = ["python"] if world_size == 1 else ["torchrun", "--standalone", f"--nproc_per_node={world_size}"]
    return shlex.join([*launcher, "train_gpt.py", *(words[2:] if len(words) >= 2 else words)])


def significance_lines(record: str, records_dir: str, track: str) -> list[str]:
    """Mean, std and the p-value against the track's previous record, as printed by verify and written by new."""
    losses = [r["val_loss"] for r in record_results(record)]
    mean, std = mean_std(losses)
    lines = [f"val loss over {len(losses)} seed(s): mean {mean:.4f}, std " + ("n/a" if std is None else f"{std:.4f}")]
    if (previous := previous_record(record, records_dir, track)) is None:
        return lines + ["previous record: none in this track (first record)"]
    old = [r["val_loss"] for r in record_results(previous)]
    p_value = improvement_p_value(losses, old)
    verdict = ("n/a (one seed: run at least 2, better 3+)" if p_value is None else
               f"{p_value:.2g} ({'significant' if p_value < 0.01 else 'NOT significant'} at p < 0.01)")
    return lines + [f"previous record: {os.path.basename(previous)} ({format_mean_std(old)}, {len(old)} seed(s)); "
                    f"one-sided Welch t-test p = {verdict}"]


# ----------------------------------------------------------------------------------------------------------------------
# Data efficiency: a loss placed on the reference curve of baselines trained on increasing token budgets

class ExtrapolationError(RecordError):
    """The loss lies outside the reference points: we bound the answer rather than invent one."""


def load_curve(path: str, curve: dict | None = None) -> dict:
    """The reference curve at path (or the given one, about to be written there), its points sorted and checked."""
    curve = read_json(path) if curve is None else curve
    points = sorted(curve.get("points", []), key=lambda p: p["train_tokens"])
    if len(points) < 2:
        raise RecordError(f"{path}: a reference curve needs at least 2 points, it has {len(points)}")
    for a, b in zip(points, points[1:]):
        if not (b["train_tokens"] > a["train_tokens"] and b["val_loss"] < a["val_loss"]):
            raise RecordError(f"{path}: reference losses must fall as the budget grows; {a['train_tokens']} tokens -> "
                              f"{a['val_loss']:.4f}, {b['train_tokens']} tokens -> {b['val_loss']:.4f} (add seeds or "
                              f"space the budgets further apart)")
    curve["points"] = points
    return curve


def matching_budget(points: list[dict], loss: float) -> float:
    """The token budget at which the baseline reaches `loss`: piecewise-linear in (log tokens, loss) between the
    reference points, which must be sorted by budget with falling losses. Refuses to extrapolate."""
    best, worst = points[-1], points[0]
    for end, off, side, which, verdict, advice in (
            (best, loss < best["val_loss"], "below", "largest", "it beats",
             "larger budgets to measure how much further"),
            (worst, loss > worst["val_loss"], "above", "smallest", "it is worse than", "smaller budgets to place it")):
        if off:
            raise ExtrapolationError(f"val loss {loss:.4f} is {side} every reference point (the {which} budget, "
                                     f"{end['train_tokens']:,} tokens, reaches {end['val_loss']:.4f}): {verdict} a "
                                     f"baseline on {end['train_tokens']:,} tokens; add reference runs with {advice}")
    for a, b in zip(points, points[1:]):
        if b["val_loss"] <= loss <= a["val_loss"]:
            fraction = (a["val_loss"] - loss) / (a["val_loss"] - b["val_loss"])
            return math.exp(math.log(a["train_tokens"]) + fraction * (math.log(b["train_tokens"]) -
                                                                      math.log(a["train_tokens"])))
    raise AssertionError("unreachable: the loss lies between the first and the last point")


def curve_budget(curve: dict, loss: float) -> float:
    """matching_budget; on a curve stored as linear in tokens (the mini track's, the public slowrun's data_eff rule)
    the budget of bench/mini.py's reference_budget, the one implementation of that rule (same range check)."""
    budget = matching_budget(curve["points"], loss)  # refuses a loss off the curve, in both cases
    if curve.get("interpolation") != "linear in train_tokens":
        return budget
    from bench.mini import reference_budget
    return reference_budget([(p["train_tokens"], p["val_loss"]) for p in curve["points"]], loss)


def efficiency_summary(curve: dict, loss: float, train_tokens: int) -> tuple[str, float | None]:
    """(one line for people, the multiple or None when out of range) for a run trained on train_tokens tokens."""
    try:
        budget = curve_budget(curve, loss)
    except ExtrapolationError as error:
        return str(error), None
    return (f"val loss {loss:.4f} on {train_tokens:,} train tokens matches a baseline trained on {budget:,.0f} tokens: "
            f"{budget / train_tokens:.2f}x the tokens"), budget / train_tokens


def efficiency_cell(curve: dict | None, loss: float, train_tokens: int, digits: int = 2) -> str:
    """The leaderboard's data-efficiency column: the multiple, or a bound when the loss lies off the curve."""
    if curve is None:
        return "—"
    best, worst = curve["points"][-1], curve["points"][0]
    bound = "> " if loss < best["val_loss"] else "< " if loss > worst["val_loss"] else ""
    budget = (best if bound == "> " else worst)["train_tokens"] if bound else curve_budget(curve, loss)
    return f"{bound}{budget / train_tokens:.{digits}f}x"


# Two conventions (issue 28): a track's reference_curve.json is its own ("strict") curve; reference_curve_public.json
# beside it, where present, is the public slowrun's convention (data_eff/README.md: the default recipe for ONE epoch
# at each budget, best of 3 sizes), whose multiples the public figures (3.8x .. 13.8x) are quoted in, to one decimal.
PUBLIC_CURVE = "reference_curve_public.json"


def both_conventions_cell(strict: dict | None, public: dict | None, loss: float, train_tokens: int) -> str:
    """Every multiple in both conventions: '1.87x strict, 9.9x public' ('— public' where a track has no such curve)."""
    return (f"{efficiency_cell(strict, loss, train_tokens)} strict, "
            f"{efficiency_cell(public, loss, train_tokens, digits=1)} public")


def efficiency_both(strict: dict | None, public: dict | None, loss: float, train_tokens: int, strict_name: str,
                    public_name: str) -> tuple[str, list[str], float | None]:
    """(the cell in both conventions, one line per convention for people, the strict multiple or None off its curve)."""
    lines, multiple = [], None
    for curve, name, label in ((strict, strict_name, "strict"), (public, public_name, "public convention")):
        if curve is None:
            lines.append(f"{label} ({name}): no curve for this track yet")
            continue
        line, value = efficiency_summary(curve, loss, train_tokens)
        lines.append(f"{label} ({name}): " + (line if value is not None else f"cannot place it: {line}"))
        multiple = value if curve is strict else multiple
    return both_conventions_cell(strict, public, loss, train_tokens), lines, multiple


def track_curve(records_dir: str, track: str, name: str = "reference_curve.json") -> dict | None:
    path = os.path.join(records_dir, track, name)
    return load_curve(path) if os.path.isfile(path) else None


# ----------------------------------------------------------------------------------------------------------------------
# Plot: train and val loss against tokens seen, the unigram baseline (and loss against ensemble size when runs log
# `ensemble` rows)

def loss_figure(folders: list[str], width_px: int = 960, height_px: int = 600, title: str = ""):
    """plot_runs' figure: per run (and member) val solid with markers, train dashed in the same colour, a dotted
    unigram baseline; a second panel of loss against ensemble size when runs log `ensemble` rows."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    # a run still going (no result.json yet) may be writing its last metrics line: that one is skipped
    runs = [(os.path.basename(os.path.normpath(folder)), read_metrics(os.path.join(folder, "metrics.jsonl"),
             not os.path.isfile(result)), result) for folder in folders
            for result in [os.path.join(folder, "result.json")]]
    ensembles = [(name, [(r["members"], r["val_loss"]) for r in rows if r.get("kind") == "ensemble"])
                 for name, rows, _ in runs]
    figure, axes = plt.subplots(1, 2 if any(rows for _, rows in ensembles) else 1, squeeze=False, dpi=100,
                                figsize=(width_px / 100, height_px / 100))
    losses, colours, markers = axes[0][0], {}, itertools.cycle("os^Dv<>p")
    for name, rows, _ in runs:
        for member in dict.fromkeys(row.get("member") for row in rows if row.get("kind") in ("train", "val")):
            label = name if member is None else f"{name} member {member}"
            val, train = ([(row["tokens_seen"], row[f"{kind}_loss"]) for row in rows
                           if row.get("kind") == kind and row.get("member") == member] for kind in ("val", "train"))
            # validated only at the end (--val_every -1): the seeds' points overlap, so each has its own hollow
            # marker shape and its value in the legend
            alone = len(val) == 1
            line, = losses.plot([t for t, _ in val], [loss for _, loss in val], marker=next(markers),
                                markersize=9 if alone else 5, fillstyle="none" if alone else "full",
                                label=f"{label} val" + (f" {val[0][1]:.4f} (end only)" if alone else ""))
            colours.setdefault(name, line.get_color())
            if train:  # dashed beside it: where val is scored rarely it shows the run's course
                losses.plot(*zip(*train), linestyle="--", linewidth=1, color=line.get_color(), label=f"{label} train")
    # the unigram baseline (train's token frequencies scored on val; none while a run is going): one grey line, or
    # one per run in its colour when their train sets differ (reference runs on different budgets)
    unigrams = {name: read_json(path).get("unigram_val_loss") for name, _, path in runs if os.path.isfile(path)}
    unigrams = {name: round(value, 4) for name, value in unigrams.items() if value is not None}
    shared = len(set(unigrams.values())) == 1
    for name, unigram in list(unigrams.items())[:1 if shared else None]:
        losses.axhline(unigram, color="gray" if shared else colours.get(name, "gray"), linestyle=":", linewidth=1.5,
                       label=("" if shared else f"{name} ") + f"unigram baseline {unigram:.4f}")
    losses.set(xlabel="tokens seen", ylabel="loss (nats/token)")
    for name, rows in filter(lambda ensemble: ensemble[1], ensembles):
        axes[0][1].plot(*zip(*rows), marker="o", label=name)
        axes[0][1].set(xlabel="ensemble size", ylabel="val loss (nats/token)")
    for panel in axes[0]:
        panel.grid(alpha=0.3)
    losses.legend(fontsize=8)
    names = [name for name, _, _ in runs]
    figure.suptitle(title or "loss against tokens seen: " + ", ".join(names[:4]) + (" ..." if len(names) > 4 else ""))
    figure.tight_layout()
    return figure


def plot_runs(folders: list[str], out: str, width_px: int = 960, height_px: int = 600, title: str = "") -> None:
    import matplotlib.pyplot as plt

    figure = loss_figure(folders, width_px, height_px, title)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    figure.savefig(out, dpi=figure.dpi)  # no bbox_inches="tight": the PNG keeps exactly width_px x height_px
    plt.close(figure)


def plot_folders(paths: list[str]) -> list[str]:
    """Run folders of the given run folders, log.txt files and record folders."""
    return [folder for path in paths for folder in (
        record_runs(path) if os.path.isfile(os.path.join(path, "record.json")) else [run_folder_of(path)])]


def record_title(paths: list[str]) -> str:
    """One record's plot is titled as `new` titles it; anything else by its runs' names (loss_figure)."""
    summary = read_json(os.path.join(paths[0], "record.json")) if len(paths) == 1 and os.path.isfile(
        os.path.join(paths[0], "record.json")) else None
    return f"{summary.get('track')}: {summary.get('title')}" if summary else ""


def command_plot(args) -> int:
    plot_runs(plot_folders(args.paths), args.out, args.width, args.height, args.title or record_title(args.paths))
    print(f"wrote {args.out}")
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# new: a record folder from finished runs

def check_runs_together(folders: list[str], free: set = PER_SEED_FIELDS, recipe: str = "recipe",
                        seeds_differ: bool = True) -> tuple[list[str], list[Run], list[dict]]:
    """Checks each run and that the runs are one experiment: the same source, validation set and settings but the
    `free` ones; the seeds of a record also differ (the points of a reference curve may share one)."""
    problems, logs, results = [], [], []
    for folder in folders:
        found, log, result = run_problems(folder)
        problems += found
        if log is not None and result is not None:
            logs.append(log)
            results.append(result)
    if problems or not logs:
        return problems, logs, results
    reference = logs[0]
    for log in logs[1:]:
        if log.source != reference.source:
            problems.append(f"{log.path}: embedded source differs from {reference.path} (sha256 "
                            f"{sha256_text(log.source)[:12]} vs {sha256_text(reference.source)[:12]})")
        differing = sorted(k for k in set(log.hyperparameters) | set(reference.hyperparameters)
                           if k not in free and log.hyperparameters.get(k) != reference.hyperparameters.get(k))
        if differing:
            problems.append(f"{log.path}: hyperparameters differ from {reference.path} (not the same {recipe}): "
                            f"{', '.join(differing)}")
    seeds = [log.hyperparameters.get("seed") for log in logs]
    if seeds_differ and len(set(seeds)) != len(seeds):
        problems.append(f"two runs share a seed ({seeds}): seeds of a record must differ")
    if not all(same_val_set(r, results[0]) for r in results):
        problems.append(f"the runs scored different validation sets (unigram entropies "
                        f"{sorted({r.get('unigram_val_entropy') for r in results})})")
    return problems, logs, results


def record_readme(summary: dict, logs: list[Run], results: list[dict], significance: list[str],
                  efficiency: str, teacher_logs: list[Run] = (), teacher_results: list[dict] = ()) -> str:
    losses, tests, first = losses_of(results), losses_of(results, "test_loss"), results[0]
    teacher_logs, teacher_results = list(teacher_logs), list(teacher_results)
    taught = [f"- teachers: {len(teacher_results)} finished run(s) in `{TEACHERS}/` (each seed's `--distill_from`), "
              f"{sum(device_hours(r) for r in teacher_results):.3f} device-hours, included in the compute above"
              ] if teacher_results else []
    teacher_lines = ["", "## Teachers", "", "Each student above learned from the finished run its `--distill_from` "
                     "names; their logs are here, their weights are not (re-run a teacher whole to re-run its "
                     "student). Listed in the order they were made: a run's teacher comes before it. Make them in "
                     "that order, each seed's `--distill_from` pointing at your own folder of the teacher named "
                     "(the commands show the maker's paths; an ensemble run keeps its members' weights in "
                     "`members/` even with `--save_model false`).", "",
                     "| teacher | seed | val loss | test loss | train time |", "|---|---|---|---|---|",
                     *[f"| {r['run_id']} | {log.hyperparameters.get('seed')} | {r['val_loss']:.4f} | "
                       f"{loss_text(r.get('test_loss')) if r.get('test_loss') is not None else '—'} | "
                       f"{r['train_seconds']:.0f} s |" for log, r in zip(teacher_logs, teacher_results)], "", "```",
                     *[short_command(log, r["world_size"]) for log, r in zip(teacher_logs, teacher_results)], "```"
                     ] if teacher_results else []
    lines = [
        f"# {summary['title']}", "",
        f"Track `{summary['track']}` · {summary['date']} · {len(results)} seed(s)", "",
        summary["description"], "",
        "## Result", "",
        f"- val loss: **{format_mean_std(losses)}** (mean ± std over {len(losses)} seed(s))",
        f"- test loss: {format_mean_std(tests) if tests else 'not scored (no test set)'}",
        f"- tokens trained on: {first['train_tokens']:,} unique train tokens, {first['tokens_seen']:,} seen "
        f"({first['epochs']:.2f} epochs, {first['steps']} steps)",
        f"- compute: {sum(device_hours(r) for r in results + teacher_results):.3f} device-hours in all "
        f"({first['world_size']} x {first['device']} per run)", *taught,
        f"- data efficiency: {efficiency}",
        *[f"- {line}" for line in significance[1:]],  # [0] repeats the mean and std above
        f"- script: sha256 {summary['source_sha256']} (inside every log.txt)", "",
        "| run | seed | val loss | test loss | steps | train time | wall time |",
        "|---|---|---|---|---|---|---|",
        *[f"| {result['run_id']} | {log.hyperparameters.get('seed')} | {result['val_loss']:.4f} | "
          f"{loss_text(result.get('test_loss')) if result.get('test_loss') is not None else '—'} | "
          f"{result['steps']} | {result['train_seconds']:.0f} s | {result['wall_seconds']:.0f} s |"
          for log, result in zip(logs, results)],
        "", "## Commands", "", "```", *[short_command(log, result["world_size"]) for log, result in zip(logs, results)],
        "```", *teacher_lines, "", "![val loss against tokens seen](plot.png)", "",
        "Check it: `python records/records.py verify <this folder>` (add `--rerun --steps 10` to re-run the embedded "
        "script and compare its loss lines); re-make it whole, teachers first: `python records/records.py reproduce "
        "<this folder> --out remade --seeds 0`.", ""]
    return "\n".join(lines)


def command_new(args) -> int:
    folders = [run_folder_of(path) for path in args.runs]
    teacher_folders = [run_folder_of(path) for path in args.teachers]
    problems, logs, results = check_runs_together(folders, RECORD_FREE_FIELDS)
    teacher_logs, teacher_results, distilled = [], [], [log for log in logs if log.hyperparameters.get("distill_from")]
    if not problems and teacher_folders:
        found, teacher_logs, teacher_results = check_teachers(logs, teacher_folders)
        problems += found
    elif not problems and distilled:
        problems.append(f"the runs learned from --distill_from ({distilled[0].hyperparameters['distill_from']}, ...): "
                        f"pass the finished runs that taught them as --teachers (one per seed), so the record "
                        f"carries them")
    if not problems:
        if not (args.track or logs[0].hyperparameters.get("preset") == "tiny"):
            raise RecordError("say which track the runs are for: --track " + " | ".join(TRACKS))
        track = get_track(args.track or "tiny")
        problems += [f"{r['run_id']}: {p}" for r in results for p in track_violations(track, r)]
        problems += [f"teacher {r['run_id']}: {p}" for r in teacher_results for p in track_violations(track, r)]
    if problems:
        raise RecordError("the runs cannot make a record:\n  " + "\n  ".join(problems))
    date = args.date or datetime.date.today().isoformat()
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", date) or not re.fullmatch(r"[a-z0-9][a-z0-9-]*", args.slug):
        raise RecordError("--date must be YYYY-MM-DD and --slug lowercase letters, digits and dashes")
    if os.path.exists(record := os.path.join(args.records_dir, track.name, f"{date}_{args.slug}")):
        raise RecordError(f"{record} already exists")
    os.makedirs(record)
    try:
        for folder, result in zip(folders, results):
            copy_run(folder, os.path.join(record, result["run_id"]), exist_ok=False)
        for log, result in zip(teacher_logs, teacher_results):  # check_teachers' order, not the command line's
            copy_run(log.folder, os.path.join(record, TEACHERS, result["run_id"]), exist_ok=False)
        plot_runs(record_runs(record), os.path.join(record, "plot.png"), title=f"{track.name}: {args.title}")
        mean, std = mean_std([r["val_loss"] for r in results])
        cell, lines, _ = efficiency_both(track_curve(args.records_dir, track.name), track_curve(
            args.records_dir, track.name, PUBLIC_CURVE), mean, results[0]["train_tokens"],
            f"records/{track.name}/reference_curve.json", f"records/{track.name}/{PUBLIC_CURVE}")
        efficiency = f"{cell} ({'; '.join(lines)})"  # both conventions (issue 28)
        made = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")
        summary = dict(track=track.name, date=date, made=made, slug=args.slug, title=args.title,
                       description=args.description or args.title, source_sha256=sha256_text(logs[0].source),
                       runs=[r["run_id"] for r in results], val_loss_mean=mean, val_loss_std=std,
                       **({"teachers": [r["run_id"] for r in teacher_results]} if teacher_folders else {}))
        significance = significance_lines(record, args.records_dir, track.name)
        train_gpt.atomic_write_bytes(os.path.join(record, "README.md"),
                                     record_readme(summary, logs, results, significance, efficiency, teacher_logs,
                                                   teacher_results).encode("utf-8"))
        summary["files"] = manifest(record)
        write_json(os.path.join(record, "record.json"), summary)
    except BaseException:
        shutil.rmtree(record, ignore_errors=True)  # no half-made record
        raise
    print("\n".join([f"made {record}", *significance, f"data efficiency: {efficiency}",
                     f"next: python records/records.py verify {record} && python records/records.py table"]))
    return 0


def manifest(record: str) -> dict[str, str]:
    """sha256 of every file of the record but record.json itself: any later edit shows."""
    paths = (os.path.join(root, name) for root, _, names in os.walk(record) for name in names)
    return dict(sorted((os.path.relpath(path, record), sha256_text(path, from_file=True)) for path in paths
                       if os.path.relpath(path, record) != "record.json"))


# ----------------------------------------------------------------------------------------------------------------------
# verify: every number re-derived from the logs; optionally the script re-run and compared step by step

def rerun_flags(hyperparameters: dict, overrides: dict[str, str]) -> list[str]:
    """Every logged hyperparameter as a flag (so the embedded script's presets do not matter), then overrides."""
    settings = {**{k: v for k, v in hyperparameters.items() if k != "preset"}, **overrides}
    return [word for name, value in settings.items()
            for word in (f"--{name}", str(value).lower() if isinstance(value, bool) else str(value))]


def losses_by_place(rows: list[dict]) -> dict[tuple, float]:
    """{(member, kind, step): loss} of the train and val rows."""
    return {(row.get("member"), row["kind"], row["step"]): row[f"{row['kind']}_loss"] for row in rows
            if row.get("kind") in ("train", "val")}


def place_text(member, kind: str, step: int) -> str:
    return f"{'' if member is None else f'member {member} '}step {step} {kind}_loss"


def run_launcher(nproc: int) -> list[str]:
    """How a re-run starts: python, or torchrun's module on one node when nproc > 1."""
    return [sys.executable, *(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                              if nproc > 1 else [])]


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """--set NAME=VALUE pairs as a dict."""
    if bad := [pair for pair in pairs if "=" not in pair]:
        raise RecordError(f"--set expects name=value, got {bad[0]!r}")
    return dict(pair.split("=", 1) for pair in pairs)


def rerun_metrics(run: Run, steps: int, workdir: str, overrides: dict[str, str], nproc: int, cwd: str,
                  timeout: float) -> list[dict]:
    """The metrics.jsonl rows of the embedded source re-run with the logged hyperparameters (its full LR schedule),
    each loss printed beside the logged one as it comes, stopped once it reaches `steps`."""
    script = os.path.join(workdir, "train_gpt.py")
    train_gpt.atomic_write_bytes(script, run.source.encode("utf-8"))
    # Stop at a step the original logged: the first logged step at or past `steps`.
    target = next((row["step"] for row in run.train if row["step"] >= steps), run.train[-1]["step"])
    wanted = "val" if any(row["step"] == target for row in run.val) else "train"  # and that step's validation
    settings = dict(run_id="rerun", log_dir=os.path.join(workdir, "logs"), save_model=False, **overrides)
    metrics_path = os.path.join(workdir, "logs", "rerun", "metrics.jsonl")
    logged, start, output, rows = losses_by_place(run.metrics), time.time(), [], []
    process = subprocess.Popen([*run_launcher(nproc), script, *rerun_flags(run.hyperparameters, settings)], cwd=cwd,
                               text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    # a re-run that hangs silently (a stalled collective) prints nothing to wake the loop below: the timer ends it
    watchdog = threading.Timer(timeout, process.terminate)
    watchdog.start()
    try:
        for line in process.stdout:
            output.append(line)
            new = read_metrics(metrics_path, whole_lines_only=True)[len(rows):] if os.path.isfile(metrics_path) else []
            for key, again in losses_by_place(new).items():  # progress: each loss of the re-run beside the logged one
                print(f"    {time.time() - start:5.0f}s  {place_text(*key)} {again:.4f} " + (
                    f"(logged {logged[key]:.4f}, |diff| {abs(again - logged[key]):.4f})" if key in logged else
                    "(not logged)"), flush=True)
            rows += new
            if any(row["step"] >= target for row in rows if row.get("kind") == wanted) or time.time() - start > timeout:
                break
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.terminate()  # only the re-run we started; its partial metrics are all we need
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if not os.path.isfile(metrics_path):
        raise RecordError("the re-run did not start:\n" + "".join(output[-20:]))
    rows = read_metrics(metrics_path, whole_lines_only=True)
    if max((row["step"] for row in rows if row.get("kind") == "train"), default=0) < target:
        raise RecordError(f"the re-run stopped before step {target}:\n" + "".join(output[-20:]))
    return rows


def compare_losses(run: Run, rerun_rows: list[dict], tolerance: float) -> tuple[list[str], str]:
    """(a problem per loss both runs logged that differs by more than tolerance, a summary with the largest)."""
    mine, theirs = losses_by_place(run.metrics), losses_by_place(rerun_rows)
    gaps = {key: abs(mine[key] - theirs[key]) for key in mine if key in theirs}
    problems = [f"{place_text(*key)}: logged {loss_text(mine[key])}, re-run {theirs[key]:.4f} (|diff| {gap:.4f} > "
                f"tolerance {tolerance})" for key, gap in gaps.items() if not gap <= tolerance]  # NaN fails too
    worst = max(gaps, key=lambda key: math.inf if math.isnan(gaps[key]) else gaps[key], default=None)
    worst = worst if worst is not None and not gaps[worst] <= 0.0 else None  # named only when there is a gap
    return problems + ([] if gaps else ["no loss line to compare (raise --steps)"]), (
        f"{len(gaps)} loss values compared, max |diff| {gaps[worst] if worst else 0.0:.4f} nats"
        + (f" at {place_text(*worst)}" if worst else "") + f" (tolerance {tolerance})")


def verify_record(record: str, records_dir: str, rerun: bool, steps: int, tolerance: float,
                  overrides: dict[str, str], nproc: int, cwd: str, timeout: float) -> list[str]:
    """Every problem of the record ([] when it passes); prints what it checks."""
    summary = read_json(os.path.join(record, "record.json"))
    folder_track = os.path.basename(os.path.dirname(os.path.normpath(record)))
    track, recorded, actual = get_track(summary.get("track", folder_track)), summary.get("files", {}), manifest(record)
    # the leaderboard groups by folder: a record must follow its folder's rules
    problems = [f"record.json says track {track.name}, but the record sits in records/{folder_track}/"
                ] if track.name != folder_track else []
    problems += [f"{name}: {'missing' if name not in actual else 'added' if name not in recorded else 'edited'} since "
                 f"the record was made (sha256 differs from record.json)"
                 for name in sorted(set(recorded) | set(actual)) if recorded.get(name) != actual.get(name)]
    folders, teacher_folders = record_runs(record), teacher_runs(record)
    found, runs, results = check_runs_together(folders, RECORD_FREE_FIELDS)
    problems += found + [f"{r['run_id']}: {p}" for r in results for p in track_violations(track, r)]
    teachers = []
    if runs and (teacher_folders or summary.get("teachers") or
                 any(run.hyperparameters.get("distill_from") for run in runs)):
        taught, teachers, taught_results = check_teachers(runs, teacher_folders) if teacher_folders else (
            [f"the runs learned from --distill_from, but the record has no {TEACHERS}/ folder"], [], [])
        problems += taught + [f"teacher {r['run_id']}: {p}" for r in taught_results for p in track_violations(track, r)]
    if runs and summary.get("source_sha256") != sha256_text(runs[0].source):
        problems.append("the embedded source's sha256 differs from record.json's source_sha256")
    if results:
        mean, std = mean_std([r["val_loss"] for r in results])
        if summary.get("val_loss_mean") is None or abs(summary["val_loss_mean"] - mean) > 1e-9:
            problems.append(f"record.json val_loss_mean {summary.get('val_loss_mean')} != the runs' mean {mean}")
        previous = previous_record(record, records_dir, track.name)
        theirs = record_results(previous)[0] if previous else results[0]
        if not same_val_set(theirs, results[0]):
            problems.append(f"scored a different validation set than {os.path.basename(previous)} (unigram entropy "
                            f"{results[0].get('unigram_val_entropy')} vs {theirs.get('unigram_val_entropy')})")
    print(f"{record}: {len(folders)} run(s)" + (f" and {len(teacher_folders)} teacher(s)" if teacher_folders else "")
          + f", track {track.name}, logs {'consistent' if not problems else 'INCONSISTENT'}")
    for line in significance_lines(record, records_dir, track.name) if results and not found else []:
        print("  " + line)
    for run in runs + teachers if rerun else []:  # a teacher re-runs like any run; a student needs its weights
        if run.hyperparameters.get("distill_from") and "distill_from" not in overrides:
            print(f"  {run.name}: not re-run: it needs its teacher's weights, which a record does not carry; re-run "
                  f"the teacher whole (its command is in README.md) and pass --set distill_from=THAT_RUN_FOLDER")
            continue
        with tempfile.TemporaryDirectory(prefix="slowrun-rerun-") as workdir:
            print(f"  re-running {run.name} for {steps} step(s) (tolerance {tolerance} nats per loss line)...",
                  flush=True)
            try:
                differences, compared = compare_losses(run, rerun_metrics(run, steps, workdir, overrides, nproc, cwd,
                                                                          timeout), tolerance)
            except RecordError as error:
                differences, compared = [str(error)], "nothing compared"
            problems += [f"{run.name} re-run: {d}" for d in differences]
            print(f"  re-run {'agrees' if not differences else 'DIVERGES'}: {compared}")
    return problems


def command_verify(args) -> int:
    overrides, failed = parse_overrides(args.set), False
    for record in args.records:
        problems = verify_record(record, args.records_dir, args.rerun, args.steps, args.tolerance, overrides,
                                 args.nproc, args.cwd, args.timeout)
        # what passing means: the consistency checks cannot tell a consistent edit of every file from a real run
        ok = (f"OK: the files match record.json, agree with each other, and a re-run of the embedded script agrees "
              f"up to step {args.steps}; later steps only a longer --rerun --steps checks" if args.rerun else
              "OK: the files match record.json and agree with each other; that the numbers came from training only "
              "--rerun checks (a consistent edit of every file, resealed, passes without it)")
        print("".join(f"  FAIL {problem}\n" for problem in problems) + f"  {'REJECTED' if problems else ok}")
        failed |= bool(problems)
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------------------------------
# reproduce: a record's runs re-made whole from their embedded script, a distilled record's teachers first

def reproduction_plan(record: str, seeds: set[int] | None) -> list[Run]:
    """The runs to re-make, in order: the chosen seeds' runs (all when seeds is None) after every teacher they
    learn from, directly or through another teacher (check_teachers gives the teachers first-made first)."""
    runs = [read_run(folder) for folder in record_runs(record)]
    teachers = []
    if any(run.hyperparameters.get("distill_from") for run in runs):
        problems, teachers, _ = check_teachers(runs, teacher_runs(record))
        if problems:
            raise RecordError(f"{record}: {problems[0]}")
    chosen = [run for run in runs if seeds is None or run.hyperparameters.get("seed") in seeds]
    if not chosen:
        raise RecordError(f"{record}: no run has a seed in {sorted(seeds)} (its seeds: "
                          f"{sorted(run.hyperparameters.get('seed') for run in runs)})")
    by_name, needed, frontier = {run.name: run for run in teachers}, set(), chosen
    while frontier:  # each run's teacher, then that teacher's own
        names = {teacher_name(run) for run in frontier if run.hyperparameters.get("distill_from")} - needed
        needed |= names
        frontier = [by_name[name] for name in names]
    return [run for run in teachers if run.name in needed] + chosen


def remake_run(run: Run, out: str, overrides: dict[str, str], nproc: int, cwd: str) -> dict:
    """run re-made whole into out/<its name> by its embedded script (its --distill_from pointed at the teacher
    re-made beside it); a folder with a result.json is kept, a killed one resumed. Its result.json."""
    folder = os.path.join(out, run.name)
    if os.path.isfile(os.path.join(folder, "result.json")):
        print(f"  {run.name}: already re-made in {folder}", flush=True)
        return read_json(os.path.join(folder, "result.json"))
    script = os.path.join(out, "scripts", sha256_text(run.source)[:12], "train_gpt.py")  # one per distinct source
    if not os.path.isfile(script):
        os.makedirs(os.path.dirname(script), exist_ok=True)
        train_gpt.atomic_write_bytes(script, run.source.encode("utf-8"))
    taught = {"distill_from": os.path.join(out, teacher_name(run))} if run.hyperparameters.get("distill_from") else {}
    flags = (["--resume", folder] if os.path.isfile(os.path.join(folder, "hyperparameters.json")) else
             rerun_flags(run.hyperparameters, {"run_id": run.name, "log_dir": out, **taught, **overrides}))
    print(f"  {run.name}: re-making it in {folder} ({'resumed' if flags[0] == '--resume' else 'from step 0'})",
          flush=True)
    if (code := subprocess.call([*run_launcher(nproc), script, *flags], cwd=cwd)) != 0:  # its progress on the console
        raise RecordError(f"{run.name}: the re-made run exited with {code} (its log: {folder}/log.txt; run "
                          f"reproduce again to resume it)")
    return read_json(os.path.join(folder, "result.json"))


def command_reproduce(args) -> int:
    overrides, out = parse_overrides(args.set), os.path.abspath(args.out)  # the runs start in --cwd, not here
    try:
        seeds = None if args.seeds is None else {int(seed) for seed in args.seeds.split(",")}
    except ValueError:
        raise RecordError(f"--seeds expects comma-separated integers, got {args.seeds!r}") from None
    plan = reproduction_plan(args.record, seeds)
    print(f"{args.record}: re-making {len(plan)} run(s) whole, in order: {', '.join(run.name for run in plan)}",
          flush=True)
    os.makedirs(out, exist_ok=True)
    problems = []
    for run in plan:
        again = remake_run(run, out, overrides, args.nproc, args.cwd)
        for kind in ("val_loss", "test_loss"):
            logged, remade = run.result.get(kind), again.get(kind)
            if logged is None:
                continue
            gap = abs(remade - logged) if remade is not None else math.nan
            print(f"  {run.name}: {kind} {loss_text(remade)} (logged {logged:.4f}, |diff| {gap:.4f})", flush=True)
            if not gap <= args.tolerance:
                problems.append(f"{run.name} {kind}: re-made {loss_text(remade)}, logged {logged:.4f} (|diff| "
                                f"{gap:.4f} > tolerance {args.tolerance})")
    print("".join(f"  FAIL {problem}\n" for problem in problems) +
          ("  REPRODUCED: every re-made run's val and test loss within the tolerance of the logged ones"
           if not problems else "  NOT REPRODUCED"))
    return 1 if problems else 0


# ----------------------------------------------------------------------------------------------------------------------
# table: the leaderboard in README.md, between the markers, from the records' result.json

def leaderboard(records_dir: str) -> str:
    """The markdown of every track's table, records ordered by mean val loss (lowest first)."""
    blocks = ["<!-- made by `python records/records.py table` from records/*/*/*/result.json; do not edit by hand -->"]
    for track in TRACKS.values():
        rows, curve, public = [], track_curve(records_dir, track.name), track_curve(records_dir, track.name,
                                                                                      PUBLIC_CURVE)
        for record in track_records(records_dir, track.name):
            summary = read_json(os.path.join(record, "record.json"))
            results = record_results(record)
            losses, tests = losses_of(results), losses_of(results, "test_loss")
            link = os.path.relpath(record, os.path.dirname(records_dir)).replace(os.sep, "/")
            rows.append((mean_std(losses)[0], os.path.basename(record), [
                format_mean_std(losses), format_mean_std(tests) if tests else "—", str(len(losses)),
                format_tokens(results[0]["train_tokens"]),
                both_conventions_cell(curve, public, mean_std(losses)[0], results[0]["train_tokens"]),
                f"{sum(device_hours(r) for r in results + run_results(teacher_runs(record))):.2f}",
                summary.get("date", ""),
                f"[{summary.get('title', summary.get('slug', ''))}]({link})"]))
        blocks += [f"\n### `{track.name}`: {track.summary}\n", *([
            "| # | val loss | test loss | seeds | train tokens | data efficiency (strict, public convention) | "
            "device-hours | date | record |",
            "|---|---|---|---|---|---|---|---|---|", *[f"| {rank} | " + " | ".join(cells) + " |" for rank, (_, _, cells)
                                                       in enumerate(sorted(rows, key=lambda row: row[:2]), start=1)]]
            if rows else ["No record yet."])]
    return "\n".join(blocks) + "\n"


def command_table(args) -> int:
    with open(args.readme, encoding="utf-8") as handle:
        text = handle.read()
    try:
        updated = train_gpt.replace_between_markers(text, LEADERBOARD_START, LEADERBOARD_END,
                                                    leaderboard(args.records_dir))
    except ValueError as error:
        raise RecordError(f"{args.readme}: {error}; the table goes between them (nothing else in the file is "
                          f"touched)") from None
    if args.check:
        print(f"{args.readme}: the leaderboard is " + ("up to date" if updated == text else
                                                        "out of date; run python records/records.py table"))
        return int(updated != text)
    if updated != text:
        train_gpt.atomic_write_bytes(args.readme, updated.encode("utf-8"))
    print(f"{args.readme}: leaderboard {'updated' if updated != text else 'already up to date'}")
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# reference: the baseline runs of a track's data-efficiency curve (plan them, then build the curve from them)

def command_reference_plan(args) -> int:
    track = get_track(args.track)
    budgets, available = [int(float(b)) for b in args.budgets.split(",")] if args.budgets else [], None
    if not budgets:
        hp = train_gpt.parse_args(list(track.baseline[track.baseline.index("--preset"):]) + list(args.extra))
        available = int(train_gpt.load_tokens(hp.train_files, hp.vocab_size, "train").size)
        budgets = [available // 2 ** k for k in reversed(range(args.halvings + 1))]
    print(f"# Reference curve of track {track.name}: the baseline `{' '.join(track.baseline)}` trained on prefixes of "
          f"the train set (--train_tokens; cut back to a document start)" +
          (f"; the train set holds {available:,} tokens" if available else ""))
    print("# A run on D train tokens gets an efficiency X = B / D, where B is the budget at which this curve reaches "
          "the run's loss;\n# so X > 1 needs reference budgets above D (more data than the record uses).")
    print(f"# Run these ({args.seeds} seed(s) per budget), then build the curve from their run folders:")
    plan = [(budget, seed) for budget in budgets for seed in range(args.seeds)]
    run_ids = [f"ref_{track.name}_{budget}_s{seed}" for budget, seed in plan]
    for (budget, seed), run_id in zip(plan, run_ids):
        print(shlex.join([*track.baseline, *args.extra, "--train_tokens", str(budget), "--seed", str(seed),
                          "--run_id", run_id, "--save_model", "false"]))
    print(f"python records/records.py reference build {' '.join('logs/' + r for r in run_ids)} --track {track.name}")
    return 0


def command_reference_build(args) -> int:
    track = get_track(args.track)
    folders = [run_folder_of(path) for path in args.runs]
    # One recipe for every point: only the budget, the seed and the names may differ.
    problems, logs, results = check_runs_together(folders, PER_SEED_FIELDS | {"train_tokens"}, "baseline recipe",
                                                  seeds_differ=False)
    if problems:
        raise RecordError("the runs cannot make a reference curve:\n  " + "\n  ".join(problems))
    by_budget = {}
    for result in results:
        by_budget.setdefault(result["train_tokens"], []).append(result)
    points = [dict(zip(("train_tokens", "val_loss", "val_loss_std", "seeds", "runs"), (
        budget, *mean_std([r["val_loss"] for r in group]), len(group), [r["run_id"] for r in group])))
        for budget, group in sorted(by_budget.items())]
    curve = dict(track=track.name, what="val loss of the track's single-model baseline against its train-token "
                                        "budget (--train_tokens); mean over seeds",
                 baseline=" ".join(track.baseline), source_sha256=sha256_text(logs[0].source),
                 unigram_val_entropy=results[0]["unigram_val_entropy"], recipe={
                     k: v for k, v in logs[0].hyperparameters.items() if k not in PER_SEED_FIELDS | {"train_tokens"}},
                 points=points)
    out = os.path.join(args.records_dir, track.name, "reference_curve.json")
    load_curve(out, dict(curve))  # refuses a curve whose losses do not fall with the budget
    os.makedirs(os.path.dirname(out), exist_ok=True)
    write_json(out, curve)
    # The runs themselves stay checkable: their logs go next to the curve.
    for folder, result in zip(folders, results):
        copy_run(folder, os.path.join(args.records_dir, track.name, "reference", result["run_id"]), exist_ok=True)
    print(f"wrote {out} ({len(points)} points) and the runs' logs under {os.path.dirname(out)}/reference/")
    for point in points:
        print(f"  {point['train_tokens']:>12,} tokens -> val loss {point['val_loss']:.4f} ({point['seeds']} seed(s))")
    return 0


def command_efficiency(args) -> int:
    failed = False  # the report for records or runs
    for path in args.paths:
        is_record = os.path.isfile(os.path.join(path, "record.json"))
        results = record_results(path) if is_record else [read_json(os.path.join(run_folder_of(path), "result.json"))]
        track = read_json(os.path.join(path, "record.json"))["track"] if is_record else args.track
        curve_path = args.curve or (os.path.join(args.records_dir, track, "reference_curve.json") if track else None)
        if curve_path is None:
            raise RecordError(f"{path}: a run folder needs --track or --curve to find its reference curve")
        if not os.path.isfile(curve_path):
            raise RecordError(f"{curve_path}: no reference curve yet; see `python records/records.py reference plan "
                              f"--track {track}`")
        curve = load_curve(curve_path)
        if "unigram_val_entropy" in curve and not same_val_set(curve, results[0]):
            raise RecordError(f"{path}: scored a different validation set than the reference curve")
        public_path = os.path.join(os.path.dirname(curve_path), PUBLIC_CURVE)  # issue 28: both conventions
        cell, lines, multiple = efficiency_both(curve, load_curve(public_path) if os.path.isfile(public_path) else
                                                None, mean_std([r["val_loss"] for r in results])[0],
                                                results[0]["train_tokens"], curve_path, public_path)
        print("\n".join([f"{path}: data efficiency {cell}", *[f"  {line}" for line in lines]]))
        failed |= multiple is None
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="records.py", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records_dir", default=RECORDS_DIR, help="the records/ folder (default: next to this file)")
    groups = {"": parser.add_subparsers(dest="command", required=True)}
    for group, name, handler, summary, arguments in [
        ("", "new", command_new, "make a record folder from finished runs (one per seed)", [
            ("runs", dict(nargs="+", help="run folders (logs/<run_id>) or their log.txt")),
            ("--teachers", dict(nargs="+", default=[], help="distilled runs (--distill_from): the finished runs that "
                                                            "taught them, one per seed; copied into the record")),
            ("--track", dict(help=f"one of {', '.join(TRACKS)} (default: tiny for --preset tiny runs)")),
            ("--slug", dict(required=True, help="short name: lowercase letters, digits, dashes")),
            ("--title", dict(required=True, help="one line for the leaderboard: what changed")),
            ("--description", dict(default="", help="what changed and why (markdown; default: the title)")),
            ("--date", dict(help="YYYY-MM-DD (default: today)"))]),
        ("", "verify", command_verify, "check records: logs consistent, one source, optionally re-run", [
            ("records", dict(nargs="+", help="record folders")),
            ("--rerun", dict(action="store_true", help="re-run each log's embedded script and compare losses")),
            ("--steps", dict(type=int, default=10, help="re-run this many optimizer steps (default 10)")),
            ("--tolerance", dict(type=float, default=0.01,
                                 help="largest |logged - re-run| difference of a loss line, in nats (default 0.01)")),
            ("--set", dict(action="append", default=[], metavar="NAME=VALUE",
                           help="override a logged hyperparameter in the re-run (e.g. device=cpu, train_files=...)")),
            ("--nproc", dict(type=int, default=1, help="ranks of the re-run (torchrun when > 1)")),
            ("--cwd", dict(default=REPO_ROOT, help="folder the re-run starts in (relative data paths)")),
            ("--timeout", dict(type=float, default=3600, help="seconds before a re-run is abandoned"))]),
        ("", "reproduce", command_reproduce,
         "re-make a record's runs whole (a distilled record's teachers first) and compare val and test losses", [
            ("record", dict(help="a record folder")),
            ("--out", dict(required=True, help="folder of the re-made runs (run again to resume a killed one)")),
            ("--seeds", dict(help="comma-separated seeds to re-make (default: every seed), each with its teachers")),
            ("--tolerance", dict(type=float, default=0.01,
                                 help="largest |logged - re-made| val or test loss, in nats (default 0.01)")),
            ("--set", dict(action="append", default=[], metavar="NAME=VALUE",
                           help="override a logged hyperparameter (e.g. device=cpu, train_files=...)")),
            ("--nproc", dict(type=int, default=1, help="ranks of each run (torchrun when > 1)")),
            ("--cwd", dict(default=REPO_ROOT, help="folder the runs start in (relative data paths)"))]),
        ("", "table", command_table, "rewrite the leaderboard in README.md between its markers", [
            ("--readme", dict(default=os.path.join(REPO_ROOT, "README.md"))),
            ("--check", dict(action="store_true", help="only report whether it is up to date (exit 1 if not)"))]),
        ("", "plot", command_plot, "PNG of val loss against tokens seen for runs or records", [
            ("paths", dict(nargs="+", help="run folders, log.txt files or record folders")),
            ("--out", dict(required=True, help="the PNG to write")),
            ("--width", dict(type=int, default=960, help="pixels")), ("--title", dict(default="")),
            ("--height", dict(type=int, default=600, help="pixels"))]),
        ("", "reference", None, "the data-efficiency reference curve: plan its runs, build it", []),
        ("reference", "plan", command_reference_plan, "print the baseline commands, one per token budget and seed", [
            ("--track", dict(required=True)),
            ("--budgets", dict(help="comma-separated train-token budgets (default: the whole train set and "
                                    "--halvings successive halves)")),
            ("--halvings", dict(type=int, default=3)), ("--seeds", dict(type=int, default=1)),
            ("extra", dict(nargs="*", help="extra train_gpt.py flags after --, e.g. -- --train_files BIG.bin"))]),
        ("reference", "build", command_reference_build,
         "write records/<track>/reference_curve.json from finished baseline runs", [
             ("runs", dict(nargs="+")), ("--track", dict(required=True))]),
        ("", "efficiency", command_efficiency, "X: the baseline matches this loss on X times the tokens", [
            ("paths", dict(nargs="+", help="record folders or run folders")),
            ("--track", dict(help="track of run folders (records know theirs)")),
            ("--curve", dict(help="a reference_curve.json (default: records/<track>/reference_curve.json)"))])]:
        command = groups[group].add_parser(name, help=summary)
        for flag, options in arguments:
            command.add_argument(flag, **options)
        if handler is None:  # a command with sub-commands of its own
            groups[name] = command.add_subparsers(dest="action", required=True)
        else:
            command.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except RecordError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2 if isinstance(error, UnreadableFile) else 1


if __name__ == "__main__":
    sys.exit(main())
