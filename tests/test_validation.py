"""Issue 25, part "every number validated" (../shared/reviews/reliability-2026-12-06.md, section 3 "Bad inputs"):
each numeric field declares its range next to it (a value kind: Positive, Fraction, Count, ...); one pass over all of
them refuses a NaN, an infinity or a value out of range with one line and exit status 2 before anything is made, and
a flag given twice is refused too."""
import dataclasses
import json
import math
import os

import pytest

import train_gpt
from conftest import micro_flags
from test_reliability import assert_one_line, run_main

NUMERIC = [f for f in dataclasses.fields(train_gpt.Hyperparameters) if type(f.default) in (int, float)]
# the few numeric fields that declare no range (any finite number is meaningful)
PLAIN = {"resid_lambda_init"}


# ------------------------------------------------------------------------------------------------- the review's cases

@pytest.mark.parametrize("case, overrides, message", [
    ("b06", dict(muon_lr="nan"), "muon_lr must be > 0 and finite, got nan"),
    ("b07", dict(muon_lr="inf"), "muon_lr must be > 0 and finite, got inf"),
    ("b36", dict(muon_lr=-1), "muon_lr must be > 0 and finite, got -1.0"),
    ("b08", dict(embed_lr=-1), "embed_lr must be > 0 and finite, got -1.0"),
    ("b52", dict(muon_momentum="nan"), "muon_momentum must lie in [0, 1), got nan"),
    ("b72", dict(rope_base=0), "rope_base must be > 0 and finite, got 0.0"),
    ("b37", dict(grad_clip="nan"), "grad_clip must be >= 0 and finite, got nan"),
    ("b45", dict(warmup_steps=-5), "warmup_steps must be >= 0, got -5"),
    ("b71", dict(logit_softcap="nan"), "logit_softcap must be >= 0 and finite, got nan"),
    ("b35", dict(adam_beta2=1.5), "adam_beta2 must lie in [0, 1), got 1.5"),
    ("b59", dict(adam_eps="nan"), "adam_eps must be > 0 and finite, got nan"),
    ("b38", dict(mlp_ratio="inf"), "mlp_ratio must be > 0 and finite, got inf"),
    ("b39", dict(mlp_ratio="nan"), "mlp_ratio must be > 0 and finite, got nan"),
    ("b40", dict(seed=-1), "seed must lie in [0, 2^63), got -1"),
    ("b41", dict(seed=99999999999999999999999), "seed must lie in [0, 2^63), got 99999999999999999999999"),
    ("seed 2^63", dict(seed=2**63), f"seed must lie in [0, 2^63), got {2**63}"),
    ("b42", dict(ensemble_size=2, ensemble_weights="1,nan"),
     "ensemble_weights must be 2 comma-separated finite weights > 0 (one per candidate) like 1,2,1, got '1,nan'"),
    ("b73", dict(ensemble_size=2, ensemble_weights="1,inf"),
     "ensemble_weights must be 2 comma-separated finite weights > 0 (one per candidate) like 1,2,1, got '1,inf'"),
    ("b43", dict(ensemble_size=2, ensemble_weights="nan,1"),
     "ensemble_weights must be 2 comma-separated finite weights > 0 (one per candidate) like 1,2,1, got 'nan,1'"),
    ("all zero", dict(ensemble_size=2, ensemble_weights="0,0"),
     "ensemble_weights must be 2 comma-separated finite weights > 0 (one per candidate) like 1,2,1, got '0,0'"),
])
def test_bad_number_is_one_line_before_anything_is_made(micro_data, tmp_path, capsys, case, overrides, message):
    """Each was accepted (a NaN result with exit status 0, or silently ignored) or a traceback, some after the run
    folder was made or after member 0 trained; now one line, exit status 2, no run folder."""
    train_path, val_path = micro_data
    status, err = run_main(micro_flags(train_path, val_path, str(tmp_path / "logs"), "bad", max_steps=2,
                                       **overrides), capsys)
    assert_one_line(status, err, message)
    assert not os.path.exists(tmp_path / "logs")


