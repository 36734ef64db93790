"""A small BPE of one's own (issue 17, "bytes or a small BPE?"): data/encode.py --train_bpe learns it from the train
split, its shards carry the ranks file's checksum, train_gpt.py refuses shards of another tokenizer or another BPE,
and bits per byte come from its token lengths."""
import base64
import json
import math
import os
import zlib

import numpy as np
import pytest

import train_gpt
from test_encode import tok as enc  # data/encode.py, loaded by path
from test_mini import TEXTS

# ----------------------------------------------------------------------------------------------------------------------
# Learning the merges, against hand computations


def test_merges_by_hand_most_frequent_pair_then_tie_to_smaller_ids():
    # GPT-2's regex cuts "abab ab" into "abab" and " ab". Pairs: (a,b) 2 + 1 = 3, (b,a) 1, (' ',a) 1 -> 257 = "ab".
    # Then "abab" = [257, 257] and " ab" = [32, 257]: (257,257) and (32,257) both 1; the tie goes to the smaller ids.
    vocabulary = enc.train_bpe(["abab ab"], 259)
    assert vocabulary[:256] == [bytes([i]) for i in range(256)] and vocabulary[256] == b""
    assert vocabulary[257:] == [b"ab", b" ab"]


def test_overlapping_pairs_merge_left_to_right():
    # "aaa" twice: (a,a) occurs 2 x 2 = 4 times -> "aa"; "aaa" becomes [aa, a] (left to right), so (aa,a) = 2 -> "aaa"
    assert enc.train_bpe(["aaa", "aaa"], 259)[257:] == [b"aa", b"aaa"]


def test_merges_stop_when_no_pair_is_left():
    assert enc.train_bpe(["ab"], 1000)[257:] == [b"ab"]  # one piece, one pair: one merge, however large the request


def test_bad_vocabulary_size_is_one_line_error():
    with pytest.raises(enc.TokenizeError, match="at least|must hold 257"):
        enc.train_bpe(["ab"], 256)


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("bpe") / "small.tiktoken")
    # by hand: "ab" (3 times), " ab" (tie with (ab,ab), smaller ids), "abab" (the last pair left); then no pair is left
    enc.write_bpe(path, enc.train_bpe(["abab ab"], 280))
    return path


def test_ranks_file_is_tiktokens_format(bpe_file):
    lines = open(bpe_file).read().splitlines()
    assert lines[0] == "AA== 0" and lines[255] == "/w== 255"  # base64 of the bytes 0x00 and 0xff
    assert lines[256] == f"{base64.b64encode(b'ab').decode()} 257"  # the separator 256 is not in the file
    assert lines[257:] == [f"{base64.b64encode(b' ab').decode()} 258", f"{base64.b64encode(b'abab').decode()} 259"]
    assert train_gpt.token_byte_lengths("bpe", 280, bpe_file)[[97, 256, 257, 258, 259, 260]].tolist() == [1, 0, 2, 3,
                                                                                                          4, 0]


def test_encoding_by_hand(bpe_file):
    encoding = enc.BpeEncoding(bpe_file)
    assert encoding.encode_ordinary("abab ab") == [259, 258]
    assert encoding.encode_ordinary("ab abab.") == [257, 258, 257, 46]  # " abab" is no token: " ab" then "ab"
    assert encoding.encode_ordinary("ba") == [98, 97]


@pytest.mark.parametrize("text", TEXTS + ["zzzz unseen ÿ bytes", "the cat sat on the mat"])
def test_bpe_round_trips_any_text_exactly(bpe_file, text):
    encoding = enc.BpeEncoding(bpe_file)
    ids = encoding.encode_ordinary(text)
    assert all(0 <= i < encoding.n_vocab and i != 256 for i in ids)
    assert encoding.decode(ids) == text
    assert b"".join(train_gpt.token_bytes_table("bpe", bpe_file)[i] for i in ids) == text.encode("utf-8")


# ----------------------------------------------------------------------------------------------------------------------
# data/encode.py --tokenizer bpe: the same documents as the byte split, learned from train only, checksum in the header

DOCS = ["The first train document talks about cats. " * 3, "A second one, about the mat and the hat. " * 3,
        "Third: zzzz zzzz zzzz is only in val. " * 4, "Fourth, test: qqqq qqqq."]


@pytest.fixture(scope="module")
def cli_outputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    source = folder / "docs.txt"
    source.write_text("\n\n".join(DOCS) + "\n", encoding="utf-8")
    splits = ["--val_tokens", str(len(DOCS[2].encode()) + 1), "--test_tokens", "5", "--quiet"]
    assert enc.main([str(source), "--tokenizer", "bytes", "--out_dir", str(folder), "--name", "b", *splits]) == 0
    assert enc.main([str(source), "--tokenizer", "bpe", "--bpe_file", str(folder / "v.tiktoken"), "--train_bpe", "300",
                     "--bpe_train_bytes", str(len(DOCS[0].encode()) + 1), "--out_dir", str(folder), "--name", "p",
                     *splits]) == 0
    return folder


def test_bpe_split_holds_the_byte_splits_documents(cli_outputs):
    encoding = enc.BpeEncoding(str(cli_outputs / "v.tiktoken"))
    for split in ("train", "val", "test"):
        tokens = train_gpt.read_shard(str(cli_outputs / f"p_{split}.bin"))
        starts = np.flatnonzero(tokens == 256).tolist() + [tokens.size]
        documents = [encoding.decode(tokens[a + 1:b]) for a, b in zip(starts, starts[1:])]
        assert documents == enc.decode_byte_documents(train_gpt.read_shard(str(cli_outputs / f"b_{split}.bin")))
    assert documents == [DOCS[3] + "\n"]  # and those are the ones the flags ask for, by hand


