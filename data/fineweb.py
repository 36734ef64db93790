"""
Fetch FineWeb and cut the exact slowrun split: 10M val / 100M train tokens, plus a held-out 10M test split.

The public slowrun benchmark (github.com/qlabs-eng/slowrun, prepare_data.py) streams FineWeb sample-10BT in order,
prefixes every document with <|endoftext|> (50256), takes the first 10,000,000 GPT-2 tokens as val (cutting its
last document), drops the rest of that document and takes the next 100,000,000 tokens as train (cut at the budget).
The same token stream is published pre-tokenized, in train_gpt.py's .bin layout, as the Hub dataset
kjj0/fineweb10B-gpt2: fineweb_val_000000.bin holds stream tokens [0, 100M), fineweb_train_000001.bin the next
shard, and so on. So this script downloads only the shards the cut needs instead of re-tokenizing FineWeb:

    val   = stream[0, V)
    train = stream[t, t + T)   t = the first document start (token 50256) at or after V
    test  = stream[s, s + S)   s = the first document start at or after t + T; held out, scored once at the end

    python data/fineweb.py                   # data/fineweb/fineweb_{val,train,test}.bin + manifest.json
    python data/fineweb.py --export slowrun  # also slowrun's own fineweb_{val,train}.pt, sha256 compared with its
    python data/fineweb.py --help

Every download and every output is checked (header, size, sha256) and fetched or cut again when it is wrong; a
re-run over a complete, verified output does nothing. data/FINEWEB.md says what is downloaded, how big, where it
goes, how long it takes, how to work offline and how the tests stand in for the Hub.
"""
from __future__ import annotations

import argparse
import datetime
import errno
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from train_gpt import SHARD_HEADER_BYTES, DataError, atomic_write_bytes, document_starts, read_shard, write_shard  # noqa: E402

DEFAULT_REPO_ID = "kjj0/fineweb10B-gpt2"
DEFAULT_OUT_DIR = os.path.join(REPO_ROOT, "data", "fineweb")
DEFAULT_BUDGETS = {"val": 10_000_000, "train": 100_000_000, "test": 10_000_000}
GPT2_EOT = 50256  # <|endoftext|>: opens every document of the stream
SPLITS = ("val", "train", "test")  # in stream order
SPLIT_FILES = {"val": "fineweb_val.bin", "train": "fineweb_train.bin", "test": "fineweb_test.bin"}
MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
HASH_CHUNK_BYTES = 1 << 24  # 16 MiB: hashing 100M tokens streams through memory in pieces
SEARCH_CHUNK_TOKENS = 1 << 20  # document starts are looked for in pieces of this many tokens

# slowrun's own .pt files (prepare_data.py): a torch.save'd dict with these keys in this order. The sha256 that
# slowrun publishes holds for its default budgets only, and depends on the exact file name (torch.save records it).
SLOWRUN_SEQ_SIZE = 2049  # slowrun's sequence length 2048 + 1
SLOWRUN_EXPORT = {
    "val": ("fineweb_val.pt", 42, "6868ed375b289a89c72c2f9df1ecbdcff700c4b9478ca806435d2dbfad8573b1"),
    "train": ("fineweb_train.pt", 43, "36e7c95c1e7f6ed952fb002d76a03044e8617fea7e696a68d7dc1ce78465dcaf"),
}


def source_shard_name(index: int) -> str:
    """File name of the index-th shard of the published stream (modded-nanogpt's naming: shard 0 is 'val')."""
    return "fineweb_val_000000.bin" if index == 0 else f"fineweb_train_{index:06d}.bin"


def one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message squeezed onto one line (library errors span several)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def progress_bar(total: int, desc: str, unit: str = "B"):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1024 if unit == "B" else 1000,
                leave=False, dynamic_ncols=True)


def sha256_of_buffers(buffers, total: int, desc: str) -> str:
    """sha256 of byte buffers fed in order, in HASH_CHUNK_BYTES pieces, with a progress bar."""
    digest = hashlib.sha256()
    with progress_bar(total, desc) as bar:
        for buffer in buffers:
            view = memoryview(buffer).cast("B")
            for first in range(0, len(view), HASH_CHUNK_BYTES):
                piece = view[first:first + HASH_CHUNK_BYTES]
                digest.update(piece)
                bar.update(len(piece))
    return digest.hexdigest()


