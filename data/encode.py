"""
Text files (plain or JSONL) -> modded-nanogpt .bin token shards for train_gpt.py.

    python data/encode.py my_corpus.txt --doc_split blank_line --out_dir data/mine --name mine
                                        # GPT-2's BPE from the bundled data/gpt2.tiktoken: no download
    python data/encode.py a.jsonl b.jsonl --text_field content --out_dir data/mine --name mine

Every document becomes <|endoftext|> (50256) followed by its GPT-2 tokens (tiktoken `encode_ordinary`: special-token
text inside a document is encoded as plain text). The LAST whole documents holding at least --val_tokens tokens go to
<name>_val.bin, the rest to <name>_train.bin (or <name>_train_000000.bin, _000001, ... when the train split is
larger than --shard_tokens); with --test_tokens the very last documents go to <name>_test.bin and val comes just
before them. Documents are never cut: not between splits, not between shards.

--tokenizer bytes instead writes each document as its UTF-8 bytes (ids 0-255) opened by the separator 256 (a
vocabulary of 257; the mini track's data/mini/ is made so). The shard header (train_gpt.SHARD_TOKENIZERS) records
which tokenizer made it, and train_gpt.py refuses a shard made by another tokenizer than the run's --tokenizer.

--tokenizer bpe --bpe_file F: a small byte-level BPE of your own, learned from the train split (--train_bpe V: a
vocabulary of V ids; 0-255 are the bytes, 256 the document separator, 257.. the merges in the order learned), written
to F as `base64(token bytes) id` lines (tiktoken's format) and encoded with tiktoken. The split is then counted in
the byte tokenizer's units (UTF-8 bytes + 1 per document), so --val_tokens/--test_tokens pick the same documents as a
--tokenizer bytes split with the same numbers, and the BPE is learned from train documents only (--bpe_train_bytes N:
only the first ones within N such units, e.g. the mini track's 262,144). The shard header holds a checksum of F, so
train_gpt.py refuses shards of another BPE.

How a plain text file splits into documents (--doc_split; JSONL files hold one document per line whatever it says):
  file        the whole file is one document
  blank_line  paragraph blocks separated by one or more blank (empty or whitespace-only) lines
  line        every line is a document
  joined      documents that were concatenated with no separator at all ("...the end.The Next Title"): a boundary
              is guessed wherever a sentence end or a lower-case word runs straight into a capitalised word with no
              whitespace between (rules in `joined_boundaries`). A heuristic: see data/README.md for its limits.
--min_doc_chars N then merges consecutive documents of the same file until each holds at least N characters (the
merged document is the file's text from the first one's start to the last one's end, separators included), e.g.
to group the short speeches of a play into scenes-sized documents.

Files are read as UTF-8 with universal newlines (\\r\\n -> \\n); names ending in .gz are decompressed. Errors are one
line, `error: ...`, with exit code 2. `import` of this file does nothing; `main(argv)` runs it.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import sys
import zlib

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(_HERE)
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
from train_gpt import BYTE_SEPARATOR, DataError, Hyperparameters, read_shard, write_shard  # noqa: E402,F401

BOS_ID = Hyperparameters.bos_id  # <|endoftext|> = 50256: opens every document

BUNDLED_VOCAB = os.path.join(_HERE, "gpt2.tiktoken")  # OpenAI's GPT-2 BPE ranks, MIT (from openai/whisper)
GPT2_RANKS = 50256  # mergeable BPE ranks of GPT-2 (ids 0..50255); <|endoftext|> is the one special token
# GPT-2's pre-tokenisation regex, as tiktoken spells it for "gpt2" (r50k_pat_str); the fallback is the same split
# for tiktoken versions that do not export the constant.
GPT2_PATTERN_FALLBACK = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
DOC_SPLITS = ("file", "blank_line", "line", "joined")
TOKENIZERS = ("gpt2", "bytes", "bpe")  # the names train_gpt's shard header and --tokenizer use
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")


class TokenizeError(Exception):
    """A problem with the inputs or the options: printed as one `error: ...` line, exit code 2."""


# ----------------------------------------------------------------------------------------------------------------------
# The tokenizer


def gpt2_pattern() -> str:
    """GPT-2's pre-tokenisation regex, as tiktoken spells it (r50k_pat_str), or the same split where not exported."""
    try:
        from tiktoken_ext.openai_public import r50k_pat_str
    except ImportError:
        return GPT2_PATTERN_FALLBACK
    return r50k_pat_str


