"""The command line's own documentation (issue 24): `--help` is a map of every flag (group, default, the start of its
comment), `--help NAME` one flag whole, `--explain` what a preset runs: only what differs from the plain model, each
with its comment and the recipe functions that read it. All three build nothing and write nothing."""
import ast
import dataclasses
import os

import pytest

import train_gpt
from conftest import run_script


def source_fields() -> list[tuple[str, object]]:
    """(name, default) of every field as the class source writes it (Recipe's, then the run settings' in
    Hyperparameters(Recipe)), read with ast: the reference for the map."""
    tree = ast.parse(open(train_gpt.__file__, encoding="utf-8").read())
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    return [(node.target.id, node.value) for name in ("Recipe", "Hyperparameters") for node in classes[name].body
            if isinstance(node, ast.AnnAssign)]


def test_help_lists_every_flag_once_with_its_default():
    text = train_gpt.usage()
    listed = [line.split()[0][2:] for line in text.splitlines() if line.startswith("  --")]
    names = [f.name for f in dataclasses.fields(train_gpt.Hyperparameters)]
    assert listed == [name for name, _ in source_fields()] and sorted(listed) == sorted(names)
    lines = open(train_gpt.__file__, encoding="utf-8").read().splitlines()
    for line, (name, value) in zip([l for l in text.splitlines() if l.startswith("  --")], source_fields()):
        written = lines[value.lineno - 1][value.col_offset:value.end_col_offset]  # a default is on one line
        assert line.split()[1] == train_gpt.one_line(written, 22).split()[0], name
    assert "optimizer: Muon for hidden matrices, AdamW for the rest (variants each off by default):" in text
    assert "run folder, logging, checkpoints:" in text  # the group headers of both classes
    assert len(text.splitlines()) < 300  # a map, not the class source


def test_help_name_prints_the_whole_comment_and_the_presets_that_set_it():
    text = train_gpt.usage("muon_wd")
    assert text.splitlines()[1] == "default: 0.0 (must be >= 0 and finite)"  # its value kind (check_numbers)
    assert "decoupled weight decay on Muon matrices" in text
    assert "1h (1.3)" in text and "baseline (1.6)" in text and "15min (0.8)" in text
    with pytest.raises(train_gpt.ConfigError, match="did you mean --muon_wd"):
        train_gpt.usage("muon_wdd")


def test_explain_lists_exactly_what_the_preset_changes_and_where_it_acts():
    hp = train_gpt.parse_args(["--preset", "1h"])
    text = train_gpt.explain(hp)
    plain = train_gpt.Hyperparameters()
    # the reference: the preset's own dict, against the defaults
    expected = sorted(name for name, value in train_gpt.PRESETS["1h"].items() if getattr(plain, name) != value)
    listed = sorted(line.split()[0][2:] for line in text.splitlines() if line.startswith("  --"))
    assert listed == expected
    assert text.splitlines()[0].startswith("preset 1h: reproduces the 1h record 3.195")
    block = text[text.index("  --value_proj True"):]
    assert "acts in: CausalSelfAttention.__init__" in block.split("\n  --")[0]
    block = text[text.index("  --public_steps 32"):]
    assert "MemberSchedule.__init__" in block.split("\n  --")[0]
    assert "Model:" in text and "Optimizers:" in text


def test_help_and_explain_exit_0_and_build_nothing(tmp_path, capsys):
    for flags in (["--help"], ["--help", "muon_lr"]):  # main in this process: the same path, without a start-up
        assert train_gpt.main(flags) == 0
        assert capsys.readouterr().out.strip()
    result = run_script(["--preset", "mini", "--explain", "--log_dir", str(tmp_path)], timeout=120)  # a real process
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("preset mini")
    assert os.listdir(tmp_path) == []
    result = run_script(["--help", "no_such_flag"], timeout=120)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