def token_sha256(tokens: np.ndarray, desc: str) -> str:
    """sha256 of a token array as little-endian uint16 bytes: the manifest's hash, the .bin file minus its header."""
    tokens = np.ascontiguousarray(tokens, dtype="<u2")
    return sha256_of_buffers([tokens], tokens.nbytes, desc)


def file_sha256(path: str, desc: str | None = None) -> str:
    """sha256 of a whole file, read in pieces."""
    def pieces():
        with open(path, "rb") as handle:
            while chunk := handle.read(HASH_CHUNK_BYTES):
                yield chunk
    return sha256_of_buffers(pieces(), os.path.getsize(path), desc or f"sha256 {os.path.basename(path)}")


def count_documents(tokens: np.ndarray, bos_id: int) -> int:
    """Documents in a split, counted as train_gpt.py counts them when it trains or scores."""
    return int(document_starts(tokens, bos_id).size)


# ----------------------------------------------------------------------------------------------------------------------
# Sources: where the shards of the stream come from


@dataclass
class SourceShard:
    name: str  # file name in the repository
    path: str  # where it lies on this machine
    tokens: np.ndarray  # uint16, read and checked
    sha256: str  # of the whole file
    commit: str = ""  # the repository commit it was resolved at ("" = unknown)


def check_source_file(path: str, name: str, expected_sha256: str | None) -> tuple[np.ndarray | None, str, str]:
    """(tokens, sha256, "") for a good shard, or (None, "", what is wrong): header, size, and sha256 when known."""
    try:
        tokens = read_shard(path)
    except DataError as error:
        return None, "", one_line(error)
    with open(path, "rb") as handle:
        header = handle.read(SHARD_HEADER_BYTES)
    sha256 = sha256_of_buffers([header, tokens], SHARD_HEADER_BYTES + tokens.nbytes, f"verify {name}")
    if expected_sha256 and sha256 != expected_sha256:
        return None, "", (f"{path}: sha256 {sha256} but the Hub's ETag for {name} is {expected_sha256} "
                          f"(corrupt download)")
    return tokens, sha256, ""


def cached_etag(path: str) -> str | None:
    """The ETag a cached file was downloaded under. huggingface_hub links snapshots/<commit>/<name> to
    ../../blobs/<ETag>; for LFS files (these shards) the Hub's ETag is the file's sha256. Only that first link is
    read: blobs/<ETag> may itself link into a shared store named by another hash."""
    return os.path.basename(os.readlink(path)) if os.path.islink(path) else None


def remove_cached(path: str) -> None:
    """Deletes a bad cached file: the snapshot link, the blob it names, and the file that blob resolves to, so the
    next hf_hub_download fetches it again instead of relinking the bad copy."""
    chain = [path]
    if os.path.islink(path):
        chain += [os.path.join(os.path.dirname(path), os.readlink(path)), os.path.realpath(path)]
    for bad in chain:
        if os.path.lexists(bad):
            os.remove(bad)


