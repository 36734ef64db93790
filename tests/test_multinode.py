"""Several nodes (issue 27). (a) run.sh's plan line, torchrun command and one-line refusals, with stub `torchrun`,
`srun`, `scontrol` and `stat` on PATH and NGPU set (no GPU, nothing fetched). (b) Two "nodes" on this machine: two
run.sh launches with NNODES=2, NODE_RANK 0 and 1, MASTER_ADDR=127.0.0.1 (two torchrun --nnodes 2 agents joined by
c10d, one rank each, gloo) train a 2-member ensemble, one member per node (--parallel_members 2, added by run.sh),
and end with the numbers of one process training both members. (c) One node killed mid-training: the other ends
within --dist_timeout with one line; --resume on both nodes ends with the uninterrupted run's numbers."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import train_gpt
from conftest import REPO_ROOT, member_weights, micro_flags, synthetic_documents, write_micro_shards

RUN_SH = os.path.join(REPO_ROOT, "run.sh")
SBATCH = os.path.join(REPO_ROOT, "examples", "slurm", "run_unlimited.sbatch")
CLEARED = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NGPU", "KEEP_NGPU", "DATA_DIR", "FETCH_PER_NODE",
           "DATA_WAIT_S", "DRY_RUN", "WAIT_FOR_PORT")
# The ensemble is scored over every rank: two ranks sum their halves of val and all-reduce, one rank sums it all, so
# the final float32 loss may differ in its last bits (measured: 1.8e-8 to 2.5e-8 relative); each member trains on
# one rank either way, so the members, their files and their own val losses are bitwise equal.
ENSEMBLE_RTOL = 1e-7
# the heartbeat watchdog's limit in the killed run: the other node must end within it. The uninterrupted runs keep a
# generous one: on a loaded machine a rank's beats may come late
DIST_TIMEOUT = 2
CALM = 60


def stub(folder, name: str, body: str) -> None:
    path = os.path.join(folder, name)
    with open(path, "w") as handle:
        handle.write("#!/usr/bin/env bash\n" + body + "\n")
    os.chmod(path, 0o755)


@pytest.fixture(scope="module")
def tools(tmp_path_factory):
    """PATH folders: `stubs` (torchrun printing its argv, srun running its command, stat printing FAKE_FSTYPE when
    set), `scontrol` (a stub naming FAKE_FIRST_HOST) and `real` (torchrun = this python's torch.distributed.run;
    with WAIT_FOR_PORT it first waits until that port takes connections, so that node 0's agent hosts the store)."""
    root = tmp_path_factory.mktemp("tools")
    folders = {name: root / name for name in ("stubs", "scontrol", "real")}
    for folder in folders.values():
        folder.mkdir()
    stub(folders["stubs"], "torchrun", 'printf "torchrun"; printf " %q" "$@"; echo')
    stub(folders["stubs"], "srun", 'while [ "${1#-}" != "$1" ]; do shift; done; exec "$@"')  # srun's options dropped
    stub(folders["stubs"], "stat", '[ -n "${FAKE_FSTYPE:-}" ] && echo "$FAKE_FSTYPE" || '
                                   f'exec {shutil.which("stat")} "$@"')
    stub(folders["scontrol"], "scontrol", '[ "$1 $2" = "show hostnames" ] && echo "$FAKE_FIRST_HOST"')
    stub(folders["real"], "torchrun", 'if [ -n "${WAIT_FOR_PORT:-}" ]; then\n  until (exec 3<>'
                                      '"/dev/tcp/127.0.0.1/$WAIT_FOR_PORT") 2>/dev/null; do sleep 0.1; done\nfi\n'
                                      f'exec {sys.executable} -m torch.distributed.run "$@"')
    return {name: str(folder) for name, folder in folders.items()}


def environment(path_first: str, **settings) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PATH=path_first + os.pathsep + os.environ["PATH"])
    env.update({k: str(v) for k, v in settings.items()})
    return env


def fake_data(folder, test: bool = True) -> str:
    """A DATA_DIR with the files run.sh looks for (the stub torchrun reads none of them)."""
    os.makedirs(folder, exist_ok=True)
    for name in ("fineweb_train.bin", "fineweb_val.bin") + (("fineweb_test.bin",) if test else ()):
        open(os.path.join(folder, name), "wb").close()
    return str(folder)


