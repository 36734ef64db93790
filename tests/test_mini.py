"""The mini track (issue 17): the byte tokenizer, the shard header's tokenizer field and its mismatch refusal, bits per
byte, the bundled byte shards, and the data-efficiency interpolation of bench/mini.py."""
import hashlib
import json
import math
import os

import numpy as np
import pytest

import train_gpt
from bench.mini import data_efficiency, reference_budget
from conftest import REPO_ROOT
from test_encode import tok as enc  # data/encode.py, loaded by path

SOURCE = os.path.join(REPO_ROOT, "..", "shared", "data", "fineweb_edu_sample_800k.txt")
MINI = os.path.join(REPO_ROOT, "data", "mini")
TEXTS = ["", "plain ascii", "é", "naïve café — “quotes” 日本語 𝄞 🎉", "a\x00b\x7f\u0080\u07ff\u0800\uffff\U0010ffff",
         "<|endoftext|> is plain text here", "\n\n\r\t  ", "\u00a0\u2028\u2029"]


# ----------------------------------------------------------------------------------------------------------------------
# The byte tokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_round_trips_exactly(text):
    ids = enc.ByteEncoding().encode_ordinary(text)
    assert ids == list(text.encode("utf-8"))  # the UTF-8 bytes themselves, independent of our code
    assert all(0 <= i < 256 for i in ids)  # the separator 256 never comes from text
    assert enc.ByteEncoding().decode(ids) == text


def test_byte_ids_by_hand():
    assert enc.ByteEncoding().encode_ordinary("Aé€😀") == [0x41, 0xC3, 0xA9, 0xE2, 0x82, 0xAC, 0xF0, 0x9F, 0x98, 0x80]


def test_random_unicode_round_trips_through_shards(tmp_path):
    """Documents of random code points (every plane, surrogates excluded) -> byte shards -> the same documents."""
    rng = np.random.default_rng(0)
    points = rng.integers(1, 0x110000, 4000)
    points = points[(points < 0xD800) | (points > 0xDFFF)]
    texts = ["".join(map(chr, chunk)) for chunk in np.array_split(points, 20)] + ["x"]
    documents = [np.array([256, *enc.ByteEncoding().encode_ordinary(t)], dtype=np.uint16) for t in texts]
    summary = enc.write_splits(documents, str(tmp_path), "u", val_tokens=1, shard_tokens=10**9, tokenizer="bytes",
                               test_tokens=1)
    assert (summary["train_documents"], summary["val_documents"], summary["test_documents"]) == (19, 1, 1)
    decoded = [d for split in ("train", "val", "test")
               for d in enc.decode_byte_documents(train_gpt.read_shard(str(tmp_path / f"u_{split}.bin")))]
    assert decoded == texts
    assert {train_gpt.shard_tokenizer(str(tmp_path / f"u_{s}.bin")) for s in ("train", "val", "test")} == {"bytes"}


def test_encode_cli_bytes_with_test_split(tmp_path):
    source = tmp_path / "t.txt"
    source.write_text("Première.\n\nDeux 🎉\n\nTrois\n\nQuatre\n", encoding="utf-8")
    assert enc.main([str(source), "--tokenizer", "bytes", "--out_dir", str(tmp_path), "--name", "t",
                     "--val_tokens", "5", "--test_tokens", "5", "--quiet"]) == 0
    read = {s: train_gpt.read_shard(str(tmp_path / f"t_{s}.bin")) for s in ("train", "val", "test")}
    assert enc.decode_byte_documents(read["train"]) == ["Première.", "Deux 🎉"]
    assert enc.decode_byte_documents(read["val"]) == ["Trois"]
    assert enc.decode_byte_documents(read["test"]) == ["Quatre\n"]
    assert read["val"].tolist() == [256, *b"Trois"]


# ----------------------------------------------------------------------------------------------------------------------
# The shard header names the tokenizer; a mismatch is one line, exit 2