class HubSource:
    """Shards of a Hub dataset repository, fetched with huggingface_hub.hf_hub_download: it caches, and when the
    connection drops it resumes with an HTTP Range request from the last chunk written. Each file is checked (header,
    size, and its sha256 against the ETag the Hub serves for it); a bad one is deleted from the cache and fetched
    again, never used."""

    def __init__(self, repo_id: str, revision: str, cache_dir: str | None, endpoint: str | None, attempts: int = 3):
        self.repo_id, self.revision, self.cache_dir, self.endpoint, self.attempts = \
            repo_id, revision, cache_dir, endpoint, attempts

    def describe(self) -> str:
        from huggingface_hub import constants
        return f"{self.endpoint or constants.ENDPOINT}/datasets/{self.repo_id} (revision {self.revision})"

    def fetch(self, index: int) -> SourceShard | None:
        """The index-th shard, or None when the repository has no such file (the stream ends before it)."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (LocalEntryNotFoundError, RemoteEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)
        name, problem = source_shard_name(index), ""
        for attempt in range(1, self.attempts + 1):
            try:
                path = hf_hub_download(self.repo_id, name, repo_type="dataset", revision=self.revision,
                                       cache_dir=self.cache_dir, endpoint=self.endpoint)
            except RemoteEntryNotFoundError:
                return None
            except Exception as error:  # network, auth, a missing repo or revision: all one line, exit 2
                final = isinstance(error, (LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError))
                problem = f"{name}: download from {self.describe()} failed: {one_line(error)}"
                if final or attempt == self.attempts:
                    raise DataError(f"{problem} (data/FINEWEB.md, 'Offline use', says how to work without the Hub)") \
                        from None
                print(f"{problem}: trying again ({attempt}/{self.attempts})", file=sys.stderr)
                continue
            etag = cached_etag(path)
            expected = etag if etag and len(etag) == 64 and all(c in "0123456789abcdef" for c in etag) else None
            tokens, sha256, problem = check_source_file(path, name, expected)
            if tokens is not None:
                commit = os.path.basename(os.path.dirname(path))  # snapshots/<commit>/<name>
                return SourceShard(name, path, tokens, sha256, commit)
            print(f"{problem}: deleting it and fetching {name} again ({attempt}/{self.attempts})", file=sys.stderr)
            remove_cached(path)
        raise DataError(f"{name}: still corrupt after {self.attempts} downloads: {problem}")


class DirectorySource:
    """Shards already on disk (copied from another machine, or modded-nanogpt's data/fineweb10B/): checked for
    header and size only, since no ETag comes with them."""

    def __init__(self, directory: str):
        self.directory = directory

    def describe(self) -> str:
        return f"local folder {self.directory}"

    def fetch(self, index: int) -> SourceShard | None:
        name = source_shard_name(index)
        path = os.path.join(self.directory, name)
        if not os.path.exists(path):
            return None
        if not os.path.isfile(path):
            raise DataError(f"{path}: not a shard file (a folder?)")
        tokens, sha256, problem = check_source_file(path, name, None)
        if tokens is None:
            raise DataError(problem)
        return SourceShard(name, path, tokens, sha256)


# ----------------------------------------------------------------------------------------------------------------------
# The stream and the cut


class StreamTooShort(Exception):
    pass


class TokenStream:
    """The source shards read as one token stream, fetched in order only as far as the cut looks."""

    def __init__(self, source):
        self.source = source
        self.shards: list[SourceShard] = []
        self.offsets = [0]  # stream position of each shard's first token; the last entry is the tokens so far
        self.ended = False

    @property
    def available(self) -> int:
        return self.offsets[-1]

    def fetch_next(self) -> bool:
        if self.ended:
            return False
        shard = self.source.fetch(len(self.shards))
        if shard is None:
            self.ended = True
            return False
        self.shards.append(shard)
        self.offsets.append(self.offsets[-1] + shard.tokens.size)
        print(f"  {shard.name}: {shard.tokens.size:,} tokens, stream [{self.offsets[-2]:,}, {self.offsets[-1]:,})")
        return True

    def require(self, end: int, why: str) -> None:
        """Fetches shards until tokens [0, end) are here."""
        while self.available < end:
            if not self.fetch_next():
                raise StreamTooShort(f"{why} needs stream tokens up to {end:,}")

    def shard_at(self, position: int) -> int:
        return int(np.searchsorted(self.offsets, position, side="right")) - 1

    def tokens(self, start: int, end: int) -> np.ndarray:
        """Stream tokens [start, end), which must be here: a view when one shard holds them, else a copy."""
        pieces = []
        for index in range(self.shard_at(start), len(self.shards)):
            first, last = self.offsets[index], self.offsets[index + 1]
            if first >= end:
                break
            pieces.append(self.shards[index].tokens[max(start - first, 0):min(end, last) - first])
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def shard_names(self, start: int, end: int) -> list[str]:
        return [shard.name for shard, first, last in zip(self.shards, self.offsets, self.offsets[1:])
                if first < end and last > start]

    def next_document_start(self, position: int, bos_id: int, why: str) -> int:
        """The first position >= position holding bos_id, fetching shards as the search goes."""
        while True:
            self.require(position + 1, why)
            index = self.shard_at(position)
            tokens, first = self.shards[index].tokens, self.offsets[index]
            local = position - first
            while local < tokens.size:
                piece = tokens[local:local + SEARCH_CHUNK_TOKENS]
                hits = np.flatnonzero(piece == bos_id)
                if hits.size:
                    return first + local + int(hits[0])
                local += piece.size
            position = self.offsets[index + 1]


@dataclass
class Split:
    name: str
    start: int  # stream position of its first token
    end: int  # one past its last token
    source_shards: list[str] = field(default_factory=list)


def plan_splits(stream: TokenStream, budgets: dict[str, int], bos_id: int) -> list[Split]:
    """Where each split lies in the stream (see the module docstring); fetches exactly the shards that takes."""
    try:
        stream.require(1, "the first token")
        first_token = int(stream.tokens(0, 1)[0])
        if first_token != bos_id:
            raise DataError(f"{stream.shards[0].path}: the stream starts with token {first_token}, not the document "
                            f"marker {bos_id}: not a document-prefixed GPT-2 stream like slowrun's")
        splits, position = [], 0
        for name in SPLITS:
            if budgets[name] <= 0:
                continue
            if name != "val":  # every split after val opens at a document start
                position = stream.next_document_start(position, bos_id, f"the first document of {name}")
            end = position + budgets[name]
            stream.require(end, f"{name} ({budgets[name]:,} tokens from stream position {position:,})")
            splits.append(Split(name, position, end, stream.shard_names(position, end)))
            position = end
        return splits
    except StreamTooShort as short:
        wanted = " + ".join(f"{name} {budgets[name]:,}" for name in SPLITS if budgets[name] > 0)
        raise DataError(f"the stream from {stream.source.describe()} ends after {stream.available:,} tokens "
                        f"({len(stream.shards)} shards): too short for {wanted} tokens; {short}") from None


# ----------------------------------------------------------------------------------------------------------------------
# Outputs: the .bin splits, the manifest, and their verification


def config_of(args: argparse.Namespace) -> dict:
    """What the output depends on: a manifest made with another config is cut again."""
    return {"repo_id": args.repo_id, "revision": args.revision, "bos_id": args.bos_id,
            "val_tokens": args.val_tokens, "train_tokens": args.train_tokens, "test_tokens": args.test_tokens}


def read_manifest(out_dir: str) -> dict | None:
    try:
        with open(os.path.join(out_dir, MANIFEST_FILE)) as handle:
            manifest = json.load(handle)
        return manifest if isinstance(manifest, dict) and manifest.get("version") == MANIFEST_VERSION else None
    except (OSError, ValueError):
        return None


def write_manifest(out_dir: str, manifest: dict) -> None:
    path = os.path.join(out_dir, MANIFEST_FILE)
    atomic_write_bytes(path, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))


def check_output(out_dir: str, entry: dict) -> str:
    """'' when a split's .bin matches its manifest entry (header, size, token count, sha256), else what is wrong."""
    path = os.path.join(out_dir, entry["file"])
    try:
        tokens = read_shard(path)
    except DataError as error:
        return one_line(error)
    if tokens.size != entry["tokens"]:
        return f"{path}: {tokens.size:,} tokens, the manifest says {entry['tokens']:,}"
    if token_sha256(tokens, f"verify {entry['file']}") != entry["sha256"]:
        return f"{path}: sha256 of its tokens differs from {MANIFEST_FILE} (corrupt)"
    return ""


def outputs_problem(out_dir: str, manifest: dict | None, config: dict) -> str:
    """'' when the output folder already holds this config's splits, all verified; else why it must be cut."""
    if manifest is None:
        return f"no valid {MANIFEST_FILE} in {out_dir}"
    if manifest.get("config") != config:
        return f"{MANIFEST_FILE} was made with other settings ({manifest.get('config')})"
    wanted, splits = [name for name in SPLITS if config[f"{name}_tokens"] > 0], manifest.get("splits")
    if not isinstance(splits, dict) or sorted(splits) != sorted(wanted):
        return f"{MANIFEST_FILE} does not list exactly the splits {', '.join(wanted)}"
    for name in wanted:
        try:
            problem = check_output(out_dir, splits[name])
        except (KeyError, TypeError):  # a hand-edited or foreign manifest
            problem = f"{MANIFEST_FILE}: its entry for {name} is malformed"
        if problem:
            return problem
    return ""


def cut(args: argparse.Namespace, out_dir: str) -> dict:
    """Fetches what the cut needs, writes the splits, verifies them, and returns the new manifest."""
    config = config_of(args)
    budgets = {name: config[f"{name}_tokens"] for name in SPLITS}
    source = DirectorySource(args.source_dir) if args.source_dir else HubSource(
        args.repo_id, args.revision, args.cache_dir, args.endpoint)
    print(f"fineweb: reading the token stream from {source.describe()}")
    stream = TokenStream(source)
    splits = plan_splits(stream, budgets, args.bos_id)
    manifest_path = os.path.join(out_dir, MANIFEST_FILE)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # the folder is inconsistent until the new manifest lands
    entries = {}
    for split in splits:
        file = SPLIT_FILES[split.name]
        tokens = stream.tokens(split.start, split.end)
        write_shard(os.path.join(out_dir, file), tokens)
        entries[split.name] = {
            "file": file, "tokens": int(tokens.size), "documents": count_documents(tokens, args.bos_id),
            "sha256": token_sha256(tokens, f"sha256 {file}"), "stream_start": split.start, "stream_end": split.end,
            "source_shards": split.source_shards,
        }
        problem = check_output(out_dir, entries[split.name])
        if problem:
            raise DataError(f"{problem} right after writing it (disk full or failing?)")
        print(f"  {file}: {tokens.size:,} tokens, {entries[split.name]['documents']:,} documents, "
              f"stream [{split.start:,}, {split.end:,}) from {', '.join(split.source_shards)}")
    stale = [SPLIT_FILES[name] for name in SPLITS if name not in entries]  # a split switched off (budget 0)
    stale += [file for file, _, _ in SLOWRUN_EXPORT.values()]  # exports of the old cut: made again on request
    for file in stale:
        if os.path.exists(os.path.join(out_dir, file)):
            os.remove(os.path.join(out_dir, file))
    return {
        "version": MANIFEST_VERSION,
        "config": config,
        "source": {"where": source.describe(), "commit": next((s.commit for s in stream.shards if s.commit), ""),
                   "shards": [{"file": s.name, "tokens": int(s.tokens.size), "sha256": s.sha256,
                               "stream_start": first} for s, first in zip(stream.shards, stream.offsets)]},
        "splits": entries,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ----------------------------------------------------------------------------------------------------------------------
# Export: slowrun's own .pt files


def slowrun_comparable(config: dict) -> bool:
    """Whether slowrun's published hashes apply: its repository, budgets and document marker."""
    return (config["repo_id"] == DEFAULT_REPO_ID and config["bos_id"] == GPT2_EOT
            and config["val_tokens"] == DEFAULT_BUDGETS["val"] and config["train_tokens"] == DEFAULT_BUDGETS["train"])


def save_slowrun_pt(path: str, tokens: np.ndarray, bos_id: int, seed: int) -> None:
    """Writes the dict that slowrun's prepare_data.py writes, atomically. torch.save stores the file's base name
    inside the archive, so the temporary file keeps the final name, in a folder of its own."""
    import torch
    payload = {
        "tokens": torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.uint16).copy()),
        "doc_starts": torch.from_numpy(document_starts(tokens, bos_id)),
        "bos_id": int(bos_id),
        "seq_shuffle_seed": int(seed),
        "seq_size": int(SLOWRUN_SEQ_SIZE),
    }
    folder = os.path.join(os.path.dirname(path), f".export.tmp{os.getpid()}")
    os.makedirs(folder, exist_ok=True)
    try:
        temporary = os.path.join(folder, os.path.basename(path))
        torch.save(payload, temporary)
        os.replace(temporary, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def export_slowrun(out_dir: str, manifest: dict) -> bool:
    """Writes (or verifies) fineweb_val.pt and fineweb_train.pt; prints whether each equals slowrun's published
    sha256. A mismatch is reported, not fatal. Returns whether the manifest changed."""
    config, recorded = manifest["config"], manifest.setdefault("export", {}).setdefault("slowrun", {})
    comparable, changed = slowrun_comparable(config), False
    for name, (file, seed, published) in SLOWRUN_EXPORT.items():
        path = os.path.join(out_dir, file)
        entry = recorded.get(name)
        if not (isinstance(entry, dict) and os.path.isfile(path)
                and file_sha256(path, f"verify {file}") == entry.get("sha256")):
            save_slowrun_pt(path, read_shard(os.path.join(out_dir, SPLIT_FILES[name])), config["bos_id"], seed)
            entry = recorded[name] = {"file": file, "sha256": file_sha256(path), "published_sha256": published}
            changed = True
        entry["matches_published"] = entry["sha256"] == published
        if entry["matches_published"]:
            verdict = "equals slowrun's published sha256"
        else:
            verdict = f"DIFFERS from slowrun's published sha256 {published} (reported, not fatal"
            verdict += ")" if comparable else (": expected, this is not slowrun's repository, budgets and marker)")
        print(f"  {file}: sha256 {entry['sha256']} {verdict}")
    return changed


# ----------------------------------------------------------------------------------------------------------------------
# Command line


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def token_count(text: str) -> int:
    try:
        value = int(text.replace(",", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of tokens") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: a token count cannot be negative")
    return value


def token_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a token id") from None
    if not 0 <= value < 2**16:
        raise argparse.ArgumentTypeError(f"{text}: a token id of a .bin shard lies in [0, 65536)")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="data/fineweb.py", description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--out_dir", default=DEFAULT_OUT_DIR, help="where the splits and manifest.json go (default: data/fineweb)")
    parser.add_argument("--val_tokens", type=token_count, default=DEFAULT_BUDGETS["val"],
                        help="val: stream tokens [0, N) (default: 10,000,000)")
    parser.add_argument("--train_tokens", type=token_count, default=DEFAULT_BUDGETS["train"],
                        help="train: N tokens from the first document start at or after the end of val "
                             "(default: 100,000,000)")
    parser.add_argument("--test_tokens", type=token_count, default=DEFAULT_BUDGETS["test"],
                        help="held-out test: N tokens from the first document start at or after the end of "
                             "train; 0 = no test split (default: 10,000,000)")
    parser.add_argument("--repo_id", default=DEFAULT_REPO_ID, help=f"Hub dataset repository holding the stream (default: {DEFAULT_REPO_ID})")
    parser.add_argument("--revision", default="main", help="branch, tag or commit of the repository (default: main)")
    parser.add_argument("--endpoint", default=None,
                        help="Hub endpoint (default: $HF_ENDPOINT, else https://huggingface.co)")
    parser.add_argument("--cache_dir", default=None,
                        help="download cache (default: huggingface_hub's, $HF_HUB_CACHE or ~/.cache/huggingface/hub)")
    parser.add_argument("--source_dir", default=None,
                        help="read the shards from this folder instead of the Hub (offline use)")
    parser.add_argument("--bos_id", type=token_id, default=GPT2_EOT, help="the token that opens every document (default: 50256, <|endoftext|>)")
    parser.add_argument("--export", choices=["slowrun"], default=None,
                        help="also write slowrun's fineweb_val.pt / fineweb_train.pt and compare their sha256")
    parser.add_argument("--force", action="store_true", help="cut again even when the output verifies")
    args = parser.parse_args(argv)
    if args.val_tokens < 1 or args.train_tokens < 1:
        parser.error("--val_tokens and --train_tokens must be at least 1")
    if args.source_dir is not None and not os.path.isdir(args.source_dir):  # not 'the stream ends after 0 tokens'
        parser.error(f"--source_dir {args.source_dir}: " + ("a file, not a folder of shards"
                                                             if os.path.exists(args.source_dir) else "no such folder"))
    args.out_dir = os.path.abspath(args.out_dir)
    # huggingface_hub reads HF_ENDPOINT once, when imported; reading it here as well lets a caller that set it later
    # (a test serving stand-in shards) reach the same endpoint.
    args.endpoint = (args.endpoint or os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None
    return args


def run(args: argparse.Namespace) -> int:
    os.makedirs(args.out_dir, exist_ok=True)
    config = config_of(args)
    manifest = read_manifest(args.out_dir)
    problem = "--force" if args.force else outputs_problem(args.out_dir, manifest, config)
    if problem:
        print(f"fineweb: cutting {args.out_dir} ({problem})")
        manifest = cut(args, args.out_dir)
        write_manifest(args.out_dir, manifest)
        print(f"fineweb: wrote {os.path.join(args.out_dir, MANIFEST_FILE)}")
    else:
        print(f"fineweb: {args.out_dir} is complete and its sha256 hashes match {MANIFEST_FILE}: nothing to do")
    if args.export == "slowrun" and export_slowrun(args.out_dir, manifest):
        write_manifest(args.out_dir, manifest)
    return 0


# what an output folder that cannot take the files says (read-only, full, over quota, not a folder, no permission)
WRITE_FAILURES = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST,
                  errno.EFBIG}


def remove_own_temporaries(out_dir: str) -> None:
    """The `.tmp<pid>` partials this process left in out_dir when a write failed: a full disk must not stay full."""
    suffix = f".tmp{os.getpid()}"
    for name in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
        if name.endswith(suffix):
            path = os.path.join(out_dir, name)
            if os.path.isdir(path):  # save_slowrun_pt's folder
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except DataError as error:
        print(f"error: {one_line(error, 1000)}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno not in WRITE_FAILURES:
            raise
        remove_own_temporaries(args.out_dir)
        print(f"error: {error.filename or args.out_dir}: cannot write the output there "
              f"({error.strerror or one_line(error)})", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