@pytest.mark.parametrize("argv, message", [
    (["--preset", "tiny", "--preset", "mini"], "flag --preset given twice (tiny, then mini): give it once"),
    (["--muon_lr", "1", "--muon_lr", "2"], "flag --muon_lr given twice (1, then 2): give it once"),
    (["--muon_lr=1", "--n_layer", "2", "--muon_lr", "1"], "flag --muon_lr given twice (1, then 1): give it once"),
])
def test_a_flag_given_twice_is_refused(capsys, argv, message):
    """b23: the second --preset silently won; now any flag given twice is one line (the values named)."""
    with pytest.raises(train_gpt.ConfigError, match="given twice"):
        train_gpt.parse_args(argv)
    status, err = run_main(argv, capsys)
    assert_one_line(status, err, message)


# ------------------------------------------------------------------------------------------------- every field

# values a field's kind allows even though the sweep tries them: each runs (checked below)
ALLOWED = {("checkpoint_every", "-1"): "never checkpoint", ("val_every", "-1"): "validate only at the end"}


@pytest.mark.parametrize("name", [f.name for f in NUMERIC])
def test_every_numeric_field_refuses_nan_inf_and_minus_one(micro_data, tmp_path, capsys, name):
    """Every int and float field given nan, inf or -1: one line, exit status 2, no folder; or, where the value is
    meaningful (ALLOWED), a run that finishes with a finite loss."""
    train_path, val_path = micro_data
    for value in ("nan", "inf", "-1"):
        log_dir = tmp_path / f"logs_{value}"
        flags = micro_flags(train_path, val_path, str(log_dir), "r",
                            **{"max_steps": 2, "val_every": -1, "checkpoint_every": -1, name: value})
        status, err = run_main(flags, capsys)
        if (name, value) in ALLOWED:
            assert status == 0, err
            assert math.isfinite(json.load(open(log_dir / "r" / "result.json"))["val_loss"])
            continue
        assert_one_line(status, err)
        assert name in err, err
        assert not os.path.exists(log_dir), (name, value)


def test_every_numeric_field_declares_its_kind():
    """Each int and float field is annotated with a value kind (its range, next to the field), or is one of the
    few PLAIN ones (any finite number); the kind's alias is the default's own type, so parsing is unchanged."""
    for field in NUMERIC:
        assert field.type in train_gpt.NUMBER_KINDS, (field.name, field.type)
        assert (field.type in ("int", "float")) == (field.name in PLAIN), (field.name, field.type)
        alias = {"int": int, "float": float}.get(field.type) or getattr(train_gpt, field.type)
        assert alias is type(field.default), (field.name, field.type, field.default)
    train_gpt.check_numbers(train_gpt.Hyperparameters())  # every default lies in its own range
    hp = train_gpt.parse_args(["--muon_lr", "1", "--seed", "3", "--dropout", "0"])
    assert (type(hp.muon_lr), type(hp.seed), type(hp.dropout)) == (float, int, float)


@pytest.mark.parametrize("name, value", [
    ("adam_beta2", 0.0), ("muon_momentum", 0.0), ("dropout", 0.0), ("warmdown_frac", 1.0), ("distill_alpha", 1.0),
    ("seed", 0), ("seed", 2**63 - 1), ("val_window_seed", 2**32 - 1), ("grad_clip", 0.0), ("logit_softcap", 0.0),
    ("warmup_steps", 0), ("muon_wd", 0.0), ("checkpoint_every", -1), ("val_every", -1), ("resid_lambda_init", -2.5),
    ("muon_lr", 1e-30), ("rope_base", 0.5),
])
def test_edge_values_inside_the_ranges_pass(name, value):
    train_gpt.check_numbers(train_gpt.Hyperparameters(**{name: value}))


