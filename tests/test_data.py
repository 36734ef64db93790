"""The shard format, its one-line errors, and the epoch loader's guarantees."""
import math
import os

import numpy as np
import pytest
import torch

import train_gpt
from conftest import MICRO_BOS, synthetic_documents


# ---------------------------------------------------------------------------------------------------------- shards

def test_shard_round_trip(tmp_path):
    tokens = np.array([50256, 1, 2, 65535, 0], dtype=np.uint16)
    path = str(tmp_path / "a.bin")
    train_gpt.write_shard(path, tokens)
    assert os.path.getsize(path) == 1024 + 2 * tokens.size
    header = np.fromfile(path, dtype="<i4", count=3)
    assert header.tolist() == [20240520, 1, 5]
    assert np.array_equal(train_gpt.read_shard(path), tokens)
    assert not [name for name in os.listdir(tmp_path) if ".tmp" in name]  # the temporary file was renamed away


def _corrupt(path, offset, value, dtype="<i4"):
    data = bytearray(open(path, "rb").read())
    data[offset:offset + np.dtype(dtype).itemsize] = np.array([value], dtype=dtype).tobytes()
    open(path, "wb").write(bytes(data))


@pytest.fixture
def good_shard(tmp_path):
    path = str(tmp_path / "good.bin")
    train_gpt.write_shard(path, np.arange(100, dtype=np.uint16))
    return path


def _error_of(path, vocab_size=None) -> str:
    with pytest.raises(train_gpt.DataError) as info:
        train_gpt.read_shard(path, vocab_size)
    message = str(info.value)
    assert "\n" not in message and path in message  # one line, naming the file
    return message


def test_missing_file_error(tmp_path):
    assert "not found" in _error_of(str(tmp_path / "nope.bin"))


def test_wrong_magic_error(good_shard):
    _corrupt(good_shard, 0, 12345)
    assert "magic number 12345" in _error_of(good_shard)


def test_wrong_version_error(good_shard):
    _corrupt(good_shard, 4, 7)
    assert "version 7" in _error_of(good_shard)


def test_header_count_disagrees_with_size(good_shard):
    _corrupt(good_shard, 8, 101)  # header claims one token more than the file holds
    assert "header says 101 tokens" in _error_of(good_shard)
    with open(good_shard, "ab") as handle:  # and a file longer than its header says
        handle.write(b"\0" * 4)
    assert "truncated or corrupt" in _error_of(good_shard)


def test_short_file_error(tmp_path):
    path = str(tmp_path / "short.bin")
    open(path, "wb").write(b"\0" * 100)
    assert "too small" in _error_of(path)


def test_token_id_beyond_vocab(good_shard):
    assert "token id 99 at position 99 is >= vocab_size 99" in _error_of(good_shard, vocab_size=99)
    train_gpt.read_shard(good_shard, vocab_size=100)  # the boundary itself is fine


def test_val_smaller_than_one_sequence():
    with pytest.raises(train_gpt.DataError, match="fewer than one sequence of seq_len \\+ 1 = 33"):
        train_gpt.EvalData(np.arange(32, dtype=np.uint16), seq_len=32, name="val.bin")
    assert train_gpt.EvalData(np.arange(33, dtype=np.uint16), seq_len=32, name="val.bin").num_windows == 1


def test_no_file_matches_glob(tmp_path):
    with pytest.raises(train_gpt.DataError, match="no train file matches"):
        train_gpt.load_tokens(str(tmp_path / "*.bin"), 50304, "train")


def test_glob_concatenates_in_name_order(tmp_path):
    train_gpt.write_shard(str(tmp_path / "b_001.bin"), np.array([3, 4], dtype=np.uint16))
    train_gpt.write_shard(str(tmp_path / "b_000.bin"), np.array([1, 2], dtype=np.uint16))
    assert train_gpt.load_tokens(str(tmp_path / "b_*.bin"), 10, "train").tolist() == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------------------- loader

def _all_windows(data: train_gpt.TrainData, epoch: int, world_size: int) -> list[np.ndarray]:
    """Every window that any rank trains on in one epoch, in (step, micro-step, rank) order."""
    windows = []
    for step in range(data.steps_in(epoch)):
        for micro in range(data.grad_accum_steps(epoch)):
            for rank in range(world_size):
                ids = data.window_ids(epoch, step, micro, rank)
                windows.extend(data.windows(epoch, ids))
    return windows


def _make_loader(tokens, world_size, rank=0, seed=0, seq_len=16, batch_seqs=12, device_batch_size=2, schedule=()):
    return train_gpt.TrainData(tokens, MICRO_BOS, seq_len, batch_seqs, device_batch_size, world_size, rank, seed,
                               schedule)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("schedule", [(), (0.5, 1.0)])
