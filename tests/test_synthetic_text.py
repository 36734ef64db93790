"""bench/synthetic_text.py: the train budget kept byte for byte, each synthetic document a real prompt then bytes
drawn from the teacher's probability average (checked against float64 softmaxes of the members, not the sampler)."""
import os
import subprocess
import sys

import numpy as np
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import train_gpt  # noqa: E402

BOS = 256


def teacher_folder(tmp_path, seeds=(0, 1)) -> tuple[str, list]:
    """A finished run's folder with two byte-level members whose heads are scaled up: peaky, different outputs."""
    hp = train_gpt.Hyperparameters(vocab_size=257, bos_id=BOS, n_layer=1, n_embd=16, n_head=2, seq_len=16)
    models = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = train_gpt.GPT(train_gpt.model_config(hp))
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, 2.0)
        train_gpt.save_candidate(str(tmp_path / "teacher" / "members" / f"member_{seed:02d}.pt"), model)
        models.append(model.eval())
    return str(tmp_path / "teacher"), models


def synthesize(tmp_path, teacher, train_file, *flags) -> np.ndarray:
    out = str(tmp_path / "out.bin")
    done = subprocess.run([sys.executable, "bench/synthetic_text.py", "--teacher", teacher, "--out", out,
                           "--train_files", train_file, "--seq_len", "16", *flags],
                          cwd=REPO_ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr
    return train_gpt.read_shard(out).astype(np.int64)


def test_the_budget_comes_first_and_each_document_opens_with_a_real_prompt(tmp_path):
    teacher, _ = teacher_folder(tmp_path)
    tokens = synthesize(tmp_path, teacher, os.path.join(REPO_ROOT, "data/mini/mini_train.bin"),
                        "--synthetic_tokens", "300", "--prompt_len", "8", "--doc_len", "24", "--batch", "5")
    raw = train_gpt.read_shard(os.path.join(REPO_ROOT, "data/mini/mini_train.bin")).astype(np.int64)
    # the mini track's budget: --train_tokens 32768 cut back to the 4 whole documents = 27,033 bytes (records/mini)
    assert raw[27033] == BOS and np.array_equal(tokens[:27033], raw[:27033])
    synthetic = tokens[27033:]
    assert synthetic.size == 300
    budget = raw[:27033].tobytes()
    documents = [synthetic[start:start + 25] for start in range(0, 300, 25)]
    assert len(documents) == 12 and all(doc[0] == BOS for doc in documents)
    for doc in documents:
        assert doc[1:9].tobytes() in budget  # the prompt: 8 bytes copied from the budget
        assert doc[1:].max() <= BOS


def test_the_bytes_are_drawn_from_the_probability_average_of_the_members(tmp_path):
    """A train file of one repeated byte makes every context the same (BOS + 4 x 'a'), so 4,000 one-byte documents
    are 4,000 draws of one distribution: their frequencies must match the float64 average of the members'
    softmaxes (within 4.5 standard errors for every byte) and not the members' normalised geometric mean."""
    teacher, models = teacher_folder(tmp_path)
    train_file = str(tmp_path / "aaaa.bin")
    train_gpt.write_shard(train_file, np.full(200, ord("a")), tokenizer="bytes")
    draws = 4000
    tokens = synthesize(tmp_path, teacher, train_file, "--train_tokens", "200", "--synthetic_tokens", str(draws * 6),
                        "--prompt_len", "4", "--doc_len", "5", "--batch", "1000")
    documents = tokens[200:].reshape(draws, 6)
    assert (documents[:, :5] == [BOS] + [ord("a")] * 4).all()
    context = torch.tensor([[BOS] + [ord("a")] * 4])
    with torch.no_grad():
        members = [torch.softmax(model(context)[0, -1].double(), -1).numpy() for model in models]
        logs = [torch.log_softmax(model(context)[0, -1].double(), -1).numpy() for model in models]
    average = np.mean(members, axis=0)
    geometric = np.exp(np.mean(logs, axis=0))
    geometric /= geometric.sum()
    counts = np.bincount(documents[:, 5], minlength=257) / draws
    error = np.sqrt(average * (1 - average) / draws) + 1e-4
    assert np.all(np.abs(counts - average) <= 4.5 * error), np.max(np.abs(counts - average) / error)
    assert np.abs(counts - geometric).sum() > 3 * np.abs(counts - average).sum()  # the two mixtures differ here


def test_a_missing_teacher_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, "bench/synthetic_text.py", "--teacher", str(tmp_path / "nothing"), "--out",
                           str(tmp_path / "out.bin"), "--synthetic_tokens", "10"], cwd=REPO_ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 2 and not os.path.exists(tmp_path / "out.bin")
    assert done.stderr.strip().splitlines() == [f"synthetic_text.py: --teacher {tmp_path / 'nothing'}: no such "
                                                f"run folder"]
