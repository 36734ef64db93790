"""The mini track in records/records.py (issue 17): its rules, its data-efficiency column (linear in tokens, by
bench/mini.py's one implementation) against a hand computation; bench/mini.py's stored curve runs; the bundled Tiny
Shakespeare byte shards (the second domain)."""
import hashlib
import importlib.util
import json
import os
import sys

import pytest

import train_gpt
from conftest import REPO_ROOT
from test_encode import tok as enc  # data/encode.py, loaded by path

spec = importlib.util.spec_from_file_location("records_tool_mini", os.path.join(REPO_ROOT, "records", "records.py"))
records = importlib.util.module_from_spec(spec)
sys.modules["records_tool_mini"] = records  # dataclasses look their module up there
spec.loader.exec_module(records)
import bench.mini as mini  # noqa: E402

# budgets 1,000 / 2,000 / 4,000 tokens reaching 3.0 / 2.6 / 2.2
POINTS = [dict(train_tokens=1000, val_loss=3.0), dict(train_tokens=2000, val_loss=2.6),
          dict(train_tokens=4000, val_loss=2.2)]
LINEAR = dict(interpolation="linear in train_tokens", points=POINTS)
SHAKESPEARE = os.path.join(REPO_ROOT, "data", "shakespeare")
SHAKESPEARE_SOURCE = os.path.join(REPO_ROOT, "..", "shared", "data", "input.txt")


def test_mini_efficiency_column_is_linear_in_tokens_by_hand():
    # 2.4 lies halfway between 2.6 (2,000) and 2.2 (4,000): linear in tokens, budget 3,000; a run on 1,000 -> 3.00x
    assert records.efficiency_cell(LINEAR, 2.4, 1000) == "3.00x"
    # 2.9 is a quarter of the way from 3.0 to 2.6: 1,000 + 0.25 x 1,000 = 1,250; a run on 500 -> 2.50x
    assert records.efficiency_cell(LINEAR, 2.9, 500) == "2.50x"
    line, multiple = records.efficiency_summary(LINEAR, 2.4, 1000)
    assert multiple == pytest.approx(3.0) and "3,000 tokens" in line
    # a curve without the key keeps records.py's log-token rule (tiny): sqrt(2,000 x 4,000) = 2,828.4 -> 2.83x
    assert records.efficiency_cell(dict(points=POINTS), 2.4, 1000) == "2.83x"
    # off the curve: bounds, never extrapolated
    assert records.efficiency_cell(LINEAR, 2.1, 500) == "> 8.00x"
    assert records.efficiency_cell(LINEAR, 3.1, 500) == "< 2.00x"
    assert records.efficiency_summary(LINEAR, 2.1, 500)[1] is None


def test_mini_track_rules():
    track = records.get_track("mini")
    result = dict(device="cpu", world_size=1, ranks_agree=True, train_seconds=99999.0, hyperparameters=dict(
        train_files="data/mini/mini_train.bin", val_files="data/mini/mini_val.bin", val_tokens=0,
        train_tokens=32768))
    assert records.track_violations(track, result) == []  # no time limit, any thread count
    result["hyperparameters"]["train_tokens"] = 262144  # the whole track: not the record's 1/8
    assert records.track_violations(track, result) == ["train_tokens = 262144, the track's budget is 32768"]


@pytest.mark.parametrize("name", ["2026-11-26_m-wd1-e16-ens4", "2026-11-26_m-wd1-lr08-sd01-e16-ens8"])
def test_committed_mini_record_in_the_leaderboard_by_hand(name):
    # the record's mean val loss on the committed curve lies between its 1/8 and 1/4 points: linear in bytes
    record = os.path.join(REPO_ROOT, "records", "mini", name)
    losses = [result["val_loss"] for result in records.record_results(record)]
    mean = sum(losses) / len(losses)
    curve = records.load_curve(os.path.join(REPO_ROOT, "records", "mini", "reference_curve.json"))
    (b0, l0), (b1, l1) = [(p["train_tokens"], p["val_loss"]) for p in curve["points"][1:3]]
    assert l1 < mean < l0
    by_hand = (b0 + (l0 - mean) / (l0 - l1) * (b1 - b0)) / 27033
    rows = [line for line in records.leaderboard(records.RECORDS_DIR).splitlines() if f"records/mini/{name})" in line]
    assert len(rows) == 1 and f"| {by_hand:.2f}x |" in rows[0]


def test_stored_curve_runs_stand_in_for_missing_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(mini, "CURVE_DIR", str(tmp_path))
    rows = [dict(run="ref_b8_m_e16", budget=8, size="m", epochs=16, val_loss=2.4, epochs_tried=[8, 16]),
            dict(run="ref_b1_m_e4", budget=1, size="m", epochs=4, val_loss=2.0)]
    (tmp_path / "reference_curve.json").write_text(json.dumps(dict(unigram_val_loss=3.2, runs=rows, points=[])))
    stored = mini.stored_curve_runs({"ref_b1_m_e4"})  # that one's folder is here: its fresh numbers win
    assert list(stored) == ["ref_b8_m_e16"]
    n, size, epochs, numbers = stored["ref_b8_m_e16"]
    assert (n, size, epochs, numbers["val_loss"], numbers["unigram_val_loss"]) == (8, "m", 16, 2.4, 3.2)


def test_shakespeare_domain_reads_the_shakespeare_shards(monkeypatch):
    for name in ("DOMAIN_FLAGS", "RUNS", "CURVE_DIR", "SECTION", "TITLE"):
        monkeypatch.setattr(mini, name, getattr(mini, name))  # restored after the test
    mini.use_domain("shakespeare")
    assert mini.DOMAIN_FLAGS.split()[1::2] == [f"data/shakespeare/shakespeare_{s}.bin" for s in ("train", "val", "test")]
    assert mini.RUNS.endswith(os.path.join("bench", "runs", "shakespeare")) and mini.SECTION == "mini_shakespeare"


def test_shakespeare_shards_are_hashed_and_are_the_play_text_in_order():
    paths = [os.path.join(SHAKESPEARE, f"shakespeare_{split}.bin") for split in ("train", "val", "test")]
    readme = open(os.path.join(REPO_ROOT, "data", "README.md"), encoding="utf-8").read()
    unlisted = [p for p in paths if hashlib.sha256(open(p, "rb").read()).hexdigest() not in readme]
    assert unlisted == [], "sha256 not listed in data/README.md"
    if not os.path.isfile(SHAKESPEARE_SOURCE):
        pytest.skip("input.txt (../shared/data) is not on this machine")
    pieces = [d for path in paths for d in enc.decode_byte_documents(train_gpt.read_shard(path))]
    # contiguous pieces cut at blank lines, in order, nothing lost: joined with blank lines they are input.txt
    assert "\n\n".join(pieces) == open(SHAKESPEARE_SOURCE, encoding="utf-8").read()