def test_every_train_token_exactly_once_per_epoch(world_size, schedule):
    tokens = synthetic_documents(40, seed=3)
    data = _make_loader(tokens, world_size, device_batch_size=1, schedule=schedule)
    for epoch in range(3):
        windows = _all_windows(data, epoch, world_size)
        used = np.concatenate([w[w >= 0] for w in windows])
        # The windows, read in order, are exactly this epoch's shuffled stream: each token once, none invented.
        assert np.array_equal(used, train_gpt.shuffled_stream(tokens, data.doc_starts, 0, epoch))
        assert np.array_equal(np.sort(used), np.sort(tokens.astype(np.int64)))
        # Padding (-1) appears only at the end of the epoch: the stream's short last window and filler windows.
        flat = np.concatenate(windows)
        assert (flat[:used.size] >= 0).all() and (flat[used.size:] == -1).all()


@pytest.mark.parametrize("schedule", [(), (0.5, 1.0)])
def test_ranks_split_the_same_global_batch(schedule):
    """Rank r of a 2-rank run trains on the same windows as the 1-rank run's matching micro-steps."""
    tokens = synthetic_documents(40, seed=3)
    one = _make_loader(tokens, 1, device_batch_size=1, schedule=schedule)
    two = [_make_loader(tokens, 2, rank=r, device_batch_size=1, schedule=schedule) for r in range(2)]
    for epoch in range(2):
        assert one.steps_in(epoch) == two[0].steps_in(epoch)
        for step in range(one.steps_in(epoch)):
            single = np.concatenate([one.window_ids(epoch, step, m, 0) for m in range(one.grad_accum_steps(epoch))])
            split = np.concatenate([two[r].window_ids(epoch, step, m, r)
                                    for m in range(two[0].grad_accum_steps(epoch)) for r in range(2)])
            assert np.array_equal(np.sort(single), np.sort(split))
            assert one.step_target_count(epoch, step) == two[1].step_target_count(epoch, step)


