#!/usr/bin/env bash
# The full-scale entry point: a track's preset (its public record, records/TRACKS.md) on every GPU of this node.
#   ./run.sh                          # the 1h preset: the 1-hour track's record (3.195)
#   ./run.sh 1h --num_epochs 2        # the preset first (default 1h), then flags passed through to train_gpt.py
#   NGPU=4 ./run.sh                   # on 4 of this node's GPUs
set -euo pipefail
cd "$(dirname "$0")"

# --- python and torch: name the real cause (a venv not activated is not "no GPU") -------------------------------------
if ! command -v python >/dev/null 2>&1; then
  echo "run.sh: no 'python' on PATH: activate the environment where torch is installed (README: Quick start)" >&2
  exit 1
fi
if ! TORCH_ERROR="$(python -c 'import torch' 2>&1)"; then
  echo "run.sh: $(command -v python) cannot import torch ($(printf '%s' "$TORCH_ERROR" | tail -n 1)):" \
       "activate its environment or pip install -r requirements.txt (README: Quick start)" >&2
  exit 1
fi

# --- preset -----------------------------------------------------------------------------------------------------------
PRESET=1h
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then PRESET="$1"; shift; fi
# which public record the preset reproduces (train_gpt.PUBLIC_RECORDS); an unknown preset stops here with the list
RECORD="$(python -c 'import sys, train_gpt
try:
    print(train_gpt.preset_record(sys.argv[1]))
except train_gpt.ConfigError as error:
    sys.exit(f"run.sh: {error}")' "$PRESET")" || exit 2
echo "run.sh: $RECORD"

# --- GPUs ------------------------------------------------------------------------------------------------------------
# the GPUs torch can use (honours CUDA_VISIBLE_DEVICES, unlike nvidia-smi -L)
NGPU="${NGPU:-$(python -c 'import torch; print(torch.cuda.device_count())')}"
if [ "${NGPU:-0}" -lt 1 ]; then  # checked before the ~400 MB download: without a GPU there is nothing to fetch for
  echo "No GPU found (torch.cuda.device_count() is 0). On CPU use: python train_gpt.py --preset mini (or tiny)" >&2
  exit 1
fi
# The slowrun preset's 256 sequences per step at 4 per GPU split evenly over 1, 2, 4, 8, 16... GPUs only: on 3, 5, 6
# or 7 use the largest power of two (same update, same recipe). KEEP_NGPU=1 keeps them all (then pick a batch_tokens
# that splits: train_gpt.py says which multiples do). NGPU=N ./run.sh chooses the count by hand.
POW2=1; while [ $((POW2 * 2)) -le "$NGPU" ]; do POW2=$((POW2 * 2)); done
if [ "$POW2" -ne "$NGPU" ] && [ -z "${KEEP_NGPU:-}" ]; then
  echo "run.sh: $NGPU GPUs found; using $POW2 (the slowrun batch splits evenly over a power of two;" \
       "KEEP_NGPU=1 NGPU=$NGPU ./run.sh --batch_tokens ... to use all of them)" >&2
  NGPU=$POW2
fi

# --- data -------------------------------------------------------------------------------------------------------------
DATA_DIR="${DATA_DIR:-data/fineweb}"
if [ ! -f "$DATA_DIR/fineweb_train.bin" ] || [ ! -f "$DATA_DIR/fineweb_val.bin" ]; then
  # About 400 MB from the Hub, cut into val/train/test and verified (data/FINEWEB.md); stops here if that fails.
  echo "FineWeb data not found in $DATA_DIR: fetching it with python data/fineweb.py (see data/FINEWEB.md)" >&2
  python data/fineweb.py --out_dir "$DATA_DIR"
fi

# --- train ------------------------------------------------------------------------------------------------------------
TEST_FLAGS=(--test_files "")  # the held-out test split is scored once at the end when it exists
[ -f "$DATA_DIR/fineweb_test.bin" ] && TEST_FLAGS=(--test_files "$DATA_DIR/fineweb_test.bin")
exec torchrun --standalone --nproc_per_node="$NGPU" train_gpt.py --preset "$PRESET" \
  --train_files "$DATA_DIR/fineweb_train.bin" --val_files "$DATA_DIR/fineweb_val.bin" "${TEST_FLAGS[@]}" "$@"
