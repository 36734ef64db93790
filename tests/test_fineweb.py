"""data/fineweb.py against a stand-in Hub: small shards served from 127.0.0.1 in the Hub's URL layout.

The real download code runs unchanged (huggingface_hub.hf_hub_download over HTTP, its cache in tmp_path); only the
endpoint differs, through HF_ENDPOINT, so nothing here touches the network."""
import hashlib
import http.server
import importlib.util
import json
import os
import subprocess
import sys
import threading
import zipfile
from urllib.parse import unquote

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT

import train_gpt

SCRIPT = os.path.join(REPO_ROOT, "data", "fineweb.py")
_spec = importlib.util.spec_from_file_location("fineweb", SCRIPT)  # by path: data/ holds no package
fineweb = sys.modules["fineweb"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fineweb)

EOT = 50256
REPO_ID = "kjj0/fineweb10B-gpt2"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
VOCAB = 50304


# ----------------------------------------------------------------------------------------------------------------------
# Stand-in shards and the stand-in Hub


def document_stream(lengths: list[int], seed: int = 0) -> np.ndarray:
    """Documents of the given lengths (each counts its leading EOT), bodies of random GPT-2 ids that are never EOT."""
    rng = np.random.default_rng(seed)
    return np.concatenate([np.concatenate([[EOT], rng.integers(0, EOT, n - 1)]) for n in lengths]).astype(np.uint16)


def shard_bytes(tokens: np.ndarray, folder) -> bytes:
    path = os.path.join(str(folder), "shard.bin")
    train_gpt.write_shard(path, tokens)
    with open(path, "rb") as handle:
        return handle.read()


