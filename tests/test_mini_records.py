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
    assert len(rows) == 1 and f"| {by_hand:.2f}x strict, " in rows[0]


# ------------------------------------------------------------------ issue 28: the public convention beside the strict

# the public convention on 3 points: budgets 1,000 / 2,000 / 4,000 reach 3.0 / 2.6 / 2.2 after ONE epoch; the strict
# curve (tuned epochs) reaches lower losses at the same budgets: 2.8 / 2.4 / 2.0
PUBLIC = dict(convention="public", interpolation="linear in train_tokens", points=POINTS)
STRICT = dict(interpolation="linear in train_tokens", points=[dict(p, val_loss=p["val_loss"] - 0.2) for p in POINTS])


def test_public_convention_interpolation_by_hand():
    # 2.7 lies between 3.0 (1,000) and 2.6 (2,000), (3.0 - 2.7) / 0.4 = 0.75 of the way: 1,000 + 0.75 x 1,000 = 1,750 bytes; a run on 250 -> 7.0x (one decimal, as the public figures)
    assert records.efficiency_cell(PUBLIC, 2.7, 250, digits=1) == "7.0x"
    assert records.efficiency_summary(PUBLIC, 2.7, 250)[1] == pytest.approx(1750 / 250)
    # the same loss on the strict curve: between 2.8 (1,000) and 2.4 (2,000), 0.25 of the way: 1,250 -> 5.00x
    assert records.both_conventions_cell(STRICT, PUBLIC, 2.7, 250) == "5.00x strict, 7.0x public"
    # 2.3 on the public curve: between 2.6 (2,000) and 2.2 (4,000), 0.75 of the way: 3,500 -> 14.0x; strict: 2.4 ..
    # 2.0, 0.25 of the way: 2,500 -> 10.00x
    assert records.both_conventions_cell(STRICT, PUBLIC, 2.3, 250) == "10.00x strict, 14.0x public"
    # below the public curve's lowest point (2.2 at 4,000): a bound, 4,000 / 250, never an extrapolation
    assert records.both_conventions_cell(STRICT, PUBLIC, 2.1, 250) == "14.00x strict, > 16.0x public"
    assert records.efficiency_summary(PUBLIC, 2.1, 250)[1] is None
    # above its first point: the other bound; and a track without a public curve says so
    assert records.both_conventions_cell(STRICT, PUBLIC, 3.1, 250) == "< 4.00x strict, < 4.0x public"
    assert records.both_conventions_cell(STRICT, None, 2.7, 250) == "5.00x strict, — public"
    # bench/mini.py's tables write the same cell from the same rule
    points = [(p["train_tokens"], p["val_loss"]) for p in POINTS]
    strict = [(b, loss - 0.2) for b, loss in points]
    for loss in (2.7, 2.3, 2.1, 3.1):
        assert mini.both_conventions_text(strict, points, loss, 250) == records.both_conventions_cell(
            STRICT, PUBLIC, loss, 250)


PUBLIC_PATH = os.path.join(REPO_ROOT, "records", "mini", "reference_curve_public.json")


def public_multiple_by_hand(curve: dict, loss: float, budget: int) -> str:
    points = [(p["train_tokens"], p["val_loss"]) for p in curve["points"]]
    if loss < points[-1][1]:
        return f"> {points[-1][0] / budget:.1f}x"
    for (b0, l0), (b1, l1) in zip(points, points[1:]):
        if l1 <= loss <= l0:
            return f"{(b0 + (l0 - loss) / (l0 - l1) * (b1 - b0)) / budget:.1f}x"
    return f"< {points[0][0] / budget:.1f}x"


@pytest.mark.skipif(not os.path.isfile(PUBLIC_PATH), reason="no public-convention curve yet")
def test_committed_public_curve_is_one_epoch_of_the_preset_best_of_three_sizes():
    curve = json.load(open(PUBLIC_PATH))
    assert curve["convention"] == "public" and curve["interpolation"] == "linear in train_tokens"
    assert {run["epochs"] for run in curve["runs"]} == {1} and set(curve["sizes"]) == {"s", "m", "l"}
    assert [p["budget"] for p in curve["points"] + curve["not_falling"]][:1] == ["1/8"]
    assert curve["points"][-1]["budget"] == "max" and curve["points"][-1]["train_tokens"] == \
        train_gpt.read_shard(os.path.join(REPO_ROOT, "data", "mini", "mini_train.bin")).size  # the whole shard
    for point in curve["points"]:  # each point: the best size on val at its budget, of 3
        runs = [run for run in curve["runs"] if run["budget"] == point["budget"]]
        assert len(runs) == 3 and point["val_loss"] == min(run["val_loss"] for run in runs)
        assert point["run"] == mini.public_run_id(point["budget"], point["size"])


@pytest.mark.skipif(not os.path.isfile(PUBLIC_PATH), reason="no public-convention curve yet")
@pytest.mark.parametrize("name", ["2026-11-26_m-wd1-e16-ens4", "2026-11-26_m-wd1-lr08-sd01-e16-ens8"])
def test_leaderboard_cell_shows_both_conventions(name, capsys):
    record = os.path.join(REPO_ROOT, "records", "mini", name)
    losses = [result["val_loss"] for result in records.record_results(record)]
    mean = sum(losses) / len(losses)
    strict = records.efficiency_cell(records.load_curve(os.path.join(REPO_ROOT, "records", "mini",
                                                                     "reference_curve.json")), mean, 27033)
    public = public_multiple_by_hand(json.load(open(PUBLIC_PATH)), mean, 27033)
    rows = [line for line in records.leaderboard(records.RECORDS_DIR).splitlines() if f"records/mini/{name})" in line]
    assert len(rows) == 1 and f"| {strict} strict, {public} public |" in rows[0]
    # the efficiency command prints the same pair, then one line per convention
    assert records.main(["efficiency", record]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{record}: data efficiency {strict} strict, {public} public"
    assert out[1].startswith("  strict (") and out[2].startswith("  public convention (")


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