def gpt2_encoding(vocab_path: str | None = None):
    """GPT-2's BPE as a tiktoken Encoding. With vocab_path: built offline from a local file, either tiktoken's
    `gpt2.tiktoken` or a folder holding it (or OpenAI's encoder.json + vocab.bpe). Without: tiktoken's "gpt2",
    which downloads the files on first use."""
    import tiktoken
    if vocab_path is None:
        return tiktoken.get_encoding("gpt2")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks, load_tiktoken_bpe
    if os.path.isdir(vocab_path):
        tiktoken_file = os.path.join(vocab_path, "gpt2.tiktoken")
        encoder_json, vocab_bpe = os.path.join(vocab_path, "encoder.json"), os.path.join(vocab_path, "vocab.bpe")
        if os.path.isfile(tiktoken_file):
            vocab_path = tiktoken_file
        elif os.path.isfile(encoder_json) and os.path.isfile(vocab_bpe):
            vocab_path = None
        else:
            raise TokenizeError(f"--vocab {vocab_path}: folder holds neither gpt2.tiktoken nor encoder.json + vocab.bpe")
    elif not os.path.isfile(vocab_path):
        raise TokenizeError(f"--vocab {vocab_path}: file not found")
    try:
        if vocab_path is None:
            ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=vocab_bpe, encoder_json_file=encoder_json)
        else:
            ranks = load_tiktoken_bpe(vocab_path)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the same one-line complaint
        raise TokenizeError(f"--vocab {vocab_path}: not a GPT-2 BPE file ({type(exc).__name__}: {exc})") from None
    if len(ranks) != GPT2_RANKS:
        raise TokenizeError(f"--vocab {vocab_path}: {len(ranks):,} BPE ranks, expected GPT-2's {GPT2_RANKS:,}")
    pattern = gpt2_pattern()
    encoding = tiktoken.Encoding(name="gpt2_local", pat_str=pattern, mergeable_ranks=ranks,
                                 special_tokens={"<|endoftext|>": BOS_ID}, explicit_n_vocab=GPT2_RANKS + 1)
    if encoding.encode_ordinary("Hello world") != [15496, 995]:
        raise TokenizeError(f"--vocab {vocab_path}: 'Hello world' does not encode to GPT-2's [15496, 995]")
    return encoding