def test_batch_schedule_numbers_steps_across_epochs():
    """With per-epoch batch multipliers, epochs have different step counts; locate, epoch_start and
    epoch_position agree with a step-by-step walk through the epochs."""
    tokens = synthetic_documents(40, seed=3)
    data = _make_loader(tokens, 1, batch_seqs=8, schedule=(0.25, 0.5, 1.0))
    assert [data.batch_seqs(e) for e in range(5)] == [2, 4, 8, 8, 8]
    counts = [data.steps_in(e) for e in range(5)]
    assert counts[0] > counts[1] > counts[2] == counts[3] == counts[4]
    walk = [(epoch, step) for epoch in range(5) for step in range(counts[epoch])]
    assert [data.locate(s) for s in range(len(walk))] == walk
    assert [data.epoch_start(e) for e in range(6)] == [sum(counts[:e]) for e in range(5)] + [len(walk)]
    assert data.epoch_position(sum(counts[:2]) + counts[2] // 2) == pytest.approx(2 + (counts[2] // 2) / counts[2])
    assert data.epoch_position(len(walk)) == 5.0


def test_epochs_differ_and_seeds_repeat():
    tokens = synthetic_documents(40, seed=3)
    starts = train_gpt.document_starts(tokens, MICRO_BOS)
    epoch0 = train_gpt.shuffled_stream(tokens, starts, seed=0, epoch=0)
    assert not np.array_equal(epoch0, train_gpt.shuffled_stream(tokens, starts, seed=0, epoch=1))
    assert not np.array_equal(epoch0, train_gpt.shuffled_stream(tokens, starts, seed=1, epoch=0))
    assert np.array_equal(epoch0, train_gpt.shuffled_stream(tokens, starts, seed=0, epoch=0))
    # Whole documents move: every document start in the shuffled stream is still a bos token.
    assert (epoch0[train_gpt.document_starts(epoch0, MICRO_BOS)] == MICRO_BOS).all()


def test_step_target_count_matches_the_windows():
    tokens = synthetic_documents(40, seed=3)
    data = _make_loader(tokens, 2)
    total = 0
    for step in range(data.steps_in(0)):
        counted = 0
        for micro in range(data.grad_accum_steps(0)):
            for rank in range(2):
                windows = data.windows(0, data.window_ids(0, step, micro, rank))
                counted += int((windows[:, 1:] >= 0).sum())
        assert counted == data.step_target_count(0, step)
        total += counted
    # Each window of w tokens gives w - 1 targets.
    assert total == tokens.size - data.windows_per_epoch


def test_micro_batch_shapes_and_padding():
    tokens = synthetic_documents(5, seed=4)  # fewer tokens than one global batch: mostly padding
    data = _make_loader(tokens, 1)
    inputs, targets = data.micro_batch(0, 0, data.grad_accum_steps(0) - 1)
    assert inputs.shape == targets.shape == (2, 16) and inputs.dtype == targets.dtype == torch.int64
    assert (inputs >= 0).all()  # padded inputs become token 0, their targets -1
    assert (targets == -1).all()


def test_eval_windows_cover_the_set_once_on_any_world_size():
    tokens = np.arange(1000, dtype=np.uint16)
    data = train_gpt.EvalData(tokens, seq_len=32, name="val")
    for world_size in (1, 2, 3):
        targets = torch.cat([t.reshape(-1) for rank in range(world_size)
                             for _, t in data.batches(rank, world_size, batch_size=4)])
        assert sorted(targets.tolist()) == list(range(1, 1 + data.num_targets))


def test_truncate_to_document():
    tokens = np.array([9, 1, 2, 9, 3, 9, 4, 4, 4], dtype=np.uint16)
    assert train_gpt.truncate_to_document(tokens, 3, 9, "t").tolist() == [9, 1, 2]  # ends exactly at a document
    assert train_gpt.truncate_to_document(tokens, 4, 9, "t").tolist() == [9, 1, 2]  # would split document 2
    assert train_gpt.truncate_to_document(tokens, 2, 9, "t").tolist() == [9, 1]  # first document longer than budget
    assert train_gpt.truncate_to_document(tokens, 99, 9, "t").size == 9


def test_unigram_loss_is_smoothed_train_frequencies_scored_on_val():
    train = np.array([0, 0, 0, 1])  # counts 3, 1, 0 (+1/2 each) over vocab 3 -> probs 3.5/5.5, 1.5/5.5, 0.5/5.5
    val = np.array([9, 0, 2])  # the first val token is never a target
    expected = -(np.log(3.5 / 5.5) + np.log(0.5 / 5.5)) / 2
    assert train_gpt.unigram_loss(train, val, vocab_size=3) == pytest.approx(expected)


def test_unigram_entropy():
    assert train_gpt.unigram_entropy(np.array([1, 1, 2, 2])) == pytest.approx(np.log(2))
    assert train_gpt.unigram_entropy(np.array([5, 5, 5])) == pytest.approx(0.0)


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("schedule, cycle_epochs", [((), 0), ((0.5, 0.5, 1.0, 1.0), 2)])
def test_public_stepping_reads_the_epochs_as_one_stream_of_whole_windows(world_size, schedule, cycle_epochs):
    """public_steps W (issue 23): each epoch keeps floor(windows / W) x W whole windows of its own shuffle, and the
    run reads epoch 0's, then epoch 1's, ... as one stream, B a step, so a step may end in the next epoch; the run is
    ceil(epochs x E / B) steps at a constant batch (its last windows from the next epoch's shuffle, as the public
    loader's are) and round(cycle windows / B_c) a cycle with a batch schedule. By hand: 40 documents of the toy
    language in windows of 17 tokens, W = 4, batch 12 sequences (8 and 16 with the schedule), 2 on each rank."""
    tokens = synthetic_documents(40, seed=3)
    epochs = 4
    full = 16 if cycle_epochs else 12  # every batch a multiple of 2 sequences x 2 ranks
    loaders = [train_gpt.TrainData(tokens, MICRO_BOS, 16, full, 2, world_size, rank, 0, schedule, public_steps=4,
                                   epochs=epochs, cycle_epochs=cycle_epochs) for rank in range(world_size)]
    data = loaders[0]
    whole = tokens.size // 17
    assert data.windows_per_epoch == whole // 4 * 4
    E = data.windows_per_epoch
    if cycle_epochs:  # cycles of 2 epochs at 8, then 16 sequences a step
        cycle_steps = [round(2 * E / 8), round(2 * E / 16)]
        assert data.run_steps(epochs) == data.schedule_steps(epochs) == sum(cycle_steps)
        batches = [8] * cycle_steps[0] + [16] * cycle_steps[1]
    else:
        assert data.run_steps(epochs) == math.ceil(epochs * E / 12)
        assert data.schedule_steps(epochs) == round(epochs * E / 12)
        batches = [12] * data.run_steps(epochs)
    expected = [train_gpt.shuffled_stream(tokens, data.doc_starts, 0, e)[:E * 17].reshape(E, 17)
                for e in range(epochs + 1)]
    stream = np.concatenate(expected)  # the epochs' windows one after another
    read = 0
    for step, batch in enumerate(batches):
        epoch, step_in_epoch = data.locate(step)
        assert epoch == read // E and data.epoch_start(epoch) <= step  # the epoch of the step's first window
        assert data.step_target_count(epoch, step_in_epoch) == batch * 16
        micro_steps = train_gpt.live_micro_steps(data, epoch, step_in_epoch, 0)
        assert micro_steps == batch // (2 * world_size)
        rows = []
        for micro in range(micro_steps):
            for loader in loaders:
                inputs, targets = loader.micro_batch(epoch, step_in_epoch, micro)
                rows.append(torch.cat([inputs[:, :1], targets], dim=1).numpy())
        assert np.array_equal(np.concatenate(rows), stream[read:read + batch])
        read += batch
    assert read >= epochs * E and (cycle_epochs or read - batch < epochs * E)  # every epoch whole, no extra step
    # each epoch ends after the step that reads its last window: the public's evaluation points
    assert [data.epoch_start(e) for e in range(1, epochs + 1)] == \
        [min(s for s in range(len(batches) + 1) if sum(batches[:s]) >= e * E) for e in range(1, epochs + 1)]
