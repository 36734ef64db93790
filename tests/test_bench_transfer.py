"""bench/mini.py's transfer table (issue 28): the pure statistics against hand-computed numbers, the public deltas
against the public README's leaderboard, and the table's counts on made-up results. Nothing here trains."""
import math
import os
import re

import pytest

from bench import mini

README = "/work/shared/reference/slowrun/fd342f0/README.md"


def test_paired_deltas_by_hand():
    # with [2.30, 2.32, 2.31], without [2.33, 2.34, 2.30] on seeds 0, 1, 2:
    # deltas -0.03, -0.02, +0.01; mean -0.04 / 3 = -0.013333; squared deviations 2.7778e-4 + 4.4444e-5 + 5.4444e-4
    # = 8.6667e-4, / (3 - 1) = 4.3333e-4, std 0.020817; se = std / sqrt 3 = 0.012019; 2 se = 0.02404 > |mean|:
    # inside seed noise. spread = 0.01 - (-0.03) = 0.04.
    stats = mini.paired_deltas([2.30, 2.32, 2.31], [2.33, 2.34, 2.30])
    assert stats["deltas"] == pytest.approx([-0.03, -0.02, 0.01], abs=1e-12)
    assert stats["mean"] == pytest.approx(-0.0133333, abs=1e-6)
    assert stats["std"] == pytest.approx(0.0208167, abs=1e-6)
    assert stats["se"] == pytest.approx(0.0120185, abs=1e-6)
    assert stats["spread"] == pytest.approx(0.04, abs=1e-12)
    assert stats["significant"] is False
    # deltas -0.02, -0.02, -0.025: mean -0.021667, squared deviations 2.778e-6 + 2.778e-6 + 1.1111e-5 = 1.6667e-5,
    # / 2 -> std 0.0028868, se 0.0016667, 2 se 0.0033333 < 0.021667: outside seed noise.
    stats = mini.paired_deltas([2.30, 2.31, 2.32], [2.32, 2.33, 2.345])
    assert stats["mean"] == pytest.approx(-0.0216667, abs=1e-6)
    assert stats["std"] == pytest.approx(0.0028868, abs=1e-6)
    assert stats["significant"] is True
    one = mini.paired_deltas([2.0], [2.5])  # one seed: a delta, no noise estimate, never "outside noise"
    assert one["mean"] == -0.5 and math.isnan(one["std"]) and one["significant"] is False
    with pytest.raises(ValueError):
        mini.paired_deltas([1.0, 2.0], [1.0])


def test_sign_agreement_by_hand():
    # -0.01 vs -0.02 agree; 0.02 vs -0.01 do not; 0 vs -0.005 do not (zero agrees only with zero); -0.03 vs 0 do not
    assert mini.sign_agreement([-0.01, 0.02, 0.0, -0.03], [-0.02, -0.01, -0.005, 0.0]) == (1, 4)
    assert mini.sign_agreement([0.0, 1.0], [0.0, 2.0]) == (2, 2)
    assert mini.sign_agreement([], []) == (0, 0)
    with pytest.raises(ValueError):
        mini.sign_agreement([1.0], [])


def test_spearman_with_ties_by_hand():
    # x = [0.1, 0.3, 0.3, -0.2] -> ranks [2, 3.5, 3.5, 1] (the tie shares ranks 3 and 4);
    # y = [-0.01, -0.03, -0.02, -0.04] -> ranks [4, 2, 3, 1]. Both means 2.5; deviations x [-0.5, 1, 1, -1.5],
    # y [1.5, -0.5, 0.5, -1.5]; sum of products -0.75 - 0.5 + 0.5 + 2.25 = 1.5; sums of squares 4.5 and 5;
    # rho = 1.5 / sqrt(22.5) = sqrt(0.1) = 0.316228.
    x, y = [0.1, 0.3, 0.3, -0.2], [-0.01, -0.03, -0.02, -0.04]
    assert mini.average_ranks(x) == [2.0, 3.5, 3.5, 1.0]
    assert mini.average_ranks(y) == [4.0, 2.0, 3.0, 1.0]
    assert mini.spearman(x, y) == pytest.approx(math.sqrt(0.1), abs=1e-12)
    assert mini.spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert math.isnan(mini.spearman([1, 1, 1], [1, 2, 3]))  # a constant side has no ranking
    scipy_stats = pytest.importorskip("scipy.stats")
    rows = [(x, y), ([0.1, -0.4, 0.2, 0.2, 0.0, -0.1], [-0.02, -0.02, -0.01, -0.005, -0.03, -0.02])]
    for a, b in rows:
        assert mini.spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a, b)[0], abs=1e-12)


