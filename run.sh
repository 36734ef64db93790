#!/usr/bin/env bash
# The full-scale entry point: a track's preset (its public record, records/TRACKS.md) on every GPU of this node, or
# of several nodes (docs/full-scale.md, "Several nodes").
#   ./run.sh                          # the 1h preset: the 1-hour track's record (3.195)
#   ./run.sh 1h --num_epochs 2        # the preset first (default 1h), then flags passed through to train_gpt.py
#   NGPU=4 ./run.sh                   # on 4 of this node's GPUs
#   NNODES=5 NODE_RANK=k MASTER_ADDR=host0 ./run.sh unlimited   # the same on each of 5 nodes (k = 0..4; under srun
#                                     # Slurm's variables stand in): one member chain per node (docs/full-scale.md)
#   DRY_RUN=1 ./run.sh ...            # print the plan and the torchrun command; start nothing, fetch nothing
set -euo pipefail
cd "$(dirname "$0")"

# --- nodes (checked first: no python needed) -------------------------------------------------------------------------
# One node: torchrun --standalone, as always. Several: this same script on every node, joined by torchrun's c10d
# rendezvous at MASTER_ADDR:MASTER_PORT (any one node's address, the same on all). Each of NNODES, NODE_RANK and
# MASTER_ADDR comes from the environment, else from Slurm's (SLURM_NNODES, SLURM_NODEID, the first host of
# SLURM_JOB_NODELIST). NODE_RANK only says which node fetches shared data: c10d numbers the nodes itself, each node's
# ranks consecutive, so a group of NGPU consecutive ranks (one --parallel_members group) is one node.
refuse() { echo "run.sh: $*" >&2; exit 2; }  # an inconsistent setting: one line, before any work
whole() { [[ "$1" =~ ^[0-9]+$ ]]; }
first_host() {  # the first host of a Slurm node list: scontrol's reading when there, else host[01-04,07],b -> host01
  local host="" list="$1" entry="" depth=0 i char
  if command -v scontrol >/dev/null 2>&1; then
    host="$(scontrol show hostnames "$list" 2>/dev/null | head -n 1)" || true
  fi
  if [ -n "$host" ]; then echo "$host"; return; fi
  for ((i = 0; i < ${#list}; i++)); do  # the first entry: up to the first comma outside brackets
    char="${list:i:1}"
    case "$char" in "[") depth=$((depth + 1)) ;; "]") depth=$((depth - 1)) ;; ",") [ "$depth" -eq 0 ] && break ;; esac
    entry+="$char"
  done
  local range='^([^[]*)\[([^],-]*)[^]]*\](.*)$'  # each [...]: its first number, zero padding kept
  while [[ "$entry" =~ $range ]]; do entry="${BASH_REMATCH[1]}${BASH_REMATCH[2]}${BASH_REMATCH[3]}"; done
  echo "$entry"
}
NNODES_FROM=NNODES; [ -z "${NNODES:-}" ] && [ -n "${SLURM_NNODES:-}" ] && NNODES_FROM=SLURM_NNODES
RANK_FROM=NODE_RANK; [ -z "${NODE_RANK:-}" ] && [ -n "${SLURM_NODEID:-}" ] && RANK_FROM=SLURM_NODEID
NNODES="${NNODES:-${SLURM_NNODES:-1}}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
MASTER_PORT="${MASTER_PORT:-29500}"
whole "$NNODES" && [ "$((10#$NNODES))" -ge 1 ] ||
  refuse "$NNODES_FROM=$NNODES: the number of nodes must be a whole number >= 1"