# ---------------------------------------------------------------------------------------------------------- (a) run.sh

@pytest.fixture(scope="module")
def launches(tools, tmp_path_factory):
    """Every run.sh case that needs python, started at once (each imports torch and train_gpt: seconds apiece)."""
    root = tmp_path_factory.mktemp("launch")
    data = fake_data(root / "data")
    resumed = root / "runs" / "interrupted"
    resumed.mkdir(parents=True)
    (resumed / "hyperparameters.json").write_text(json.dumps(dict(ensemble_size=10, parallel_members=5)))
    cases = {
        # one node: today's torchrun --standalone line, MASTER_ADDR ignored
        "one_node": (["--seed", "1"], dict(NGPU=8, DATA_DIR=data, MASTER_ADDR="elsewhere")),
        # two nodes by hand, this one rank 1: members of the ensemble one chain per node, nothing fetched (dry run)
        "two_nodes": (["unlimited", "--ensemble_size", "4"],
                      dict(NGPU=8, NNODES=2, NODE_RANK=1, MASTER_ADDR="10.0.0.1", MASTER_PORT=29555, DRY_RUN=1,
                           DATA_DIR=str(root / "nowhere"))),
        # Slurm through the sbatch example: srun runs run.sh, the node list read without scontrol
        "sbatch": (None, dict(NGPU=8, DATA_DIR=data, SLURM_NNODES=5, SLURM_NODEID=3, SLURM_JOB_ID=4242,
                              SLURM_JOB_NODELIST="gpu-a[07-11],gpu-b01", SLURM_SUBMIT_DIR=REPO_ROOT)),
        # Slurm with scontrol; a one-model preset: data parallel over all ranks, no --parallel_members
        "slurm_scontrol": (["1h"], dict(NGPU=4, DRY_RUN=1, DATA_DIR=data, SLURM_NNODES=2, SLURM_NODEID=0,
                                         SLURM_JOB_NODELIST="n[1-2]", SLURM_JOB_ID=7, FAKE_FIRST_HOST="n1.cluster")),
        # --resume: the run folder's members and groups, nothing added (train_gpt.py refuses a changed setting)
        "resume": (["unlimited", "--resume", resumed],
                   dict(NGPU=8, NNODES=5, MASTER_ADDR="h", DRY_RUN=1, DATA_DIR=data)),
        "not_divide": (["unlimited"], dict(NGPU=8, NNODES=2, MASTER_ADDR="h", DATA_DIR=data)),
        "bad_flag": (["unlimited", "--no_such_flag", "1"], dict(NGPU=8, NNODES=5, MASTER_ADDR="h", DATA_DIR=data)),
        "logs_tmpfs": (["unlimited", "--log_dir", str(root / "logs-in-ram")],
                       dict(NGPU=8, NNODES=5, MASTER_ADDR="h", DATA_DIR=data, FAKE_FSTYPE="tmpfs")),
        "fetch_on_nfs": (["unlimited"], dict(NGPU=8, NNODES=5, MASTER_ADDR="h", DATA_DIR=data, FETCH_PER_NODE=1,
                                             FAKE_FSTYPE="nfs")),
        "no_shared_data": (["unlimited"], dict(NGPU=8, NNODES=5, NODE_RANK=2, MASTER_ADDR="h", DATA_WAIT_S=0,
                                               DATA_DIR=str(root / "empty"))),
    }
    started = {}
    for name, (args, settings) in cases.items():
        path_first = tools["stubs"]
        if name == "slurm_scontrol":
            path_first = tools["scontrol"] + os.pathsep + path_first
        command = ["bash", SBATCH] if args is None else ["bash", RUN_SH, *args]
        started[name] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                         env=environment(path_first, **settings), cwd=str(root))
    done = {name: (process, *process.communicate(timeout=180)) for name, process in started.items()}
    return dict(done, data=data)


def plan_and_command(launch) -> tuple[str, str]:
    process, out, err = launch
    assert process.returncode == 0, out + err
    lines = out.strip().splitlines()
    return lines[1], lines[-1]


