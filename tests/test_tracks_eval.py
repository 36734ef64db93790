"""The 1h record's evaluation and the rest of its model (records/TRACKS.md F9, F12, F13, F22, F23, IHA LR): each
against a hand computation or a float64 re-implementation of the public formula written here, and each flag at its
default leaving the plain model bitwise as the stored fixture has it."""
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures"))
import make_plain_reference as reference  # noqa: E402

REFERENCE = torch.load(os.path.join(os.path.dirname(__file__), "fixtures", "plain_reference.pt"), weights_only=True)


def micro_hp(**overrides) -> train_gpt.Hyperparameters:
    settings = dict(vocab_size=16, bos_id=15, n_layer=2, n_embd=8, n_head=2, seq_len=6, logit_softcap=10.0)
    settings.update(overrides)
    return train_gpt.Hyperparameters(**settings)


# ------------------------------------------------------------------------------------------- defaults are plain

@pytest.mark.parametrize("flag, on, default", [("mtp_weight", 0.3, dict(mtp_style="linear")),
                                               ("stochastic_depth", 0.1, dict(stochastic_depth_style="sequence"))])
def test_default_styles_leave_the_stored_model_bitwise(flag, on, default):
    """The styles at their defaults are the fixture's model with the trick on, bitwise (made before these flags)."""
    hp = train_gpt.Hyperparameters(**reference.MICRO, **{flag: on}, **default)
    for got, want in zip(reference.model_outputs(hp)["logits"], REFERENCE["flags"][flag]):
        assert torch.equal(got, want)


@pytest.mark.stored_bitwise
def test_new_flags_at_default_leave_the_plain_step_bitwise():
    """head_mix_lr 0, val_public_windows 0, epoch_snapshot_weights equal: one optimizer step equals the fixture's."""
    hp = train_gpt.Hyperparameters(**reference.MICRO, head_mix_lr=0.0, val_public_windows=0,
                                   epoch_snapshot_weights="equal", mtp_style="block", stochastic_depth_style="batch")
    step = reference.optimizer_step(hp)  # mtp_style and stochastic_depth_style without their trigger: no effect
    assert step.keys() == REFERENCE["step"].keys()
    assert all(torch.equal(step[name], REFERENCE["step"][name]) for name in step)


# ------------------------------------------------------------------------------------------- F22 public windows

def test_public_windows_are_numpy_permutation_and_split_over_ranks():
    # numpy's RandomState(42).permutation(10) is [8 1 5 0 7 2 9 4 3 6] (a well-known value): the first 4 windows
    tokens = np.arange(10 * 7 + 3, dtype=np.uint16)  # 10 disjoint windows of seq_len + 1 = 7 tokens, 3 left over
    data = train_gpt.PublicWindows(tokens, 6, "synthetic", 4, 42)
    assert data.window_ids.tolist() == [8, 1, 5, 0] and data.num_targets == 24
    seen = []
    for rank in range(2):
        for inputs, targets in data.batches(rank, 2, 3):
            for row_in, row_t in zip(inputs.tolist(), targets.tolist()):
                k = row_in[0] // 7
                assert row_in == list(range(7 * k, 7 * k + 6)) and row_t == list(range(7 * k + 1, 7 * k + 7))
                seen.append(k)
    assert sorted(seen) == [0, 1, 5, 8]
    with pytest.raises(train_gpt.DataError):
        train_gpt.PublicWindows(tokens, 6, "synthetic", 11, 42)