class ByteEncoding:
    """The byte tokenizer: a document is its UTF-8 bytes (ids 0-255), opened by the separator 256 (vocabulary 257).
    No merges to learn and nothing out of vocabulary; every token is one byte, so nats per token are nats per byte.
    The same calls as a tiktoken Encoding where tokenize_files uses one."""
    name = "bytes"
    bos_id = BYTE_SEPARATOR
    n_vocab = BYTE_SEPARATOR + 1

    def encode_ordinary(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        """One document's ids (no separator) -> its text; invalid UTF-8 is an error, never replaced."""
        return bytes(int(i) for i in ids).decode("utf-8")


def decode_byte_documents(tokens) -> list[str]:
    """A byte shard's tokens -> its documents' texts (each separator opens one)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    starts = np.flatnonzero(tokens == BYTE_SEPARATOR)
    ends = np.append(starts[1:], tokens.size)
    return [ByteEncoding().decode(tokens[start + 1:end]) for start, end in zip(starts, ends)]


# ----------------------------------------------------------------------------------------------------------------------
# A small byte-level BPE learned from the train split (issue 17: bytes or a small BPE for the mini track?)


def train_bpe(texts: list[str], vocab_size: int, quiet: bool = True) -> list[bytes]:
    """Byte-level BPE (Sennrich et al. 2016 on UTF-8 bytes, as GPT-2): the texts are cut into pieces by GPT-2's
    pre-tokenisation regex (merges never cross a piece boundary: a space opens a word, digits and punctuation stay
    apart), then the most frequent adjacent pair of ids is merged into a new id, vocab_size - 257 times (ties: the
    pair with the smaller ids). Returns every id's bytes: 0-255 the bytes, 256 the separator (b""), 257.. the merges.
    Pair counts are updated only in the pieces a merge touches, so 768 merges of a 262 kB text take seconds."""
    import collections

    import regex
    if vocab_size < BYTE_SEPARATOR + 1 or vocab_size > 2**16:
        raise TokenizeError(f"--train_bpe {vocab_size}: the vocabulary must hold 257 ids (bytes and separator) and "
                            f"at most 65,536 (uint16 shards)")
    pattern = gpt2_pattern()
    piece_counts = collections.Counter(piece for text in texts for piece in regex.findall(pattern, text))
    pieces = [list(piece.encode("utf-8")) for piece in piece_counts]
    counts = list(piece_counts.values())
    pair_counts: collections.Counter = collections.Counter()
    pieces_with = collections.defaultdict(set)  # pair -> indices of the pieces holding it
    for index, ids in enumerate(pieces):
        for pair in zip(ids, ids[1:]):
            pair_counts[pair] += counts[index]
            pieces_with[pair].add(index)
    vocabulary = [bytes([i]) for i in range(256)] + [b""]
    while len(vocabulary) < vocab_size and pair_counts:
        best = max(pair_counts, key=lambda pair: (pair_counts[pair], -pair[0], -pair[1]))
        new_id = len(vocabulary)
        vocabulary.append(vocabulary[best[0]] + vocabulary[best[1]])
        for index in pieces_with.pop(best):
            old, merged, position = pieces[index], [], 0
            while position < len(old):
                if position + 1 < len(old) and (old[position], old[position + 1]) == best:
                    merged.append(new_id)
                    position += 2
                else:
                    merged.append(old[position])
                    position += 1
            for pair in zip(old, old[1:]):
                pair_counts[pair] -= counts[index]
                if pair_counts[pair] <= 0:
                    del pair_counts[pair]
                if pair != best:
                    pieces_with[pair].discard(index)
            for pair in zip(merged, merged[1:]):
                pair_counts[pair] += counts[index]
                pieces_with[pair].add(index)
            pieces[index] = merged
        pair_counts.pop(best, None)
    if not quiet:
        print(f"BPE: {len(vocabulary) - BYTE_SEPARATOR - 1:,} merges learned from {sum(map(len, texts)):,} "
              f"characters ({len(piece_counts):,} distinct pieces)")
    return vocabulary


def write_bpe(path: str, vocabulary: list[bytes]) -> None:
    """The vocabulary as tiktoken's ranks file: one `base64(token bytes) id` line per id, the separator left out."""
    import base64
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        for token_id, token in enumerate(vocabulary):
            if token_id != BYTE_SEPARATOR:
                handle.write(f"{base64.b64encode(token).decode()} {token_id}\n")


class BpeEncoding:
    """A BPE ranks file written by write_bpe, as a tiktoken Encoding (its Rust encoder): ids 0-255 the bytes, 256 the
    separator that opens every document, then the merges. The same calls as ByteEncoding."""
    name = "bpe"
    bos_id = BYTE_SEPARATOR

    def __init__(self, path: str):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
        if not os.path.isfile(path):
            raise TokenizeError(f"--bpe_file {path}: file not found (make it with --train_bpe VOCAB_SIZE)")
        try:
            ranks = load_tiktoken_bpe(path)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the same one-line complaint
            raise TokenizeError(f"--bpe_file {path}: not a BPE ranks file ({type(exc).__name__}: {exc})") from None
        if any(ranks.get(bytes([i])) != i for i in range(256)) or BYTE_SEPARATOR in ranks.values():
            raise TokenizeError(f"--bpe_file {path}: ids 0-255 must be the single bytes and 256 unused (the separator)")
        pattern = gpt2_pattern()
        self.n_vocab = max(ranks.values()) + 1
        self._encoding = tiktoken.Encoding(name="slowrun_bpe", pat_str=pattern, mergeable_ranks=ranks,
                                           special_tokens={"<|separator|>": BYTE_SEPARATOR})
        self._bytes = {token_id: token for token, token_id in ranks.items()}

    def encode_ordinary(self, text: str) -> list[int]:
        return self._encoding.encode_ordinary(text)

    def decode(self, ids) -> str:
        """One document's ids (no separator) -> its text; invalid UTF-8 is an error, never replaced."""
        return b"".join(self._bytes[int(i)] for i in ids).decode("utf-8")


def make_encoding(tokenizer: str, vocab_path: str | None, bpe_file: str | None = None):
    if tokenizer == "bytes":
        return ByteEncoding()
    if tokenizer == "bpe":
        return BpeEncoding(bpe_file)
    if tokenizer != "gpt2":
        raise TokenizeError(f"--tokenizer {tokenizer!r}: use one of {', '.join(TOKENIZERS)}")
    return gpt2_encoding(vocab_path)


# ----------------------------------------------------------------------------------------------------------------------
# Documents: where a text file splits, as (start, end) character spans of the file's text

_BLANK_LINES = re.compile(r"\n(?:[ \t\f\v]*\n)+")  # one or more blank (empty or whitespace-only) lines

# joined: a boundary candidate is a position where no whitespace separates ...
_SENTENCE_JOIN = re.compile(  # (a) a sentence end [.!?], maybe closed by quotes/brackets, from a capital letter
    r"""(?<=[^\s])[.!?]+[”"’')\]>]*(?=[“"]?[A-Z])""")
_CASE_JOIN = re.compile(r"(?<=[a-z])(?=[A-Z])")  # (b) a lower-case letter from a capital letter
_WORD = re.compile(r"[A-Za-z]+")
# Abbreviations that end in a period and may run into a capitalised word ("Dr.Smith"): never a document end.
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr prof gen sen rep rev col capt lt sgt mt ft fig figs vol vols no nos vs etc al approx "
    "dept univ est jan feb mar apr jun jul aug sep sept oct nov dec".split())