def refusal(launch) -> str:
    process, out, err = launch
    assert process.returncode == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("run.sh: "), err
    return lines[0]


def test_one_node_keeps_the_standalone_launch(launches):
    plan, command = plan_and_command(launches["one_node"])
    data = launches["data"]
    assert plan == f"run.sh: 1 node x 8 GPUs (torchrun --standalone) | preset 1h | data {data}: present"
    assert command == (f"torchrun --standalone --nproc_per_node=8 train_gpt.py --preset 1h --train_files "
                       f"{data}/fineweb_train.bin --val_files {data}/fineweb_val.bin --test_files "
                       f"{data}/fineweb_test.bin --seed 1")


def test_two_nodes_plan_one_member_chain_per_node_and_fetch_nothing_in_a_dry_run(launches, tmp_path_factory):
    plan, command = plan_and_command(launches["two_nodes"])
    assert plan.startswith("run.sh: node 1 of 2 x 8 GPUs (16 ranks) | rendezvous c10d at 10.0.0.1:29555 | preset "
                           "unlimited: 4 members, 2 at once (one chain per node, 2 round(s)) by --parallel_members 2 "
                           "| data "), plan
    assert "shared by all nodes: missing, node 0 fetches it | run folders under logs (" in plan
    assert command.startswith("run.sh: DRY_RUN=1, would run: torchrun --nnodes=2 --nproc_per_node=8 "
                              "--rdzv_backend=c10d --rdzv_endpoint=10.0.0.1:29555 --rdzv_id=slowrun train_gpt.py "
                              "--preset unlimited --parallel_members 2 --train_files "), command
    assert command.endswith("--ensemble_size 4")
    nowhere = plan.split("| data ")[1].split(" (")[0]
    assert not os.path.exists(nowhere)  # a dry run fetched nothing


def test_slurm_through_the_sbatch_example(launches):
    """srun starts run.sh on each node: node 3 of 5 reads its rank and the rendezvous host (the node list's first,
    parsed without scontrol) from Slurm, the port from the job id, and starts torchrun with one chain per node."""
    process, out, err = launches["sbatch"]
    assert process.returncode == 0, out + err
    lines = out.strip().splitlines()
    assert lines[1].startswith("run.sh: node 3 of 5 x 8 GPUs (40 ranks) | rendezvous c10d at gpu-a07:24242 | preset "
                               "unlimited: 5 members, 5 at once (one chain per node, 1 round(s)) by "
                               "--parallel_members 5 | data "), lines[1]
    assert lines[-1].startswith("torchrun --nnodes=5 --nproc_per_node=8 --rdzv_backend=c10d "
                                "--rdzv_endpoint=gpu-a07:24242 --rdzv_id=4242 train_gpt.py --preset unlimited "
                                "--parallel_members 5 --train_files "), lines[-1]


def test_slurm_with_scontrol_and_a_one_model_preset(launches):
    plan, command = plan_and_command(launches["slurm_scontrol"])
    assert plan.startswith("run.sh: node 0 of 2 x 4 GPUs (8 ranks) | rendezvous c10d at n1.cluster:29500 | preset 1h "
                           "| data "), plan
    assert "--rdzv_endpoint=n1.cluster:29500 --rdzv_id=7 train_gpt.py --preset 1h --train_files" in command
    assert "--parallel_members" not in command


def test_resume_keeps_the_run_folders_members_and_groups(launches):
    plan, command = plan_and_command(launches["resume"])
    assert "| preset unlimited: 10 members, 5 at once (one chain per node, 2 round(s)) | data " in plan, plan
    assert f"| run folders under {launches['data'].rsplit('/', 1)[0]}/runs (" in plan, plan
    assert "--parallel_members" not in command and command.endswith("--resume " + launches["data"].rsplit("/", 1)[0]
                                                                     + "/runs/interrupted")