def test_public_windows_on_10000_tokens_equal_independent_numpy_choice():
    tokens = np.random.RandomState(0).randint(0, 16, 10_000).astype(np.uint16)
    data = train_gpt.PublicWindows(tokens, 15, "synthetic", 100, 42)
    expected = np.random.RandomState(42).permutation(10_000 // 16)[:100]
    rows = torch.cat([torch.cat([i, t[:, -1:]], 1) for i, t in data.batches(0, 1, 7)])
    assert torch.equal(rows, torch.from_numpy(np.stack([tokens[k * 16:(k + 1) * 16] for k in expected]).astype(np.int64)))


class TableModel(torch.nn.Module):
    """logits = table[token]: known logits for a float64 reference."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table.float(), requires_grad=False)

    def forward(self, idx):
        return self.table[idx]


def float64_mixture_scores(tables, weights, data, token_bytes):
    """-log sum_i w_i softmax(table_i[x])[y] per target, float64: (mean nats, nats of byte-bearing targets / (ln 2 bytes))."""
    nats, with_bytes, total_bytes = [], 0.0, 0
    for k in data.window_ids:
        window = data.tokens[k * 7:(k + 1) * 7].astype(np.int64)
        for x, y in zip(window[:-1], window[1:]):
            p = sum(w * torch.softmax(t.double()[x], 0)[y].item() for t, w in zip(tables, weights))
            nats.append(-math.log(p))
            if token_bytes[y] > 0:
                with_bytes += nats[-1]
            total_bytes += token_bytes[y]
    return sum(nats) / len(nats), with_bytes / (math.log(2) * total_bytes)


def test_mixture_loss_and_bits_per_byte_match_float64():
    """F9 recency weights (1/3, 2/3) over two models and F22's loss and bpb, against the float64 formulas."""
    generator = torch.Generator().manual_seed(0)
    tables = [torch.randn(16, 16, generator=generator) * 2 for _ in range(2)]
    tokens = np.random.RandomState(1).randint(0, 16, 10 * 7).astype(np.uint16)
    data = train_gpt.PublicWindows(tokens, 6, "synthetic", 6, 42)
    token_bytes = np.array([1, 2, 3, 0, 1, 1, 4, 2, 1, 0, 3, 1, 1, 2, 5, 0], dtype=np.int64)
    mix = train_gpt.snapshot_mixtures(train_gpt.Hyperparameters(epoch_snapshot_weights="recency"), 2)["recency"]
    assert mix == pytest.approx([1 / 3, 2 / 3], abs=1e-15)
    loss, bpb = train_gpt.score([TableModel(t) for t in tables], mix, data, train_gpt.Dist(), 4, token_bytes=token_bytes)
    want_loss, want_bpb = float64_mixture_scores(tables, [1 / 3, 2 / 3], data, token_bytes)
    assert loss == pytest.approx(want_loss, rel=1e-6) and bpb == pytest.approx(want_bpb, rel=1e-6)


def test_snapshot_mixtures_by_flag():
    both = train_gpt.snapshot_mixtures(train_gpt.Hyperparameters(epoch_snapshot_weights="both"), 3)
    assert both["equal"] == pytest.approx([1 / 3] * 3) and both["recency"] == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    assert list(train_gpt.snapshot_mixtures(train_gpt.Hyperparameters(), 3)) == ["equal"]


def test_public_figure_takes_lowest_bpb_epoch_then_lower_loss_average():
    """The 1h rule: the epoch with the lowest bpb gives its loss (not the lowest loss); an average replaces it only
    when its loss is lower."""
    tokens = np.random.RandomState(1).randint(0, 16, 10 * 7).astype(np.uint16)
    data = train_gpt.RunData(tokens, tokens, None, None, public_data=train_gpt.PublicWindows(tokens, 6, "s", 6, 42),
                             token_bytes=np.ones(16, np.int64))
    rows = [dict(step=10, epoch=1.0, val_loss=3.0, val_bpb=2.0), dict(step=20, epoch=2.0, val_loss=2.9, val_bpb=2.1)]
    hp = train_gpt.Hyperparameters(val_batch_size=4)
    alone = train_gpt.public_figure_rows(hp, train_gpt.Dist(), data, rows, {})
    assert alone["val_loss_public"] == 3.0 and alone["chosen"] == "epoch end, step 10"
    uniform = TableModel(torch.zeros(16, 16))  # loss ln 16 = 2.77 < 3.0: replaces; a worse one would not
    figure = train_gpt.public_figure_rows(hp, train_gpt.Dist(), data, rows, {"avg": ([uniform], [1.0])})
    assert figure["chosen"] == "avg" and figure["val_loss_public"] == pytest.approx(math.log(16), rel=1e-6)
    assert figure["val_bpb_public"] == pytest.approx(math.log(16) / math.log(2), rel=1e-6)
    rows[0]["val_loss"] = 2.5
    assert train_gpt.public_figure_rows(hp, train_gpt.Dist(), data, rows, {"avg": ([uniform], [1.0])})["chosen"] == \
        "epoch end, step 10"


def test_token_byte_counts_of_gpt2():
    counts = train_gpt.token_byte_lengths("gpt2", 50304)
    assert counts[0] == 1 and counts[262] == 4 and counts[50255] == 6  # "!", " the", " gazed"
    assert counts[50256] == 0 and counts[50257:].sum() == 0  # <|endoftext|> and padding count no bytes


def test_public_windows_count_the_runs_own_token_bytes(tmp_path, monkeypatch):
    """--val_public_windows on the byte track scores bits per byte with the bytes' own table: every byte id 1 byte,
    the document separator (256) none. Before, the GPT-2 table was used whatever the tokenizer: id 256 counted 2
    bytes (GPT-2's token 256), and on mini_bpe 555 of the 1,024 ids had the wrong length."""
    seen, score = [], train_gpt.score

    def recording(*args, **kwargs):
        if kwargs.get("token_bytes") is not None:
            seen.append(np.asarray(kwargs["token_bytes"]))
        return score(*args, **kwargs)
    monkeypatch.setattr(train_gpt, "score", recording)
    flags = ["--preset", "mini", "--train_tokens", "8192", "--val_tokens", "4096", "--test_files", "",
             "--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--batch_tokens", "1024", "--device_batch_size", "8",
             "--max_steps", "2", "--val_public_windows", "4", "--log_dir", str(tmp_path), "--run_id", "bytes",
             "--save_model", "false"]
    assert train_gpt.main(flags) == 0
    assert seen and all(table[:256].tolist() == [1] * 256 and table[256] == 0 for table in seen)


def test_unknown_ensemble_mode_is_refused_by_score():
    with pytest.raises(train_gpt.ConfigError, match="unknown ensemble mode 'geometric'"):
        train_gpt.score([], [], None, train_gpt.Dist(), 1, "geometric")


# ------------------------------------------------------------------------------------------- F23 data line

def test_public_val_status(tmp_path):
    tokens = np.arange(100, dtype=np.uint16)
    path = str(tmp_path / "fineweb_val.bin")
    train_gpt.write_shard(path, tokens)
    hp = train_gpt.Hyperparameters(val_files=path)
    assert "unknown" in train_gpt.public_val_status(hp)
    import hashlib
    manifest = dict(splits=dict(val=dict(sha256=hashlib.sha256(tokens.astype("<u2").tobytes()).hexdigest())))
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert "unknown" in train_gpt.public_val_status(hp) and "--export slowrun" in train_gpt.public_val_status(hp)
    for published, verdict in ((True, "val = public: yes"), (False, "val = public: NO")):
        manifest["export"] = dict(slowrun=dict(val=dict(matches_published=published)))
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
        assert train_gpt.public_val_status(hp).startswith(verdict)
    train_gpt.write_shard(path, tokens[::-1].copy())  # another val file than the manifest's
    assert train_gpt.public_val_status(hp).startswith("val = public: no (")


# ------------------------------------------------------------------------------------------- F13 stochastic depth

def test_batch_stochastic_depth_keeps_or_drops_the_whole_block():
    config = train_gpt.model_config(micro_hp(n_layer=3, stochastic_depth=0.5, stochastic_depth_style="batch"))
    blocks = [train_gpt.Block(config, layer) for layer in range(4)]  # layer 3 = the MTP block's index L
    assert [b.drop_prob for b in blocks] == pytest.approx([0.0, 0.25, 0.5, 0.75])  # p l / (L - 1)
    block = blocks[2]
    torch.nn.init.normal_(block.attn.c_proj.weight, std=0.3)
    x = torch.randn(3, 6, 8)
    cos, sin = train_gpt.rotary_tables(6, 4, 10000.0)
    full = block.eval()(x, cos, sin)  # eval: the block always runs
    block.train()
    torch.manual_seed(0)
    kept = 0
    for _ in range(1000):
        out = block(x, cos, sin)
        # x_in + keep (x_out - x_in): dropped is x exactly, kept is block(x) up to rounding, for the whole batch
        is_kept, is_dropped = torch.allclose(out, full, atol=1e-6, rtol=0), torch.equal(out, x)
        assert is_kept != is_dropped  # one of the two, never a mix, never rescaled by 1/(1-p)
        kept += is_kept
    assert abs(kept / 1000 - 0.5) < 0.05
    blocks[0].train()
    assert torch.equal(blocks[0](x, cos, sin), blocks[0].eval()(x, cos, sin))  # layer 0 never dropped


# ------------------------------------------------------------------------------------------- F12 MTP block

def rope64(x, positions):
    """(T, H, D) float64 rotary with pairs (x[:D/2], x[D/2:]), base 10000."""
    half = x.size(-1) // 2
    inv = 1.0 / 10000 ** (torch.arange(0, x.size(-1), 2, dtype=torch.float64) / x.size(-1))
    angle = positions[:, None, None] * inv
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * angle.cos() + x2 * angle.sin(), x2 * angle.cos() - x1 * angle.sin()], -1)


