"""records/records.py: making, verifying (also by re-running), tabulating and plotting records; the t-test; the
data-efficiency curve. The logs come from real micro runs of train_gpt.py (made once per module), not hand-written."""
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import train_gpt
from conftest import REPO_ROOT, micro_flags, read_metrics, write_micro_shards

spec = importlib.util.spec_from_file_location("records_tool", os.path.join(REPO_ROOT, "records", "records.py"))
records = importlib.util.module_from_spec(spec)
sys.modules["records_tool"] = records  # dataclasses look their module up there
spec.loader.exec_module(records)

MICRO_TRACK = records.Track("micro", "toy language on CPU", "cpu", None, None, "train.bin", "val.bin", 0,
                            ("python", "train_gpt.py"))


# ------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module", autouse=True)
def micro_track():
    """The micro runs follow the rules of a test-only track (the real tracks name the real data files)."""
    records.TRACKS["micro"] = MICRO_TRACK
    yield
    records.TRACKS.pop("micro")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three seeds of a 4-step micro run (validating at steps 2 and 4), run side by side; {seed: run folder}."""
    root = tmp_path_factory.mktemp("runs")
    train_path, val_path = write_micro_shards(root)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    processes = []
    for seed in range(3):
        flags = micro_flags(train_path, val_path, str(root / "logs"), f"s{seed}", n_layer=1, batch_tokens=128,
                            device_batch_size=4, max_steps=4, val_every=2, seed=seed)
        processes.append(subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, "train_gpt.py"), *flags],
                                          cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for process in processes:
        output, _ = process.communicate(timeout=120)
        assert process.returncode == 0, output.decode()
    return {seed: str(root / "logs" / f"s{seed}") for seed in range(3)}


def make_record(runs, records_dir, seeds, slug, date="2025-01-01", capsys=None):
    argv = ["--records_dir", str(records_dir), "new", *[runs[s] for s in seeds], "--track", "micro", "--slug", slug,
            "--title", f"try {slug}", "--date", date]
    assert records.main(argv) == 0
    return os.path.join(str(records_dir), "micro", f"{date}_{slug}")


@pytest.fixture(scope="module")
def record(runs, tmp_path_factory):
    """A three-seed record, made once; tests that edit it work on a copy."""
    return make_record(runs, tmp_path_factory.mktemp("records"), [0, 1, 2], "first")


def copy_record(record, tmp_path):
    target = tmp_path / "records" / "micro" / os.path.basename(record)
    shutil.copytree(record, target)
    return str(target)


def edit_file(path, old, new):
    with open(path) as handle:
        text = handle.read()
    assert text.count(old) == 1, (old, path)
    with open(path, "w") as handle:
        handle.write(text.replace(old, new))


def reseal(record):
    """What a careful forger does after an edit: recompute record.json's hashes, so only the content checks remain."""
    path = os.path.join(record, "record.json")
    summary = json.load(open(path))
    summary["files"] = records.manifest(record)
    json.dump(summary, open(path, "w"))


def verify(record, *extra):
    return records.main(["--records_dir", os.path.dirname(os.path.dirname(record)), "verify", record, *extra])


def log_line(run_folder, prefix):
    """The first run-section line of the log that starts with prefix."""
    with open(os.path.join(run_folder, "log.txt")) as handle:
        return next(line.rstrip("\n") for line in handle if line.startswith(prefix))


def logged_value(line, field):
    """The text after `field ` in a `key value | key value` log line."""
    return line.split(f"{field} ")[1].split(" ")[0]


# ------------------------------------------------------------------------------------------------- new and verify

def test_new_makes_a_checkable_record(record, capsys):
    assert sorted(os.listdir(record)) == ["README.md", "plot.png", "record.json", "s0", "s1", "s2"]
    for seed in range(3):
        assert sorted(os.listdir(os.path.join(record, f"s{seed}"))) == ["log.txt", "metrics.jsonl", "result.json"]
    losses = [json.load(open(os.path.join(record, f"s{s}", "result.json")))["val_loss"] for s in range(3)]
    readme = open(os.path.join(record, "README.md")).read()
    assert f"{np.mean(losses):.4f} ± {np.std(losses, ddof=1):.4f}" in readme
    assert "python train_gpt.py --train_files" in readme and "device-hours" in readme
    assert verify(record) == 0
    out = capsys.readouterr().out
    assert f"mean {np.mean(losses):.4f}, std {np.std(losses, ddof=1):.4f}" in out and "OK" in out


def test_read_run_reads_the_run(runs):
    run = records.read_run(runs[0])
    assert run.source == open(os.path.join(REPO_ROOT, "train_gpt.py")).read()
    assert run.hyperparameters["n_layer"] == 1 and run.hyperparameters["seed"] == 0
    assert [row["step"] for row in run.train] == [1, 2, 3, 4] and [row["step"] for row in run.val] == [2, 4]
    assert run.command.split()[1].endswith("train_gpt.py") and not run.resumed


@pytest.mark.parametrize("prefix, field", [("step 2/4", "train_loss"), ("val  step 4/4", "val_loss")])
def test_verify_rejects_an_edited_loss_line(record, tmp_path, capsys, prefix, field):
    copy = copy_record(record, tmp_path)
    line = log_line(os.path.join(copy, "s1"), prefix)
    logged = logged_value(line, field)
    edit_file(os.path.join(copy, "s1", "log.txt"), line, line.replace(f"{field} {logged}", f"{field} 1.2345"))
    assert verify(copy) == 1
    out = capsys.readouterr().out
    assert "s1/log.txt: edited since the record was made" in out and "REJECTED" in out
    reseal(copy)  # even with the hashes made to match, the numbers disagree with metrics.jsonl
    assert verify(copy) == 1
    out = capsys.readouterr().out
    kind = field.split("_")[0]
    assert f"{kind} loss lines disagree with metrics.jsonl" in out and "edited since" not in out