@pytest.mark.parametrize("case, message", [
    ("not_divide", "run.sh: 2 nodes do not divide the ensemble of 5 members (preset unlimited; one member chain per "
                   "node): run on 1 or 5 nodes, or give --ensemble_size a multiple of 2"),
    ("bad_flag", "run.sh: unknown flag --no_such_flag (python train_gpt.py --help lists them)"),
    ("logs_tmpfs", "are on tmpfs, which no other node sees: 5 nodes write and read one run folder"),
    ("fetch_on_nfs", "FETCH_PER_NODE=1 fetches onto each node's own disk, but DATA_DIR="),
    ("no_shared_data", "run.sh: node 2: no FineWeb in "),
])
def test_refusals_that_need_the_preset(launches, case, message):
    assert message in refusal(launches[case])


@pytest.mark.parametrize("settings, message", [
    (dict(NNODES=2), "run.sh: NNODES=2 needs MASTER_ADDR: the address of one node"),
    (dict(NNODES=2, NODE_RANK=2, MASTER_ADDR="h"), "run.sh: NODE_RANK=2 is outside [0, 2) (NNODES=2)"),
    (dict(SLURM_NNODES=2, SLURM_NODEID=5, SLURM_JOB_NODELIST="a,b"),
     "run.sh: SLURM_NODEID=5 is outside [0, 2) (SLURM_NNODES=2)"),
    (dict(NNODES="two"), "run.sh: NNODES=two: the number of nodes must be a whole number >= 1"),
    (dict(NNODES=0), "run.sh: NNODES=0: the number of nodes must be a whole number >= 1"),
    (dict(NNODES=2, NODE_RANK="-1", MASTER_ADDR="h"), "run.sh: NODE_RANK=-1: this node's rank must be a whole number"),
    (dict(NNODES=2, MASTER_ADDR="h", MASTER_PORT=70000), "run.sh: MASTER_PORT=70000: the rendezvous port must be"),
    (dict(NGPU="eight"), "run.sh: NGPU=eight: the number of GPUs to use on this node must be a whole number"),
    (dict(FETCH_PER_NODE="yes"), "run.sh: FETCH_PER_NODE=yes: 1 (fetch onto each node's disk) or 0"),
])
def test_refusals_before_python(tools, settings, message):
    """Node settings are checked first, in bash alone: one line, exit 2, in milliseconds."""
    done = subprocess.run(["bash", RUN_SH, "unlimited"], capture_output=True, text=True, timeout=30,
                          env=environment(tools["stubs"], **settings))
    assert done.returncode == 2 and done.stdout == "" and done.stderr.strip().splitlines() == [
        done.stderr.strip()], done.stderr
    assert done.stderr.startswith(message), done.stderr


def test_a_node_waits_for_node_0_to_fetch_onto_the_shared_path(tools, tmp_path):
    """Node 1 with no data on the shared DATA_DIR waits while node 0's fetch marker is there, and starts once the
    files are in place and the marker gone."""
    data = tmp_path / "shared"
    data.mkdir()
    marker = data / ".fetching_by_node_0"
    marker.touch()
    env = environment(tools["stubs"], NGPU=8, NNODES=5, NODE_RANK=1, MASTER_ADDR="h", DATA_DIR=str(data),
                      DATA_WAIT_S=60)
    process = subprocess.Popen(["bash", RUN_SH, "unlimited"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
    try:
        waiting = process.stderr.readline()
        assert waiting.startswith(f"run.sh: node 1 waits up to 60 s for node 0 to fetch FineWeb into the shared "
                                  f"{data}"), waiting
        fake_data(data)  # the files are there, the marker too: node 0 is still verifying them
        time.sleep(3)
        assert process.poll() is None
        marker.unlink()
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert out.strip().splitlines()[-1].startswith("torchrun --nnodes=5 --nproc_per_node=8 --rdzv_backend=c10d")
    assert f"--test_files {data}/fineweb_test.bin" in out  # the test split, present by now, is scored


# ------------------------------------------------------------------------------------------- (b, c) two nodes, for real

EPOCHS = 10  # 100 steps per member; the killed run checkpoints every step (slower steps, the same numbers), so that
# node 0 still trains for longer than DIST_TIMEOUT after node 1 is killed (when node 0 logs its step 12)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """The toy language as a DATA_DIR run.sh accepts, and the micro flags of a 2-member ensemble (no files flags:
    run.sh passes DATA_DIR's, as --resume needs them again)."""
    root = tmp_path_factory.mktemp("nodes")
    data = root / "data"
    data.mkdir()
    train_gpt.write_shard(str(data / "fineweb_train.bin"), synthetic_documents(80, seed=1))
    train_gpt.write_shard(str(data / "fineweb_val.bin"), synthetic_documents(20, seed=2))

    def flags(run_id: str, dist_timeout: float = CALM) -> list[str]:
        every = micro_flags("", "", str(root), run_id, ensemble_size=2, batch_tokens=256, device_batch_size=2,
                            num_epochs=EPOCHS, log_every=1, dist_timeout=dist_timeout)
        assert every[:4] == ["--train_files", "", "--val_files", ""]
        return every[4:]
    return dict(root=root, data=str(data), flags=flags)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_nodes(tools, micro, args: list[str], name: str, run_sh: bool = True) -> list[subprocess.Popen]:
    """Two "nodes" of this machine, one rank each, node 0's agent hosting the c10d store: run.sh with NNODES=2,
    NODE_RANK 0 and 1, or (run_sh False) the two torchrun commands it starts, given by hand."""
    port, nodes = free_port(), []
    for rank in (0, 1):
        env = environment(tools["real"], NNODES=2, NODE_RANK=rank, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NGPU=1,
                          DATA_DIR=micro["data"], **({"WAIT_FOR_PORT": port} if rank else {}))
        command = ["bash", RUN_SH, "tiny", *args] if run_sh else [
            "torchrun", "--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=1", "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=slowrun", os.path.join(REPO_ROOT, "train_gpt.py"), *args]
        out = open(micro["root"] / f"{name}_node{rank}.txt", "w")
        nodes.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, text=True,
                                      cwd=REPO_ROOT))
    return nodes


