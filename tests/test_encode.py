"""data/encode.py: text and JSONL -> .bin shards with GPT-2's BPE, offline vocabulary, document splits, errors."""
import errno
import gzip
import hashlib
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import train_gpt
from conftest import REPO_ROOT

VOCAB = os.path.join(REPO_ROOT, "data", "gpt2.tiktoken")  # bundled: the tests never download
SHARED = os.path.join(REPO_ROOT, "..", "shared", "data")  # the sample's source texts, on the machine that made it
needs_sources = pytest.mark.skipif(not os.path.isfile(os.path.join(SHARED, "fineweb_edu_sample_800k.txt")),
                                   reason="the sample's source texts (../shared/data) are not on this machine")


def load_encode_module():
    spec = importlib.util.spec_from_file_location("slowrun_encode", os.path.join(REPO_ROOT, "data", "encode.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tok = load_encode_module()


@pytest.fixture(scope="module")
def encoding():
    return tok.gpt2_encoding(VOCAB)


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "data", "encode.py"), *args],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)


def test_bundled_vocab_is_gpt2_and_the_default(encoding):
    assert tok.build_parser().parse_args(["x.txt", "--out_dir", "o", "--name", "n"]).vocab == VOCAB


def test_local_vocab_is_gpt2(encoding):
    assert encoding.encode_ordinary("Hello world") == [15496, 995]
    text = "The slowrun asks how low val loss goes — on fixed data.\n"
    assert encoding.decode(encoding.encode_ordinary(text)) == text
    # special-token text inside a document is plain text, never the BOS id
    assert 50256 not in encoding.encode_ordinary("a <|endoftext|> b")


def test_bad_vocab_file_is_one_line_error(tmp_path):
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_text("not base64 at all\n")
    with pytest.raises(tok.TokenizeError, match="not a GPT-2 BPE file|BPE ranks"):
        tok.gpt2_encoding(str(bad))
    with pytest.raises(tok.TokenizeError, match="file not found"):
        tok.gpt2_encoding(str(tmp_path / "missing.tiktoken"))


def test_document_splits():
    text = "one\ntwo\n\n  \nthree\n"
    assert [text[s:e] for s, e in tok.document_spans(text, "blank_line")] == ["one\ntwo", "three\n"]
    assert [text[s:e] for s, e in tok.document_spans(text, "line")] == ["one", "two", "", "  ", "three", ""]
    assert tok.document_spans(text, "file") == [(0, len(text))]
    joined = "It was the end of the story.The Next Title\nBody text here.More text"
    starts = tok.joined_boundaries(joined)
    assert starts == [joined.index("The Next"), joined.index("More text")]
    # abbreviations and initials are not boundaries
    assert tok.joined_boundaries("Ask Dr.Smith about the Ph.D. program and the U.S.Army") == []


def test_merge_short_keeps_all_text():
    spans = [(0, 5), (7, 9), (11, 30), (32, 33)]
    merged = tok.merge_short(spans, 10)
    assert merged == [(0, 30), (32, 33)] or merged == [(0, 33)]
    assert merged[0][0] == 0 and merged[-1][1] == 33


def test_text_to_shards_roundtrip(tmp_path, encoding):
    docs = [f"Document number {i} says something about topic {i * 7}." * (1 + i % 3) for i in range(40)]
    source = tmp_path / "corpus.txt"
    source.write_text("\n\n".join(docs))
    summary = tok.run(tok.build_parser().parse_args(
        [str(source), "--out_dir", str(tmp_path / "out"), "--name", "c", "--vocab", VOCAB, "--val_tokens", "100",
         "--quiet"]))
    train = train_gpt.read_shard(str(tmp_path / "out" / "c_train.bin"))
    val = train_gpt.read_shard(str(tmp_path / "out" / "c_val.bin"))
    stream = np.concatenate([train, val])
    starts = np.flatnonzero(stream == 50256)
    assert starts.size == len(docs) and starts[0] == 0 and val[0] == 50256  # val begins on a whole document
    decoded = [encoding.decode(stream[a + 1:b].tolist()) for a, b in zip(starts, [*starts[1:], stream.size])]
    assert decoded == docs
    assert val.size >= 100 and val.size - (np.flatnonzero(val == 50256)[-1]) < 100  # the fewest last documents
    assert summary["train_tokens"] == train.size and summary["val_tokens"] == val.size