def norm64(x):
    return x / (x.square().mean(-1, keepdim=True) + torch.finfo(torch.float32).eps).sqrt()


def mtp_term_float64(model, h, targets, cap):
    """The 1h record's MTP loss (mean CE over the valid y_{t+1}) for one row, float64, written out by hand."""
    W = {n: p.detach().double() for n, p in model.named_parameters()}
    T, H = h.size(0) - 1, model.config.n_head
    D = h.size(1) // H
    e = norm64(W["wte.weight"][targets[:-1].clamp(min=0)])
    c = torch.cat([norm64(h[:-1]), e], -1) @ W["mtp_proj.weight"].T
    a = norm64(c)
    q, k, v = ((a @ W[f"mtp_block.attn.c_{n}.weight"].T).view(T, H, D) for n in "qkv")
    pos = torch.arange(T, dtype=torch.float64)
    q, k = norm64(rope64(q, pos)), norm64(rope64(k, pos))
    scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
    y = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(T, -1)
    c = c + y @ W["mtp_block.attn.c_proj.weight"].T
    m = torch.relu(norm64(c) @ W["mtp_block.mlp.c_fc.weight"].T).square()
    c = c + m @ W["mtp_block.mlp.c_proj.weight"].T
    z = norm64(c) @ W["lm_head.weight"].T
    z = cap * torch.tanh(z / cap)
    y_next = targets[1:]
    valid = y_next >= 0
    return (torch.logsumexp(z, -1) - z.gather(-1, y_next.clamp(min=0)[:, None]).squeeze(-1))[valid].mean().item()