def output(micro, name: str, rank: int) -> str:
    with open(micro["root"] / f"{name}_node{rank}.txt") as handle:
        return handle.read()


def finish(nodes, timeout: float = 180) -> list[int]:
    try:
        return [node.wait(timeout=timeout) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()


def result(folder) -> dict:
    with open(os.path.join(folder, "result.json")) as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def two_nodes(tools, micro):
    """The uninterrupted two-node run: (run folder, seconds)."""
    start = time.monotonic()
    status = finish(start_nodes(tools, micro, micro["flags"]("two"), "two"))
    assert status == [0, 0], output(micro, "two", 0)[-3000:] + output(micro, "two", 1)[-3000:]
    return str(micro["root"] / "two"), time.monotonic() - start


def test_two_nodes_train_one_member_each_like_one_process_training_both(two_nodes, micro):
    folder, seconds = two_nodes
    plan = output(micro, "two", 1).splitlines()[1]
    assert plan.startswith("run.sh: node 1 of 2 x 1 GPUs (2 ranks) | rendezvous c10d at 127.0.0.1:") and \
        "| preset tiny: 2 members, 2 at once (one chain per node, 1 round(s)) by --parallel_members 2 |" in plan, plan
    log = open(os.path.join(folder, "log.txt")).read()
    assert "world_size 2" in log and "2 members at once" in log and "trained by another group" in log
    one = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "train_gpt.py"), "--preset", "tiny",
                          "--train_files", os.path.join(micro["data"], "fineweb_train.bin"),
                          "--val_files", os.path.join(micro["data"], "fineweb_val.bin"), "--test_files", "",
                          *micro["flags"]("one")], capture_output=True, text=True, timeout=180,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=REPO_ROOT)
    assert one.returncode == 0, one.stderr[-3000:]
    reference = str(micro["root"] / "one")
    two, single = result(folder), result(reference)
    for member in (0, 1):
        mine, theirs = member_weights(folder, member), member_weights(reference, member)
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), member
    assert two["member_val_losses"] == single["member_val_losses"]
    assert two["member_val_losses"][0] != two["member_val_losses"][1]  # two different members
    assert abs(two["val_loss"] - single["val_loss"]) <= ENSEMBLE_RTOL * single["val_loss"], (two, single)
    print(f"\ntwo nodes {seconds:.1f} s: val_loss {two['val_loss']!r}, members {two['member_val_losses']}; "
          f"one process: val_loss {single['val_loss']!r} (relative difference "
          f"{abs(two['val_loss'] - single['val_loss']) / single['val_loss']:.1e})")