def test_old_shards_read_as_gpt2_and_header_field(tmp_path):
    path = str(tmp_path / "old.bin")
    header = np.zeros(256, dtype="<i4")
    header[:3] = 20240520, 1, 3
    with open(path, "wb") as handle:  # a shard as modded-nanogpt writes it: header[3] is 0
        handle.write(header.tobytes() + np.array([50256, 1, 2], dtype="<u2").tobytes())
    assert train_gpt.shard_tokenizer(path) == "gpt2"
    train_gpt.write_shard(path, np.array([256, 65]), "bytes")
    assert int(np.fromfile(path, dtype="<i4", count=4)[3]) == 1
    assert train_gpt.shard_tokenizer(os.path.join(REPO_ROOT, "data", "sample", "fineweb_edu_val.bin")) == "gpt2"
    assert train_gpt.shard_tokenizer(os.path.join(MINI, "mini_val.bin")) == "bytes"


@pytest.mark.parametrize("preset,files,made_by", [
    ("tiny", "data/mini/mini_val.bin", "bytes"),  # byte shards under a BPE preset
    ("mini", "data/sample/fineweb_edu_val.bin", "gpt2"),  # BPE shards under the byte preset
    ("mini_bpe", "data/mini/mini_val.bin", "bytes"),  # byte shards under the small-BPE preset
    ("mini", "data/mini/mini_bpe_val.bin", "bpe"),  # the small BPE's shards under the byte preset
    ("mini_bpe", "data/sample/fineweb_edu_val.bin", "gpt2"),  # GPT-2 shards under the small-BPE preset
])
def test_tokenizer_mismatch_is_refused_in_one_line(preset, files, made_by, capsys, tmp_path):
    files = os.path.join(REPO_ROOT, files)
    code = train_gpt.main(["--preset", preset, "--train_files", files, "--val_files", files, "--test_files", "",
                           "--log_dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "vocab/tokenizer mismatch" in err and f"made by the {made_by}" in err
    assert not os.listdir(tmp_path)  # refused before a run folder exists


# ----------------------------------------------------------------------------------------------------------------------
# Bits per byte


def test_token_byte_lengths_against_tiktoken():
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    ranks = load_tiktoken_bpe(os.path.join(REPO_ROOT, "data", "gpt2.tiktoken"))
    lengths = train_gpt.token_byte_lengths("gpt2", 50304)
    encoding = tiktoken.Encoding(name="g", pat_str=r"\S+|\s+", mergeable_ranks=ranks, special_tokens={})
    for token_id in (0, 198, 995, 15496, 50255):
        assert lengths[token_id] == len(encoding.decode_single_token_bytes(token_id))
    assert lengths[15496] == len(b"Hello") and lengths[995] == len(b" world")
    assert lengths[50256] == 0 and lengths[50303] == 0  # <|endoftext|> and padding hold no text
    byte_lengths = train_gpt.token_byte_lengths("bytes", 257)
    assert byte_lengths[:256].tolist() == [1] * 256 and byte_lengths[256] == 0


def test_bits_per_byte_by_hand():
    # 3 tokens at ln 2 nats each over 6 bytes of text: 3 bits / 6 bytes = 0.5 bit per byte
    assert train_gpt.bits_per_byte(math.log(2), 3, 6) == pytest.approx(0.5)
    # 10 targets at 2.0 nats over 4 bytes: 20 nats / 4 bytes / ln 2
    assert train_gpt.bits_per_byte(2.0, 10, 4) == pytest.approx(5.0 / math.log(2))


def test_mini_run_reports_bits_per_byte(tmp_path):
    """A two-step byte run: result.json's val_bpb equals val_loss x targets / bytes / ln 2, counted here from the
    val file (every target token is one byte except the separators); the done line shows it."""
    code = train_gpt.main(["--preset", "mini", "--n_layer", "1", "--n_embd", "32", "--n_head", "2",
                           "--max_steps", "2", "--val_tokens", "4097", "--test_files", "", "--train_tokens", "20000",
                           "--train_files", os.path.join(MINI, "mini_train.bin"),
                           "--val_files", os.path.join(MINI, "mini_val.bin"),
                           "--log_dir", str(tmp_path), "--run_id", "r", "--save_model", "false"])
    assert code == 0
    result = json.loads((tmp_path / "r" / "result.json").read_text())
    val = train_gpt.read_shard(os.path.join(MINI, "mini_val.bin"))[:4097]
    targets = val[1:4097]  # 32 windows of 128
    expected_bytes = int((targets != 256).sum())
    assert result["val_bytes"] == expected_bytes
    assert result["val_bpb"] == pytest.approx(result["val_loss"] * 4096 / expected_bytes / math.log(2), rel=1e-12)
    assert result["unigram_val_bpb"] > result["val_bpb"] * 0.5
    assert f"val_bpb {result['val_bpb']:.4f}" in (tmp_path / "r" / "log.txt").read_text()
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [row["val_bpb"] for row in rows if row["kind"] == "bits_per_byte"] == [result["val_bpb"]]


# ----------------------------------------------------------------------------------------------------------------------
# The bundled mini shards


def test_mini_shards_match_their_hashes():
    readme = open(os.path.join(REPO_ROOT, "data", "README.md"), encoding="utf-8").read()
    for name in [f"mini_{split}.bin" for split in ("train", "val", "test")] + ["mini_bpe.tiktoken"] + [
            f"mini_bpe_{split}.bin" for split in ("train", "val", "test")]:
        digest = hashlib.sha256(open(os.path.join(MINI, name), "rb").read()).hexdigest()
        assert digest in readme, f"{name}: sha256 {digest} not listed in data/README.md"


def test_mini_bpe_shards_hold_the_byte_shards_documents():
    """The mini_bpe preset's shards decode to the byte shards' documents, split for split, and its train_tokens keeps
    exactly the byte track's 44 documents (the first 262,144 bytes cut back to a document start)."""
    encoding = enc.BpeEncoding(os.path.join(MINI, "mini_bpe.tiktoken"))
    for split in ("train", "val", "test"):
        tokens = train_gpt.read_shard(os.path.join(MINI, f"mini_bpe_{split}.bin"))
        starts = np.flatnonzero(tokens == 256).tolist() + [tokens.size]
        assert [encoding.decode(tokens[a + 1:b]) for a, b in zip(starts, starts[1:])] == enc.decode_byte_documents(
            train_gpt.read_shard(os.path.join(MINI, f"mini_{split}.bin")))
    preset = train_gpt.PRESETS["mini_bpe"]
    kept = train_gpt.truncate_to_document(train_gpt.read_shard(os.path.join(MINI, "mini_bpe_train.bin")),
                                          preset["train_tokens"], 256, "")
    assert kept.size == preset["train_tokens"] and int((kept == 256).sum()) == 44


@pytest.mark.skipif(not os.path.isfile(SOURCE), reason="the source text (../shared/data) is not on this machine")
def test_mini_shards_are_the_source_text_cut_at_documents():
    documents = [d for split in ("train", "val", "test")
                 for d in enc.decode_byte_documents(train_gpt.read_shard(os.path.join(MINI, f"mini_{split}.bin")))]
    with open(SOURCE, encoding="utf-8") as handle:
        text = handle.read()
    assert "".join(documents) == text  # nothing lost, nothing reordered; documents are whole


# ----------------------------------------------------------------------------------------------------------------------
# Data efficiency (bench/mini.py), against a hand computation


def test_data_efficiency_by_hand():
    points = [(1000, 3.0), (2000, 2.5), (4000, 2.2)]
    # 2.35 lies halfway between 2.5 (2,000) and 2.2 (4,000): budget 3,000; a run on 500 -> 6x
    assert reference_budget(points, 2.35) == pytest.approx(3000.0)
    assert data_efficiency(points, 2.35, 500) == ("=", pytest.approx(6.0))
    # 2.9 is a fifth of the way from 3.0 to 2.5: 1,000 + 0.2 x 1,000 = 1,200
    assert reference_budget(points, 2.9) == pytest.approx(1200.0)
    assert data_efficiency(points, 2.5, 250) == ("=", pytest.approx(8.0))  # exactly on a point
    assert data_efficiency(points, 2.0, 500) == (">", pytest.approx(8.0))  # beats the whole curve: a bound
    assert data_efficiency(points, 3.1, 500) == ("<", pytest.approx(2.0))  # worse than its smallest budget
    with pytest.raises(ValueError, match="fall in loss"):
        reference_budget([(1000, 3.0), (2000, 3.1)], 3.05)