def _letters_before(text: str, end: int) -> str:
    """The run of ASCII letters ending just before `end`."""
    start = end
    while start > 0 and text[start - 1].isascii() and text[start - 1].isalpha():
        start -= 1
    return text[start:end]


def _letters_after(text: str, start: int) -> str:
    end = start
    while end < len(text) and text[end].isascii() and text[end].isalpha():
        end += 1
    return text[start:end]


def joined_boundaries(text: str) -> list[int]:
    """Guessed start offsets of the documents after the first, in text whose documents were concatenated with no
    separator. Two kinds of join, both with no whitespace between the two sides:

    (a) sentence end + capital: "...pursuit of happiness.Taking Play Seriously", "...it.”I’m", "...gardener.)The".
        Not when the period closes an abbreviation: the letters before it are one letter ("U.S", "e.g"), two
        letters starting with a capital ("Ph.D", "Co.As", "Mr"), or a listed abbreviation ("Fig", "No", "etc");
        nor when the capital is a lone initial followed by a period ("Ph.D.", "A.D.A.M."); nor after an ellipsis of
        four or more dots straight after a word ("transcribers....He scored": an elision inside a quotation).
    (b) a lower-case word running into a capitalised one: "...climate change is still an issueBolivia: ...",
        "...found this helpfulThese LEDs ...". camelCase names (TechSoup, iPod, pH, partlyLocated) look the same, so
        (b) needs all of: the letters before the capital are one all-lower-case word of at least 3 letters (this
        drops CobraNet, McDonald, DataCenter, and also real joins after a capitalised word, such as
        "...Federal Highway AdministrationDengue Fever"), the whole letter run occurs only once in the text (a name
        recurs; a join of two documents is unique), and both parts occur elsewhere in the text as words of their
        own (case-insensitive).
    Missed: joins after digits or other symbols ("...0713NetWellness"), documents that start in lower case, and
    documents that end at the end of a line (those look like ordinary line breaks)."""
    boundaries = set()
    for match in _SENTENCE_JOIN.finditer(text):
        punctuation, start = match.group(), match.end()
        period = match.start() + punctuation.find(".")
        if punctuation.startswith("...."):
            if _letters_before(text, match.start()):
                continue
        elif punctuation.startswith(".") and not punctuation.startswith(".."):
            before = _letters_before(text, period)
            if len(before) == 1 or (len(before) == 2 and before[0].isupper()) or before.lower() in _ABBREVIATIONS:
                continue
        capital = start + 1 if text[start] in "“\"" else start
        if text[capital + 1:capital + 2] == ".":  # a lone initial: "Ph.D.", "A.D.A.M."
            continue
        boundaries.add(start)
    word_counts: dict[str, int] = {}
    run_counts: dict[str, int] = {}
    for word in _WORD.findall(text):
        run_counts[word] = run_counts.get(word, 0) + 1
        word_counts[word.lower()] = word_counts.get(word.lower(), 0) + 1
    for match in _CASE_JOIN.finditer(text):
        start = match.start()
        before, after = _letters_before(text, start), _letters_after(text, start)
        after_part = re.match(r"[A-Z][a-z]*|[A-Z]+", after).group()  # "Bolivia" of "BoliviaTimes", "NINE" of "NINE"
        if len(before) < 3 or not before.islower() or run_counts.get(before + after, 0) != 1:
            continue
        if word_counts.get(before, 0) < 1 or word_counts.get(after_part.lower(), 0) < 1:
            continue
        boundaries.add(start)
    return sorted(boundaries)