def children(pid: int) -> list[int]:
    """pid's descendants (torchrun starts its workers in sessions of their own: a process group kill misses them)."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                kids = [int(kid) for kid in handle.read().split()]
        except OSError:
            kids = []
        for kid in kids:
            found += [kid, *children(kid)]
    return found


def test_a_killed_node_ends_the_other_in_one_line_and_resume_on_both_gives_the_same_numbers(tools, micro, two_nodes):
    files = ["--train_files", os.path.join(micro["data"], "fineweb_train.bin"), "--val_files",
             os.path.join(micro["data"], "fineweb_val.bin"), "--test_files", ""]  # as run.sh passes them
    flags = ["--preset", "tiny", "--parallel_members", "2", *files, *micro["flags"]("killed", DIST_TIMEOUT),
             "--checkpoint_every", "1"]
    nodes = start_nodes(tools, micro, flags, "killed", run_sh=False)
    try:
        deadline = time.monotonic() + 120  # node 0 training, past a few checkpoints (node 1 anywhere)
        while not re.search(r"^member (\d) of 2 \| step 12/", output(micro, "killed", 0), re.M):
            assert time.monotonic() < deadline and nodes[0].poll() is None and nodes[1].poll() is None, \
                output(micro, "killed", 0)[-3000:] + output(micro, "killed", 1)[-3000:]
            time.sleep(0.02)
        victims = [nodes[1].pid, *children(nodes[1].pid)]  # node 1: its torchrun agent and its rank
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        # node 0 is still training its member, in no collective with node 1: the watchdog names the silent rank (a
        # collective in flight would fail at once instead, with peer_failure's line: test_reliability.py)
        assert f" | step {EPOCHS * 10}/" not in output(micro, "killed", 0)
        status = nodes[0].wait(timeout=DIST_TIMEOUT + 60)
        waited = time.monotonic() - killed
    finally:
        finish(nodes, timeout=5)
    survivor = output(micro, "killed", 0)
    errors = [line for line in survivor.splitlines() if line.startswith("error:")]
    assert status != 0 and len(errors) == 1, survivor[-3000:]
    assert "stopped answering" in errors[0] and any(f"pid {pid}," in errors[0] for pid in victims), errors
    assert DIST_TIMEOUT - DIST_TIMEOUT / 5 <= waited < DIST_TIMEOUT + 10, waited
    folder = str(micro["root"] / "killed")
    assert not os.path.exists(os.path.join(folder, "result.json"))

    status = finish(start_nodes(tools, micro, ["--resume", folder, "--dist_timeout", str(CALM)], "resumed",
                                run_sh=False))
    assert status == [0, 0], output(micro, "resumed", 0)[-3000:] + output(micro, "resumed", 1)[-3000:]
    log = open(os.path.join(folder, "log.txt")).read()
    survivor_member = re.search(r"^member (\d) of 2 \| step 12/", survivor, re.M).group(1)
    # the survivor's member: resumed from its checkpoint, or loaded when it finished before the watchdog fired (a fast
    # CPU finishes the few steps left first); node 1's member: resumed, loaded or retrained
    assert re.search(rf"^member {survivor_member} of 2 \| (resumed from|loaded finished before the resume)", log,
                     re.M), log[-3000:]
    reference, resumed = result(two_nodes[0]), result(folder)
    for key in ("val_loss", "member_val_losses", "ensemble_val_losses", "candidate_val_losses", "steps"):
        assert resumed[key] == reference[key], key
    for member in (0, 1):
        mine, theirs = member_weights(folder, member), member_weights(two_nodes[0], member)
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), member
    print(f"\nnode 1 killed: node 0 ended {waited:.1f} s later with: {errors[0]}")


WAITER = """
import sys, time
import torch.distributed as dist
import train_gpt
world = train_gpt.setup_distributed("cpu", timeout_s=1.0)  # collectives time out at 2 s, the watchdog at 1 s
if world.rank == 1:
    time.sleep(5)  # a group still training its member while the other has finished