@pytest.mark.parametrize("name, value, message", [
    ("adam_beta2", 1.0, "adam_beta2 must lie in [0, 1), got 1.0"),
    ("warmdown_frac", 1.5, "warmdown_frac must lie in [0, 1], got 1.5"),
    ("val_window_seed", 2**32, f"val_window_seed must lie in [0, 2^32), got {2**32}"),
    ("checkpoint_every", -2, "checkpoint_every must be >= -1, got -2"),
    ("n_layer", 0, "n_layer must be >= 1, got 0"),
    ("resid_lambda_init", float("inf"), "resid_lambda_init must be finite, got inf"),
    ("muon_lr", "0.02", "muon_lr must be a number, got '0.02'"),  # a hand-edited hyperparameters.json
    ("seed", 1.5, "seed must be a whole number, got 1.5"),
    ("seed", True, "seed must be a whole number, got True"),
])
def test_values_outside_the_ranges_are_refused(name, value, message):
    with pytest.raises(train_gpt.ConfigError) as info:
        train_gpt.check_numbers(train_gpt.Hyperparameters(**{name: value}))
    assert str(info.value) == message


def test_snapshot_noise_seeds_fit_64_bits():
    """The snapshot noise is seeded with seed x 1000 + cycle: a seed that fits 2^63 may still overflow there."""
    hp = train_gpt.Hyperparameters(seed=2**62, snapshot_cycles=2, snapshot_noise=0.1, num_epochs=2)
    with pytest.raises(train_gpt.ConfigError, match="snapshot_noise seeds"):
        train_gpt.check_hyperparameters(hp, 1)


def micro_hp(**overrides) -> train_gpt.Hyperparameters:
    return train_gpt.Hyperparameters(**{**dict(n_layer=2, n_embd=32, n_head=2, seq_len=32, batch_tokens=384,
                                              device_batch_size=2, val_batch_size=4, device="cpu"), **overrides})


@pytest.mark.parametrize("overrides, message", [
    (dict(batch_schedule="0.5,x"), "batch_schedule must be comma-separated finite numbers > 0 like 0.25,0.5,1, got "
                                   "'0.5,x'"),
    (dict(batch_schedule="0.5,inf"), "batch_schedule must be comma-separated finite numbers > 0"),
    (dict(mtp_offsets="1,-0.5"), "mtp_offsets must be comma-separated finite weights >= 0 like 1,0.5,0.25"),
    (dict(fitness_tokens=100, select_top_sweep="8,8.5"), "select_top_sweep must be comma-separated whole numbers > 0"),
    (dict(fitness_tokens=100, select_top_sweep="0,8"), "select_top_sweep must be comma-separated whole numbers > 0"),
])
def test_every_list_flag_is_read_by_one_parser_with_one_kind_of_line(overrides, message):
    """The list flags (batch_schedule, mtp_offsets, select_top_sweep, ensemble_weights, the *_betas) share one
    parser, number_list: the same one-line form naming the flag, its rule, an example and what was given."""
    with pytest.raises(train_gpt.ConfigError) as error:
        train_gpt.check_hyperparameters(micro_hp(**overrides), 1)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_number_list_reads_what_a_hand_reads():
    assert train_gpt.number_list("x", "0.25, 0.5,,1", "numbers", "1,2", lambda v: v > 0) == [0.25, 0.5, 1.0]
    assert train_gpt.number_list("x", "", "numbers", "1,2", lambda v: v > 0) == []  # off
    assert train_gpt.top_sweep(micro_hp(select_top_sweep="32,8,16,8,64"), 33) == [8, 16, 32]  # ascending, < count
    with pytest.raises(train_gpt.ConfigError, match=r"x must be 3 comma-separated numbers like 1,2, got '1,2'"):
        train_gpt.number_list("x", "1,2", "numbers", "1,2", lambda v: True, count=3)
