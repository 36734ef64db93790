#!/usr/bin/env bash
# Rebuilds the bundled sample shards from their two source texts (see data/README.md), in the folder given as the
# first argument (default ../shared/data, where they were kept while the sample was made):
#   fineweb_edu_sample_800k.txt = the first 800,139 characters of fineweb_sample.txt in github.com/sdrshn-nmbr/gpt-2.x
#                                 (commit 5c89630), 803,005 bytes: head -c 803005 fineweb_sample.txt > ...
#                                 sha256 4ebd1f4ec0612352b7f46bd3d612956d0f72696abb66788e86dd243696bd322e
#   input.txt                   = input.txt of github.com/karpathy/char-rnn (commit 6f9487a, data/tinyshakespeare/)
#                                 sha256 86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed
#   bash data/sample/make_sample.sh /path/to/texts
# Deterministic: the outputs' sha256 are listed in data/README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
SRC="${1:-../shared/data}"
python data/encode.py "$SRC/fineweb_edu_sample_800k.txt" --doc_split joined \
  --out_dir data/sample --name fineweb_edu --vocab data/gpt2.tiktoken --val_tokens 32768
python data/encode.py "$SRC/input.txt" --doc_split blank_line --min_doc_chars 2000 \
  --out_dir data/sample --name shakespeare --vocab data/gpt2.tiktoken --val_tokens 32768
sha256sum data/sample/*.bin
