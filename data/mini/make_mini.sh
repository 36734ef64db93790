#!/usr/bin/env bash
# Rebuilds the mini track's byte shards (data/mini/, issue 17) from the bundled sample's FineWeb-Edu source text
# (fineweb_edu_sample_800k.txt: where it comes from and its sha256 are in data/sample/make_sample.sh), in the folder
# given as the first argument (default ../shared/data):
#   bash data/mini/make_mini.sh /path/to/texts
# The same 148 documents as the tiny sample (--doc_split joined), as UTF-8 bytes with separator 256 (vocabulary
# 257); the last whole documents holding >= 40,000 bytes are test, the ones before them holding >= 40,000 bytes are
# val, the rest (133 documents) train. The mini preset trains on the first 262,144 bytes of train (--train_tokens,
# cut back to a document start). Deterministic: the outputs' sha256 are listed in data/README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
SRC="${1:-../shared/data}"
python data/encode.py "$SRC/fineweb_edu_sample_800k.txt" --doc_split joined --tokenizer bytes \
  --out_dir data/mini --name mini --val_tokens 40000 --test_tokens 40000
sha256sum data/mini/*.bin