def test_jsonl_and_sharding(tmp_path, encoding):
    source = tmp_path / "docs.jsonl"
    source.write_text("\n".join(json.dumps({"text": f"Record {i}: " + "words " * 30, "id": i}) for i in range(20)))
    tok.run(tok.build_parser().parse_args(
        [str(source), "--out_dir", str(tmp_path / "out"), "--name", "j", "--vocab", VOCAB, "--val_tokens", "0",
         "--shard_tokens", "200", "--quiet"]))
    shards = sorted((tmp_path / "out").glob("j_train_*.bin"))
    assert len(shards) > 1 and not (tmp_path / "out" / "j_val.bin").exists()
    tokens = train_gpt.load_tokens(str(tmp_path / "out" / "j_train_*.bin"), 50304, "train")
    assert int((tokens == 50256).sum()) == 20
    for shard in shards:  # documents are never cut between shards
        assert train_gpt.read_shard(str(shard))[0] == 50256


@pytest.mark.parametrize("content, flags, message", [
    ('{"text": "a"}\n{"body": "b"}\n', ["--format", "jsonl"], r":2: no 'text' field"),
    ('{"text": 5}\n', ["--format", "jsonl"], "expected a string"),
    ("{oops\n", ["--format", "jsonl"], ":1: not valid JSON"),
    ("one doc only\n", ["--val_tokens", "1000"], "more than the data allows"),
    ("   \n\n", [], "no documents"),
])
def test_bad_input_is_one_line_error(tmp_path, content, flags, message):
    source = tmp_path / "in.txt"
    source.write_text(content)
    result = run_cli(str(source), "--out_dir", str(tmp_path / "out"), "--name", "x", "--vocab", VOCAB, *flags)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert __import__("re").search(message, lines[0]), lines[0]


def test_cli_missing_file_and_not_utf8(tmp_path):
    result = run_cli(str(tmp_path / "nope.txt"), "--out_dir", str(tmp_path), "--name", "x", "--vocab", VOCAB)
    assert result.returncode == 2 and "nope.txt: file not found" in result.stderr
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"ok \xff\xfe bad")
    result = run_cli(str(binary), "--out_dir", str(tmp_path), "--name", "x", "--vocab", VOCAB)
    assert result.returncode == 2 and "not UTF-8" in result.stderr


@needs_sources
def test_bundled_sample_is_reproducible(tmp_path):
    """data/sample/*.bin are exactly what make_sample.sh's commands produce from ../shared/data."""
    for name, source, flags in [
        ("fineweb_edu", "fineweb_edu_sample_800k.txt", ["--doc_split", "joined"]),
        ("shakespeare", "input.txt", ["--doc_split", "blank_line", "--min_doc_chars", "2000"]),
    ]:
        result = run_cli(os.path.join(SHARED, source), *flags, "--out_dir", str(tmp_path), "--name", name,
                         "--vocab", VOCAB, "--val_tokens", "32768", "--quiet")
        assert result.returncode == 0, result.stderr
        for split in ("train", "val"):
            made = hashlib.sha256((tmp_path / f"{name}_{split}.bin").read_bytes()).hexdigest()
            bundled = hashlib.sha256(open(os.path.join(REPO_ROOT, "data", "sample", f"{name}_{split}.bin"), "rb")
                                     .read()).hexdigest()
            assert made == bundled, f"{name}_{split}.bin differs from data/sample"


