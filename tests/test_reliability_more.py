"""Cases the 2026-12-06 reliability review left untried (issue 25, 'Not yet tried'), re-run in /tmp/rel9: a disk
that fills while log.txt or metrics.jsonl is appended (RunLog appends had no error handling: an OSError traceback,
exit 1), a --resume over a log line that such a failure (or a kill) cut short, and run ids that cannot name a folder
in a log (a newline, undecodable bytes, spaces only). Each failed before the change that came with it (an OSError or
UnicodeEncodeError traceback, exit 1, a glued line, a run id accepted)."""
import errno
import json
import os
import shutil

import pytest

import train_gpt
from conftest import micro_flags, read_metrics, write_micro_shards

class FullFrom:
    """A RunLog file handle on a disk that fills up: from the first write holding `marker` on, every write and flush
    fails with ENOSPC, and so does the close that would flush the unwritten tail (what a real full disk does)."""

    def __init__(self, handle, marker: str):
        self.handle, self.marker, self.full = handle, marker, False
        self.name = handle.name

    @staticmethod
    def fail():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def write(self, text: str) -> int:
        self.full = self.full or self.marker in text
        if self.full:
            self.fail()
        return self.handle.write(text)

    def flush(self) -> None:
        if self.full:
            self.fail()
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()
        if self.full:
            self.fail()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The flags of a 6-step micro run (checkpoints after steps 2 and 4) and that run uninterrupted: the reference
    an interrupted-then-resumed run must reproduce row for row."""
    base = tmp_path_factory.mktemp("more")
    train_path, val_path = write_micro_shards(base)

    def flags(log_dir, run_id, **overrides):
        return micro_flags(train_path, val_path, str(log_dir), run_id, **{"max_steps": 6, "checkpoint_every": 2,
                                                                           "val_every": -1, **overrides})
    assert train_gpt.main(flags(base / "logs", "ref")) == 0
    return flags, str(base / "logs" / "ref")


def progress(folder: str) -> list[tuple]:
    return [(row["kind"], row["step"], row[f"{row['kind']}_loss"], row["tokens_seen"])
            for row in read_metrics(folder) if row["kind"] in ("train", "val")]


@pytest.mark.parametrize("handle, name, marker", [("_log", "log.txt", "step 5/"),
                                                  ("_metrics", "metrics.jsonl", '"step": 5,')])
def test_full_disk_while_appending_is_one_line_and_resume_finishes(runs, tmp_path, monkeypatch, capsys, handle, name,
                                                                   marker):
    """ENOSPC on the append of step 5's log line (or metrics row): one `error:` line naming the file, exit status 2,
    no traceback, step 4's checkpoint kept; with room again, --resume continues from it and the run ends with the
    reference's rows, one per step, and its val loss."""
    flags, reference = runs
    init = train_gpt.RunLog.__init__

    def on_a_filling_disk(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if getattr(self, handle) is not None:
            setattr(self, handle, FullFrom(getattr(self, handle), marker))
    monkeypatch.setattr(train_gpt.RunLog, "__init__", on_a_filling_disk)
    folder = str(tmp_path / "logs" / "full")
    capsys.readouterr()
    status = train_gpt.main(flags(tmp_path / "logs", "full"))
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {os.path.join(folder, name)}: cannot append") and "No space left" in err[0], err
    assert sorted(os.listdir(os.path.join(folder, "checkpoints"))) == [
        "member_00_step0000004_rank0.pt", "member_00_step0000004_shared.pt"]
    monkeypatch.setattr(train_gpt.RunLog, "__init__", init)
    assert train_gpt.main(["--resume", folder]) == 0
    assert "resumed from" in open(os.path.join(folder, "log.txt")).read()
    assert progress(folder) == progress(reference)
    assert not os.path.exists(os.path.join(folder, "checkpoints"))


def test_resume_after_a_cut_log_line_starts_its_section_on_a_line_of_its_own(runs, tmp_path):
    """log.txt ending in half a line (a full disk or a kill mid-append): the resume section is not glued onto it, so
    every line of log.txt stays a whole line (records.py and readers split on lines)."""
    flags, _ = runs
    assert train_gpt.main(flags(tmp_path / "logs", "cut", stop_at_step=3)) == 3
    folder = str(tmp_path / "logs" / "cut")
    with open(os.path.join(folder, "log.txt"), "a") as handle:
        handle.write("step 4/6 | epoch 1.00 | train_lo")
    assert train_gpt.main(["--resume", folder]) == 0
    lines = open(os.path.join(folder, "log.txt")).read().splitlines()
    assert "step 4/6 | epoch 1.00 | train_lo" in lines
    assert any(line.startswith("==================== resume ") for line in lines)


def test_unicode_and_spaces_in_every_path_resume_exactly(runs, tmp_path):
    """Data files, --log_dir and --run_id with spaces and non-ASCII letters: a stopped run resumes and ends as the
    uninterrupted reference (rows and val loss)."""
    flags, reference = runs
    odd = tmp_path / "dätä dir ✓"
    odd.mkdir()
    base = os.path.dirname(os.path.dirname(reference))
    for name in ("train.bin", "val.bin"):
        shutil.copy(os.path.join(base, name), odd / f"{name[:-4]} ü.bin")
    odd_flags = flags(tmp_path / "lög dir", "rün ïd 1", stop_at_step=3, train_files=str(odd / "train ü.bin"),
                      val_files=str(odd / "val ü.bin"))
    assert train_gpt.main(odd_flags) == 3
    folder = str(tmp_path / "lög dir" / "rün ïd 1")
    assert train_gpt.main(["--resume", folder]) == 0
    assert progress(folder) == progress(reference)


@pytest.mark.parametrize("run_id", ["a\nb", os.fsdecode(b"\xff\xfe"), " "])
def test_run_id_that_is_not_a_printable_name_is_one_line(runs, tmp_path, capsys, run_id):
    """A newline in --run_id was accepted (log.txt's 'run folder:' line split in two); bytes that are not UTF-8 gave a
    UnicodeEncodeError traceback (exit 1) from the header and left a half-made run folder; ' ' made a folder named
    by a space. Now: one line, exit 2, no folder."""
    flags, _ = runs
    capsys.readouterr()
    status = train_gpt.main(flags(tmp_path / "logs", run_id))
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "must be a folder name of printable UTF-8 characters" in err[0], err
    assert not os.path.exists(tmp_path / "logs") or os.listdir(tmp_path / "logs") == []


def test_undecodable_bytes_in_a_data_path_are_logged_escaped(runs, tmp_path):
    """A train file whose name holds bytes that are not UTF-8 (argv carries them as surrogates): the header's command
    line raised UnicodeEncodeError (traceback, exit 1, half-made run folder). Now the run trains and log.txt shows
    the bytes as \\udcff escapes."""
    flags, reference = runs
    base = os.path.dirname(os.path.dirname(reference))
    odd = os.fsdecode(os.fsencode(str(tmp_path)) + b"/train\xff.bin")
    shutil.copy(os.path.join(base, "train.bin"), odd)
    assert train_gpt.main(flags(tmp_path / "logs", "odd", max_steps=2, train_files=odd)) == 0
    log = open(tmp_path / "logs" / "odd" / "log.txt", encoding="utf-8").read()
    assert "train\\udcff.bin" in log


def test_resume_on_changed_data_is_one_line_and_log_untouched(tmp_path, capsys):
    """Review case r16: a train shard edited between a stop and a --resume (one token changed, the same size) went
    unnoticed. The run folder's data.json (size and CRC-32 of each token set as read) is checked first: one line
    naming the train set, exit 2, log.txt untouched; the unchanged data resumes and finishes."""
    train_path, val_path = write_micro_shards(tmp_path)
    flags = micro_flags(train_path, val_path, str(tmp_path / "logs"), "run", stop_at_step=2, max_steps=4,
                        val_every=-1)
    assert train_gpt.main(flags) == 3
    folder = str(tmp_path / "logs" / "run")
    started = json.load(open(os.path.join(folder, "data.json")))
    assert set(started) == {"train", "val"} and started["train"]["tokens"] > 0
    original = open(train_path, "rb").read()
    edited = bytearray(original)
    edited[-2] ^= 1  # the last token's low byte
    open(train_path, "wb").write(bytes(edited))
    log_before = open(os.path.join(folder, "log.txt"), "rb").read()
    capsys.readouterr()
    assert train_gpt.main(["--resume", folder]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --resume: the train tokens differ"), err
    assert open(os.path.join(folder, "log.txt"), "rb").read() == log_before
    open(train_path, "wb").write(original)
    assert train_gpt.main(["--resume", folder]) == 0
