#!/usr/bin/env bash
# Rebuilds the bundled sample shards from the texts in ../shared/data (see data/README.md). Deterministic: the
# outputs' sha256 are listed in data/README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
SRC="${1:-../shared/data}"
python data/tokenize.py "$SRC/fineweb_edu_sample_800k.txt" --doc_split joined \
  --out_dir data/sample --name fineweb_edu --vocab "$SRC/gpt2.tiktoken" --val_tokens 32768
python data/tokenize.py "$SRC/input.txt" --doc_split blank_line --min_doc_chars 2000 \
  --out_dir data/sample --name shakespeare --vocab "$SRC/gpt2.tiktoken" --val_tokens 32768
sha256sum data/sample/*.bin
