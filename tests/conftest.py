"""Shared helpers for the tests: synthetic token shards and micro-sized runs that finish in seconds on a CPU."""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

# The stored fixtures (tests/fixtures/*.pt) are compared bitwise, and PyTorch's CPU kernels round differently by
# instruction set: on an AMD EPYC with AVX-512, 18 fixture tests differed from the AVX2 numbers they were made with
# (1-2 float32 ulp in a logit; 1% in a weight after 3 Muon steps, whose bfloat16 Newton-Schulz runs on oneDNN's
# AVX-512-BF16 kernels there). Every x86-64 CPU we run on has AVX2, so pin ATen's, MKL's and oneDNN's kernels to it
# before torch loads (setdefault: a value set by hand wins). The fixture makers import this module first for the same
# reason.
FIXTURE_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
for _name, _value in FIXTURE_KERNELS.items():
    os.environ.setdefault(_name, _value)
# torch.compile's on-disk cache does not key its CPU kernels by that pin: a kernel built for AVX-512 by an ordinary run
# and loaded here gave NaN (and a heap corruption the other way round), so the tests keep a cache of their own per pin.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"torchinductor_slowrun_tests_{os.environ['ATEN_CPU_CAPABILITY']}"))
import torch  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import train_gpt  # noqa: E402

MICRO_VOCAB = 256
MICRO_BOS = 255


def synthetic_documents(num_docs: int, seed: int, vocab: int = MICRO_VOCAB, bos: int = MICRO_BOS,
                        min_len: int = 5, max_len: int = 60) -> np.ndarray:
    """A learnable toy language: each document counts upwards from a random start (mod 200) with occasional jumps,
    so a model can beat the unigram loss quickly. Every document begins with bos."""
    rng = np.random.default_rng(seed)
    pieces = []
    for _ in range(num_docs):
        length = int(rng.integers(min_len, max_len))
        start = int(rng.integers(0, 200))
        body = (start + np.arange(length) + (rng.random(length) < 0.1) * rng.integers(0, 7, length).cumsum()) % 200
        pieces.append(np.concatenate([[bos], body]))
    tokens = np.concatenate(pieces).astype(np.uint16)
    assert tokens.max() < vocab
    return tokens


def write_micro_shards(folder) -> tuple[str, str]:
    """Train (120 documents) and val (30) shards of the toy language in folder; returns their paths."""
    train_path, val_path = str(folder / "train.bin"), str(folder / "val.bin")
    train_gpt.write_shard(train_path, synthetic_documents(120, seed=1))
    train_gpt.write_shard(val_path, synthetic_documents(30, seed=2))
    return train_path, val_path


@pytest.fixture
def micro_data(tmp_path):
    """Train and val shards of the toy language; returns their paths."""
    return write_micro_shards(tmp_path)


def micro_flags(train_path: str, val_path: str, log_dir: str, run_id: str, **overrides) -> list[str]:
    """Command-line flags of a micro run: a 2-layer, 32-wide model on the toy language."""
    settings = dict(train_files=train_path, val_files=val_path, vocab_size=MICRO_VOCAB, bos_id=MICRO_BOS,
                    n_layer=2, n_embd=32, n_head=2, seq_len=32, batch_tokens=384, device_batch_size=2,
                    val_batch_size=4, num_epochs=2, muon_lr=0.02, embed_lr=0.05, head_lr=0.01,
                    logit_softcap=15.0, log_every=1, log_dir=log_dir, run_id=run_id, device="cpu",
                    save_model=False)
    settings.update(overrides)
    flags = []
    for name, value in settings.items():
        flags += [f"--{name}", str(value)]
    return flags


def read_metrics(run_folder: str) -> list[dict]:
    with open(os.path.join(run_folder, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def member_weights(run_folder: str, member: int) -> dict:
    """A finished member's weights (members/member_NN.pt), by parameter name."""
    return torch.load(os.path.join(run_folder, "members", f"member_{member:02d}.pt"), weights_only=False)["model"]


def micro_preset_run(preset: str, micro_data, tmp_path, **overrides) -> tuple[str, list[float]]:
    """train_gpt.main with --preset at micro width (micro_flags plus the preset's shrunk shapes in overrides), 3
    steps, no evaluation or checkpoint on the way: (the run's log text, its train losses)."""
    train_path, val_path = micro_data
    flags = ["--preset", preset] + micro_flags(train_path, val_path, str(tmp_path), "micro_" + preset,
                                               **{"max_steps": 3, "val_every": -1, "checkpoint_every": -1,
                                                  "test_files": "", **overrides})
    assert train_gpt.main(flags) == 0
    log = open(os.path.join(tmp_path, "micro_" + preset, "log.txt")).read()
    metrics = read_metrics(os.path.join(str(tmp_path), "micro_" + preset))
    return log, [row["train_loss"] for row in metrics if "train_loss" in row]


def run_script(args: list[str], nproc: int = 1, timeout: int = 300, one_thread: bool = True) -> subprocess.CompletedProcess:
    """Runs train_gpt.py in a fresh process (under torchrun when nproc > 1). one_thread: OMP_NUM_THREADS=1, so that
    several ranks on 2 cores do not oversubscribe them; False leaves torch its default (every core)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if one_thread:
        env["OMP_NUM_THREADS"] = "1"
    else:
        env.pop("OMP_NUM_THREADS", None)
    script = os.path.join(REPO_ROOT, "train_gpt.py")
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   script, *args]
    else:
        command = [sys.executable, script, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO_ROOT)


def assert_bitwise_plain_reference(hp) -> None:
    """hp (flags at their defaults on the fixture's micro shape) gives the stored plain logits, gradients and one
    optimizer step of tests/fixtures/plain_reference.pt (made before the refactor) bit for bit."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures"))
    import make_plain_reference as reference
    stored = torch.load(os.path.join(os.path.dirname(__file__), "fixtures", "plain_reference.pt"), weights_only=True)
    plain = reference.model_outputs(hp)
    assert torch.equal(plain["logits"][0], stored["plain"]["logits"][0])
    for name, grad in plain["grads"].items():
        assert torch.equal(grad, stored["plain"]["grads"][name]), name
    for name, param in reference.optimizer_step(hp).items():
        assert torch.equal(param, stored["step"][name]), name


def pytest_configure(config):
    config.addinivalue_line("markers", "stored_bitwise: compares bit for bit with a stored fixture, which holds for "
                                       "the AVX2 CPU kernels only (the pin at the top of tests/conftest.py)")


def pytest_collection_modifyitems(config, items):
    """On a CPU without the fixtures' kernels (an ARM laptop), or with other kernels chosen by hand, the stored-bitwise
    tests skip with the reason instead of failing by an ulp; every other test still runs."""
    capability = torch.backends.cpu.get_cpu_capability()
    chosen = {name: os.environ.get(name) for name in FIXTURE_KERNELS}
    if capability == "AVX2" and chosen == FIXTURE_KERNELS:
        return
    skip = pytest.mark.skip(reason=f"stored fixtures are bitwise for the AVX2 CPU kernels; this process runs "
                                   f"{capability} ({', '.join(f'{k}={v}' for k, v in chosen.items())})")
    for item in items:
        if "stored_bitwise" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    """The CPU kernels the bitwise fixtures are compared under (see the pin above)."""
    return f"torch {torch.__version__}, CPU kernels {torch.backends.cpu.get_cpu_capability()}"