@pytest.mark.parametrize("prefix, old, new, message", [
    ("step 4/4", "step 4/4", None, "train loss lines disagree with metrics.jsonl (3 log lines, 4 metrics rows)"),
    ("step 3/4", "step 3/4 | ", "step 3/5 | ", "train loss lines disagree with metrics.jsonl (metrics.jsonl: step 3/4"),
    ("done | ", "tokens trained on ", "tokens trained on 1", "result.json tokens_seen"),
    ("n_layer = ", "n_layer = 1", "n_layer = 2", "result.json hyperparameters differ from the log's hyperparameters"),
    ("world_size ", "device cpu", "device cuda:0", "result.json world_size 1 / device cpu differ from the log's"),
])
def test_verify_checks_the_log_against_the_numbers(record, tmp_path, capsys, prefix, old, new, message):
    """log.txt must say what metrics.jsonl and result.json hold: a dropped line, another total, the done line's
    tokens, a hyperparameter, where it ran (the hashes resealed, so only these checks can see it)."""
    copy = copy_record(record, tmp_path)
    line = log_line(os.path.join(copy, "s0"), prefix)
    edit_file(os.path.join(copy, "s0", "log.txt"), line + "\n", "" if new is None else line.replace(old, new) + "\n")
    reseal(copy)
    assert verify(copy) == 1
    out = capsys.readouterr().out
    assert f"s0: {message}" in out and "REJECTED" in out


def drop_step(run_folder, kind, step, prefix):
    """What a careful forger does to hide a step: its metrics.jsonl row and its log.txt line both go."""
    path = os.path.join(run_folder, "metrics.jsonl")
    rows = [json.loads(line) for line in open(path)]
    kept = [row for row in rows if not (row["kind"] == kind and row["step"] == step)]
    assert len(kept) == len(rows) - 1
    open(path, "w").write("".join(json.dumps(row) + "\n" for row in kept))
    edit_file(os.path.join(run_folder, "log.txt"), log_line(run_folder, prefix) + "\n", "")


@pytest.mark.parametrize("kind, step, prefix, message", [
    ("train", 3, "step 3/4",
     "s0: train rows skip step 3, which the run logs (step 1, each multiple of log_every 1, the last)"),
    ("val", 2, "val  step 2/4",
     "s0: val rows skip step 2, which the run validates (each multiple of val_every 2, the last"),
])
def test_verify_rejects_a_step_dropped_from_both_files(record, tmp_path, capsys, kind, step, prefix, message):
    """Review case v08: one step's metrics row and its log line both dropped, the hashes resealed, passed (the two
    files still agree with each other); now the steps must be the ones the run's own settings log."""
    copy = copy_record(record, tmp_path)
    drop_step(os.path.join(copy, "s0"), kind, step, prefix)
    reseal(copy)
    assert verify(copy) == 1
    out = capsys.readouterr().out
    assert message in out and "REJECTED" in out


def test_step_continuity_sees_epoch_ends_and_members():
    """The expected steps, from the run's settings: train at step 1, every log_every-th and the last; val at every
    val_every-th and the last, and (val_every >= 0) at each epoch end, read from the member's steps/epoch line."""
    def run(rows, lines, **hp):
        train = [dict(kind="train", step=s, member=m) for m, kind, s in rows if kind == "train"]
        val = [dict(kind="val", step=s, member=m) for m, kind, s in rows if kind == "val"]
        return records.SimpleNamespace(hyperparameters=dict(log_every=5, val_every=0, **hp), train=train, val=val,
                                       lines=lines)
    lines = ["seed 0 | 4/3 steps/epoch x 3 epochs -> 10 steps | compile off"]  # epoch ends at steps 4, 7 (and 10)
    whole = [(None, "train", s) for s in (1, 5, 10)] + [(None, "val", s) for s in (4, 7, 10)]
    assert records.step_gaps(run(whole, lines), {None: 10}) == []
    gaps = records.step_gaps(run(whole[:-2] + whole[-1:], lines), {None: 10})
    assert gaps == ["val rows skip step 7, which the run validates (each epoch end, the last)"], gaps
    assert records.step_gaps(run(whole[1:], lines), {None: 10})[0].startswith("train rows skip step 1,")
    members = [(m, kind, s) for m in (0, 1) for _, kind, s in whole if (m, kind, s) not in [(1, "train", 5),
                                                                                          (0, "val", 7)]]
    tagged = ["member 0 of 2 | " + lines[0], "member 1 of 2 | " + lines[0]]
    gaps = records.step_gaps(run(members, tagged, ensemble_size=2), {0: 10, 1: 10})
    assert gaps == ["member 0: val rows skip step 7, which the run validates (each epoch end, the last)",
                    "member 1: train rows skip step 5, which the run logs (step 1, each multiple of log_every 5, "
                    "the last)"]


