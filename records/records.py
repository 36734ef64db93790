"""
records: make, check, tabulate and plot slowrun records, and place them on a data-efficiency reference curve.

A record is a folder records/<track>/<YYYY-MM-DD>_<slug>/ holding one sub-folder per seed (the run's log.txt with
the training script's full source inside, metrics.jsonl, result.json), plot.png, README.md and record.json (summary
plus the sha256 of every file). Anyone can check a record: `verify` re-derives every number from the logs, and
`verify --rerun` runs the embedded script again and compares the loss lines step by step.

    python records/records.py new logs/run_s0 logs/run_s1 logs/run_s2 --track tiny --slug my-trick --title "..."
    python records/records.py verify records/tiny/2025-01-01_my-trick [--rerun --steps 10]
    python records/records.py table                      # rewrites the leaderboard in README.md (between markers)
    python records/records.py plot logs/run_s0 records/tiny/2025-01-01_my-trick --out loss.png
    python records/records.py reference plan --track tiny  # prints the baseline runs of the reference curve
    python records/records.py reference build logs/ref_tiny_* --track tiny
    python records/records.py efficiency records/tiny/2025-01-01_my-trick

Standard library, numpy and matplotlib only (matplotlib only for plots); `reference plan` imports train_gpt to count
the train tokens.
"""
from __future__ import annotations

import argparse
import ast
import datetime
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass

RECORDS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(RECORDS_DIR)
LEADERBOARD_START, LEADERBOARD_END = "<!-- leaderboard:start -->", "<!-- leaderboard:end -->"
RUN_FILES = ("log.txt", "metrics.jsonl", "result.json")
# Hyperparameters that may differ between the seeds of one record (everything else must be equal).
PER_SEED_FIELDS = {"seed", "run_id", "log_dir"}


class RecordError(Exception):
    """A problem the user must fix: printed as `error: ...`, exit status 1."""


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
    # tiny: records train on the first quarter of the bundled sample (--train_tokens 35027), so the reference
    # baselines can go up to 4x more data (the whole sample) and the data-efficiency multiple can be measured. The
    # baseline recipe gives every budget the same compute (54 steps of 8,192 tokens, the tiny preset's on the whole
    # sample): compute is nearly free, data is the constraint, as in the slowrun.
    "tiny": Track("tiny", "CPU, the first quarter (35k tokens) of the bundled FineWeb-Edu sample, any wall time",
                  "cpu", None, None, "fineweb_edu_train.bin", "fineweb_edu_val.bin", 35027,
                  ("python", "train_gpt.py", "--preset", "tiny", "--num_epochs", "1000", "--max_steps", "54",
                   "--val_every", "-1")),
    "8gpu-15min": _gpu_track("8gpu-15min", 15 * 60, "15 minutes of training"),
    "8gpu-1h": _gpu_track("8gpu-1h", 3600, "1 hour of training"),
    "8gpu-2h": _gpu_track("8gpu-2h", 7200, "2 hours of training"),
    "8gpu-unlimited": _gpu_track("8gpu-unlimited", None, "no time limit"),
}


def get_track(name: str) -> Track:
    if name not in TRACKS:
        raise RecordError(f"unknown track {name!r} (known: {', '.join(TRACKS)})")
    return TRACKS[name]


def track_violations(track: Track, result: dict) -> list[str]:
    """Why a finished run does not qualify for the track ([] when it does)."""
    hp, problems = result["hyperparameters"], []
    if not str(result.get("device", "")).startswith(track.device):
        problems.append(f"ran on {result.get('device')}, track {track.name} is {track.device}")
    if track.world_size is not None and result.get("world_size") != track.world_size:
        problems.append(f"ran on {result.get('world_size')} ranks, track {track.name} needs {track.world_size}")
    if track.train_seconds is not None and result.get("train_seconds", math.inf) > track.train_seconds:
        problems.append(f"trained {result.get('train_seconds')} s, over the track's {track.train_seconds:.0f} s")
    if os.path.basename(hp.get("train_files", "")) != track.train_file:
        problems.append(f"train_files {hp.get('train_files')!r} is not the track's {track.train_file}")
    if os.path.basename(hp.get("val_files", "")) != track.val_file:
        problems.append(f"val_files {hp.get('val_files')!r} is not the track's {track.val_file}")
    if hp.get("val_tokens", 0) != 0:
        problems.append(f"val_tokens = {hp.get('val_tokens')}: a record scores the whole validation set")
    if hp.get("train_tokens", 0) != track.train_tokens:
        problems.append(f"train_tokens = {hp.get('train_tokens')}, the track's budget is {track.train_tokens}")
    if result.get("ranks_agree") is False:
        problems.append("ranks ended with different weights (ranks agree: NO)")
    return problems


# ----------------------------------------------------------------------------------------------------------------------
# Reading a run: log.txt sections, its progress lines, metrics.jsonl and result.json

HEADER = re.compile(r"^==================== (.+?) =*$")


@dataclass
class RunLog:
    path: str
    source: str  # the training script exactly as it ran
    sections: dict[str, list[str]]  # every section after the source, by title
    hyperparameters: dict
    train: list[dict]  # {"step", "total", "train_loss", "tokens", "text"} per progress line ("text": as printed)
    val: list[dict]  # {"step", "total", "val_loss", "tokens", "text"}
    test_loss: str | None  # as printed
    done: dict | None  # the final line's fields
    resumed: bool = False  # the log holds more than one run section (--resume appended to it)

    @property
    def command(self) -> str:
        return self.sections.get("command", [""])[0]


def _fields(line: str) -> dict[str, str]:
    """`key value | key value | ...` -> {key: value}; pieces of another shape (`13 ms/step`) are harmless extras."""
    fields = {}
    for piece in line.split(" | "):
        key, _, value = piece.strip().partition(" ")
        fields[key] = value.strip()
    return fields


MEMBER_PREFIX = re.compile(r"^member (\d+)/(\d+) \| ")  # ensemble runs: member k of K (from 1) before each line