start = time.monotonic()
world.wait_for_all() if sys.argv[1] == "wait" else dist.barrier()
print(f"waited {time.monotonic() - start:.1f} s", flush=True)
world.barrier()  # the process group still works after the wait
train_gpt.stop_heartbeat_watchdog()
"""


def test_a_round_waits_for_a_slower_group_past_the_collective_timeout(tmp_path, how="wait"):
    """The round's closing wait (Dist.wait_for_all) lasts as long as the slowest group: rank 1 arrives 5 s late,
    past the 2 s collective timeout of --dist_timeout 1, and both ranks go on (rank 0 waited ~5 s). A plain
    collective barrier, what the round ended with before, fails there (how="barrier": rank 0 exits with gloo's
    timeout; measured, not run in the suite): at full scale, chains finishing more than 2 x dist_timeout apart
    crashed."""
    port, ranks = free_port(), []
    for rank in (0, 1):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_RANK=str(rank), OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
        ranks.append(subprocess.Popen([sys.executable, "-c", WAITER, how], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, env=env, text=True, cwd=tmp_path))
    status = finish(ranks, timeout=60)
    outputs = [rank.stdout.read() for rank in ranks]
    if how == "barrier":
        assert status[0] != 0, outputs[0]
        return
    assert status == [0, 0], outputs
    assert float(re.search(r"waited ([\d.]+) s", outputs[0]).group(1)) >= 4.0, outputs[0]


def test_a_node_local_log_dir_is_refused_at_the_start_in_one_line(tmp_path):
    """Two ranks whose --log_dir is not one folder (a relative "logs" from two working directories: what a folder
    local to each node looks like) are refused before any step with one line saying --log_dir must be shared, and
    rank 0 removes the folder it made; before, the run trained round 1 and failed when a member file written on the
    other node was missing."""
    train_path, val_path = write_micro_shards(tmp_path)
    port, ranks = free_port(), []
    flags = micro_flags(train_path, val_path, "logs", "local", ensemble_size=2, parallel_members=2, dist_timeout=2,
                        batch_tokens=256)
    for rank in (0, 1):
        node = tmp_path / f"node{rank}"
        node.mkdir()
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
        ranks.append(subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, "train_gpt.py"), *flags],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True, cwd=node))
    status = finish(ranks, timeout=120)
    out, err = ranks[0].stdout.read(), ranks[0].stderr.read()
    assert status == [2, 2], (out, err)
    assert err.strip().count("\n") == 0 and "1 of 2 ranks cannot see the run folder" in err and \
        "--log_dir must be one folder every node shares" in err, err
    assert "step 1/" not in out and os.listdir(tmp_path / "node0" / "logs") == []


def test_group_logs_merge_once_whatever_the_kill_point(tmp_path):
    """Another group's log and metrics files end up appended to log.txt and metrics.jsonl once, group by group, its
    cut last line ended: merged again after a kill between the append and the removal, nothing is doubled."""
    (tmp_path / "log.txt").write_text("header\n")
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "member": 0, "step": 1}\n')
    (tmp_path / "log_group1.txt").write_text("member 1 | step 1\n")
    (tmp_path / "metrics_group1.jsonl").write_text('{"kind": "train", "member": 1, "step": 1}\n{"kind": "tr')
    (tmp_path / "log_group2.txt").write_text("member 2 | step 1\n")
    train_gpt.merge_group_logs(str(tmp_path))
    assert (tmp_path / "log.txt").read_text() == "header\nmember 1 | step 1\nmember 2 | step 1\n"
    assert (tmp_path / "metrics.jsonl").read_text() == ('{"kind": "train", "member": 0, "step": 1}\n'
                                                        '{"kind": "train", "member": 1, "step": 1}\n{"kind": "tr\n')
    assert sorted(os.listdir(tmp_path)) == ["log.txt", "metrics.jsonl"]
    (tmp_path / "log_group2.txt").write_text("member 2 | step 1\n")  # a kill after its append, before its removal
    train_gpt.merge_group_logs(str(tmp_path))
    assert (tmp_path / "log.txt").read_text() == "header\nmember 1 | step 1\nmember 2 | step 1\n"
    assert sorted(os.listdir(tmp_path)) == ["log.txt", "metrics.jsonl"]