def test_verify_ok_says_what_only_a_rerun_checks(record, tmp_path, capsys):
    """Review case v11: the final val loss forged consistently (val line, done line, metrics row, result.json, the
    record's mean, resealed) passes every consistency check: only --rerun can catch it, and the OK line says so."""
    copy = copy_record(record, tmp_path)
    run = os.path.join(copy, "s0")
    result = json.load(open(os.path.join(run, "result.json")))
    old = result["val_loss"]
    new = old - 0.1
    result["val_loss"] = new
    json.dump(result, open(os.path.join(run, "result.json"), "w"))
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    for row in rows:
        if row["kind"] == "val" and row["val_loss"] == old:
            row["val_loss"] = new
    open(os.path.join(run, "metrics.jsonl"), "w").write("".join(json.dumps(row) + "\n" for row in rows))
    log = open(os.path.join(run, "log.txt")).read()
    open(os.path.join(run, "log.txt"), "w").write(log.replace(f"val_loss {old:.4f}", f"val_loss {new:.4f}"))
    summary = json.load(open(os.path.join(copy, "record.json")))
    losses = [json.load(open(os.path.join(copy, f"s{s}", "result.json")))["val_loss"] for s in range(3)]
    summary.update(val_loss_mean=float(np.mean(losses)), val_loss_std=float(np.std(losses, ddof=1)))
    json.dump(summary, open(os.path.join(copy, "record.json"), "w"))
    reseal(copy)
    capsys.readouterr()
    assert verify(copy) == 0
    ok = capsys.readouterr().out.splitlines()[-1]
    assert ok.startswith("  OK: ") and "only --rerun" in ok and "consistent edit" in ok, ok