def test_public_deltas_match_the_public_readme():
    assert mini.public_delta("1h", 2) == pytest.approx(3.376 - 3.402)
    assert mini.public_delta("unlimited", 2) == pytest.approx(-0.138)
    with pytest.raises(ValueError):
        mini.public_delta("1h", 1)  # step 1 has no previous step
    if not os.path.isfile(README):
        pytest.skip("the public README is not on this machine")
    text = open(README, encoding="utf-8").read()
    headings = {"1h": "### Limited Compute Track", "15min": "### Tiny Track", "unlimited": "### Unlimited Compute Track"}
    for track, heading in headings.items():
        section = text.split(heading, 1)[1].split("###", 1)[0]
        losses = tuple(float(v) for v in re.findall(r"^(?:\| )?\d+ \| (\d\.\d+) \|", section, re.M))
        assert losses == mini.LEADERBOARD[track], track
    for _, _, with_c, without_c, track, step, _ in mini.TRANSFER_ROWS:
        assert with_c in mini.TRANSFER_CONFIGS and without_c in mini.TRANSFER_CONFIGS
        assert mini.public_delta(track, step) < 0  # every leaderboard step was a record


def test_merge_flags_lets_a_row_override_the_base():
    assert mini.merge_flags("--a 1 --b 2 --c 3", "--b 0 --d") == "--a 1 --c 3 --b 0 --d"
    assert mini.merge_flags("--a 1", "") == "--a 1"
    assert "--stochastic_depth 0.1" not in mini.transfer_flags("sd0", 2)
    assert mini.transfer_flags("sd0", 2).endswith("--stochastic_depth 0 --seed 2")


def test_table_counts_on_made_up_results():
    # every config scores 2.3 + 0.001 seed, except swiglu 0.01 lower (helps: agrees with the public -0.014),
    # no-stochastic-depth 0.02 lower (so the removal row's delta, base - sd0, is +0.02: disagrees) and U-Net 0.005
    # higher (disagrees). All other deltas are exactly 0: inside noise, no sign. 21 rows, 20 public steps (1h #3
    # twice: counted once). Overall 1 of 20 agree; outside noise 1 of 3. Spearman over 20: laptop ranks swiglu lowest, unet and SD removal highest.
    offsets = {"swiglu": -0.01, "sd0": -0.02, "unet": 0.005}
    results = {(c, s): {"val_loss": 2.3 + 0.001 * s + offsets.get(c, 0.0)}
               for c in mini.TRANSFER_CONFIGS for s in mini.TRANSFER_SEEDS}
    table = mini.transfer_tables(results, "test")
    assert "**1 of 20** overall" in table and "**1 of 3** among" in table
    swiglu = next(line for line in table.splitlines() if line.startswith("| SwiGLU |"))
    assert "| -0.0100 ± 0.0000 * [-0.010, -0.010] | 1h #4 | -0.014 |" in swiglu
    sd = next(line for line in table.splitlines() if line.startswith("| stochastic depth (removal) |"))
    assert "+0.0200" in sd and "| 1h #15 | -0.003 |" in sd
    rows = mini.TRANSFER_ROWS[:-1]  # the last row repeats 1h #3 (value projections against tables): counted once
    assert (mini.TRANSFER_ROWS[-1][4], mini.TRANSFER_ROWS[-1][5]) == ("1h", 3)
    laptop = [-0.01 if r[2] == "swiglu" else 0.005 if r[2] == "unet" else 0.02 if r[3] == "sd0" else 0.0 for r in rows]
    board = [mini.public_delta(r[4], r[5]) for r in rows]
    assert f"**{mini.spearman(laptop, board):+.3f}** overall (n = 20)" in table
    del results["swiglu", 2]  # a missing run: the row says how many seeds, and leaves the statistics
    table = mini.transfer_tables(results, "test")
    assert "(2 seeds)" in table and "**0 of 19** overall" in table and "3 seeds: 19 of 20" in table
