"""The ablation bench's table, rebuilt from run folders (no training): paired per-seed deltas, partial benches."""
import json
import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from bench import ablation  # noqa: E402

LOSSES = {"all-on": (8.30, 8.40), "no-xsa": (8.31, 8.38), "plain (all off)": (8.20, 8.25)}
ALL_ON = {**ablation.COMMON, **ablation.TECHNIQUES, **ablation.SUB_SETTINGS}
SETTINGS = {"all-on": ALL_ON, "no-xsa": {**ALL_ON, "xsa": ""}, "plain (all off)": dict(ablation.COMMON)}


def fake_runs(folder, names):
    for name in names:
        for seed, loss in zip((0, 1), LOSSES[name]):
            os.makedirs(os.path.join(folder, f"{name}-seed{seed}"))
            with open(os.path.join(folder, f"{name}-seed{seed}", "result.json"), "w") as handle:
                settings = dict(SETTINGS[name], num_epochs=4, train_tokens=35027, seed=seed)
                json.dump(dict(val_loss=loss, wall_seconds=120.0, git_commit="abc123", torch="2.13.0",
                               hyperparameters=settings), handle)


def table_rows(path):
    return {line.split(" | ")[0][2:]: line for line in open(path).read().splitlines() if line.startswith("| ")}


def test_rebuilt_table_has_means_spreads_and_paired_deltas(tmp_path):
    runs, out = str(tmp_path / "runs"), str(tmp_path / "RESULTS.md")
    fake_runs(runs, LOSSES)
    assert ablation.main(["--rebuild", runs, "--only", "xsa", "--out", out]) == 0
    rows = table_rows(out)
    # no-xsa: mean 8.345 against all-on 8.35; seed by seed +0.01 and -0.02 (signs disagree: noise)
    assert rows["no-xsa"] == "| no-xsa | 8.3100 | 8.3800 | 8.3450 | 0.0700 | -0.0050 | +0.0100 / -0.0200 |"
    assert rows["plain (all off)"].endswith("| -0.1250 | -0.1000 / -0.1500 |")
    text = open(out).read()
    assert "git abc123 (the runs')" in text and "add up to 12.0 min" in text and "incomplete" not in text


def test_rebuilt_table_of_an_interrupted_bench_says_so(tmp_path):
    runs, out = str(tmp_path / "runs"), str(tmp_path / "RESULTS.md")
    fake_runs(runs, ["all-on", "no-xsa"])
    os.remove(os.path.join(runs, "no-xsa-seed1", "result.json"))  # killed during its second seed
    assert ablation.main(["--rebuild", runs, "--only", "xsa", "--out", out]) == 0
    assert list(table_rows(out)) == ["config", "all-on"]
    assert "incomplete: 1 of 3 configurations so far" in open(out).read()


def test_rebuild_refuses_runs_made_with_other_flags(tmp_path, capsys):
    runs, out = str(tmp_path / "runs"), str(tmp_path / "RESULTS.md")
    fake_runs(runs, ["all-on"])
    with pytest.raises(SystemExit):
        ablation.main(["--rebuild", runs, "--only", "xsa", "--num_epochs", "3", "--out", out])
    assert "num_epochs 4 (expected 3)" in capsys.readouterr().err and not os.path.exists(out)


def test_write_section_rewrites_only_its_own_part(tmp_path):
    """bench/results_file.py through train_gpt's marker helper and atomic write: a missing file is made, a new section
    appended, an existing one replaced with the text around it kept byte for byte; crossed markers refused."""
    from bench.results_file import write_section

    path = str(tmp_path / "RESULTS.md")
    write_section(path, "a", "first\n")
    write_section(path, "b", "table b\n")
    assert open(path).read() == ("# Bench results\n\n<!-- a:start -->\nfirst\n<!-- a:end -->\n\n"
                                 "<!-- b:start -->\ntable b\n<!-- b:end -->\n")
    write_section(path, "a", "second\nrow\n\n")
    assert open(path).read() == ("# Bench results\n\n<!-- a:start -->\nsecond\nrow\n<!-- a:end -->\n\n"
                                 "<!-- b:start -->\ntable b\n<!-- b:end -->\n")
    assert os.listdir(tmp_path) == ["RESULTS.md"]  # no temporary file left
    open(path, "w").write("<!-- a:end -->\n<!-- a:start -->\n")
    with pytest.raises(SystemExit, match="needs exactly one <!-- a:start --> line followed by one <!-- a:end -->"):
        write_section(path, "a", "x")