def document_spans(text: str, doc_split: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the documents in one text file's contents, in order; may include empty or
    whitespace-only spans (the caller drops those)."""
    if doc_split == "file":
        return [(0, len(text))]
    if doc_split == "line":
        spans, start = [], 0
        for match in re.finditer(r"\n", text):
            spans.append((start, match.start()))
            start = match.end()
        return spans + [(start, len(text))]
    if doc_split == "blank_line":
        spans, start = [], 0
        for match in _BLANK_LINES.finditer(text):
            spans.append((start, match.start()))
            start = match.end()
        return spans + [(start, len(text))]
    if doc_split == "joined":
        edges = [0, *joined_boundaries(text), len(text)]
        return list(zip(edges[:-1], edges[1:]))
    raise ValueError(f"unknown doc_split {doc_split!r}")


def merge_short(spans: list[tuple[int, int]], min_chars: int) -> list[tuple[int, int]]:
    """Merges consecutive spans until each covers at least min_chars characters (the last one may fall short)."""
    if min_chars <= 0:
        return spans
    merged: list[tuple[int, int]] = []
    first_start = None
    for start, end in spans:
        if first_start is None:
            first_start = start
        if end - first_start >= min_chars:
            merged.append((first_start, end))
            first_start = None
    if first_start is not None:
        if merged and spans[-1][1] - first_start < min_chars:  # a short tail joins the previous document
            merged[-1] = (merged[-1][0], spans[-1][1])
        else:
            merged.append((first_start, spans[-1][1]))
    return merged


# ----------------------------------------------------------------------------------------------------------------------
# Reading the inputs


def check_input(path: str) -> None:
    if os.path.isdir(path):
        raise TokenizeError(f"{path}: a folder, not a text file (name the files in it)")
    if not os.path.isfile(path):
        raise TokenizeError(f"{path}: file not found")


def _open_text(path: str):
    check_input(path)
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def is_jsonl(path: str, input_format: str) -> bool:
    if input_format != "auto":
        return input_format == "jsonl"
    return path.lower().endswith(JSONL_SUFFIXES)


def read_documents(path: str, input_format: str, doc_split: str, text_field: str, min_doc_chars: int = 0):
    """Yields (document text, input characters consumed) for one file, skipping empty/whitespace-only documents."""
    try:
        with _open_text(path) as handle:
            if is_jsonl(path, input_format):
                for line_number, line in enumerate(handle, start=1):
                    if not line.strip():
                        yield "", len(line)
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise TokenizeError(f"{path}:{line_number}: not valid JSON ({exc.msg})") from None
                    if not isinstance(record, dict):
                        raise TokenizeError(f"{path}:{line_number}: a JSON {type(record).__name__}, expected an "
                                            f"object with a {text_field!r} field")
                    if text_field not in record:
                        raise TokenizeError(f"{path}:{line_number}: no {text_field!r} field (fields: "
                                            f"{', '.join(map(repr, list(record)[:8])) or 'none'}; see --text_field)")
                    text = record[text_field]
                    if not isinstance(text, str):
                        raise TokenizeError(f"{path}:{line_number}: field {text_field!r} is a JSON "
                                            f"{type(text).__name__}, expected a string")
                    yield (text if text.strip() else ""), len(line)
                return
            text = handle.read()
    except UnicodeDecodeError as exc:
        raise TokenizeError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start:,})") from None
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError; a cut .gz ends in EOFError
        detail = (exc.strerror if isinstance(exc, OSError) else "") or str(exc) or type(exc).__name__
        raise TokenizeError(f"{path}: cannot read it ({detail})") from None
    spans = merge_short([(s, e) for s, e in document_spans(text, doc_split) if text[s:e].strip()], min_doc_chars)
    consumed = 0
    for start, end in spans:
        yield text[start:end], end - consumed
        consumed = end
    yield "", len(text) - consumed


# ----------------------------------------------------------------------------------------------------------------------
# Splitting and writing


def split_point(doc_lengths: np.ndarray, val_tokens: int, flag: str = "--val_tokens") -> int:
    """Index of the first validation document: the fewest last documents whose tokens (BOS included) reach
    val_tokens. len(doc_lengths) when val_tokens is 0. At least one document must stay in train."""
    if val_tokens <= 0:
        return len(doc_lengths)
    from_end = np.cumsum(doc_lengths[::-1])
    reached = np.flatnonzero(from_end >= val_tokens)
    most_val = int(from_end[-2]) if len(doc_lengths) > 1 else 0
    if reached.size == 0 or reached[0] >= len(doc_lengths) - 1:
        raise TokenizeError(f"{flag} {val_tokens:,} is more than the data allows: the {len(doc_lengths):,} "
                            f"documents hold {int(from_end[-1]):,} tokens and at least one whole document must stay "
                            f"in train, so val can hold at most {most_val:,}")
    return len(doc_lengths) - 1 - int(reached[0])


def shard_ranges(doc_lengths: np.ndarray, shard_tokens: int) -> list[tuple[int, int]]:
    """(first doc, end doc) of each train shard: whole documents, at most shard_tokens tokens per shard unless one
    document alone is longer (then it gets a shard of its own)."""
    ranges, first, tokens = [], 0, 0
    for index, length in enumerate(doc_lengths.tolist()):
        if tokens and shard_tokens > 0 and tokens + length > shard_tokens:
            ranges.append((first, index))
            first, tokens = index, 0
        tokens += length
    ranges.append((first, len(doc_lengths)))
    return ranges


def _progress(total_chars: int, quiet: bool):
    """A tqdm bar over input characters on long inputs (a no-op object otherwise, or when tqdm is missing)."""
    class _Silent:
        def update(self, _):
            pass

        def close(self):
            pass
    if quiet or total_chars < 4_000_000:
        return _Silent()
    try:
        from tqdm import tqdm
    except ImportError:
        return _Silent()
    return tqdm(total=total_chars, unit="char", unit_scale=True, desc="tokenizing", file=sys.stderr)


def tokenize_files(paths: list[str], encoding, input_format: str = "auto", doc_split: str = "blank_line",
                   text_field: str = "text", min_doc_chars: int = 0, quiet: bool = True,
                   texts: list[str] | None = None) -> list[np.ndarray]:
    """One uint16 array per non-empty document: BOS then the document's tokens, in input order. texts: the
    documents already read (iter_texts), so the files are not read again."""
    bos_id = getattr(encoding, "bos_id", BOS_ID)
    source = texts if texts is not None else iter_texts(paths, input_format, doc_split, text_field, min_doc_chars,
                                                        quiet)
    return [np.array([bos_id, *encoding.encode_ordinary(text)], dtype=np.uint16) for text in source]


def iter_texts(paths: list[str], input_format: str = "auto", doc_split: str = "blank_line",
               text_field: str = "text", min_doc_chars: int = 0, quiet: bool = True):
    """Yields every non-empty document's text, in input order, with a progress bar over the input (the caller
    tokenizes each as it comes)."""
    for path in paths:  # every missing file is reported before any work is done
        if not os.path.isfile(path):
            raise TokenizeError(f"{path}: file not found")
    total = sum(os.path.getsize(path) for path in paths)  # bytes: close enough to characters for a progress bar
    bar = _progress(total, quiet)
    found = False
    try:
        for path in paths:
            for text, consumed in read_documents(path, input_format, doc_split, text_field, min_doc_chars):
                if text:
                    found = True
                    yield text
                bar.update(consumed)
    finally:
        bar.close()
    if not found:
        raise TokenizeError(f"no documents: {', '.join(paths)} hold no non-empty text"
                            + (f" in field {text_field!r}" if any(is_jsonl(p, input_format) for p in paths) else ""))


def _stale_outputs(out_dir: str, name: str) -> list[str]:
    """Files a previous run of this name may have left: they would mix into a glob of the new ones."""
    if not os.path.isdir(out_dir):
        return []
    pattern = re.compile(rf"{re.escape(name)}_(?:train|val|test)(?:_\d{{6}})?\.bin")
    return sorted(os.path.join(out_dir, entry) for entry in os.listdir(out_dir) if pattern.fullmatch(entry))


def byte_units(texts: list[str]) -> np.ndarray:
    """Each document's length in the byte tokenizer's tokens: its UTF-8 bytes and the separator."""
    return np.array([len(text.encode("utf-8")) + 1 for text in texts], dtype=np.int64)


def split_documents(lengths: np.ndarray, val_tokens: int, test_tokens: int) -> tuple[int, int]:
    """(first val document, first test document): test is the last whole documents, val the ones before them."""
    first_test = split_point(lengths, test_tokens, "--test_tokens")
    return split_point(lengths[:first_test], val_tokens), first_test


def write_splits(documents: list[np.ndarray], out_dir: str, name: str, val_tokens: int,
                 shard_tokens: int, tokenizer: str = "gpt2", test_tokens: int = 0, bpe_file: str = "",
                 split_lengths: np.ndarray | None = None) -> dict:
    """Writes the train shard(s), the val file and (test_tokens > 0) the test file: test is the last whole documents,
    val the ones before them; returns a summary. split_lengths: the document lengths the split counts (default the
    tokens written; a BPE split counts byte_units)."""
    lengths = np.array([doc.size for doc in documents], dtype=np.int64)
    first_val, first_test = split_documents(lengths if split_lengths is None else split_lengths, val_tokens,
                                            test_tokens)
    train_ranges = shard_ranges(lengths[:first_val], shard_tokens)
    outputs = []  # (path, first doc, end doc)
    if len(train_ranges) == 1:
        outputs.append((os.path.join(out_dir, f"{name}_train.bin"), 0, first_val))
    else:
        outputs += [(os.path.join(out_dir, f"{name}_train_{index:06d}.bin"), first, end)
                    for index, (first, end) in enumerate(train_ranges)]
    if first_val < first_test:
        outputs.append((os.path.join(out_dir, f"{name}_val.bin"), first_val, first_test))
    if first_test < len(documents):
        outputs.append((os.path.join(out_dir, f"{name}_test.bin"), first_test, len(documents)))
    written = {os.path.abspath(path) for path, _, _ in outputs}
    removed = [path for path in _stale_outputs(out_dir, name) if os.path.abspath(path) not in written]
    for path in removed:
        os.remove(path)
    files = []
    for path, first, end in outputs:
        write_shard(path, np.concatenate(documents[first:end]), tokenizer, bpe_file)
        files.append({"path": path, "documents": end - first, "tokens": int(lengths[first:end].sum())})
    return {"documents": len(documents), "tokens": int(lengths.sum()),
            "train_documents": first_val, "train_tokens": int(lengths[:first_val].sum()),
            "val_documents": first_test - first_val, "val_tokens": int(lengths[first_val:first_test].sum()),
            "test_documents": len(documents) - first_test, "test_tokens": int(lengths[first_test:].sum()),
            "files": files, "removed": removed}


# ----------------------------------------------------------------------------------------------------------------------
# Command line


class OneLineParser(argparse.ArgumentParser):
    """argparse's errors as the script's others: one `error: ...` line and exit status 2 (not the usage block)."""

    def error(self, message: str):
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python data/encode.py",
        description="Tokenize text or JSONL files with GPT-2's BPE into modded-nanogpt .bin shards "
                    "(<|endoftext|> before every document; the last documents form the val split).")
    parser.add_argument("inputs", nargs="+", help="text files, or JSONL files (.jsonl: one JSON object per line)")
    parser.add_argument("--out_dir", required=True, help="folder for the .bin files (made if missing)")
    parser.add_argument("--name", required=True, help="file prefix: <name>_train.bin, <name>_val.bin")
    parser.add_argument("--doc_split", choices=DOC_SPLITS, default="blank_line",
                        help="how a plain text file splits into documents (default: blank_line); see the module doc")
    parser.add_argument("--min_doc_chars", type=int, default=0,
                        help="merge consecutive documents of a text file until each has this many characters (0 = off)")
    parser.add_argument("--format", dest="input_format", choices=("auto", "text", "jsonl"), default="auto",
                        help="input format (auto: .jsonl/.ndjson[.gz] are JSONL, anything else plain text)")
    parser.add_argument("--text_field", default="text", help="the JSONL field holding a document's text")
    parser.add_argument("--val_tokens", type=int, default=32768,
                        help="the last whole documents holding at least this many tokens form the val split "
                             "(0 = no val file; default 32768)")
    parser.add_argument("--test_tokens", type=int, default=0,
                        help="the last whole documents holding at least this many tokens form a held-out test split, "
                             "<name>_test.bin, and val comes from the documents before them (default 0: no test)")
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default="gpt2",
                        help="gpt2: GPT-2's BPE (default) | bytes: UTF-8 bytes, ids 0-255, with 256 opening every "
                             "document (vocabulary 257; train with --tokenizer bytes --vocab_size 257 --bos_id 256, "
                             "as --preset mini does) | bpe: your own small BPE (--bpe_file, --train_bpe; the split then "
                             "counts byte units: UTF-8 bytes + 1 per document). The shard header records which")
    parser.add_argument("--bpe_file", default=None,
                        help="--tokenizer bpe: the BPE ranks file to encode with, or (with --train_bpe) to write")
    parser.add_argument("--train_bpe", type=int, default=0, metavar="VOCAB_SIZE",
                        help="--tokenizer bpe: first learn a byte-level BPE of this many ids (>= 257) from the train "
                             "documents and write it to --bpe_file")
    parser.add_argument("--bpe_train_bytes", type=int, default=0,
                        help="--train_bpe: learn only from the first train documents within this many byte units "
                             "(UTF-8 bytes + 1 per document, as --train_tokens cuts a byte shard; 0 = all train)")
    parser.add_argument("--shard_tokens", type=int, default=100_000_000,
                        help="most tokens per train shard; more train than this is split into numbered shards "
                             "(default 100M, as modded-nanogpt)")
    parser.add_argument("--vocab", default=BUNDLED_VOCAB if os.path.isfile(BUNDLED_VOCAB) else None,
                        help="GPT-2 BPE: a gpt2.tiktoken file, or a folder with it or with encoder.json + vocab.bpe "
                             "(default: the copy bundled in data/, so no download; else tiktoken's 'gpt2')")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    return parser


def run(args: argparse.Namespace) -> dict:
    if args.val_tokens < 0:
        raise TokenizeError(f"--val_tokens {args.val_tokens}: must be >= 0")
    if args.shard_tokens < 1:
        raise TokenizeError(f"--shard_tokens {args.shard_tokens}: must be >= 1")
    if args.min_doc_chars < 0:
        raise TokenizeError(f"--min_doc_chars {args.min_doc_chars}: must be >= 0")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", args.name):
        raise TokenizeError(f"--name {args.name!r}: use letters, digits, '.', '_' and '-' only")
    for path in args.inputs:
        check_input(path)
    if args.test_tokens < 0:
        raise TokenizeError(f"--test_tokens {args.test_tokens}: must be >= 0")
    if args.tokenizer == "bpe" and not args.bpe_file:
        raise TokenizeError("--tokenizer bpe needs --bpe_file (with --train_bpe VOCAB_SIZE to learn it first)")
    if (args.train_bpe or args.bpe_train_bytes) and args.tokenizer != "bpe":
        raise TokenizeError("--train_bpe and --bpe_train_bytes go with --tokenizer bpe")
    if args.bpe_train_bytes < 0:
        raise TokenizeError(f"--bpe_train_bytes {args.bpe_train_bytes}: must be >= 0")
    texts, split_lengths = None, None
    if args.tokenizer == "bpe":  # all texts first: the split (and the BPE learned from train) come before encoding
        texts = list(iter_texts(args.inputs, args.input_format, args.doc_split, args.text_field, args.min_doc_chars,
                                quiet=args.quiet))
        split_lengths = byte_units(texts)
    if args.train_bpe:  # learned from train documents only: the split is known before any BPE exists
        first_val, _ = split_documents(split_lengths, args.val_tokens, args.test_tokens)
        learn_from = first_val
        if args.bpe_train_bytes:  # the documents a byte shard's --train_tokens N keeps: those ending within N
            learn_from = max(1, int(np.searchsorted(np.cumsum(split_lengths[:first_val]), args.bpe_train_bytes,
                                                    side="right")))
        write_bpe(args.bpe_file, train_bpe(texts[:learn_from], args.train_bpe, quiet=args.quiet))
    encoding = make_encoding(args.tokenizer, args.vocab, args.bpe_file)
    documents = tokenize_files(args.inputs, encoding, args.input_format, args.doc_split, args.text_field,
                               args.min_doc_chars, quiet=args.quiet, texts=texts)
    summary = write_splits(documents, args.out_dir, args.name, args.val_tokens, args.shard_tokens, args.tokenizer,
                           args.test_tokens, args.bpe_file or "", split_lengths)
    if not args.quiet:
        print(f"{summary['documents']:,} documents, {summary['tokens']:,} tokens (BOS included) from "
              f"{len(args.inputs)} file(s)")
        print(f"train: {summary['train_documents']:,} documents, {summary['train_tokens']:,} tokens")
        print(f"val:   {summary['val_documents']:,} documents, {summary['val_tokens']:,} tokens")
        if summary["test_documents"]:
            print(f"test:  {summary['test_documents']:,} documents, {summary['test_tokens']:,} tokens")
        for path in summary["removed"]:
            print(f"removed stale {path}")
        for entry in summary["files"]:
            print(f"wrote {entry['path']}: {entry['documents']:,} documents, {entry['tokens']:,} tokens")
    return summary


def remove_own_temporaries(out_dir: str) -> None:
    """The `.tmp<pid>` partial shard this process left when a write failed: a full disk must not stay full."""
    suffix = f".tmp{os.getpid()}"
    for name in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
        if name.endswith(suffix):
            os.remove(os.path.join(out_dir, name))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (TokenizeError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the summary's reader went away (| head): the shards are written, nothing is wrong
        return 0
    except OSError as error:  # an output that cannot be written (not a folder, read-only, full): one line
        remove_own_temporaries(args.out_dir)
        target = os.fsdecode(error.filename) if error.filename else args.out_dir
        in_out_dir = os.path.abspath(target).startswith(os.path.join(os.path.abspath(args.out_dir), ""))
        where = (f"{args.out_dir}: cannot write the shards there" if in_out_dir or target == args.out_dir
                 else f"{target}: cannot write it")
        print(f"error: {where} ({error.strerror or error})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