@pytest.mark.parametrize("fused", [None, ("chunked", 10.0)])
def test_block_mtp_term_matches_float64_reference(fused):
    hp = micro_hp(mtp_weight=0.3, mtp_style="block")
    torch.manual_seed(0)
    model = train_gpt.GPT(train_gpt.model_config(hp))
    bound = 3**0.5 * 8**-0.5  # the 1h init: sqrt(3) n_embd^-0.5 although the fan-in is 2 n_embd
    assert model.mtp_proj.weight.shape == (8, 16) and model.mtp_proj.weight.abs().max() <= bound
    assert model.mtp_proj.weight.abs().max() > 0.9 * bound
    with torch.no_grad():
        for block in [*model.blocks, model.mtp_block]:
            torch.nn.init.normal_(block.attn.c_proj.weight, std=0.3)
            torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.3)
        torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    inputs = torch.randint(0, 16, (2, 6), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 16, (2, 6), generator=torch.Generator().manual_seed(2))
    targets[1, 4:] = -1  # padding: embedded as token 0, not scored
    model.train()
    loss, objective = train_gpt.training_loss_sums(model, inputs, targets, 0.3, fused=fused, mtp_style="block")
    with torch.no_grad():
        h = model.residual_stream(inputs).double()
    n_lm = (targets >= 0).sum().item()
    lm = [F.cross_entropy(l, t, ignore_index=-1, reduction="sum").item() for l, t in zip(model.eval()(inputs), targets)]
    # the record: mean over the micro-batch's valid MTP targets (all rows together), added to the next-token mean
    mtp_rows = [(mtp_term_float64(model, h[b], targets[b], 10.0), (targets[b, 1:] >= 0).sum().item()) for b in range(2)]
    mtp_mean = sum(m * n for m, n in mtp_rows) / sum(n for _, n in mtp_rows)
    assert loss.item() == pytest.approx(sum(lm), rel=1e-5)
    assert (objective.item() - loss.item()) / n_lm == pytest.approx(0.3 * mtp_mean, rel=1e-4)
    grads = torch.autograd.grad(objective, [model.mtp_proj.weight, model.mtp_block.attn.c_q.weight])
    assert all(g.abs().sum() > 0 for g in grads)