def parse_progress_line(line: str) -> tuple[str, dict] | None:
    """A run-section line -> ("train" | "val" | "test" | "done", fields), or None for other lines. Train and val
    fields carry "member": None in a single-model run, else the member index from 0 (as metrics.jsonl counts)."""
    member = None
    prefix = MEMBER_PREFIX.match(line)
    if prefix:
        member, line = int(prefix.group(1)) - 1, line[prefix.end():]
    if line.startswith("step ") or line.startswith("val  step "):
        kind = "val" if line.startswith("val") else "train"
        fields = _fields(line[len("val  "):] if kind == "val" else line)
        step, _, total = fields["step"].partition("/")
        loss_key = f"{kind}_loss"
        return kind, dict(step=int(step), total=int(total), loss=float(fields[loss_key]), text=fields[loss_key],
                          tokens=fields.get("tokens", ""), member=member)
    if line.startswith("test "):
        return "test", _fields(line)
    if line.startswith("done | "):
        fields = _fields(line)
        return "done", dict(val_loss=fields.get("val_loss"), tokens=fields.get("tokens"),
                            ranks_agree=fields.get("ranks"))
    return None


def parse_log(path: str) -> RunLog:
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    if not lines or not (HEADER.match(lines[0]) and HEADER.match(lines[0]).group(1).startswith("source")):
        raise RecordError(f"{path}: does not start with the source section (not a train_gpt.py log.txt?)")
    # The source may itself contain header-like lines; the real command header is the last one in the file.
    command_at = max((i for i, line in enumerate(lines) if HEADER.match(line) and HEADER.match(line).group(1) == "command"),
                     default=None)
    if command_at is None:
        raise RecordError(f"{path}: no command section after the source")
    source = "\n".join(lines[1:command_at]) + "\n"
    sections: dict[str, list[str]] = {}
    current, run_headers = None, 0
    for line in lines[command_at:]:
        match = HEADER.match(line)
        if match:
            current = match.group(1)
            run_headers += current == "run"
            sections.setdefault(current, [])  # a resumed run repeats its headers: one list per title
        else:
            sections[current].append(line)
    for needed in ("hyperparameters", "run"):
        if needed not in sections:
            raise RecordError(f"{path}: no {needed} section (the run did not start)")
    hyperparameters = {}
    for line in sections["hyperparameters"]:
        name, _, value = line.partition(" = ")
        try:
            hyperparameters[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise RecordError(f"{path}: unreadable hyperparameter line {line!r}") from None
    train, val, test_loss, done = [], [], None, None
    # progress lines: the run section, and for ensembles the sections after it (the K -> loss table, test, done)
    progress_lines = [line for title, lines in sections.items()
                      if title not in ("command", "environment", "hyperparameters") for line in lines]
    for line in progress_lines:
        try:
            parsed = parse_progress_line(line)
        except (KeyError, ValueError):
            raise RecordError(f"{path}: malformed progress line {line!r}") from None
        if parsed is None:
            continue
        kind, fields = parsed
        if kind == "train":
            train.append(fields)
        elif kind == "val":
            val.append(fields)
        elif kind == "test":
            test_loss = fields.get("test_loss")
        else:
            done = fields
    return RunLog(path, source, sections, hyperparameters, train, val, test_loss, done, resumed=run_headers > 1)


def read_json(path: str):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise RecordError(f"{path}: missing") from None
    except json.JSONDecodeError as error:
        raise RecordError(f"{path}: not valid JSON ({error})") from None


def read_metrics(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise RecordError(f"{path}: missing")
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def run_folder_of(path: str) -> str:
    """Accepts a run folder or its log.txt."""
    folder = os.path.dirname(path) if os.path.basename(path) == "log.txt" else path
    if not os.path.isfile(os.path.join(folder, "log.txt")):
        raise RecordError(f"{path}: no log.txt (expected a run folder such as logs/<run_id>)")
    return folder


def sha256_file(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------------------------------------
# Consistency: every number of a run re-derived from its log (result.json and metrics.jsonl must agree with it)

def count_matches(printed: str, exact: float) -> bool:
    """`8.19k` (train_gpt.format_count: 2 decimals and a unit, or a plain integer) against an exact count."""
    units = {"k": 1e3, "M": 1e6, "B": 1e9}
    if printed and printed[-1] in units:
        return abs(float(printed[:-1]) - exact / units[printed[-1]]) <= 0.0051
    return printed.isdigit() and int(printed) == round(exact)


def loss_text(value) -> str:
    return "nan" if value is None else f"{value:.4f}"


def run_problems(folder: str) -> tuple[list[str], RunLog | None, dict | None]:
    """Checks one run folder; returns (problems, parsed log, result.json)."""
    try:
        log = parse_log(os.path.join(folder, "log.txt"))
        result = read_json(os.path.join(folder, "result.json"))
        metrics = read_metrics(os.path.join(folder, "metrics.jsonl"))
    except RecordError as error:
        return [str(error)], None, None
    name, problems = os.path.basename(folder.rstrip("/")), []

    def need(condition: bool, message: str) -> None:
        if not condition:
            problems.append(f"{name}: {message}")

    need(log.done is not None, "log.txt has no final `done` line (the run did not finish)")
    need(bool(log.train) and bool(log.val), "log.txt has no progress or validation lines")
    need(not log.resumed, "the run was resumed (--resume): a record is one uninterrupted run, so that its log is "
                          "the whole story and --rerun can replay it")
    if problems:
        return problems, log, result
    try:
        compile(log.source, "train_gpt.py", "exec")
    except SyntaxError as error:
        problems.append(f"{name}: the embedded source does not compile ({error.msg}, line {error.lineno})")
    need(log.hyperparameters == result.get("hyperparameters"),
         "result.json hyperparameters differ from the log's hyperparameters section")
    # The progress lines themselves, member by member (one "member" None in a single-model run): steps rise, every
    # line names the member's total, the last train line is that total; the members' totals add up to result.steps.
    members = list(dict.fromkeys(row["member"] for row in log.train))
    member_totals = {}
    for member in members:
        label = "" if member is None else f"member {member + 1}: "
        for kind, rows in (("train", log.train), ("val", log.val)):
            rows = [row for row in rows if row["member"] == member]
            steps = [row["step"] for row in rows]
            need(steps == sorted(set(steps)), f"{label}{kind} lines' steps are not strictly increasing: {steps}")
            need(len({row["total"] for row in rows}) == 1,
                 f"{label}{kind} lines name totals {sorted({row['total'] for row in rows})}")
        own = [row for row in log.train if row["member"] == member]
        member_totals[member] = own[0]["total"]
        need(own[-1]["step"] == own[0]["total"], f"{label}last train line is step {own[-1]['step']} of "
                                                 f"{own[0]['total']}")
    need(sum(member_totals.values()) == result.get("steps"),
         f"the log's steps add up to {sum(member_totals.values())}, result.json says {result.get('steps')}")
    need(len(members) == result.get("hyperparameters", {}).get("ensemble_size", 1),
         f"the log shows {len(members)} member(s), result.json's ensemble_size is "
         f"{result.get('hyperparameters', {}).get('ensemble_size')}")
    # result.json against the log's closing lines: the done line prints the ranked val loss and the tokens trained
    # on (all members); a single model's ranked loss is also its last val line (not so for snapshot ensembles).
    val_text = loss_text(result.get("val_loss"))
    need(log.done["val_loss"] == val_text, f"result.json val_loss {val_text} != the done line's {log.done['val_loss']}")
    if members == [None] and not log.hyperparameters.get("snapshot_cycles") \
            and not log.hyperparameters.get("epoch_snapshots"):
        need(log.val[-1]["text"] == val_text, f"result.json val_loss {val_text} != last val line's "
                                              f"{log.val[-1]['text']}")
    done_tokens = (log.done.get("tokens") or "").replace("trained on ", "")
    need(count_matches(done_tokens, result.get("tokens_seen", -1)),
         f"result.json tokens_seen {result.get('tokens_seen')} != the done line's {done_tokens}")
    need(log.train[-1]["text"] == loss_text(result.get("train_loss")),
         f"result.json train_loss {loss_text(result.get('train_loss'))} != last train line's {log.train[-1]['text']}")
    need(log.test_loss == (None if result.get("test_loss") is None else loss_text(result["test_loss"])),
         f"result.json test_loss {result.get('test_loss')} != the log's test line ({log.test_loss})")
    need(log.done["ranks_agree"] == ("agree: yes" if result.get("ranks_agree") else "agree: NO"),
         "result.json ranks_agree differs from the done line")
    # what the track rules read: where it ran (the environment section) and how long it trained (each member's
    # last metrics row carries its running training time)
    environment = _fields(next((line for line in log.sections.get("environment", []) if line.startswith("world_size")),
                               ""))
    need(environment.get("world_size") == str(result.get("world_size")) and
         environment.get("device") == str(result.get("device")),
         f"result.json world_size {result.get('world_size')} / device {result.get('device')} differ from the log's "
         f"environment (world_size {environment.get('world_size')} / device {environment.get('device')})")
    last_rows = {}
    for row in metrics:
        if row.get("kind") == "train" and "train_seconds" in row:
            last_rows[row.get("member")] = row
    trained = sum(row["train_seconds"] for row in last_rows.values())
    # result.json rounds the sum to 0.01 s, each metrics row its own time to 0.001 s
    need(abs(trained - result.get("train_seconds", -1)) <= 0.006 + 0.0005 * len(last_rows),
         f"result.json train_seconds {result.get('train_seconds')} != {trained:.2f} in metrics.jsonl")
    # metrics.jsonl against every progress line: an edited loss line disagrees with its metrics row. Sorted by
    # (member, step): with --parallel_members, groups append their lines in whatever order they finish.
    for kind, rows in (("train", log.train), ("val", log.val)):
        def order(entry):
            return (-1 if entry[0] is None else entry[0], entry[1])
        logged = sorted(((row["member"], row["step"], row["text"]) for row in rows), key=order)
        recorded = sorted(((row.get("member"), row["step"], loss_text(row.get(f"{kind}_loss")))
                           for row in metrics if row.get("kind") == kind), key=order)
        if logged != recorded:
            first = next((f"step {a[1]}: log {a[2]}, metrics {b[2]}" for a, b in zip(logged, recorded) if a != b),
                         f"{len(logged)} log lines, {len(recorded)} metrics rows")
            problems.append(f"{name}: {kind} loss lines disagree with metrics.jsonl ({first})")
    return problems, log, result


# ----------------------------------------------------------------------------------------------------------------------
# Statistics: mean, std and the one-sided Welch t-test (the t distribution via the regularised incomplete beta)

def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Lentz's method for the continued fraction of I_x(a, b) (Numerical Recipes, betacf)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
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


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):  # the continued fraction converges fast on this side; else use symmetry
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def student_t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df degrees of freedom (df need not be an integer: Welch)."""
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return tail if t > 0 else 1.0 - tail


def improvement_p_value(new: list[float], old: list[float]) -> float | None:
    """One-sided p-value of "the new runs' mean loss is lower than the old ones'": Welch's t-test; against a single
    old run, a one-sample t-test of the new runs against its value. None when the new record has one seed."""
    if len(new) < 2:
        return None
    new_mean, new_std = mean_std(new)
    old_mean, old_std = mean_std(old)
    new_var = new_std ** 2 / len(new)
    old_var = (old_std ** 2 / len(old)) if old_std is not None else 0.0
    spread = new_var + old_var
    if spread == 0.0:
        return 0.0 if new_mean < old_mean else 1.0
    t = (old_mean - new_mean) / math.sqrt(spread)
    if old_std is None:
        df = len(new) - 1
    else:  # Welch-Satterthwaite
        df = spread ** 2 / (new_var ** 2 / (len(new) - 1) + old_var ** 2 / (len(old) - 1))
    return student_t_sf(t, df)


# ----------------------------------------------------------------------------------------------------------------------
# Records on disk: the seeds' results, the track's other records

def record_runs(record: str) -> list[str]:
    """The run folders of a record (sub-folders holding a log.txt), in name order."""
    if not os.path.isdir(record):
        raise RecordError(f"{record}: not a folder")
    runs = sorted(os.path.join(record, entry) for entry in os.listdir(record)
                  if os.path.isfile(os.path.join(record, entry, "log.txt")))
    if not runs:
        raise RecordError(f"{record}: holds no run folders (<run_id>/log.txt)")
    return runs


def record_results(record: str) -> list[dict]:
    return [read_json(os.path.join(run, "result.json")) for run in record_runs(record)]


def track_records(records_dir: str, track: str) -> list[str]:
    """Record folders of a track, oldest first (folder names begin with the date)."""
    folder = os.path.join(records_dir, track)
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, entry) for entry in os.listdir(folder)
                  if os.path.isfile(os.path.join(folder, entry, "record.json")))


def previous_record(record: str, records_dir: str, track: str) -> str | None:
    """The track's standing record just before this one: the lowest mean val loss among the older records."""
    name = os.path.basename(os.path.normpath(record))
    older = [r for r in track_records(records_dir, track) if os.path.basename(r) < name]
    if not older:
        return None
    return min(older, key=lambda r: mean_std([res["val_loss"] for res in record_results(r)])[0])


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


def short_command(log: RunLog, world_size: int) -> str:
    """The logged command with the interpreter and absolute script path replaced by the portable form."""
    words = shlex.split(log.command)
    flags = words[2:] if len(words) >= 2 else words
    launcher = ["python"] if world_size == 1 else ["torchrun", "--standalone", f"--nproc_per_node={world_size}"]
    return " ".join(shlex.quote(word) for word in [*launcher, "train_gpt.py", *flags])


def significance_lines(record: str, records_dir: str, track: str) -> list[str]:
    """Mean, std and the p-value against the track's previous record, as printed by verify and written by new."""
    losses = [r["val_loss"] for r in record_results(record)]
    mean, std = mean_std(losses)
    lines = [f"val loss over {len(losses)} seed(s): mean {mean:.4f}, std " + ("n/a" if std is None else f"{std:.4f}")]
    previous = previous_record(record, records_dir, track)
    if previous is None:
        lines.append("previous record: none in this track (first record)")
        return lines
    old = [r["val_loss"] for r in record_results(previous)]
    p_value = improvement_p_value(losses, old)
    verdict = ("n/a (one seed: run at least 2, better 3+)" if p_value is None else
               f"{p_value:.2g} ({'significant' if p_value < 0.01 else 'NOT significant'} at p < 0.01)")
    lines.append(f"previous record: {os.path.basename(previous)} ({format_mean_std(old)}, {len(old)} seed(s)); "
                 f"one-sided Welch t-test p = {verdict}")
    return lines


# ----------------------------------------------------------------------------------------------------------------------
# Data efficiency: a loss placed on the reference curve of baselines trained on increasing token budgets

class ExtrapolationError(RecordError):
    """The loss lies outside the reference points: we bound the answer rather than invent one."""


def load_curve(path: str) -> dict:
    curve = read_json(path)
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
    if loss < best["val_loss"]:
        raise ExtrapolationError(
            f"val loss {loss:.4f} is below every reference point (the largest budget, {best['train_tokens']:,} tokens, "
            f"reaches {best['val_loss']:.4f}): it beats a baseline on {best['train_tokens']:,} tokens; add reference "
            f"runs with larger budgets to measure how much further")
    if loss > worst["val_loss"]:
        raise ExtrapolationError(
            f"val loss {loss:.4f} is above every reference point (the smallest budget, {worst['train_tokens']:,} "
            f"tokens, reaches {worst['val_loss']:.4f}): it is worse than a baseline on {worst['train_tokens']:,} "
            f"tokens; add reference runs with smaller budgets to place it")
    for a, b in zip(points, points[1:]):
        if b["val_loss"] <= loss <= a["val_loss"]:
            fraction = (a["val_loss"] - loss) / (a["val_loss"] - b["val_loss"])
            log_tokens = math.log(a["train_tokens"]) + fraction * (math.log(b["train_tokens"]) - math.log(a["train_tokens"]))
            return math.exp(log_tokens)
    raise AssertionError("unreachable: the loss lies between the first and the last point")


def efficiency_summary(curve: dict, loss: float, train_tokens: int) -> tuple[str, float | None]:
    """(one line for people, the multiple or None when out of range) for a run trained on train_tokens tokens."""
    try:
        budget = matching_budget(curve["points"], loss)
    except ExtrapolationError as error:
        return str(error), None
    multiple = budget / train_tokens
    return (f"val loss {loss:.4f} on {train_tokens:,} train tokens matches a baseline trained on {budget:,.0f} tokens: "
            f"{multiple:.2f}x the tokens"), multiple


def efficiency_cell(curve: dict | None, loss: float, train_tokens: int) -> str:
    """The leaderboard's data-efficiency column: the multiple, or a bound when the loss lies off the curve."""
    if curve is None:
        return "—"
    points = curve["points"]
    if loss < points[-1]["val_loss"]:
        return f"> {points[-1]['train_tokens'] / train_tokens:.2f}x"
    if loss > points[0]["val_loss"]:
        return f"< {points[0]['train_tokens'] / train_tokens:.2f}x"
    return f"{matching_budget(points, loss) / train_tokens:.2f}x"


def track_curve(records_dir: str, track: str) -> dict | None:
    path = os.path.join(records_dir, track, "reference_curve.json")
    return load_curve(path) if os.path.isfile(path) else None


# ----------------------------------------------------------------------------------------------------------------------
# Plot: val loss against tokens seen (and loss against ensemble size when runs log `ensemble` rows)

def run_series(folder: str) -> tuple[str, list[tuple[int, float]], list[tuple[int, float]], list[tuple[int, float]]]:
    """(label, [(tokens_seen, val_loss)], [(ensemble size, val_loss)], [(tokens_seen, train_loss)]) of one run."""
    metrics = read_metrics(os.path.join(folder, "metrics.jsonl"))
    val = [(row["tokens_seen"], row["val_loss"]) for row in metrics if row.get("kind") == "val"]
    ensemble = [(row["members"], row["val_loss"]) for row in metrics if row.get("kind") == "ensemble"]
    train = [(row["tokens_seen"], row["train_loss"]) for row in metrics
             if row.get("kind") == "train" and "member" not in row]
    return os.path.basename(os.path.normpath(folder)), val, ensemble, train


def plot_runs(folders: list[str], out: str, width_px: int = 960, height_px: int = 600, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    series = [run_series(folder) for folder in folders]
    with_ensembles = any(ensemble for _, _, ensemble, _ in series)
    dpi = 100
    figure, axes = plt.subplots(1, 2 if with_ensembles else 1, figsize=(width_px / dpi, height_px / dpi), dpi=dpi,
                                squeeze=False)
    for label, val, _, train in series:
        line, = axes[0][0].plot([t for t, _ in val], [loss for _, loss in val], marker="o", markersize=3,
                                label=f"{label} val")
        if train:  # the train curve beside it, dashed: where val is scored only at the end it shows the run's course
            axes[0][0].plot(*zip(*train), linestyle="--", linewidth=1, color=line.get_color(), label=f"{label} train")
    axes[0][0].set_xlabel("tokens seen")
    axes[0][0].set_ylabel("loss (nats/token)")
    axes[0][0].grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if with_ensembles:
        for label, _, ensemble, _ in series:
            if ensemble:
                axes[0][1].plot(*zip(*ensemble), marker="o", label=label)
        axes[0][1].set_xlabel("ensemble size")
        axes[0][1].set_ylabel("val loss (nats/token)")
        axes[0][1].grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    figure.savefig(out, dpi=dpi)  # no bbox_inches="tight": the PNG keeps exactly width_px x height_px
    plt.close(figure)


def plot_folders(paths: list[str]) -> list[str]:
    """Run folders of the given run folders, log.txt files and record folders."""
    folders = []
    for path in paths:
        if os.path.isfile(os.path.join(path, "record.json")):
            folders += record_runs(path)
        else:
            folders.append(run_folder_of(path))
    return folders


def command_plot(args) -> int:
    plot_runs(plot_folders(args.paths), args.out, args.width, args.height, args.title)
    print(f"wrote {args.out}")
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# new: a record folder from finished runs

def check_runs_together(folders: list[str]) -> tuple[list[str], list[RunLog], list[dict]]:
    """Checks each run and that the runs are seeds of one experiment: same source, same settings but the seed."""
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
                           if k not in PER_SEED_FIELDS and log.hyperparameters.get(k) != reference.hyperparameters.get(k))
        if differing:
            problems.append(f"{log.path}: hyperparameters differ from {reference.path}: {', '.join(differing)}")
    seeds = [log.hyperparameters.get("seed") for log in logs]
    if len(set(seeds)) != len(seeds):
        problems.append(f"two runs share a seed ({seeds}): seeds of a record must differ")
    entropies = {round(r.get("unigram_val_entropy", 0.0), 6) for r in results}
    if len(entropies) > 1:
        problems.append(f"the runs scored different validation sets (unigram entropies {sorted(entropies)})")
    return problems, logs, results


def record_readme(summary: dict, logs: list[RunLog], results: list[dict], significance: list[str],
                  efficiency: str) -> str:
    losses = [r["val_loss"] for r in results]
    tests = [r["test_loss"] for r in results if r.get("test_loss") is not None]
    first = results[0]
    lines = [
        f"# {summary['title']}", "",
        f"Track `{summary['track']}` · {summary['date']} · {len(results)} seed(s)", "",
        summary["description"], "",
        "## Result", "",
        f"- val loss: **{format_mean_std(losses)}** (mean ± std over {len(losses)} seed(s))",
        f"- test loss: {format_mean_std(tests) if tests else 'not scored (no test set)'}",
        f"- tokens trained on: {first['train_tokens']:,} unique train tokens, {first['tokens_seen']:,} seen "
        f"({first['epochs']:.2f} epochs, {first['steps']} steps)",
        f"- compute: {sum(device_hours(r) for r in results):.3f} device-hours in all "
        f"({first['world_size']} x {first['device']} per run)",
        f"- data efficiency: {efficiency}",
        *[f"- {line}" for line in significance[1:]],  # [0] repeats the mean and std above
        f"- script: sha256 {summary['source_sha256']} (inside every log.txt)", "",
        "| run | seed | val loss | test loss | steps | train time | wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    for log, result in zip(logs, results):
        lines.append(f"| {result['run_id']} | {log.hyperparameters.get('seed')} | {result['val_loss']:.4f} | "
                     f"{loss_text(result.get('test_loss')) if result.get('test_loss') is not None else '—'} | "
                     f"{result['steps']} | {result['train_seconds']:.0f} s | {result['wall_seconds']:.0f} s |")
    lines += ["", "## Commands", "", "```"]
    lines += [short_command(log, result["world_size"]) for log, result in zip(logs, results)]
    lines += ["```", "", "![val loss against tokens seen](plot.png)", "",
              "Check it: `python records/records.py verify <this folder>` (add `--rerun --steps 10` to re-run the "
              "embedded script and compare its loss lines).", ""]
    return "\n".join(lines)


def command_new(args) -> int:
    folders = [run_folder_of(path) for path in args.runs]
    problems, logs, results = check_runs_together(folders)
    if not problems:
        track_name = args.track or ("tiny" if logs[0].hyperparameters.get("preset") == "tiny" else None)
        if track_name is None:
            raise RecordError("say which track the runs are for: --track " + " | ".join(TRACKS))
        track = get_track(track_name)
        problems += [f"{r['run_id']}: {p}" for r in results for p in track_violations(track, r)]
    if problems:
        raise RecordError("the runs cannot make a record:\n  " + "\n  ".join(problems))
    date = args.date or datetime.date.today().isoformat()
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", date) or not re.fullmatch(r"[a-z0-9][a-z0-9-]*", args.slug):
        raise RecordError("--date must be YYYY-MM-DD and --slug lowercase letters, digits and dashes")
    record = os.path.join(args.records_dir, track.name, f"{date}_{args.slug}")
    if os.path.exists(record):
        raise RecordError(f"{record} already exists")
    os.makedirs(record)
    try:
        for folder, result in zip(folders, results):
            os.makedirs(os.path.join(record, result["run_id"]))
            for name in RUN_FILES:
                shutil.copyfile(os.path.join(folder, name), os.path.join(record, result["run_id"], name))
        plot_runs(record_runs(record), os.path.join(record, "plot.png"), title=f"{track.name}: {args.title}")
        losses = [r["val_loss"] for r in results]
        curve = track_curve(args.records_dir, track.name)
        efficiency = (efficiency_summary(curve, mean_std(losses)[0], results[0]["train_tokens"])[0] if curve else
                      f"no reference curve for this track yet (records/{track.name}/reference_curve.json)")
        summary = dict(track=track.name, date=date, slug=args.slug, title=args.title,
                       description=args.description or args.title, source_sha256=sha256_text(logs[0].source),
                       runs=[r["run_id"] for r in results], val_loss_mean=mean_std(losses)[0],
                       val_loss_std=mean_std(losses)[1])
        significance = significance_lines(record, args.records_dir, track.name)
        with open(os.path.join(record, "README.md"), "w", encoding="utf-8") as handle:
            handle.write(record_readme(summary, logs, results, significance, efficiency))
        summary["files"] = manifest(record)
        with open(os.path.join(record, "record.json"), "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2)
            handle.write("\n")
    except BaseException:
        shutil.rmtree(record, ignore_errors=True)  # no half-made record
        raise
    print(f"made {record}")
    for line in significance:
        print(line)
    print(f"data efficiency: {efficiency}")
    print(f"next: python records/records.py verify {record} && python records/records.py table")
    return 0


def manifest(record: str) -> dict[str, str]:
    """sha256 of every file of the record but record.json itself: any later edit shows."""
    files = {}
    for root, _, names in os.walk(record):
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, record)
            if relative != "record.json":
                files[relative] = sha256_file(path)
    return dict(sorted(files.items()))


# ----------------------------------------------------------------------------------------------------------------------
# verify: every number re-derived from the logs; optionally the script re-run and compared step by step

def rerun_flags(hyperparameters: dict, overrides: dict[str, str]) -> list[str]:
    """Every logged hyperparameter as a flag (so the embedded script's presets do not matter), then overrides."""
    settings = {k: v for k, v in hyperparameters.items() if k != "preset"}
    settings.update(overrides)
    flags = []
    for name, value in settings.items():
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        flags += [f"--{name}", text]
    return flags


def rerun_log(log: RunLog, steps: int, workdir: str, overrides: dict[str, str], nproc: int, cwd: str,
              timeout: float) -> RunLog:
    """Runs the embedded source with the logged hyperparameters (its full LR schedule: same total steps) and stops
    it once its progress lines reach `steps` (and that step's validation, if the original validated there)."""
    script = os.path.join(workdir, "train_gpt.py")
    with open(script, "w", encoding="utf-8") as handle:
        handle.write(log.source)
    # Stop at a step the original logged: the first logged step at or past `steps`.
    target = next((row["step"] for row in log.train if row["step"] >= steps), log.train[-1]["step"])
    wait_for_val = any(row["step"] == target for row in log.val)
    settings = dict(run_id="rerun", log_dir=os.path.join(workdir, "logs"), save_model=False, **overrides)
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc_per_node={nproc}"]
    command = [*launcher, script, *rerun_flags(log.hyperparameters, settings)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    output, reached = [], False
    # a re-run that hangs silently (a stalled collective) prints nothing to wake the loop below: the timer ends it
    watchdog = threading.Timer(timeout, process.terminate)
    watchdog.start()
    try:
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
        for line in process.stdout:
            output.append(line)
            parsed = parse_progress_line(line.rstrip("\n"))
            if parsed and parsed[0] == "train" and parsed[1]["step"] >= target and not wait_for_val:
                reached = True
            if parsed and parsed[0] == "val" and parsed[1]["step"] >= target:
                reached = True
            if reached or datetime.datetime.now() > deadline:
                break
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.terminate()  # only the re-run we started; its partial log is all we need
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    log_path = os.path.join(workdir, "logs", "rerun", "log.txt")
    if not os.path.isfile(log_path):
        raise RecordError("the re-run did not start:\n" + "".join(output[-20:]))
    rerun = parse_log(log_path)
    if not rerun.train or rerun.train[-1]["step"] < target:
        raise RecordError(f"the re-run stopped before step {target}:\n" + "".join(output[-20:]))
    return rerun


def compare_losses(original: RunLog, rerun: RunLog, tolerance: float) -> list[str]:
    """Loss lines at every step both runs logged; a difference over tolerance fails."""
    problems, compared = [], 0
    for kind in ("train", "val"):
        theirs = {row["step"]: row["loss"] for row in getattr(rerun, kind)}
        for row in getattr(original, kind):
            if row["step"] not in theirs:
                continue
            compared += 1
            difference = abs(row["loss"] - theirs[row["step"]])
            if not difference <= tolerance:  # NaN fails too
                problems.append(f"step {row['step']} {kind}_loss: logged {row['text']}, re-run {theirs[row['step']]:.4f} "
                                f"(|diff| {difference:.4f} > tolerance {tolerance})")
    if compared == 0:
        problems.append("no loss line to compare (raise --steps)")
    return problems


def verify_record(record: str, records_dir: str, rerun: bool, steps: int, tolerance: float,
                  overrides: dict[str, str], nproc: int, cwd: str, timeout: float) -> list[str]:
    """Every problem of the record ([] when it passes); prints what it checks."""
    summary = read_json(os.path.join(record, "record.json"))
    folder_track = os.path.basename(os.path.dirname(os.path.normpath(record)))
    track = get_track(summary.get("track", folder_track))
    problems = []
    if track.name != folder_track:  # the leaderboard groups by folder: a record must follow its folder's rules
        problems.append(f"record.json says track {track.name}, but the record sits in records/{folder_track}/")
    recorded, actual = summary.get("files", {}), manifest(record)
    for name in sorted(set(recorded) | set(actual)):
        if recorded.get(name) != actual.get(name):
            state = "missing" if name not in actual else "added" if name not in recorded else "edited"
            problems.append(f"{name}: {state} since the record was made (sha256 differs from record.json)")
    folders = record_runs(record)
    found, logs, results = check_runs_together(folders)
    problems += found
    for result in results:
        problems += [f"{result['run_id']}: {p}" for p in track_violations(track, result)]
    if logs and summary.get("source_sha256") != sha256_text(logs[0].source):
        problems.append("the embedded source's sha256 differs from record.json's source_sha256")
    if results:
        mean, std = mean_std([r["val_loss"] for r in results])
        if summary.get("val_loss_mean") is None or abs(summary["val_loss_mean"] - mean) > 1e-9:
            problems.append(f"record.json val_loss_mean {summary.get('val_loss_mean')} != the runs' mean {mean}")
        previous = previous_record(record, records_dir, track.name)
        if previous is not None:
            theirs = round(record_results(previous)[0].get("unigram_val_entropy", 0.0), 6)
            if theirs != round(results[0].get("unigram_val_entropy", 0.0), 6):
                problems.append(f"scored a different validation set than {os.path.basename(previous)} "
                                f"(unigram entropy {results[0].get('unigram_val_entropy')} vs {theirs})")
    print(f"{record}: {len(folders)} run(s), track {track.name}, logs {'consistent' if not problems else 'INCONSISTENT'}")
    if results and not found:
        for line in significance_lines(record, records_dir, track.name):
            print("  " + line)
    if rerun and logs:
        for log in logs:
            with tempfile.TemporaryDirectory(prefix="slowrun-rerun-") as workdir:
                print(f"  re-running {os.path.basename(os.path.dirname(log.path))} for {steps} step(s) "
                      f"(tolerance {tolerance} nats per loss line)...", flush=True)
                try:
                    again = rerun_log(log, steps, workdir, overrides, nproc, cwd, timeout)
                    differences = compare_losses(log, again, tolerance)
                except RecordError as error:
                    differences = [str(error)]
                name = os.path.basename(os.path.dirname(log.path))
                problems += [f"{name} re-run: {d}" for d in differences]
                print(f"  re-run {'agrees' if not differences else 'DIVERGES'}")
    return problems


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    overrides = {}
    for pair in pairs:
        name, equals, value = pair.partition("=")
        if not equals:
            raise RecordError(f"--set expects name=value, got {pair!r}")
        overrides[name] = value
    return overrides


def command_verify(args) -> int:
    overrides = parse_overrides(args.set)
    failed = False
    for record in args.records:
        problems = verify_record(record, args.records_dir, args.rerun, args.steps, args.tolerance, overrides,
                                 args.nproc, args.cwd, args.timeout)
        for problem in problems:
            print(f"  FAIL {problem}")
        print(f"  {'REJECTED' if problems else 'OK'}")
        failed |= bool(problems)
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------------------------------
# table: the leaderboard in README.md, between the markers, from the records' result.json

def leaderboard(records_dir: str) -> str:
    """The markdown of every track's table, records ordered by mean val loss (lowest first)."""
    blocks = ["<!-- made by `python records/records.py table` from records/*/*/*/result.json; do not edit by hand -->"]
    for track in TRACKS.values():
        rows = []
        curve = track_curve(records_dir, track.name)
        for record in track_records(records_dir, track.name):
            summary = read_json(os.path.join(record, "record.json"))
            results = record_results(record)
            losses = [r["val_loss"] for r in results]
            tests = [r["test_loss"] for r in results if r.get("test_loss") is not None]
            link = os.path.relpath(record, os.path.dirname(records_dir)).replace(os.sep, "/")
            rows.append((mean_std(losses)[0], os.path.basename(record), [
                format_mean_std(losses), format_mean_std(tests) if tests else "—", str(len(losses)),
                format_tokens(results[0]["train_tokens"]),
                efficiency_cell(curve, mean_std(losses)[0], results[0]["train_tokens"]),
                f"{sum(device_hours(r) for r in results):.2f}", summary.get("date", ""),
                f"[{summary.get('title', summary.get('slug', ''))}]({link})"]))
        blocks.append(f"\n### `{track.name}`: {track.summary}\n")
        if not rows:
            blocks.append("No record yet.")
            continue
        blocks.append("| # | val loss | test loss | seeds | train tokens | data efficiency | device-hours | date | record |")
        blocks.append("|---|---|---|---|---|---|---|---|---|")
        for rank, (_, _, cells) in enumerate(sorted(rows, key=lambda row: (row[0], row[1])), start=1):
            blocks.append(f"| {rank} | " + " | ".join(cells) + " |")
    return "\n".join(blocks) + "\n"


def replace_between_markers(text: str, body: str, path: str) -> str:
    start, end = text.find(LEADERBOARD_START), text.find(LEADERBOARD_END)
    if start < 0 or end < 0 or end < start or text.count(LEADERBOARD_START) != 1 or text.count(LEADERBOARD_END) != 1:
        raise RecordError(f"{path}: needs exactly one {LEADERBOARD_START} line followed by one {LEADERBOARD_END} "
                          f"line; the table goes between them (nothing else in the file is touched)")
    return text[:start + len(LEADERBOARD_START)] + "\n" + body + text[end:]


def command_table(args) -> int:
    with open(args.readme, encoding="utf-8") as handle:
        text = handle.read()
    updated = replace_between_markers(text, leaderboard(args.records_dir), args.readme)
    if args.check:
        if updated != text:
            print(f"{args.readme}: the leaderboard is out of date; run python records/records.py table")
            return 1
        print(f"{args.readme}: the leaderboard is up to date")
        return 0
    if updated != text:
        with open(args.readme, "w", encoding="utf-8") as handle:
            handle.write(updated)
    print(f"{args.readme}: leaderboard {'updated' if updated != text else 'already up to date'}")
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# reference: the baseline runs of a track's data-efficiency curve (plan them, then build the curve from them)

def command_reference_plan(args) -> int:
    track = get_track(args.track)
    if args.budgets:
        budgets = [int(float(b)) for b in args.budgets.split(",")]
        available = None
    else:
        sys.path.insert(0, REPO_ROOT)
        import train_gpt  # the repo's script knows the preset's data and how to read it
        hp = train_gpt.parse_args(list(track.baseline[track.baseline.index("--preset"):]) + list(args.extra))
        available = int(train_gpt.load_tokens(hp.train_files, hp.vocab_size, "train").size)
        budgets = [available // 2 ** k for k in reversed(range(args.halvings + 1))]
    print(f"# Reference curve of track {track.name}: the baseline `{' '.join(track.baseline)}` trained on prefixes of "
          f"the train set (--train_tokens; cut back to a document start)" +
          (f"; the train set holds {available:,} tokens" if available else ""))
    print("# A run on D train tokens gets an efficiency X = B / D, where B is the budget at which this curve reaches "
          "the run's loss;\n# so X > 1 needs reference budgets above D (more data than the record uses).")
    print(f"# Run these ({args.seeds} seed(s) per budget), then build the curve from their run folders:")
    run_ids = []
    for budget in budgets:
        for seed in range(args.seeds):
            run_id = f"ref_{track.name}_{budget}_s{seed}"
            run_ids.append(run_id)
            words = [*track.baseline, *args.extra, "--train_tokens", str(budget), "--seed", str(seed),
                     "--run_id", run_id, "--save_model", "false"]
            print(" ".join(shlex.quote(w) for w in words))
    print(f"python records/records.py reference build {' '.join('logs/' + r for r in run_ids)} --track {track.name}")
    return 0


def command_reference_build(args) -> int:
    track = get_track(args.track)
    folders = [run_folder_of(path) for path in args.runs]
    problems, by_budget, recipe, source = [], {}, None, None
    for folder in folders:
        found, log, result = run_problems(folder)
        problems += found
        if log is None or result is None or found:
            continue
        # One recipe for every point: only the budget, the seed and the names may differ.
        settings = {k: v for k, v in log.hyperparameters.items() if k not in PER_SEED_FIELDS | {"train_tokens"}}
        if recipe is None:
            recipe, source, entropy = settings, log.source, result["unigram_val_entropy"]
        elif settings != recipe or log.source != source:
            problems.append(f"{folder}: not the same baseline recipe and script as the first run")
        elif abs(result["unigram_val_entropy"] - entropy) > 1e-6:
            problems.append(f"{folder}: scored a different validation set")
        by_budget.setdefault(result["train_tokens"], []).append(result)
    if problems:
        raise RecordError("the runs cannot make a reference curve:\n  " + "\n  ".join(problems))
    points = []
    for budget, results in sorted(by_budget.items()):
        mean, std = mean_std([r["val_loss"] for r in results])
        points.append(dict(train_tokens=budget, val_loss=mean, val_loss_std=std, seeds=len(results),
                           runs=[r["run_id"] for r in results]))
    curve = dict(track=track.name, what="val loss of the track's single-model baseline against its train-token "
                                        "budget (--train_tokens); mean over seeds",
                 baseline=" ".join(track.baseline), source_sha256=sha256_text(source), unigram_val_entropy=entropy,
                 recipe=recipe, points=points)
    out = os.path.join(args.records_dir, track.name, "reference_curve.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    temporary = out + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(curve, handle, indent=2)
        handle.write("\n")
    try:
        load_curve(temporary)  # refuses a curve whose losses do not fall with the budget
    except RecordError:
        os.remove(temporary)
        raise
    os.replace(temporary, out)
    # The runs themselves stay checkable: their logs go next to the curve.
    for folder, result in ((f, read_json(os.path.join(f, "result.json"))) for f in folders):
        target = os.path.join(args.records_dir, track.name, "reference", result["run_id"])
        os.makedirs(target, exist_ok=True)
        for name in RUN_FILES:
            shutil.copyfile(os.path.join(folder, name), os.path.join(target, name))
    print(f"wrote {out} ({len(points)} points) and the runs' logs under {os.path.dirname(out)}/reference/")
    for point in points:
        print(f"  {point['train_tokens']:>12,} tokens -> val loss {point['val_loss']:.4f} ({point['seeds']} seed(s))")
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# efficiency: the report for records or runs

def command_efficiency(args) -> int:
    failed = False
    for path in args.paths:
        if os.path.isfile(os.path.join(path, "record.json")):
            results = record_results(path)
            track = read_json(os.path.join(path, "record.json"))["track"]
        else:
            results = [read_json(os.path.join(run_folder_of(path), "result.json"))]
            track = args.track
        curve_path = args.curve or (os.path.join(args.records_dir, track, "reference_curve.json") if track else None)
        if curve_path is None:
            raise RecordError(f"{path}: a run folder needs --track or --curve to find its reference curve")
        if not os.path.isfile(curve_path):
            raise RecordError(f"{curve_path}: no reference curve yet; see `python records/records.py reference plan "
                              f"--track {track}`")
        curve = load_curve(curve_path)
        if abs(curve.get("unigram_val_entropy", results[0]["unigram_val_entropy"]) - results[0]["unigram_val_entropy"]) > 1e-6:
            raise RecordError(f"{path}: scored a different validation set than the reference curve")
        loss = mean_std([r["val_loss"] for r in results])[0]
        line, multiple = efficiency_summary(curve, loss, results[0]["train_tokens"])
        print(f"{path}: {line}" if multiple is not None else f"{path}: cannot place it: {line}")
        failed |= multiple is None
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------------------------------
# main

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="records.py", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records_dir", default=RECORDS_DIR, help="the records/ folder (default: next to this file)")
    commands = parser.add_subparsers(dest="command", required=True)

    new = commands.add_parser("new", help="make a record folder from finished runs (one per seed)")
    new.add_argument("runs", nargs="+", help="run folders (logs/<run_id>) or their log.txt")
    new.add_argument("--track", help=f"one of {', '.join(TRACKS)} (default: tiny for --preset tiny runs)")
    new.add_argument("--slug", required=True, help="short name: lowercase letters, digits, dashes")
    new.add_argument("--title", required=True, help="one line for the leaderboard: what changed")
    new.add_argument("--description", default="", help="what changed and why (markdown; default: the title)")
    new.add_argument("--date", help="YYYY-MM-DD (default: today)")
    new.set_defaults(handler=command_new)

    verify = commands.add_parser("verify", help="check records: logs consistent, one source, optionally re-run")
    verify.add_argument("records", nargs="+", help="record folders")
    verify.add_argument("--rerun", action="store_true", help="re-run each log's embedded script and compare losses")
    verify.add_argument("--steps", type=int, default=10, help="re-run this many optimizer steps (default 10)")
    verify.add_argument("--tolerance", type=float, default=0.01,
                        help="largest |logged - re-run| difference of a loss line, in nats (default 0.01)")
    verify.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="override a logged hyperparameter in the re-run (e.g. device=cpu, train_files=...)")
    verify.add_argument("--nproc", type=int, default=1, help="ranks of the re-run (torchrun when > 1)")
    verify.add_argument("--cwd", default=REPO_ROOT, help="folder the re-run starts in (relative data paths)")
    verify.add_argument("--timeout", type=float, default=3600, help="seconds before a re-run is abandoned")
    verify.set_defaults(handler=command_verify)

    table = commands.add_parser("table", help="rewrite the leaderboard in README.md between its markers")
    table.add_argument("--readme", default=os.path.join(REPO_ROOT, "README.md"))
    table.add_argument("--check", action="store_true", help="only report whether it is up to date (exit 1 if not)")
    table.set_defaults(handler=command_table)

    plot = commands.add_parser("plot", help="PNG of val loss against tokens seen for runs or records")
    plot.add_argument("paths", nargs="+", help="run folders, log.txt files or record folders")
    plot.add_argument("--out", required=True, help="the PNG to write")
    plot.add_argument("--width", type=int, default=960, help="pixels")
    plot.add_argument("--height", type=int, default=600, help="pixels")
    plot.add_argument("--title", default="")
    plot.set_defaults(handler=command_plot)

    reference = commands.add_parser("reference", help="the data-efficiency reference curve: plan its runs, build it")
    steps = reference.add_subparsers(dest="action", required=True)
    plan = steps.add_parser("plan", help="print the baseline commands, one per token budget and seed")
    plan.add_argument("--track", required=True)
    plan.add_argument("--budgets", help="comma-separated train-token budgets (default: the whole train set and "
                                        "--halvings successive halves)")
    plan.add_argument("--halvings", type=int, default=3)
    plan.add_argument("--seeds", type=int, default=1)
    plan.add_argument("extra", nargs="*", help="extra train_gpt.py flags after --, e.g. -- --train_files BIG.bin")
    plan.set_defaults(handler=command_reference_plan)
    build = steps.add_parser("build", help="write records/<track>/reference_curve.json from finished baseline runs")
    build.add_argument("runs", nargs="+")
    build.add_argument("--track", required=True)
    build.set_defaults(handler=command_reference_build)

    efficiency = commands.add_parser("efficiency", help="X: the baseline matches this loss on X times the tokens")
    efficiency.add_argument("paths", nargs="+", help="record folders or run folders")
    efficiency.add_argument("--track", help="track of run folders (records know theirs)")
    efficiency.add_argument("--curve", help="a reference_curve.json (default: records/<track>/reference_curve.json)")
    efficiency.set_defaults(handler=command_efficiency)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except RecordError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