class StandInHub:
    """The few Hub answers hf_hub_download needs: HEAD and GET on /datasets/<repo>/resolve/<revision>/<file>, with
    ETag (an LFS file's sha256), X-Repo-Commit and Content-Length; Range requests (206) for resumed downloads; 404s
    with the X-Error-Code the client maps to its exceptions. `faults[name]` lists what each next GET of a file does
    wrong: "corrupt" (one byte flipped) or "truncate" (the connection drops halfway)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.faults: dict[str, list[str]] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, file, Range header)
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub.answer(self, body=False)

            def do_GET(self):
                hub.answer(self, body=True)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def publish(self, tokens: np.ndarray, shard_sizes: list[int], folder) -> None:
        """Cuts a stream into shards named as in kjj0/fineweb10B-gpt2 (documents may straddle shard ends)."""
        assert sum(shard_sizes) == tokens.size
        offsets = np.cumsum([0] + shard_sizes)
        for index, (first, last) in enumerate(zip(offsets, offsets[1:])):
            self.files[fineweb.source_shard_name(index)] = shard_bytes(tokens[first:last], folder)

    def gets(self, name: str | None = None) -> list:
        return [r for r in self.requests if r[0] == "GET" and (name is None or r[1] == name)]

    def answer(self, handler, body: bool) -> None:
        prefix = f"/datasets/{REPO_ID}/resolve/"
        if not handler.path.startswith(prefix):
            return self.refuse(handler, "RepoNotFound")
        revision, _, name = handler.path[len(prefix):].partition("/")
        name = unquote(name)
        self.requests.append((handler.command, name, handler.headers.get("Range")))
        if revision not in ("main", COMMIT):
            return self.refuse(handler, "RevisionNotFound")
        if name not in self.files:
            return self.refuse(handler, "EntryNotFound")
        data = self.files[name]
        fault = self.faults[name].pop(0) if body and self.faults.get(name) else None
        status, start = 200, 0
        if body and handler.headers.get("Range", "").startswith("bytes="):
            status, start = 206, int(handler.headers["Range"][len("bytes="):].split("-")[0])
        payload = bytearray(data[start:])
        if fault == "corrupt":
            payload[len(payload) // 2] ^= 0xFF
        handler.send_response(status)
        handler.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        handler.send_header("X-Repo-Commit", COMMIT)
        handler.send_header("Accept-Ranges", "bytes")
        handler.send_header("Content-Type", "application/octet-stream")
        handler.send_header("Content-Length", str(len(payload)))
        if status == 206:
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        handler.end_headers()
        if not body:
            return
        if fault == "truncate":  # half the promised bytes, then the connection drops
            handler.wfile.write(payload[:len(payload) // 2])
            handler.wfile.flush()
            handler.close_connection = True
            return
        handler.wfile.write(payload)

    def refuse(self, handler, code: str) -> None:
        handler.send_response(404)
        handler.send_header("X-Error-Code", code)
        handler.send_header("X-Repo-Commit", COMMIT)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    stand_in = StandInHub()
    monkeypatch.setenv("HF_ENDPOINT", stand_in.url)
    yield stand_in
    stand_in.close()


def cut(tmp_path, *flags) -> int:
    """data/fineweb.py in this process: output in tmp_path/out, huggingface_hub's cache in tmp_path/hub."""
    return fineweb.main(["--out_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "hub"), *flags])


def budgets(val: int, train: int, test: int) -> list[str]:
    return ["--val_tokens", str(val), "--train_tokens", str(train), "--test_tokens", str(test)]


def split(tmp_path, name: str) -> np.ndarray:
    return train_gpt.read_shard(str(tmp_path / "out" / f"fineweb_{name}.bin"))


def manifest(tmp_path) -> dict:
    with open(tmp_path / "out" / "manifest.json") as handle:
        return json.load(handle)


def mtimes(folder) -> dict[str, int]:
    return {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in sorted(os.listdir(folder))}


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def cached_file(tmp_path, name: str) -> str:
    """The real file behind huggingface_hub's snapshot link for a shard."""
    folder = tmp_path / "hub" / f"datasets--{REPO_ID.replace('/', '--')}" / "snapshots" / COMMIT
    return os.path.realpath(folder / name)


# Stream A: a document ends exactly at val's end (1000); train [1000, 2500) ends inside the document [2280, 2613);
# test opens at 2613. Shards of 1200 tokens: train spans three of them, the fourth is never needed.
LENGTHS_A = [300, 450, 250, 400, 380, 500, 333, 600, 700, 837]
BUDGETS_A = (1000, 1500, 800)
# Stream B: the document [750, 1300) straddles val's end and the shard end at 1200, so the search for train's start
# crosses into the next shard; train [1300, 2300) ends exactly where a document starts, so test opens there.
LENGTHS_B = [300, 450, 550, 500, 500, 400, 700, 200]
BUDGETS_B = (1000, 1000, 300)


@pytest.fixture
def stream_a(hub, tmp_path):
    tokens = document_stream(LENGTHS_A, seed=1)
    hub.publish(tokens, [1200, 1200, 1200, tokens.size - 3600], tmp_path)
    return tokens


# ----------------------------------------------------------------------------------------------------------------------
# The cut at the edges, and the manifest


def test_document_ending_at_val_budget_starts_train_there(tmp_path, hub, stream_a, capsys):
    assert cut(tmp_path, *budgets(*BUDGETS_A)) == 0
    val, train, test = (split(tmp_path, name) for name in ("val", "train", "test"))
    assert np.array_equal(val, stream_a[:1000])
    assert np.array_equal(train, stream_a[1000:2500])  # stream[1000] opens a document: nothing is dropped
    assert stream_a[2500] != EOT and np.array_equal(test, stream_a[2613:3413])  # train ended mid-document
    assert [name for _, name, _ in hub.gets()] == [fineweb.source_shard_name(i) for i in range(3)]  # not shard 3

    entries = manifest(tmp_path)["splits"]
    for name, tokens, start, documents in [("val", val, 0, 3), ("train", train, 1000, 4), ("test", test, 2613, 2)]:
        entry = entries[name]
        assert entry["tokens"] == tokens.size and entry["documents"] == documents
        assert entry["documents"] == int((tokens == EOT).sum())
        assert entry["sha256"] == hashlib.sha256(tokens.astype("<u2").tobytes()).hexdigest()
        assert (entry["stream_start"], entry["stream_end"]) == (start, start + tokens.size)
    assert entries["train"]["source_shards"] == ["fineweb_val_000000.bin", "fineweb_train_000001.bin",
                                                 "fineweb_train_000002.bin"]
    assert entries["test"]["source_shards"] == ["fineweb_train_000002.bin"]
    # train_gpt.py reads the split as it is
    loaded = train_gpt.load_tokens(str(tmp_path / "out" / "fineweb_train.bin"), VOCAB, "train")
    assert np.array_equal(loaded, train)


def test_document_straddling_val_budget_is_dropped(tmp_path, hub):
    tokens = document_stream(LENGTHS_B, seed=2)
    hub.publish(tokens, [1200, 1200, tokens.size - 2400], tmp_path)
    assert cut(tmp_path, *budgets(*BUDGETS_B)) == 0
    assert np.array_equal(split(tmp_path, "val"), tokens[:1000])  # ends inside the document [750, 1300)
    assert np.array_equal(split(tmp_path, "train"), tokens[1300:2300])  # its rest [1000, 1300) belongs to none
    assert np.array_equal(split(tmp_path, "test"), tokens[2300:2600])  # stream[2300] opens a document
    entries = manifest(tmp_path)["splits"]
    assert entries["val"]["documents"] == 3 and entries["train"]["documents"] == 2


def test_no_test_split_when_its_budget_is_zero(tmp_path, hub, stream_a):
    assert cut(tmp_path, *budgets(1000, 1500, 0)) == 0
    assert sorted(manifest(tmp_path)["splits"]) == ["train", "val"]
    assert not (tmp_path / "out" / "fineweb_test.bin").exists()


@pytest.mark.parametrize("lengths, wanted", [
    (LENGTHS_A, budgets(1000, 1500, 2200)),  # test runs off the end of the stream
    ([300, 450, 2000], budgets(1000, 100, 10)),  # no document opens after val
])
def test_stream_too_short_for_the_budgets_is_one_clear_line(tmp_path, hub, capsys, lengths, wanted):
    tokens = document_stream(lengths)
    hub.publish(tokens, [1200, tokens.size - 1200], tmp_path)
    assert cut(tmp_path, *wanted) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "too short" in errors[0] and f"ends after {tokens.size:,} tokens" in errors[0]
    assert os.listdir(tmp_path / "out") == []  # nothing half-written


def test_stream_not_starting_with_a_document_is_refused(tmp_path, hub, capsys):
    tokens = document_stream([500, 500, 500])[1:]
    hub.publish(tokens, [tokens.size], tmp_path)
    assert cut(tmp_path, *budgets(100, 100, 0)) == 2
    assert "starts with token" in error_lines(capsys.readouterr().err)[0]


# ----------------------------------------------------------------------------------------------------------------------
# Re-runs: nothing to do when complete; a corrupt output or cached shard is cut or fetched again


def test_rerun_over_a_complete_output_does_nothing(tmp_path, hub, stream_a, capsys):
    assert cut(tmp_path, *budgets(*BUDGETS_A)) == 0
    before, hub.requests[:] = mtimes(tmp_path / "out"), []
    capsys.readouterr()
    assert cut(tmp_path, *budgets(*BUDGETS_A)) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert hub.requests == [] and mtimes(tmp_path / "out") == before
    # other budgets are another cut: made again, from the cache (no shard downloaded twice)
    assert cut(tmp_path, *budgets(1100, 1000, 800)) == 0
    assert manifest(tmp_path)["config"]["val_tokens"] == 1100 and split(tmp_path, "val").size == 1100
    assert hub.gets() == []


@pytest.mark.parametrize("damage", ["flip a token", "truncate", "garble the manifest", "delete a split"])
def test_corrupt_output_is_detected_and_cut_again(tmp_path, hub, stream_a, capsys, damage):
    assert cut(tmp_path, *budgets(*BUDGETS_A)) == 0
    good = split(tmp_path, "train").copy()
    path = tmp_path / "out" / "fineweb_train.bin"
    if damage == "flip a token":
        with open(path, "r+b") as handle:
            handle.seek(train_gpt.SHARD_HEADER_BYTES + 2 * 700)
            handle.write(b"\x01\x02")
    elif damage == "truncate":
        os.truncate(path, os.path.getsize(path) - 2)
    elif damage == "garble the manifest":
        (tmp_path / "out" / "manifest.json").write_text('{"version": 1, "config": {}, "splits": [}')
    else:
        os.remove(path)
    hub.requests[:] = []
    capsys.readouterr()
    assert cut(tmp_path, *budgets(*BUDGETS_A)) == 0
    assert "fineweb: cutting" in capsys.readouterr().out
    assert np.array_equal(split(tmp_path, "train"), good)
    assert hub.gets() == []  # re-cut from the verified cache


@pytest.mark.parametrize("damage", ["flip a byte", "truncate"])
def test_corrupt_cached_shard_is_detected_and_fetched_again(tmp_path, hub, stream_a, capsys, damage):
    assert cut(tmp_path, *budgets(*BUDGETS_A)) == 0
    blob = cached_file(tmp_path, "fineweb_train_000001.bin")
    if damage == "flip a byte":
        with open(blob, "r+b") as handle:
            handle.seek(2000)
            byte = handle.read(1)
            handle.seek(2000)
            handle.write(bytes([byte[0] ^ 0xFF]))
    else:
        os.truncate(blob, os.path.getsize(blob) - 100)
    hub.requests[:] = []
    capsys.readouterr()
    assert cut(tmp_path, *budgets(*BUDGETS_A), "--force") == 0
    assert "fetching fineweb_train_000001.bin again" in capsys.readouterr().err
    assert [name for _, name, _ in hub.gets()] == ["fineweb_train_000001.bin"]
    assert np.array_equal(split(tmp_path, "train"), stream_a[1000:2500])


def test_corrupt_download_is_fetched_again_and_never_used(tmp_path, hub, stream_a, capsys):
    hub.faults["fineweb_train_000001.bin"] = ["corrupt"]
    assert cut(tmp_path, *budgets(*BUDGETS_A)) == 0
    assert "corrupt download" in capsys.readouterr().err
    assert len(hub.gets("fineweb_train_000001.bin")) == 2
    assert np.array_equal(split(tmp_path, "train"), stream_a[1000:2500])


def test_download_corrupt_every_time_is_one_error_line(tmp_path, hub, stream_a, capsys):
    hub.faults["fineweb_train_000001.bin"] = ["corrupt"] * 5
    assert cut(tmp_path, *budgets(*BUDGETS_A)) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "still corrupt after 3 downloads" in errors[0]
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_interrupted_download_resumes_with_a_range_request(tmp_path, hub, stream_a, monkeypatch):
    # huggingface_hub writes what it receives in chunks of DOWNLOAD_CHUNK_SIZE (10 MB) and resumes after the last
    # chunk written: small chunks let a 3 KB stand-in shard show that.
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 256)
    hub.faults["fineweb_train_000002.bin"] = ["truncate"]
    assert cut(tmp_path, *budgets(*BUDGETS_A)) == 0
    size = len(hub.files["fineweb_train_000002.bin"])
    first, second = [r for _, _, r in hub.gets("fineweb_train_000002.bin")]
    assert first is None and second == f"bytes={size // 2 // 256 * 256}-"  # asks only for what is missing
    assert np.array_equal(split(tmp_path, "test"), stream_a[2613:3413])


def test_missing_repository_is_one_error_line(tmp_path, hub, stream_a, capsys):
    assert cut(tmp_path, *budgets(*BUDGETS_A), "--repo_id", "nobody/nothing") == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "nobody/nothing" in errors[0] and "Offline use" in errors[0]


def test_local_source_folder_gives_the_same_cut(tmp_path, hub, stream_a, capsys):
    folder = tmp_path / "shards"
    folder.mkdir()
    for name, data in hub.files.items():
        (folder / name).write_bytes(data)
    assert cut(tmp_path, *budgets(*BUDGETS_A), "--source_dir", str(folder)) == 0
    assert hub.requests == [] and np.array_equal(split(tmp_path, "train"), stream_a[1000:2500])
    os.truncate(folder / "fineweb_train_000001.bin", 2000)
    assert cut(tmp_path, *budgets(*BUDGETS_A), "--source_dir", str(folder), "--force") == 2
    assert "truncated or corrupt" in error_lines(capsys.readouterr().err)[0]


# ----------------------------------------------------------------------------------------------------------------------
# --export slowrun


def test_export_slowrun_writes_its_pt_format_and_reports_the_hash(tmp_path, hub, stream_a, capsys):
    assert cut(tmp_path, *budgets(*BUDGETS_A), "--export", "slowrun") == 0
    out = capsys.readouterr().out
    assert out.count("DIFFERS from slowrun's published sha256") == 2  # reported, not fatal
    recorded = manifest(tmp_path)["export"]["slowrun"]
    for name, seed in [("val", 42), ("train", 43)]:
        path = tmp_path / "out" / f"fineweb_{name}.pt"
        data = torch.load(path, weights_only=True)
        assert list(data) == ["tokens", "doc_starts", "bos_id", "seq_shuffle_seed", "seq_size"]
        assert data["tokens"].dtype == torch.uint16 and data["doc_starts"].dtype == torch.int64
        assert np.array_equal(data["tokens"].numpy(), split(tmp_path, name))
        assert np.array_equal(data["doc_starts"].numpy(), np.flatnonzero(split(tmp_path, name) == EOT))
        assert (data["bos_id"], data["seq_shuffle_seed"], data["seq_size"]) == (EOT, seed, 2049)
        with zipfile.ZipFile(path) as archive:  # torch.save records the file name: slowrun's is fineweb_<split>
            assert all(entry.startswith(f"fineweb_{name}/") for entry in archive.namelist())
        assert recorded[name]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert recorded[name]["matches_published"] is False

    before = mtimes(tmp_path / "out")
    assert cut(tmp_path, *budgets(*BUDGETS_A), "--export", "slowrun") == 0
    assert "nothing to do" in capsys.readouterr().out and mtimes(tmp_path / "out") == before


def test_export_reports_a_match_and_rewrites_a_corrupt_file(tmp_path, hub, stream_a, capsys, monkeypatch):
    assert cut(tmp_path, *budgets(*BUDGETS_A), "--export", "slowrun") == 0
    val_sha = manifest(tmp_path)["export"]["slowrun"]["val"]["sha256"]
    monkeypatch.setitem(fineweb.SLOWRUN_EXPORT, "val", ("fineweb_val.pt", 42, val_sha))  # as if it were slowrun's
    path = tmp_path / "out" / "fineweb_val.pt"
    path.write_bytes(path.read_bytes()[:-10])
    capsys.readouterr()
    assert cut(tmp_path, *budgets(*BUDGETS_A), "--export", "slowrun") == 0
    out = capsys.readouterr().out
    assert "fineweb_val.pt: sha256 " + val_sha + " equals slowrun's published sha256" in out
    assert hashlib.sha256(path.read_bytes()).hexdigest() == val_sha


# ----------------------------------------------------------------------------------------------------------------------
# Flags, and the script as run.sh runs it


@pytest.mark.parametrize("flags, says", [
    (["--val_tokens", "ten"], "not a whole number"),
    (["--val_tokens", "-5"], "cannot be negative"),
    (["--train_tokens", "0"], "at least 1"),
    (["--export", "nanogpt"], "invalid choice"),
    (["--bos_id", "70000"], "[0, 65536)"),
    (["--no_such_flag"], "unrecognized arguments"),
])
def test_bad_flags_are_one_error_line(tmp_path, capsys, flags, says):
    with pytest.raises(SystemExit) as exit_info:
        cut(tmp_path, *flags)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error:") and says in err


def test_script_uses_hf_endpoint_and_cache_then_works_offline(tmp_path, hub, stream_a):
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(tmp_path / "hub"), OMP_NUM_THREADS="1")
    command = [sys.executable, SCRIPT, "--out_dir", str(tmp_path / "out"), *budgets(*BUDGETS_A)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert np.array_equal(split(tmp_path, "train"), stream_a[1000:2500])
    assert os.path.isfile(cached_file(tmp_path, "fineweb_train_000002.bin"))  # in $HF_HUB_CACHE

    os.remove(tmp_path / "out" / "fineweb_train.bin")
    hub.requests[:] = []
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert hub.requests == [] and np.array_equal(split(tmp_path, "train"), stream_a[1000:2500])


# ---------------------------------------------------------------------------------- bad inputs (issue 25, not yet tried)

@pytest.mark.parametrize("what, says", [("missing", "no such folder"), ("a file", "a file, not a folder of shards")])
def test_source_dir_that_is_not_a_folder_is_one_line(tmp_path, capsys, what, says):
    """--source_dir missing or a plain file said 'the stream from local folder X ends after 0 tokens (0 shards): too
    short ...', as if the folder held too little: now one line saying what is wrong with the flag."""
    source = tmp_path / "shards"
    if what == "a file":
        source.write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        cut(tmp_path, "--source_dir", str(source), *budgets(1000, 1500, 0))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err == [f"error: --source_dir {source}: {says} (see --help)"], err


def test_source_shard_that_is_a_folder_is_one_line(tmp_path, capsys):
    """A folder where a shard should be was reported as 'file not found' (read_shard's words for any non-file)."""
    source = tmp_path / "shards"
    (source / fineweb.source_shard_name(0)).mkdir(parents=True)
    capsys.readouterr()
    status = cut(tmp_path, "--source_dir", str(source), *budgets(1000, 1500, 0))
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err == [f"error: {source / fineweb.source_shard_name(0)}: not a shard file (a folder?)"], err
