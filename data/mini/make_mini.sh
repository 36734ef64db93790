#!/usr/bin/env bash
# Rebuilds the mini track's byte shards (data/mini/, issue 17) from the bundled sample's FineWeb-Edu source text
# (fineweb_edu_sample_800k.txt: where it comes from and its sha256 are in data/sample/make_sample.sh), in the folder
# given as the first argument (default ../shared/data):
#   bash data/mini/make_mini.sh /path/to/texts
# The same 148 documents as the tiny sample (--doc_split joined), as UTF-8 bytes with separator 256 (vocabulary
# 257); the last whole documents holding >= 40,000 bytes are test, the ones before them holding >= 40,000 bytes are
# val, the rest (133 documents) train. The mini preset trains on the first 262,144 bytes of train (--train_tokens,
# cut back to a document start). Deterministic: the outputs' sha256 are listed in data/README.md.
# It also writes the same documents in the mini_bpe preset's BPE (mini_bpe.tiktoken, mini_bpe_{train,val,test}.bin):
# 1,024 ids learned from the first 32,768 byte units of train only, i.e. the 4 documents (27,033 bytes) of the track's
# 1/8 budget, which every budget from 1/8 up contains, so no run at 1/8 or more has a tokenizer that saw text its
# model may not. The split counts bytes, so it holds the same documents as the byte shards.
#   bash data/mini/make_mini.sh /path/to/texts bpe
# also writes the comparison BPEs of bench/mini.py --domain bpe512 / bpe1024 (learned from all 262,144 bytes of the
# track) and b8bpe512 / b8bpe1024 (from the 1/8 budget; b8bpe1024 is mini_bpe under another name): not committed.
set -euo pipefail
cd "$(dirname "$0")/../.."
SRC="${1:-../shared/data}"
python data/encode.py "$SRC/fineweb_edu_sample_800k.txt" --doc_split joined --tokenizer bytes \
  --out_dir data/mini --name mini --val_tokens 40000 --test_tokens 40000
bpe() {  # name vocabulary learned-from-byte-units
  python data/encode.py "$SRC/fineweb_edu_sample_800k.txt" --doc_split joined --tokenizer bpe \
    --bpe_file "data/mini/$1.tiktoken" --train_bpe "$2" --bpe_train_bytes "$3" \
    --out_dir data/mini --name "$1" --val_tokens 40000 --test_tokens 40000
}
bpe mini_bpe 1024 32768
if [ "${2:-}" = "bpe" ]; then
  for vocab in 512 1024; do
    bpe "mini_bpe$vocab" "$vocab" 262144
    bpe "mini_b8bpe$vocab" "$vocab" 32768
  done
fi
sha256sum data/mini/mini_{train,val,test}.bin data/mini/mini_bpe.tiktoken data/mini/mini_bpe_{train,val,test}.bin
