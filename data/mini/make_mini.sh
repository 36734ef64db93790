#!/usr/bin/env bash
# Rebuilds the mini track's byte shards (data/mini/, issue 17) from the bundled sample's FineWeb-Edu source text
# (fineweb_edu_sample_800k.txt: where it comes from and its sha256 are in data/sample/make_sample.sh), in the folder
# given as the first argument (default ../shared/data):
#   bash data/mini/make_mini.sh /path/to/texts
# The same 148 documents as the tiny sample (--doc_split joined), as UTF-8 bytes with separator 256 (vocabulary
# 257); the last whole documents holding >= 40,000 bytes are test, the ones before them holding >= 40,000 bytes are
# val, the rest (133 documents) train. The mini preset trains on the first 262,144 bytes of train (--train_tokens,
# cut back to a document start). Deterministic: the outputs' sha256 are listed in data/README.md.
#   bash data/mini/make_mini.sh /path/to/texts bpe
# also writes the same documents in two small BPEs learned from the track's 262,144 train bytes only (vocabularies of
# 512 and 1,024 ids: mini_bpe512.tiktoken, mini_bpe1024.tiktoken and their shards), for the "bytes or a small BPE?"
# comparison (bench/mini.py --domain bpe512 / bpe1024); the split counts bytes, so it holds the same documents.
set -euo pipefail
cd "$(dirname "$0")/../.."
SRC="${1:-../shared/data}"
python data/encode.py "$SRC/fineweb_edu_sample_800k.txt" --doc_split joined --tokenizer bytes \
  --out_dir data/mini --name mini --val_tokens 40000 --test_tokens 40000
if [ "${2:-}" = "bpe" ]; then
  for vocab in 512 1024; do
    python data/encode.py "$SRC/fineweb_edu_sample_800k.txt" --doc_split joined --tokenizer bpe \
      --bpe_file "data/mini/mini_bpe$vocab.tiktoken" --train_bpe "$vocab" --bpe_train_bytes 262144 \
      --out_dir data/mini --name "mini_bpe$vocab" --val_tokens 40000 --test_tokens 40000
  done
fi
sha256sum data/mini/*.bin data/mini/*.tiktoken 2>/dev/null