def test_cut_metrics_line_is_one_line_with_exit_status_2(runs, record, tmp_path, capsys):
    """A metrics.jsonl whose last line was cut (a killed writer, a truncated copy): one line, exit status 2, for the
    tools that read it (plot, verify); result.json that is not JSON likewise."""
    run = tmp_path / "cut"
    shutil.copytree(runs[0], run)
    text = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(text[:-25])  # the last row loses its end
    rows = text.count("\n")
    assert records.main(["plot", str(run), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"metrics.jsonl: line {rows} is cut short or not a metrics row" in err
    copy = copy_record(record, tmp_path)
    (tmp_path / "records" / "micro" / os.path.basename(copy) / "s1" / "metrics.jsonl").write_text(text[:-25])
    assert verify(copy) == 2
    assert capsys.readouterr().err.startswith(f"error: {copy}/s1/metrics.jsonl: line {rows} is cut short")
    (run / "metrics.jsonl").write_text(text)
    (run / "result.json").write_text('{"val_loss": 5.')
    assert records.main(["plot", str(run), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "result.json: not valid JSON" in err


def test_verify_rejects_an_edited_source(record, tmp_path, capsys):
    copy = copy_record(record, tmp_path)
    edit_file(os.path.join(copy, "s2", "log.txt"), "    muon_momentum: Fraction = 0.95",
              "    muon_momentum: Fraction = 0.9")
    reseal(copy)
    assert verify(copy) == 1
    out = capsys.readouterr().out
    assert "embedded source differs" in out and "REJECTED" in out


@pytest.mark.parametrize("field, change, message", [
    ("val_loss", lambda v: v - 0.01, "result.json val_loss"),
    ("train_seconds", lambda v: v / 2 - 0.01, "result.json train_seconds"),  # what the time-limited tracks read
    ("world_size", lambda v: 8, "result.json world_size 8"),
])
def test_verify_rejects_result_json_that_disagrees_with_the_log(record, tmp_path, capsys, field, change, message):
    copy = copy_record(record, tmp_path)
    path = os.path.join(copy, "s0", "result.json")
    result = json.load(open(path))
    result[field] = change(result[field])
    json.dump(result, open(path, "w"))
    reseal(copy)
    assert verify(copy) == 1
    assert message in capsys.readouterr().out


def test_new_refuses_runs_that_are_not_seeds_of_one_experiment(runs, tmp_path, capsys):
    argv = ["--records_dir", str(tmp_path), "new", runs[0], runs[0], "--track", "micro", "--slug", "x", "--title", "x"]
    assert records.main(argv) == 1
    assert "share a seed" in capsys.readouterr().err
    assert records.main(argv[:3] + [runs[0], "--track", "tiny", "--slug", "x", "--title", "x"]) == 1
    assert "is not the track's fineweb_edu_train.bin" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "micro") and not os.path.exists(tmp_path / "tiny")


def test_rerun_agrees_and_catches_a_forged_curve(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    single = make_record(runs, tmp_path / "records", [0], "single")
    assert verify(single, "--rerun", "--steps", "3") == 0
    out = capsys.readouterr().out
    # progress while it runs: each re-run loss beside the logged one; then how many were compared and the largest gap
    logged = {row["step"]: row["train_loss"] for row in read_metrics(runs[0]) if row["kind"] == "train"}
    for step in (1, 2, 3):
        assert f"step {step} train_loss " in out and f"(logged {logged[step]:.4f}, |diff| " in out
    summary = out.split("re-run agrees: ")[1].splitlines()[0]
    assert int(summary.split(" loss values")[0]) >= 4  # train steps 1-3 and val step 2 at least
    assert float(summary.split("max |diff| ")[1].split(" ")[0]) <= 0.01
    # A forger lowers step 2's train loss in the log and in metrics.jsonl alike: the logs stay consistent...
    line = log_line(os.path.join(single, "s0"), "step 2/4")
    logged = logged_value(line, "train_loss")
    forged = f"{float(logged) - 0.2:.4f}"
    edit_file(os.path.join(single, "s0", "log.txt"), line, line.replace(f"train_loss {logged}", f"train_loss {forged}"))
    metrics_path = os.path.join(single, "s0", "metrics.jsonl")
    rows = [json.loads(row) for row in open(metrics_path)]
    for row in rows:
        if row["kind"] == "train" and row["step"] == 2:
            row["train_loss"] = float(forged)
    open(metrics_path, "w").write("".join(json.dumps(row) + "\n" for row in rows))
    reseal(single)
    assert verify(single) == 0
    capsys.readouterr()
    # ...and only running the embedded script again shows the lie.
    assert verify(single, "--rerun", "--steps", "3") == 1
    out = capsys.readouterr().out
    assert "re-run DIVERGES" in out and f"step 2 train_loss: logged {forged}" in out and "> tolerance 0.01" in out
    largest = out.split("max |diff| ")[1]  # the forged 0.2 nats, give or take the 4-decimal rounding of the log
    assert abs(float(largest.split(" ")[0]) - 0.2) <= 2e-4 and largest.split(" nats at ")[1].startswith("step 2 train")


# ------------------------------------------------------------------------------------------------- table

README_TEXT = "# slowrun\n\nIntro.\n\n<!-- leaderboard:start -->\nold table\n<!-- leaderboard:end -->\n\n## After\n"


def test_table_orders_by_loss_and_is_idempotent(runs, tmp_path, capsys):
    records_dir = tmp_path / "records"
    made = {slug: make_record(runs, records_dir, seeds, slug, date)
            for slug, seeds, date in [("all", [0, 1, 2], "2025-01-01"), ("one", [1], "2025-01-02"),
                                      ("two", [0, 2], "2025-01-03")]}
    readme = tmp_path / "README.md"
    readme.write_text(README_TEXT)
    argv = ["--records_dir", str(records_dir), "table", "--readme", str(readme)]
    assert records.main(argv) == 0
    first = readme.read_text()
    assert first.startswith("# slowrun\n\nIntro.\n\n<!-- leaderboard:start -->\n")
    assert first.endswith("<!-- leaderboard:end -->\n\n## After\n") and "old table" not in first
    means = {slug: np.mean([json.load(open(os.path.join(folder, run, "result.json")))["val_loss"]
                            for run in os.listdir(folder) if run.startswith("s")]) for slug, folder in made.items()}
    rows = [line for line in first.splitlines() if line.startswith("| ") and "try " in line]
    assert [row.split("[try ")[1].split("]")[0] for row in rows] == sorted(means, key=means.get)
    assert [row.split(" | ")[0] for row in rows] == ["| 1", "| 2", "| 3"]
    assert records.main(argv) == 0
    assert readme.read_text() == first  # idempotent
    assert records.main(argv + ["--check"]) == 0
    capsys.readouterr()


def test_replace_between_markers():
    """train_gpt's one marker helper (records' leaderboard, the benches' RESULTS.md sections), by hand."""
    text = "a\n<!-- x:start -->\nold\nlines\n<!-- x:end -->\nb\n"
    assert train_gpt.replace_between_markers(text, "<!-- x:start -->", "<!-- x:end -->", "new\n\n") == \
        "a\n<!-- x:start -->\nnew\n<!-- x:end -->\nb\n"
    for bad in ("a\n", "<!-- x:end -->\n<!-- x:start -->\n", text + text, "<!-- x:start -->\n"):
        with pytest.raises(ValueError, match="needs exactly one <!-- x:start --> line followed by one <!-- x:end -->"):
            train_gpt.replace_between_markers(bad, "<!-- x:start -->", "<!-- x:end -->", "new")


def test_table_needs_the_markers(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# slowrun\n\nno markers here\n")
    assert records.main(["--records_dir", str(tmp_path), "table", "--readme", str(readme)]) == 1
    assert "<!-- leaderboard:start -->" in capsys.readouterr().err
    assert readme.read_text() == "# slowrun\n\nno markers here\n"


# ------------------------------------------------------------------------------------------------- plot

def test_plot_writes_a_png_of_the_asked_size(runs, record, tmp_path):
    import matplotlib.image

    out = tmp_path / "plot.png"
    assert records.main(["plot", runs[0], record, "--out", str(out), "--width", "640", "--height", "480"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(str(out)).shape == (480, 640, 4)
    # Runs that log ensemble rows get a second panel, loss against ensemble size; the size stays as asked.
    ensemble = tmp_path / "ensemble"
    shutil.copytree(runs[1], ensemble)
    with open(ensemble / "metrics.jsonl", "a") as handle:
        for members, loss in [(1, 5.4), (2, 5.3), (4, 5.25)]:
            handle.write(json.dumps(dict(kind="ensemble", members=members, val_loss=loss)) + "\n")
    out2 = tmp_path / "ensemble.png"
    records.plot_runs([str(ensemble)], str(out2), 800, 300)
    assert matplotlib.image.imread(str(out2)).shape == (300, 800, 4)


def test_record_plot_draws_each_seeds_val_curve_and_the_unigram_line(runs, record, tmp_path):
    """The record's figure, read back: per seed its val curve (validated at steps 2 and 4: two points, not one dot)
    and its train curve, equal to metrics.jsonl; one unigram line at result.json's value; a title."""
    import matplotlib.pyplot as plt

    folders = records.plot_folders([record])
    figure = records.loss_figure(folders, title=records.record_title([record]))
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    assert len(lines) == 3 + 3 + 1 and figure.get_suptitle() == "micro: try first"
    for seed in range(3):
        rows = read_metrics(runs[seed])
        for kind in ("val", "train"):
            line = lines[f"s{seed} {kind}"]
            assert list(line.get_xdata()) == [row["tokens_seen"] for row in rows if row["kind"] == kind]
            assert list(line.get_ydata()) == [row[f"{kind}_loss"] for row in rows if row["kind"] == kind]
        assert len(lines[f"s{seed} val"].get_xdata()) == 2
    unigram = json.load(open(os.path.join(runs[0], "result.json")))["unigram_val_loss"]
    assert list(lines[f"unigram baseline {unigram:.4f}"].get_ydata()) == [round(unigram, 4)] * 2
    plt.close(figure)
    # plot without --title names its runs
    figure = records.loss_figure([runs[0], runs[1]])
    assert figure.get_suptitle() == "loss against tokens seen: s0, s1"
    plt.close(figure)


# ------------------------------------------------------------------------------------------------- statistics

def t_sf_by_integration(t, df, points=400001):
    """P(T > t) by integrating the t density numerically: an independent check of the incomplete-beta route."""
    x = np.linspace(t, t + 4000, points)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    density = np.exp(log_norm - (df + 1) / 2 * np.log1p(x ** 2 / df))
    return float(np.sum((density[1:] + density[:-1]) / 2 * np.diff(x)))


def test_student_t_tail_matches_tables_and_integration():
    assert records.student_t_sf(2.228138852, 10) == pytest.approx(0.025, abs=1e-7)  # t table: 97.5%, 10 df
    assert records.student_t_sf(3.364929997, 5) == pytest.approx(0.01, abs=1e-7)  # 99%, 5 df
    assert records.student_t_sf(1.0, 1) == pytest.approx(0.25)  # Cauchy
    assert records.student_t_sf(0.0, 3.7) == pytest.approx(0.5)
    assert records.student_t_sf(-1.3, 4) == pytest.approx(1 - records.student_t_sf(1.3, 4))
    assert records.student_t_sf(1.959964, 1e7) == pytest.approx(0.025, abs=1e-6)  # large df: normal
    for t, df in [(1.7, 7.3), (0.4, 2.5), (3.1, 12.8)]:  # Welch gives fractional degrees of freedom
        assert records.student_t_sf(t, df) == pytest.approx(t_sf_by_integration(t, df), abs=1e-5)


def test_welch_p_value():
    # Hand computation: means 3.28 vs 3.30, variances 1e-4 / 3 each -> t = 0.02 / sqrt(2e-4 / 3) = 2.449, df = 4.
    p = records.improvement_p_value([3.27, 3.28, 3.29], [3.29, 3.30, 3.31])
    assert p == pytest.approx(records.student_t_sf(0.02 / math.sqrt(2e-4 / 3), 4))
    assert 0.01 < p < 0.05
    # A clear gain, but the old runs' spread leaves Welch about 2 degrees of freedom: p ~ 0.0015, not tiny.
    assert records.improvement_p_value([3.20, 3.201, 3.199], [3.30, 3.31, 3.29]) == pytest.approx(0.00153, abs=1e-5)
    assert records.improvement_p_value([3.30, 3.31, 3.29], [3.30, 3.31, 3.29]) == pytest.approx(0.5)
    assert records.improvement_p_value([3.28], [3.30, 3.31]) is None  # one seed: no test
    # Against a single previous run: a one-sample test against its value (df = n - 1).
    assert records.improvement_p_value([3.27, 3.28, 3.29], [3.30]) == pytest.approx(
        records.student_t_sf(0.02 / (0.01 / math.sqrt(3)), 2))


def test_verify_reports_p_value_against_the_previous_record(runs, tmp_path, capsys):
    records_dir = tmp_path / "records"
    make_record(runs, records_dir, [1], "old", "2025-01-01")
    newer = make_record(runs, records_dir, [0, 2], "new", "2025-02-01")
    capsys.readouterr()
    assert verify(newer) == 0
    old = json.load(open(os.path.join(runs[1], "result.json")))["val_loss"]
    new = [json.load(open(os.path.join(runs[s], "result.json")))["val_loss"] for s in (0, 2)]
    expected = records.improvement_p_value(new, [old])
    assert f"previous record: 2025-01-01_old ({old:.4f}, 1 seed(s)); one-sided Welch t-test p = {expected:.2g}" in \
        capsys.readouterr().out


def test_the_previous_record_is_the_one_made_before_not_the_slug_before(runs, tmp_path, capsys):
    """Two records of one date: the second made is compared with the first, though its slug sorts before it."""
    records_dir = tmp_path / "records"
    first = make_record(runs, records_dir, [1], "zzz-first", "2025-01-01")
    second = make_record(runs, records_dir, [0, 2], "aaa-second", "2025-01-01")
    assert records.previous_record(first, str(records_dir), "micro") is None
    assert records.previous_record(second, str(records_dir), "micro") == first
    assert "- previous record: 2025-01-01_zzz-first" in open(os.path.join(second, "README.md")).read()  # when made
    capsys.readouterr()
    assert verify(second) == 0 and "previous record: 2025-01-01_zzz-first" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------- data efficiency

# A synthetic baseline: the loss falls by 0.5 nats per doubling of the data, from 5.0 at 1,000 tokens to 3.0 at 16,000.
CURVE = [dict(train_tokens=1000 * 2 ** k, val_loss=5.0 - 0.5 * k) for k in range(5)]


def test_interpolation_returns_the_known_budget():
    assert records.matching_budget(CURVE, 4.0) == pytest.approx(4000)  # on a point
    assert records.matching_budget(CURVE, 3.25) == pytest.approx(1000 * 2 ** 3.5)  # between: linear in log tokens
    assert records.matching_budget(CURVE, 5.0) == pytest.approx(1000)
    assert records.matching_budget(CURVE, 3.0) == pytest.approx(16000)
    line, multiple = records.efficiency_summary(dict(points=CURVE), 3.5, 1000)
    assert multiple == pytest.approx(8.0) and "8.00x the tokens" in line


@pytest.mark.parametrize("loss, message", [
    (2.9, "val loss 2.9000 is below every reference point (the largest budget, 16,000 tokens, reaches 3.0000)"),
    (5.2, "val loss 5.2000 is above every reference point (the smallest budget, 1,000 tokens, reaches 5.0000)"),
])
def test_interpolation_refuses_to_extrapolate(loss, message):
    with pytest.raises(records.ExtrapolationError) as info:
        records.matching_budget(CURVE, loss)
    assert message in str(info.value) and "add reference runs" in str(info.value)
    # The leaderboard shows a bound instead of a number.
    assert records.efficiency_cell(dict(points=CURVE), loss, 1000) == ("> 16.00x" if loss < 3 else "< 1.00x")


def test_curve_must_fall_with_the_budget(tmp_path):
    path = tmp_path / "reference_curve.json"
    path.write_text(json.dumps(dict(points=[dict(train_tokens=1000, val_loss=4.0), dict(train_tokens=2000, val_loss=4.1)])))
    with pytest.raises(records.RecordError, match="must fall as the budget grows"):
        records.load_curve(str(path))


def test_efficiency_command_on_a_record(record, tmp_path, capsys):
    loss = np.mean([json.load(open(os.path.join(record, f"s{s}", "result.json")))["val_loss"] for s in range(3)])
    train_tokens = json.load(open(os.path.join(record, "s0", "result.json")))["train_tokens"]
    curve = tmp_path / "curve.json"
    # Loss falls 0.1 per doubling; the record's loss sits exactly one doubling above its own budget.
    points = [dict(train_tokens=train_tokens * 2 ** k, val_loss=loss + 0.1 - 0.1 * k) for k in range(4)]
    curve.write_text(json.dumps(dict(points=points)))
    assert records.main(["efficiency", record, "--curve", str(curve)]) == 0
    assert "2.00x the tokens" in capsys.readouterr().out
    curve.write_text(json.dumps(dict(points=points[2:])))
    assert records.main(["efficiency", record, "--curve", str(curve)]) == 1
    assert "cannot place it: val loss" in capsys.readouterr().out


def test_reference_curve_from_baseline_runs(runs, record, tmp_path, capsys):
    """Two real baseline runs, one epoch on a small and on the whole train set, make a curve the record sits on."""
    root = os.path.dirname(os.path.dirname(runs[0]))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    processes = [subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, "train_gpt.py"), *micro_flags(
        os.path.join(root, "train.bin"), os.path.join(root, "val.bin"), str(tmp_path / "logs"), f"ref_{budget}",
        n_layer=1, batch_tokens=128, device_batch_size=4, num_epochs=1, train_tokens=budget)],
        cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL) for budget in (300, 0)]
    assert [process.wait(timeout=120) for process in processes] == [0, 0]
    records_dir = os.path.dirname(os.path.dirname(record))
    argv = ["--records_dir", records_dir, "reference", "build", str(tmp_path / "logs" / "ref_300"),
            str(tmp_path / "logs" / "ref_0"), "--track", "micro"]
    try:
        assert records.main(argv) == 0
        curve = records.load_curve(os.path.join(records_dir, "micro", "reference_curve.json"))
        assert [p["runs"] for p in curve["points"]] == [["ref_300"], ["ref_0"]]
        assert sorted(os.listdir(os.path.join(records_dir, "micro", "reference"))) == ["ref_0", "ref_300"]
        capsys.readouterr()
        code = records.main(["--records_dir", records_dir, "efficiency", record])
        out = capsys.readouterr().out
        assert ("matches a baseline trained on" in out) if code == 0 else ("cannot place it" in out)
        # A run of another recipe cannot join the curve.
        assert records.main(argv[:4] + [runs[0], str(tmp_path / "logs" / "ref_300"), "--track", "micro"]) == 1
        assert "not the same baseline recipe" in capsys.readouterr().err
    finally:  # the record fixture's folder is shared: leave it without a curve
        os.remove(os.path.join(records_dir, "micro", "reference_curve.json"))
        shutil.rmtree(os.path.join(records_dir, "micro", "reference"))


def test_reference_plan_prints_the_baseline_commands(capsys):
    assert records.main(["reference", "plan", "--track", "tiny", "--budgets", "20000,40000", "--seeds", "2"]) == 0
    out = capsys.readouterr().out
    assert ("python train_gpt.py --preset tiny --num_epochs 1000 --max_steps 54 --val_every -1 --train_tokens 20000 --seed 1 "
            "--run_id ref_tiny_20000_s1") in out
    assert "python records/records.py reference build logs/ref_tiny_20000_s0 logs/ref_tiny_20000_s1" in out


# ------------------------------------------------------------------------------------------------- ensemble records

@pytest.fixture(scope="module")
def ensemble_runs(tmp_path_factory):
    """Two seeds of a 2-member micro ensemble (member lines carry a `member k of K |` prefix; the ranked loss is the
    ensemble's, on the done line, not any member's last val line)."""
    root = tmp_path_factory.mktemp("ensemble_runs")
    train_path, val_path = write_micro_shards(root)
    folders = {}
    for seed in range(2):
        flags = micro_flags(train_path, val_path, str(root / "logs"), f"e{seed}", n_layer=1, batch_tokens=128,
                            device_batch_size=4, max_steps=3, val_every=-1, seed=seed, ensemble_size=2)
        assert train_gpt.main(flags) == 0
        folders[seed] = str(root / "logs" / f"e{seed}")
    return folders


def test_ensemble_runs_make_a_checkable_record(ensemble_runs, tmp_path, capsys):
    record = make_record(ensemble_runs, tmp_path / "records", [0, 1], "ens")
    assert verify(record) == 0
    # its plot: each member's own curves (val scored once at its end, the value in the legend), the ensemble panel
    import matplotlib.pyplot as plt
    figure = records.loss_figure([ensemble_runs[0]])
    rows = read_metrics(ensemble_runs[0])
    labels = [line.get_label() for line in figure.axes[0].get_lines()]
    for member in (0, 1):
        val = [row["val_loss"] for row in rows if row["kind"] == "val" and row["member"] == member]
        assert len(val) == 1 and f"e0 member {member} val {val[0]:.4f} (end only)" in labels
        assert f"e0 member {member} train" in labels
    assert list(figure.axes[1].get_lines()[0].get_ydata()) == [r["val_loss"] for r in rows if r["kind"] == "ensemble"]
    plt.close(figure)
    result = json.load(open(os.path.join(ensemble_runs[0], "result.json")))
    assert result["steps"] == 6 and len(result["member_val_losses"]) == 2
    # an edited member-1 loss line is caught (metrics.jsonl disagrees), even with record.json resealed
    forged = copy_record(record, tmp_path / "forged")
    line = log_line(os.path.join(forged, "e0"), "member 1 of 2 | step 3/3")
    loss = line.split("train_loss ")[1].split(" ")[0]
    edit_file(os.path.join(forged, "e0", "log.txt"), line, line.replace(loss, f"{float(loss) - 0.5:.4f}"))
    reseal(forged)
    capsys.readouterr()
    assert verify(forged) == 1
    assert "train loss lines disagree with metrics.jsonl" in capsys.readouterr().out


@pytest.fixture(scope="module")
def distilled_runs(ensemble_runs, tmp_path_factory):
    """Two seeds of a micro student (issue 28), each distilled from the finished 2-member run of its own seed
    (ensemble_runs e0, e1) by --distill_from: {seed: run folder}."""
    root = tmp_path_factory.mktemp("distilled_runs")
    train_path, val_path = write_micro_shards(root)
    folders = {}
    for seed in range(2):
        flags = micro_flags(train_path, val_path, str(root / "logs"), f"d{seed}", n_layer=1, batch_tokens=128,
                            device_batch_size=4, max_steps=3, val_every=-1, seed=seed,
                            distill_from=ensemble_runs[seed], distill_alpha=0.5, save_model=True)  # teaches too
        assert train_gpt.main(flags) == 0
        folders[seed] = str(root / "logs" / f"d{seed}")
    return folders


def test_a_distilled_record_carries_its_teachers(distilled_runs, ensemble_runs, tmp_path, capsys):
    students, teachers = [distilled_runs[s] for s in (0, 1)], [ensemble_runs[s] for s in (0, 1)]
    argv = ["--records_dir", str(tmp_path / "records"), "new", *students, "--track", "micro", "--slug", "taught",
            "--title", "taught", "--date", "2025-01-02"]
    assert records.main(argv) == 1  # without its teachers a distilled record cannot be checked: refused
    assert "pass the finished runs that taught them as --teachers" in capsys.readouterr().err
    assert records.main(argv + ["--teachers", teachers[0]]) == 1  # d1's teacher e1 missing
    assert "d1: its teacher" in capsys.readouterr().err and not os.path.exists(tmp_path / "records" / "micro")
    assert records.main(argv + ["--teachers", *teachers]) == 0
    record = str(tmp_path / "records" / "micro" / "2025-01-02_taught")
    summary = json.load(open(os.path.join(record, "record.json")))
    assert summary["runs"] == ["d0", "d1"] and summary["teachers"] == ["e0", "e1"]
    for teacher in teachers:  # the teachers' files, byte for byte
        for name in records.RUN_FILES:
            copied = os.path.join(record, "teachers", os.path.basename(teacher), name)
            assert open(copied, "rb").read() == open(os.path.join(teacher, name), "rb").read()
    # compute counts the teachers: ranks x wall seconds of all four runs, from their result.json by hand
    walls = [json.load(open(os.path.join(folder, "result.json")))["wall_seconds"] for folder in students + teachers]
    readme = open(os.path.join(record, "README.md")).read()
    assert f"- compute: {sum(walls) / 3600:.3f} device-hours in all" in readme and "## Teachers" in readme
    capsys.readouterr()
    assert verify(record) == 0
    assert "2 run(s) and 2 teacher(s)" in capsys.readouterr().out
    # a teacher's log edited and the record resealed: caught by the teachers' own checks
    forged = copy_record(record, tmp_path / "forged")
    line = log_line(os.path.join(forged, "teachers", "e1"), "member 1 of 2 | step 3/3")
    loss = logged_value(line, "train_loss")
    edit_file(os.path.join(forged, "teachers", "e1", "log.txt"), line, line.replace(loss, f"{float(loss) - 0.5:.4f}"))
    reseal(forged)
    capsys.readouterr()
    assert verify(forged) == 1
    assert "teacher e1: train loss lines disagree with metrics.jsonl" in capsys.readouterr().out
    # the teachers taken away (resealed): refused
    bare = copy_record(record, tmp_path / "bare")
    shutil.rmtree(os.path.join(bare, "teachers"))
    reseal(bare)
    capsys.readouterr()
    assert verify(bare) == 1
    assert "the runs learned from --distill_from, but the record has no teachers/ folder" in capsys.readouterr().out


@pytest.fixture(scope="module")
def second_generation_runs(distilled_runs, tmp_path_factory):
    """Students of the students: g0, g1 taught by d0, d1 (themselves taught by e0, e1): [run folder per seed]."""
    root = tmp_path_factory.mktemp("second_generation_runs")
    train_path, val_path = write_micro_shards(root)
    second = []
    for seed in range(2):
        flags = micro_flags(train_path, val_path, str(root / "logs"), f"g{seed}", n_layer=1, batch_tokens=128,
                            device_batch_size=4, max_steps=3, val_every=-1, seed=seed,
                            distill_from=distilled_runs[seed], distill_alpha=0.5)
        assert train_gpt.main(flags) == 0
        second.append(str(root / "logs" / f"g{seed}"))
    return second


def test_a_second_generation_record_carries_both_generations(second_generation_runs, distilled_runs, ensemble_runs,
                                                            tmp_path, capsys):
    """The students of the students: the record needs both generations, each one recipe."""
    second = second_generation_runs
    capsys.readouterr()
    argv = ["--records_dir", str(tmp_path / "records"), "new", *second, "--track", "micro", "--slug", "gen2",
            "--title", "gen2", "--date", "2025-01-03", "--teachers", distilled_runs[0], distilled_runs[1]]
    assert records.main(argv) == 1  # the first generation's teachers are missing
    assert "d0: its teacher" in capsys.readouterr().err
    assert records.main(argv + [ensemble_runs[0]]) == 1  # e1 still missing
    assert "d1: its teacher" in capsys.readouterr().err
    assert records.main(argv + [ensemble_runs[0], ensemble_runs[1]]) == 0
    record = str(tmp_path / "records" / "micro" / "2025-01-03_gen2")
    # the order they were made
    assert json.load(open(os.path.join(record, "record.json")))["teachers"] == ["e0", "e1", "d0", "d1"]
    capsys.readouterr()
    assert verify(record) == 0 and "2 run(s) and 4 teacher(s)" in capsys.readouterr().out


def test_reproduce_remakes_one_seed_of_a_record_teachers_first(second_generation_runs, distilled_runs, ensemble_runs,
                                                              tmp_path, capsys):
    """`reproduce --seeds 1` re-makes e1, then d1 taught by the re-made e1, then g1 taught by the re-made d1, each
    from the record's embedded script, and gets the losses the original runs logged (same machine: to 1e-6)."""
    argv = ["--records_dir", str(tmp_path / "records"), "new", *second_generation_runs, "--track", "micro",
            "--slug", "gen2", "--title", "gen2", "--date", "2025-01-03", "--teachers", *distilled_runs.values(),  # not
            # the order they were made: each teacher still lands in teachers/<its run_id>
            *ensemble_runs.values()]
    assert records.main(argv) == 0
    record = str(tmp_path / "records" / "micro" / "2025-01-03_gen2")
    out = str(tmp_path / "remade")
    capsys.readouterr()
    assert records.main(["reproduce", record, "--out", out, "--seeds", "1"]) == 0
    printed = capsys.readouterr().out
    assert "re-making 3 run(s) whole, in order: e1, d1, g1" in printed and "REPRODUCED" in printed
    assert sorted(name for name in os.listdir(out) if name != "scripts") == ["d1", "e1", "g1"]  # seed 0 left alone
    originals = {"e1": ensemble_runs[1], "d1": distilled_runs[1], "g1": second_generation_runs[1]}
    for name, original in originals.items():
        logged, remade = (json.load(open(os.path.join(folder, "result.json"))) for folder in (original,
                                                                                               os.path.join(out, name)))
        assert abs(remade["val_loss"] - logged["val_loss"]) < 1e-6, name
    for name, teacher in (("d1", "e1"), ("g1", "d1")):  # each learned from the re-made teacher, not the original
        hyperparameters = json.load(open(os.path.join(out, name, "result.json")))["hyperparameters"]
        assert hyperparameters["distill_from"] == os.path.join(out, teacher)
    # run again: the finished runs are kept, nothing re-trained
    assert records.main(["reproduce", record, "--out", out, "--seeds", "1"]) == 0
    assert capsys.readouterr().out.count("already re-made") == 3
    # a changed recipe does not reproduce: g1 with another learning rate, taught by the same re-made d1
    shutil.copytree(os.path.join(out, "e1"), os.path.join(tmp_path / "changed", "e1"))
    shutil.copytree(os.path.join(out, "d1"), os.path.join(tmp_path / "changed", "d1"))
    assert records.main(["reproduce", record, "--out", str(tmp_path / "changed"), "--seeds", "1", "--set",
                         "muon_lr=0.5", "--tolerance", "1e-6"]) == 1
    printed = capsys.readouterr().out
    assert "FAIL g1 val_loss" in printed and "NOT REPRODUCED" in printed
    assert records.main(["reproduce", record, "--out", out, "--seeds", "7"]) == 1
    assert "no run has a seed in [7]" in capsys.readouterr().err


def test_a_resumed_run_is_not_a_record(tmp_path):
    train_path, val_path = write_micro_shards(tmp_path)
    flags = micro_flags(train_path, val_path, str(tmp_path / "logs"), "r", n_layer=1, batch_tokens=128,
                        device_batch_size=4, max_steps=4, stop_at_step=2)
    assert train_gpt.main(flags) == 3
    assert train_gpt.main(["--resume", str(tmp_path / "logs" / "r")]) == 0
    problems, log, _ = records.run_problems(str(tmp_path / "logs" / "r"))
    assert log.resumed and any("the run was resumed" in problem for problem in problems)


def test_verify_rejects_a_record_moved_to_another_track(record, tmp_path, capsys):
    moved = tmp_path / "records" / "tiny" / os.path.basename(record)  # a micro record filed under tiny
    shutil.copytree(record, moved)
    capsys.readouterr()
    assert verify(str(moved)) == 1
    assert "record.json says track micro, but the record sits in records/tiny/" in capsys.readouterr().out


def test_rerun_of_a_silent_hang_ends_at_the_timeout(tmp_path):
    """A re-run that prints nothing (a stalled collective) must not block verify past --timeout."""
    import time
    run = records.Run(str(tmp_path), "import time\ntime.sleep(120)\n", {}, False, [dict(kind="train", step=1, train_loss=5.0)],
                      dict(hyperparameters={}))
    start = time.time()
    with pytest.raises(records.RecordError, match="did not start"):
        records.rerun_metrics(run, 1, str(tmp_path), {}, 1, str(tmp_path), timeout=2)
    assert time.time() - start < 30