def test_unwritable_output_folder_is_one_line(tmp_path, capsys):
    """An --out_dir below a plain file (what a read-only or full disk also gives: an OSError while writing) stops
    with one `error:` line naming the folder and exit status 2, not a traceback."""
    text = tmp_path / "t.txt"
    text.write_text("first document\n\nsecond document\n\nthird document\n")
    (tmp_path / "plain").write_text("a file, not a folder")
    out_dir = str(tmp_path / "plain" / "out")
    status = tok.main([str(text), "--out_dir", out_dir, "--name", "x", "--tokenizer", "bytes", "--val_tokens", "5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith(f"error: {out_dir}: cannot write"), err


# ---------------------------------------------------------------------------------- bad inputs (issue 25, not yet tried)

def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize("flags, says", [
    (["--val_tokens", "abc"], "invalid int value: 'abc'"),
    (["--val_tokens", "1e3"], "invalid int value: '1e3'"),
    (["--doc_split", "pages"], "invalid choice: 'pages'"),
    (["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
])
def test_bad_flags_are_one_error_line(tmp_path, capsys, flags, says):
    """argparse's own errors were its usage block (7 lines) and then the error: now one line, exit status 2."""
    text = tmp_path / "t.txt"
    text.write_text("a document\n")
    with pytest.raises(SystemExit) as exit_info:
        tok.main([str(text), "--out_dir", str(tmp_path / "out"), "--name", "x", *flags])
    assert exit_info.value.code == 2 and says in one_error_line(capsys)


def test_no_inputs_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tok.main(["--out_dir", str(tmp_path / "out"), "--name", "x"])
    assert exit_info.value.code == 2 and "the following arguments are required: inputs" in one_error_line(capsys)


@pytest.mark.parametrize("content, says", [
    (b"plain text, not gzip\n", "Not a gzipped file"),
    (gzip.compress(b"a document cut short " * 200)[:60], "Compressed file ended before the end-of-stream marker"),
], ids=["not gzip", "cut short"])
def test_unreadable_gz_input_is_one_line_naming_it(tmp_path, capsys, content, says):
    """A .gz input that is not gzip (it blamed --out_dir: 'cannot write the shards there (Not a gzipped file)') or
    is cut short (an EOFError traceback): one line naming the input."""
    source = tmp_path / "in.txt.gz"
    source.write_bytes(content)
    status = tok.main([str(source), "--out_dir", str(tmp_path / "out"), "--name", "x", "--tokenizer", "bytes",
                       "--val_tokens", "5"])
    line = one_error_line(capsys)
    assert status == 2 and line.startswith(f"error: {source}: cannot read it") and says in line, line
    assert not os.path.exists(tmp_path / "out")


def test_folder_as_input_says_it_is_a_folder(tmp_path, capsys):
    (tmp_path / "texts").mkdir()
    status = tok.main([str(tmp_path / "texts"), "--out_dir", str(tmp_path / "out"), "--name", "x"])
    assert status == 2 and one_error_line(capsys) == f"error: {tmp_path / 'texts'}: a folder, not a text file " \
                                                      f"(name the files in it)"


def test_full_disk_leaves_no_partial_shard(tmp_path, monkeypatch, capsys):
    """ENOSPC while a shard is written: one line naming --out_dir, and the partial `.tmp<pid>` (which kept the disk
    full) is removed; the shard written before it stays."""
    text = tmp_path / "t.txt"
    text.write_text("".join(f"document {i} " * 20 + "\n\n" for i in range(20)))
    write_shard = tok.write_shard

    def full_disk(path, tokens, *args, **kwargs):
        if path.endswith("_val.bin"):
            with open(f"{path}.tmp{os.getpid()}", "wb") as handle:
                handle.write(b"x" * 100)  # the partial a real ENOSPC leaves
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_shard(path, tokens, *args, **kwargs)
    monkeypatch.setattr(tok, "write_shard", full_disk)
    out_dir = str(tmp_path / "out")
    status = tok.main([str(text), "--out_dir", out_dir, "--name", "x", "--tokenizer", "bytes", "--val_tokens", "200",
                       "--quiet"])
    assert status == 2 and one_error_line(capsys) == f"error: {out_dir}: cannot write the shards there " \
                                                      f"(No space left on device)"
    assert sorted(os.listdir(out_dir)) == ["x_train.bin"]


def test_unwritable_bpe_file_is_named(tmp_path, capsys):
    """--train_bpe writing --bpe_file where it cannot go: the line names where it failed (its folder, a plain file
    here), not --out_dir ('cannot write the shards there' before)."""
    text = tmp_path / "t.txt"
    text.write_text("".join(f"document {i} with some words " * 20 + "\n\n" for i in range(20)))
    (tmp_path / "plain").write_text("a file, not a folder")
    bpe_file = str(tmp_path / "plain" / "b.bpe")
    status = tok.main([str(text), "--out_dir", str(tmp_path / "out"), "--name", "x", "--tokenizer", "bpe",
                       "--bpe_file", bpe_file, "--train_bpe", "300", "--val_tokens", "200", "--quiet"])
    assert status == 2 and one_error_line(capsys) == f"error: {tmp_path / 'plain'}: cannot write it (File exists)"