def test_mtp_block_and_head_mix_optimizer_groups():
    hp = micro_hp(mtp_weight=0.3, mtp_style="block", head_mix=True, head_mix_lr=0.02, scalar_lr=0.025,
                  attn_gate=True)
    model = train_gpt.GPT(train_gpt.model_config(hp))
    adamw, muon = train_gpt.build_optimizers(model, hp, train_gpt.Dist())
    muon_ids = {id(p) for group in muon.param_groups for p in group["params"]}
    named = dict(model.named_parameters())
    assert all(id(named[f"mtp_block.{n}.weight"]) in muon_ids for n in ("attn.c_q", "attn.c_proj", "mlp.c_fc"))
    assert id(named["mtp_proj.weight"]) in muon_ids
    mix_group = [g for g in adamw.param_groups if any(p is named["mtp_block.attn.head_mix"] for p in g["params"])]
    assert len(mix_group) == 1 and mix_group[0]["lr"] == 0.02 and mix_group[0]["weight_decay"] == 0.0
    assert {id(p) for p in mix_group[0]["params"]} == {id(p) for n, p in named.items() if n.endswith("head_mix")}
    assert len(mix_group[0]["params"]) == 3  # two trunk blocks and the MTP block
    gates = [g for g in adamw.param_groups if any(p is named["blocks.0.attn.out_gate"] for p in g["params"])]
    assert gates[0]["lr"] == 0.025  # the other scalars keep scalar_lr
    # one AdamW step moves a head-mix entry with gradient 1 by exactly lr (first Adam step = lr * sign)
    before = named["blocks.0.attn.head_mix"].detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    named["blocks.0.attn.head_mix"].grad.fill_(1.0)
    adamw.step()
    assert torch.allclose(before - named["blocks.0.attn.head_mix"].detach(), torch.full_like(before, 0.02), atol=1e-7)


def test_bad_values_are_one_line_errors():
    for flags in (dict(mtp_style="deep"), dict(stochastic_depth_style="token"), dict(epoch_snapshot_weights="x"),
                  dict(epoch_snapshot_weights="both"), dict(val_public_windows=-1)):
        with pytest.raises(train_gpt.ConfigError):
            train_gpt.check_hyperparameters(micro_hp(**flags), 1)
    # an ensemble mixes its candidates uniformly: a snapshot weighting there (the 1h preset's, under --ensemble_size)
    # was silently ignored; it is accepted and the run's log says it is not used
    ensemble = micro_hp(epoch_snapshots=2, epoch_snapshot_weights="recency", ensemble_size=2)
    train_gpt.check_averaging(ensemble)  # the check of these flags: no refusal
    assert train_gpt.unused_settings(ensemble) == [
        "note | epoch_snapshot_weights recency weighs one model's epoch snapshots: this ensemble's 4 candidates mix "
        "uniformly (or by --ensemble_weights)"]
    assert train_gpt.unused_settings(micro_hp(epoch_snapshots=2, epoch_snapshot_weights="recency")) == []