def test_bpe_is_learned_from_the_first_train_document_only(cli_outputs):
    vocabulary = {base64.b64decode(line.split()[0]) for line in open(cli_outputs / "v.tiktoken")}
    assert b" cats" in vocabulary or b"cats" in vocabulary  # in the learning document three times
    assert not any(b"zz" in token or b"mat" in token or b"qq" in token for token in vocabulary)  # val, train 2, test


def test_bpe_shard_header_holds_the_ranks_checksum(cli_outputs):
    header = np.fromfile(cli_outputs / "p_val.bin", dtype="<i4", count=5)
    crc = zlib.crc32(open(cli_outputs / "v.tiktoken", "rb").read()) & 0x7FFFFFFF  # zlib, not our function
    assert header[3] == 2 and header[4] == crc
    assert train_gpt.shard_tokenizer(str(cli_outputs / "p_val.bin")) == f"bpe:{crc}"


@pytest.mark.parametrize("args,message", [
    (["--tokenizer", "bpe"], "--tokenizer bpe needs --bpe_file"),
    (["--tokenizer", "bpe", "--bpe_file", "/nonexistent.tiktoken"], "file not found"),
    (["--train_bpe", "300"], "go with --tokenizer bpe"),
])
def test_bpe_cli_errors_are_one_line(tmp_path, capsys, args, message):
    source = tmp_path / "t.txt"
    source.write_text("one\n\ntwo\n", encoding="utf-8")
    assert enc.main([str(source), "--out_dir", str(tmp_path), "--name", "t", "--val_tokens", "1", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


# ----------------------------------------------------------------------------------------------------------------------
# train_gpt.py refuses shards of another tokenizer, or of another BPE, in one line before any run folder exists


def refusal(capsys, tmp_path, flags):
    code = train_gpt.main(["--preset", "mini", "--test_files", "", "--log_dir", str(tmp_path / "runs"), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and not os.path.exists(tmp_path / "runs")
    return err


def bpe_flags(cli_outputs, bpe_file, shards):
    return ["--tokenizer", "bpe", "--bpe_file", str(bpe_file), "--vocab_size", "300",
            "--train_files", str(cli_outputs / f"{shards}_train.bin"),
            "--val_files", str(cli_outputs / f"{shards}_val.bin")]


def test_byte_shards_refused_by_a_bpe_run(cli_outputs, capsys, tmp_path):
    err = refusal(capsys, tmp_path, bpe_flags(cli_outputs, cli_outputs / "v.tiktoken", "b"))
    assert "vocab/tokenizer mismatch" in err and "made by the bytes tokenizer" in err and "expects bpe" in err


def test_bpe_shards_refused_by_a_byte_run(cli_outputs, capsys, tmp_path):
    err = refusal(capsys, tmp_path, ["--train_files", str(cli_outputs / "p_train.bin"),
                                     "--val_files", str(cli_outputs / "p_val.bin")])
    assert "vocab/tokenizer mismatch" in err and "made by the bpe tokenizer" in err and "expects bytes" in err


def test_shards_of_another_bpe_refused(cli_outputs, capsys, tmp_path):
    other = tmp_path / "other.tiktoken"
    enc.write_bpe(str(other), enc.train_bpe(["something else entirely"], 300))
    err = refusal(capsys, tmp_path, bpe_flags(cli_outputs, other, "p"))
    assert "made by another BPE" in err and str(other) in err


def test_bpe_run_without_its_file_refused(capsys, tmp_path):
    err = refusal(capsys, tmp_path, ["--tokenizer", "bpe", "--bpe_file", str(tmp_path / "missing.tiktoken")])
    assert "needs --bpe_file" in err


def test_bpe_run_reports_bits_per_byte_of_its_tokens(cli_outputs, tmp_path):
    """Two steps on the BPE shards: val_bpb = val_loss x 32 targets / their bytes / ln 2, the bytes counted here from
    the ranks file's lines (the separator holds none)."""
    bpe_file = cli_outputs / "v.tiktoken"
    code = train_gpt.main(["--preset", "mini", *bpe_flags(cli_outputs, bpe_file, "p"), "--test_files", "",
                           "--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--seq_len", "16",
                           "--batch_tokens", "64", "--device_batch_size", "4", "--val_batch_size", "2",
                           "--val_tokens", "33", "--max_steps", "2", "--train_tokens", "0",
                           "--log_dir", str(tmp_path), "--run_id", "r", "--save_model", "false"])
    assert code == 0
    result = json.loads((tmp_path / "r" / "result.json").read_text())
    length = {int(rank): len(base64.b64decode(token)) for token, rank in (line.split() for line in open(bpe_file))}
    targets = train_gpt.read_shard(str(cli_outputs / "p_val.bin"))[1:33]
    expected_bytes = sum(length.get(int(t), 0) for t in targets)
    assert expected_bytes > 32  # merged tokens: more bytes than targets
    assert result["val_bytes"] == expected_bytes
    assert result["val_bpb"] == pytest.approx(result["val_loss"] * 32 / expected_bytes / math.log(2), rel=1e-12)
