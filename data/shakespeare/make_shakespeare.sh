#!/usr/bin/env bash
# Rebuilds the Tiny Shakespeare byte shards (data/shakespeare/, issue 17's second domain) from input.txt of
# github.com/karpathy/char-rnn data/tinyshakespeare (commit 6f9487a, MIT; 1,115,394 bytes, sha256 86c4e6aa...565ed,
# see ../shared/data/SOURCES.md), in the folder given as the first argument (default ../shared/data):
#   bash data/shakespeare/make_shakespeare.sh /path/to/texts
# Speeches are separated by blank lines; --min_doc_chars 2000 groups consecutive speeches into contiguous
# ~2,000-byte documents (scene-sized pieces, never reordered). As UTF-8 bytes with separator 256 (vocabulary 257):
# the last whole documents holding >= 40,000 bytes are test, the ones before them holding >= 40,000 bytes are val,
# the rest train. The track trains on the first 262,144 bytes of train (bench/mini.py --domain shakespeare),
# cut back to a document start. Deterministic: the outputs' sha256 are listed in data/README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
SRC="${1:-../shared/data}"
echo "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed  $SRC/input.txt" | sha256sum -c -
python data/encode.py "$SRC/input.txt" --doc_split blank_line --min_doc_chars 2000 --tokenizer bytes \
  --out_dir data/shakespeare --name shakespeare --val_tokens 40000 --test_tokens 40000
sha256sum data/shakespeare/*.bin