whole "$NODE_RANK" || refuse "$RANK_FROM=$NODE_RANK: this node's rank must be a whole number in [0, $NNODES)"
NNODES=$((10#$NNODES)); NODE_RANK=$((10#$NODE_RANK))
[ "$NODE_RANK" -lt "$NNODES" ] || refuse "$RANK_FROM=$NODE_RANK is outside [0, $NNODES) ($NNODES_FROM=$NNODES)"
whole "$MASTER_PORT" && [ "$((10#$MASTER_PORT))" -ge 1 ] && [ "$((10#$MASTER_PORT))" -le 65535 ] ||
  refuse "MASTER_PORT=$MASTER_PORT: the rendezvous port must be a whole number in [1, 65535]"
MASTER_PORT=$((10#$MASTER_PORT))
FETCH_PER_NODE="${FETCH_PER_NODE:-0}"
[[ "$FETCH_PER_NODE" =~ ^[01]$ ]] ||
  refuse "FETCH_PER_NODE=$FETCH_PER_NODE: 1 (fetch onto each node's disk) or 0 (a shared DATA_DIR)"
DATA_WAIT_S="${DATA_WAIT_S:-3600}"
[ -z "${NGPU:-}" ] || whole "$NGPU" ||
  refuse "NGPU=$NGPU: the number of GPUs to use on this node must be a whole number"
whole "$DATA_WAIT_S" || refuse "DATA_WAIT_S=$DATA_WAIT_S: seconds to wait for node 0's fetch must be a whole number"
if [ "$NNODES" -gt 1 ]; then
  [ -z "${MASTER_ADDR:-}" ] && [ -n "${SLURM_JOB_NODELIST:-}" ] && MASTER_ADDR="$(first_host "$SLURM_JOB_NODELIST")"
  [ -n "${MASTER_ADDR:-}" ] || refuse "$NNODES_FROM=$NNODES needs MASTER_ADDR: the address of one node (the same on" \
    "every node) where torchrun's c10d rendezvous listens on MASTER_PORT ($MASTER_PORT)"
fi

# --- python, torch and the preset: one python start ---------------------------------------------------------------
if ! command -v python >/dev/null 2>&1; then
  echo "run.sh: no 'python' on PATH: activate the environment where torch is installed (README: Run it)" >&2
  exit 1
fi
PRESET=1h
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then PRESET="$1"; shift; fi
# Three lines: which public record the preset reproduces (train_gpt.PUBLIC_RECORDS; an unknown preset stops here with
# the list); the GPUs torch can use (honours CUDA_VISIBLE_DEVICES, unlike nvidia-smi -L; "-" when NGPU is given); on
# several nodes what the run will be (your flags over the preset, or a --resume folder's own settings): "members
# parallel_members given_by_you runs_folder", or "error: ..." for flags that train_gpt.py would refuse. Exit 3: torch
# does not import, its error on stdout (a venv not activated is not "no GPU").
ANSWER="$(python -c 'import sys
try:
    import torch
except BaseException as error:
    import traceback
    print(traceback.format_exception_only(error)[-1].strip())
    sys.exit(3)
import json, os, train_gpt
preset, nodes, ngpu, args = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
try:
    print(train_gpt.preset_record(preset))
except train_gpt.ConfigError as error:
    sys.exit(f"run.sh: {error}")
print(torch.cuda.device_count() if ngpu == "" else "-")
if nodes > 1:
    try:
        hp = train_gpt.parse_args(["--preset", preset, *args])
        given = {arg[2:].split("=", 1)[0] for arg in args if arg.startswith("--")}
        if hp.resume:  # the members and their groups are the run folder'"'"'s own
            path = os.path.join(hp.resume, "hyperparameters.json")
            try:
                with open(path) as handle:
                    saved = json.load(handle)
            except (OSError, ValueError) as error:
                raise train_gpt.ConfigError(f"--resume {hp.resume}: cannot read {path} ({type(error).__name__})")
            print(saved.get("ensemble_size", 1), saved.get("parallel_members", 1), 1,
                  os.path.dirname(os.path.normpath(hp.resume)) or ".")
        else:
            print(hp.ensemble_size, hp.parallel_members, int("parallel_members" in given), hp.log_dir)
    except train_gpt.ConfigError as error:
        print(f"error: {error}")' "$PRESET" "$NNODES" "${NGPU:-}" "$@")" || {
  STATUS=$?
  if [ "$STATUS" -eq 3 ]; then
    echo "run.sh: $(command -v python) cannot import torch ($(printf '%s' "$ANSWER" | tail -n 1)):" \
         "activate its environment or pip install -r requirements.txt (README: Run it)" >&2
    exit 1
  fi
  exit 2
}
mapfile -t ANSWERS <<< "$ANSWER"
SETTINGS="${ANSWERS[2]:-}"
echo "run.sh: ${ANSWERS[0]}"

# --- GPUs ------------------------------------------------------------------------------------------------------------
NGPU="${NGPU:-${ANSWERS[1]}}"  # the GPUs torch can use, from the answer above
NGPU=$((10#${NGPU:-0}))
if [ "$NGPU" -lt 1 ]; then  # checked before the ~400 MB download: without a GPU there is nothing to fetch for
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

# --- members across nodes ---------------------------------------------------------------------------------------------
# The unlimited track as the public runs it: one member chain per node, data parallel inside the node, the nodes
# talking only when the members are scored together at the end. So on N nodes a preset whose ensemble has K > 1
# members gets --parallel_members N (K/N rounds of N members at once), and N must divide K. A --parallel_members of
# your own, and a --resume (its run folder keeps its own), are left as they are; train_gpt.py checks them.
ADDED=()  # flags run.sh adds before yours
RUNS_DIR=logs  # where train_gpt.py puts run folders: --log_dir, or the folder holding a --resume
if [ "$NNODES" -gt 1 ]; then
  [ "${SETTINGS#error: }" = "$SETTINGS" ] || refuse "${SETTINGS#error: }"
  read -r ENSEMBLE PARALLEL KEPT RUNS_DIR <<< "$SETTINGS"
  if [ "$ENSEMBLE" -gt 1 ] && [ "$KEPT" = 0 ]; then
    if [ $((ENSEMBLE % NNODES)) -ne 0 ]; then
      DIVISORS=(); for ((d = 1; d <= ENSEMBLE; d++)); do [ $((ENSEMBLE % d)) -eq 0 ] && DIVISORS+=("$d"); done
      LAST="${DIVISORS[-1]}"; unset "DIVISORS[-1]"; CHOICES="${DIVISORS[*]}"  # 1 2 5 10 -> "1, 2, 5 or 10"
      refuse "$NNODES nodes do not divide the ensemble of $ENSEMBLE members (preset $PRESET; one member chain per" \
        "node): run on ${CHOICES// /, } or $LAST nodes, or give --ensemble_size a multiple of $NNODES"
    fi
    PARALLEL="$NNODES"
    ADDED=(--parallel_members "$NNODES")
  fi
fi

# --- storage ----------------------------------------------------------------------------------------------------------
# Several nodes share one run folder (rank 0 writes hyperparameters.json and result.json, each group's rank 0 its
# member files and whole lines appended to log.txt and metrics.jsonl, each rank its checkpoint shards; every rank reads
# every member file when the ensemble is scored): the run folders must be on a file system every node sees. Data:
# DATA_DIR on such a shared path (default; node 0 fetches it when missing, the others wait for it), or
# FETCH_PER_NODE=1: each node fetches onto its own disk (then DATA_DIR must be node-local).
DATA_DIR="${DATA_DIR:-data/fineweb}"
fs_type() {  # the file system type of a path, or of its nearest existing parent
  local path="$1"
  while [ ! -e "$path" ]; do path="$(dirname "$path")"; done
  stat -f -c %T "$path" 2>/dev/null || echo unknown
}
DATA_FS="$(fs_type "$DATA_DIR")"
HAVE_DATA=0
[ -f "$DATA_DIR/fineweb_train.bin" ] && [ -f "$DATA_DIR/fineweb_val.bin" ] && HAVE_DATA=1
FETCHING="$DATA_DIR/.fetching_by_node_0"  # while node 0 fetches onto a shared DATA_DIR
if [ "$NNODES" -gt 1 ]; then
  RUNS_FS="$(fs_type "$RUNS_DIR")"
  case "$RUNS_FS" in tmpfs | ramfs | overlay | overlayfs)
    refuse "run folders under $RUNS_DIR are on $RUNS_FS, which no other node sees: $NNODES nodes write and read one" \
      "run folder (members, checkpoints, log): give --log_dir a path on a file system all nodes share" ;;
  esac
  if [ "$FETCH_PER_NODE" = 1 ]; then
    case "$DATA_FS" in nfs* | lustre | gpfs | ceph* | cifs | smb* | afs | beegfs | fuse* | panfs | wekafs | 9p)
      refuse "FETCH_PER_NODE=1 fetches onto each node's own disk, but DATA_DIR=$DATA_DIR is on $DATA_FS (shared):" \
        "give a node-local DATA_DIR (e.g. /tmp/fineweb), or drop FETCH_PER_NODE and node 0 fetches it once" ;;
    esac
    DATA_PLAN="data $DATA_DIR ($DATA_FS) per node: $([ "$HAVE_DATA" = 1 ] && echo present ||
      echo "missing, fetched here first")"
  else
    DATA_PLAN="data $DATA_DIR ($DATA_FS) shared by all nodes: $([ "$HAVE_DATA" = 1 ] && echo present ||
      { [ "$NODE_RANK" = 0 ] && echo "missing, fetched here (node 0) first" || echo "missing, node 0 fetches it"; })"
  fi
  MEMBERS_PLAN="preset $PRESET"
  if [ "$ENSEMBLE" -gt 1 ]; then
    MEMBERS_PLAN+=": $ENSEMBLE members, $PARALLEL at once"
    [ "$PARALLEL" = "$NNODES" ] && MEMBERS_PLAN+=" (one chain per node, $((ENSEMBLE / NNODES)) round(s))"
    [ "${#ADDED[@]}" -gt 0 ] && MEMBERS_PLAN+=" by --parallel_members $NNODES"
  fi
  echo "run.sh: node $NODE_RANK of $NNODES x $NGPU GPUs ($((NNODES * NGPU)) ranks) | rendezvous c10d at" \
       "$MASTER_ADDR:$MASTER_PORT | $MEMBERS_PLAN | $DATA_PLAN | run folders under $RUNS_DIR ($RUNS_FS, shared)"
  LAUNCH=(--nnodes="$NNODES" --nproc_per_node="$NGPU" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT"
          --rdzv_id="${SLURM_JOB_ID:-slowrun}")
else
  echo "run.sh: 1 node x $NGPU GPUs (torchrun --standalone) | preset $PRESET | data $DATA_DIR:" \
       "$([ "$HAVE_DATA" = 1 ] && echo present || echo "missing, fetched first")"
  LAUNCH=(--standalone --nproc_per_node="$NGPU")
fi

# --- data -------------------------------------------------------------------------------------------------------------
if [ "${DRY_RUN:-0}" = 1 ]; then
  :  # the plan above and the command below: nothing fetched, nothing waited for, nothing started
elif [ "$HAVE_DATA" = 0 ] && [ "$NNODES" -gt 1 ] && [ "$FETCH_PER_NODE" = 0 ] && [ "$NODE_RANK" -gt 0 ]; then
  [ "$DATA_WAIT_S" -gt 0 ] &&
    echo "run.sh: node $NODE_RANK waits up to $DATA_WAIT_S s for node 0 to fetch FineWeb into the shared $DATA_DIR" >&2
  WAITED=0
  until [ -f "$DATA_DIR/fineweb_train.bin" ] && [ -f "$DATA_DIR/fineweb_val.bin" ] && [ ! -e "$FETCHING" ]; do
    [ "$WAITED" -ge "$DATA_WAIT_S" ] && refuse "node $NODE_RANK: no FineWeb in $DATA_DIR after $WAITED s of waiting" \
      "for node 0 to fetch it: is DATA_DIR on a file system every node shares? If not, FETCH_PER_NODE=1 with a" \
      "node-local DATA_DIR$([ -e "$FETCHING" ] && echo " (or node 0 died while fetching: remove $FETCHING)")"
    sleep 2; WAITED=$((WAITED + 2))
  done
elif [ "$HAVE_DATA" = 0 ]; then
  # About 400 MB from the Hub, cut into val/train/test and verified (data/FINEWEB.md); stops here if that fails.
  echo "FineWeb data not found in $DATA_DIR: fetching it with python data/fineweb.py (see data/FINEWEB.md)" >&2
  if [ "$NNODES" -gt 1 ] && [ "$FETCH_PER_NODE" = 0 ]; then  # the other nodes wait while this marker is there
    mkdir -p "$DATA_DIR" && touch "$FETCHING" && trap 'rm -f "$FETCHING"' EXIT
  fi
  python data/fineweb.py --out_dir "$DATA_DIR"
  rm -f "$FETCHING"; trap - EXIT
fi

# --- train ------------------------------------------------------------------------------------------------------------
# the data flags from DATA_DIR unless given (train_gpt.py refuses a flag given twice); the held-out test split is
# scored once at the end when it exists
given() { local flag; for flag in "${@:2}"; do [ "${flag%%=*}" = "--$1" ] && return 0; done; return 1; }
DATA_FLAGS=()
given train_files "$@" || DATA_FLAGS+=(--train_files "$DATA_DIR/fineweb_train.bin")
given val_files "$@" || DATA_FLAGS+=(--val_files "$DATA_DIR/fineweb_val.bin")
if ! given test_files "$@"; then
  if [ -f "$DATA_DIR/fineweb_test.bin" ]; then DATA_FLAGS+=(--test_files "$DATA_DIR/fineweb_test.bin")
  else DATA_FLAGS+=(--test_files ""); fi
fi
COMMAND=(torchrun "${LAUNCH[@]}" train_gpt.py --preset "$PRESET" ${ADDED[@]+"${ADDED[@]}"} "${DATA_FLAGS[@]}" "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "run.sh: DRY_RUN=1, would run:$(printf ' %q' "${COMMAND[@]}")"
  exit 0
fi
exec "${COMMAND[@]}"
