"""The 15min record's model (issue 15, records/TRACKS.md F14 a-e, g and its F5 groups; qlabs-eng/slowrun tiny/train.py
at fd342f0): partial RoPE, the partial key offset, the resid lambda init, MLP dropout off, XSA's eps, the XSA and output
gate AdamW betas, and the recurrence of the whole stack. Each against a hand computation or a float64 model written
out in this file, each flag at its default leaving the plain model bitwise unchanged, and the compiled step with every
flag on (recurrence switching on mid-run: a bounded number of graphs)."""
import dataclasses
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import train_gpt
from conftest import assert_bitwise_plain_reference, micro_flags, read_metrics

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures"))
import make_plain_reference as reference  # noqa: E402

REFERENCE = torch.load(os.path.join(os.path.dirname(__file__), "fixtures", "plain_reference.pt"), weights_only=True)

# every flag of this work at its default (the plain model)
DEFAULTS = dict(rope_pairs=0, key_offset=False, resid_lambda_init=1.0, dropout_mlp=True, xsa_eps=1e-12, xsa_betas="",
                out_gate_betas="", recurrence=1, recurrence_start_frac=0.0)


def micro_hp(**overrides) -> train_gpt.Hyperparameters:
    return train_gpt.Hyperparameters(**{**dict(vocab_size=11, bos_id=10, n_layer=1, n_embd=8, n_head=2, seq_len=8),
                                        **overrides})


# ----------------------------------------------------------------------------------------------- defaults are plain

@pytest.mark.stored_bitwise
def test_15min_flags_at_default_leave_the_plain_model_and_step_bitwise():
    """Every flag set explicitly to its default: the stored plain logits, gradients and optimizer step
    (tests/fixtures/plain_reference.pt) come out bitwise, and so do the stored logits of fixed XSA and of resid_mix
    (the flags that pass a default eps or initial value into those tricks)."""
    hp = train_gpt.Hyperparameters(**reference.MICRO, **DEFAULTS)
    assert_bitwise_plain_reference(hp)
    for flag in ("xsa", "resid_mix"):
        flagged = train_gpt.Hyperparameters(**reference.MICRO, **DEFAULTS, **{flag: reference.FLAG_ON[flag]})
        assert torch.equal(reference.model_outputs(flagged)["logits"][0], REFERENCE["flags"][flag][0]), flag


@pytest.mark.stored_bitwise
def test_rope_pairs_equal_to_all_pairs_is_bitwise_plain():
    """rope_pairs = head_dim / 2 (every pair rotates): the public formula base^(-2j / 2r) is then the plain one, and
    the logits and gradients are the stored plain ones bitwise."""
    pairs = reference.MICRO["n_embd"] // reference.MICRO["n_head"] // 2
    hp = train_gpt.Hyperparameters(**reference.MICRO, rope_pairs=pairs)
    flagged = reference.model_outputs(hp)
    assert torch.equal(flagged["logits"][0], REFERENCE["plain"]["logits"][0])
    for name, grad in flagged["grads"].items():
        assert torch.equal(grad, REFERENCE["plain"]["grads"][name]), name


# ----------------------------------------------------------------------------------------------- F14a partial RoPE

def test_rope_pairs_rotate_only_the_first_pairs():
    """r = 2 of head_dim 8's 4 pairs: dims (2, 6) and (3, 7) come out unchanged at every position; (0, 4) rotate by
    angle t (inv_freq 1), (1, 5) by t * 10000^(-1/2) = t / 100 (float64 by hand; the tables are float32)."""
    time_steps = 6
    cos, sin = train_gpt.rotary_tables(time_steps, 8, 10000.0, pairs=2)
    assert cos.shape == (1, time_steps, 1, 4)
    x = torch.randn(1, time_steps, 1, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = train_gpt.apply_rotary(x, cos, sin)
    for dim in (2, 3, 6, 7):
        assert torch.equal(out[..., dim], x[..., dim]), dim
    for t in range(time_steps):
        for (a, b), angle in (((0, 4), t * 1.0), ((1, 5), t / 100.0)):
            c, s = math.cos(angle), math.sin(angle)
            assert abs(out[0, t, 0, a].item() - (x[0, t, 0, a].item() * c + x[0, t, 0, b].item() * s)) < 1e-6
            assert abs(out[0, t, 0, b].item() - (x[0, t, 0, b].item() * c - x[0, t, 0, a].item() * s)) < 1e-6
    # the 15min shape: 32 of head_dim 128's 64 pairs, inv_freq_j = 10000^(-2j/64) (tiny/train.py _precompute_rotary)
    cos, sin = train_gpt.rotary_tables(3, 128, 10000.0, pairs=32)
    angles = torch.tensor([2 * 10000.0 ** (-2 * j / 64) for j in range(32)], dtype=torch.float64)
    assert torch.allclose(cos[0, 2, 0, :32].double(), angles.cos(), atol=1e-6)
    assert torch.equal(cos[0, :, 0, 32:], torch.ones(3, 32)) and torch.equal(sin[0, :, 0, 32:], torch.zeros(3, 32))


# ----------------------------------------------------------------------------------------------- F14b key offset

def test_shift_key_half_on_a_hand_tensor():
    """(1, 3, 1, 4) keys 0..11: the last two dims of position t become position t-1's; position 0 keeps its own."""
    k = torch.arange(12.0).view(1, 3, 1, 4)
    expected = torch.tensor([[0, 1, 2, 3], [4, 5, 2, 3], [8, 9, 6, 7]], dtype=torch.float32).view(1, 3, 1, 4)
    assert torch.equal(train_gpt.shift_key_half(k), expected)
    assert torch.equal(train_gpt.shift_key_half(k[:, :1]), k[:, :1])  # one position: nothing to shift


def test_key_offset_acts_on_long_layers_and_the_last_one():
    """tiny/train.py: use_key_offset = (pattern letter == 'L') or last layer. 6 layers of SSSL: layers 3 and 5; the
    MTP block (layer index n_layer) never."""
    hp = micro_hp(n_layer=6, window_pattern="SSSL", key_offset=True, mtp_weight=0.3, mtp_style="block")
    model = train_gpt.GPT(train_gpt.model_config(hp))
    assert [block.attn.key_offset for block in model.blocks] == [False, False, False, True, False, True]
    assert model.mtp_block.attn.key_offset is False


# ----------------------------------------------------------------------------------------------- a float64 hand model

def rms(t: torch.Tensor) -> torch.Tensor:
    return t / torch.sqrt(t.square().mean(-1, keepdim=True) + torch.finfo(t.dtype).eps)


def hand_weights(model: train_gpt.GPT, trainable: bool) -> dict:
    return {name: p.detach().double().clone().requires_grad_(trainable) for name, p in model.named_parameters()}


def hand_layer(w: dict, x: torch.Tensor, x0: torch.Tensor, hp, key_offset: bool) -> torch.Tensor:
    """One block of a 1-layer model with resid_mix, value_proj, learned XSA, partial RoPE, written out: tiny/train.py's
    _run_network_once + Block + CausalSelfAttention.forward, in float64."""
    batch, time_steps, width = x.shape
    heads, dim = hp.n_head, width // hp.n_head
    h = w["resid_lambdas"][0] * x + w["x0_lambdas"][0] * x0
    a = rms(h)
    q, k, v = ((a @ w[f"blocks.0.attn.{name}.weight"].T).view(batch, time_steps, heads, dim)
               for name in ("c_q", "c_k", "c_v"))
    gate = 2 * torch.sigmoid(a[..., :width] @ w["blocks.0.attn.value_gate"].T)  # (B, T, H); 8 channels < 32: all
    v = v + gate.unsqueeze(-1) * (x0 @ w["blocks.0.attn.c_x0v.weight"].T).view(batch, time_steps, heads, dim)
    inv_freq = torch.tensor([hp.rope_base ** (-j / hp.rope_pairs) if j < hp.rope_pairs else 0.0
                             for j in range(dim // 2)], dtype=torch.float64)
    angles = torch.arange(time_steps, dtype=torch.float64)[:, None] * inv_freq  # (T, D/2)
    c, s = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]

    def rope(t):
        t1, t2 = t[..., :dim // 2], t[..., dim // 2:]
        return torch.cat([t1 * c + t2 * s, t2 * c - t1 * s], dim=-1)
    q, k = rms(rope(q)), rms(rope(k))
    if key_offset:  # the public's in-place form
        k = k.clone()
        k[:, 1:, :, dim // 2:] = k[:, :-1, :, dim // 2:].clone()
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(dim)
    scores = scores.masked_fill(~torch.ones(time_steps, time_steps, dtype=torch.bool).tril(), float("-inf"))
    y = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)
    v_hat = v / v.square().sum(-1, keepdim=True).sqrt().clamp_min(hp.xsa_eps)
    y = y - torch.tanh(w["blocks.0.attn.xsa_alpha"]).view(1, 1, heads, 1) * (y * v_hat).sum(-1, keepdim=True) * v_hat
    h = h + y.reshape(batch, time_steps, width) @ w["blocks.0.attn.c_proj.weight"].T
    m = rms(h)
    return h + F.relu(m @ w["blocks.0.mlp.c_fc.weight"].T).square() @ w["blocks.0.mlp.c_proj.weight"].T


def hand_logits(w: dict, idx: torch.Tensor, hp, passes: int, key_offset: bool = True, constant_first: dict = None):
    """tiny/train.py GPT.forward: x0 = norm(wte(idx)); each pass x = norm(layers(x, x0)); then norm once more, the
    lm_head, softcap 15. constant_first: the weights of the passes before the last, which then run on detached
    inputs: the no-grad passes, their output a constant to the last pass."""
    x0 = rms(w["wte.weight"][idx])
    x = x0
    for done in range(passes):
        if done == passes - 1 or constant_first is None:
            x = rms(hand_layer(w, x, x0, hp, key_offset))
        else:  # a constant: fixed weights, and inputs cut off from the embedding's gradient
            x = rms(hand_layer(constant_first, x.detach(), x0.detach(), hp, key_offset))
    z = rms(x) @ w["lm_head.weight"].T
    return 15 * torch.tanh(z / 15)


def hand_model_hp(**overrides):
    return micro_hp(resid_mix=True, resid_lambda_init=1.1, value_proj=True, xsa="learned", xsa_eps=1e-4,
                    rope_pairs=1, key_offset=True, window_pattern="L", recurrence=2, logit_softcap=15.0, **overrides)


def hand_model(hp) -> train_gpt.GPT:
    model = train_gpt.build_model(hp, train_gpt.Dist(), seed=0).double()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # the zero-initialised projections, gates and strengths would hide their terms
        for name, p in model.named_parameters():
            if name.endswith(("c_proj.weight", "value_gate", "xsa_alpha")):
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64) * 0.5)
        model.lm_head.weight.mul_(300)
    return model


IDX = torch.tensor([[1, 4, 2, 7, 3], [9, 0, 0, 5, 6]])


def test_the_15min_layer_matches_the_hand_model_and_every_flag_counts():
    """A 1-layer model with resid_mix (lambda 1.1), value projection, learned XSA (eps 1e-4), partial RoPE (1 of 2
    pairs) and the key offset, one pass (recurrence before its start): its logits equal the float64 hand model's,
    which norms the last pass twice; without the key offset in the hand model they do not (the flag acts)."""
    hp = hand_model_hp()
    model = hand_model(hp)
    assert torch.equal(model.resid_lambdas.detach(), torch.full((1,), 1.1, dtype=torch.float64).float().double())
    model.recurrence_active = False
    w = hand_weights(model, trainable=False)
    ours = model(IDX).double()  # float32 logits (GPT.head)
    assert torch.allclose(ours, hand_logits(w, IDX, hp, passes=1), atol=1e-5, rtol=0)
    assert not torch.allclose(ours, hand_logits(w, IDX, hp, passes=1, key_offset=False), atol=1e-3, rtol=0)
    assert not torch.allclose(ours, hand_logits(w, IDX, dataclasses.replace(hp, rope_pairs=2), passes=1),
                              atol=1e-3, rtol=0)


# ----------------------------------------------------------------------------------------------- F14e recurrence

def test_recurrence_two_passes_equal_the_hand_model_and_its_gradients_the_last_pass_alone():
    """Two passes: logits = f(rms(f(x0), x0)) with the final double norm, in training and in evaluation; the
    gradients equal the hand model's with the first pass's weights held constant (its output a constant input to
    the second pass), and differ from those of backpropagating through both passes."""
    hp = hand_model_hp()
    model = hand_model(hp)
    model.train()
    ours = model(IDX)
    (ours.square().mean()).backward()
    w = hand_weights(model, trainable=True)
    hand = hand_logits(w, IDX, hp, passes=2, constant_first=hand_weights(model, trainable=False))
    assert torch.allclose(ours.detach().double(), hand.detach(), atol=1e-5, rtol=0)
    hand.square().mean().backward()
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, w[name].grad, atol=1e-6, rtol=1e-4), name
    both = hand_weights(model, trainable=True)
    hand_logits(both, IDX, hp, passes=2).square().mean().backward()
    assert max((both[name].grad - p.grad).abs().max().item() for name, p in model.named_parameters()) > 1e-3
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(IDX).double(), hand.detach(), atol=1e-5, rtol=0)


def test_recurrence_switches_on_where_the_public_schedule_does():
    """tiny/train.py get_scheduled_iterations with the late transition (ratio 0.3): 1 pass while step / N < 1 - 0.3,
    2 after. N = 2850: the last 1-pass step is 1994; the training loop's switch agrees at every step."""
    hp = train_gpt.Hyperparameters(recurrence=2, recurrence_start_frac=0.7)
    public = [1 if step / 2850 < 1.0 - 0.3 else 2 for step in range(2850)]
    ours = [2 if train_gpt.recurrence_on(step, 2850, hp) else 1 for step in range(2850)]
    assert ours == public and public.index(2) == 1995


# ----------------------------------------------------------------------------------------------- F14c, d, g

def test_dropout_mlp_false_leaves_the_mlp_branch_undropped():
    """dropout 0.5 in training with a zero attention output: dropout_mlp False gives x + mlp(rms(x)) exactly as
    written out in float64; with the default (True) some MLP outputs are dropped or doubled."""
    torch.manual_seed(0)
    for dropout_mlp in (False, True):
        block = train_gpt.Block(train_gpt.model_config(micro_hp(dropout=0.5, dropout_mlp=dropout_mlp))).double().train()
        with torch.no_grad():
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.normal_()
        x = torch.randn(2, 5, 8, dtype=torch.float64)
        cos, sin = train_gpt.rotary_tables(5, 4, 10000.0)
        hand = x + F.relu(rms(x) @ block.mlp.c_fc.weight.T).square() @ block.mlp.c_proj.weight.T
        out = block(x, cos, sin)
        assert torch.allclose(out, hand, atol=1e-12) is not dropout_mlp


def test_xsa_eps_floors_the_value_norm():
    """y = (1, 2), v = (3e-6, 4e-6) (norm 5e-6): eps 1e-4 gives v_hat = v / 1e-4 = (0.03, 0.04), y.v_hat = 0.11,
    y - 0.11 v_hat = (0.9967, 1.9956); the default eps 1e-12 gives v_hat = (0.6, 0.8), y.v_hat = 2.2, so
    (-0.32, 0.24)."""
    y = torch.tensor([1.0, 2.0], dtype=torch.float64).view(1, 1, 1, 2)
    v = torch.tensor([3e-6, 4e-6], dtype=torch.float64).view(1, 1, 1, 2)
    floored = train_gpt.exclusive_self_attention(y, v, 1.0, 1e-4).flatten().tolist()
    plain = train_gpt.exclusive_self_attention(y, v, 1.0).flatten().tolist()
    assert floored == pytest.approx([0.9967, 1.9956], abs=1e-12) and plain == pytest.approx([-0.32, 0.24], abs=1e-9)
    assert train_gpt.GPT(train_gpt.model_config(micro_hp(xsa="learned", xsa_eps=1e-4))).blocks[0].attn.xsa_eps == 1e-4


# ----------------------------------------------------------------------------------------------- F5: 15min's groups

def test_xsa_and_out_gate_train_in_their_own_adamw_groups():
    """xsa_betas 0.9,0.95 and out_gate_betas 0.9,0.99 (tiny/train.py setup_optimizer): each in a group at scalar_lr,
    WD 0, with its betas; two AdamW steps with gradients 1 then -3 move each as the float64 AdamW formula with those
    betas does; the other scalars stay in the scalar group."""
    hp = micro_hp(n_layer=2, xsa="learned", attn_gate=True, resid_mix=True, xsa_betas="0.9,0.95",
                  out_gate_betas="0.9,0.99", scalar_lr=0.2)
    train_gpt.check_hyperparameters(hp, 1)
    model = train_gpt.build_model(hp, train_gpt.Dist(), seed=0)
    adamw = train_gpt.build_optimizers(model, hp, train_gpt.Dist())[0]
    group_of = {id(p): group for group in adamw.param_groups for p in group["params"]}
    cases = [(block.attn.xsa_alpha, (0.9, 0.95)) for block in model.blocks]
    cases += [(block.attn.out_gate, (0.9, 0.99)) for block in model.blocks]
    for param, betas in cases:
        assert (group_of[id(param)]["lr"], group_of[id(param)]["betas"], group_of[id(param)]["weight_decay"]) == \
            (0.2, betas, 0.0)
    assert group_of[id(model.x0_lambdas)]["betas"] == (hp.adam_beta1, hp.adam_beta2)
    start = {id(p): p.detach().double().clone() for p, _ in cases}
    for grad in (1.0, -3.0):
        for p in model.parameters():
            p.grad = torch.full_like(p, grad) if id(p) in start else None
        adamw.step()
    for param, (beta1, beta2) in cases:
        m = v = 0.0
        value = start[id(param)]
        for t, grad in enumerate((1.0, -3.0), 1):
            m, v = beta1 * m + (1 - beta1) * grad, beta2 * v + (1 - beta2) * grad**2
            value = value - 0.2 * (m / (1 - beta1**t)) / (math.sqrt(v / (1 - beta2**t)) + hp.adam_eps)
        assert torch.allclose(param.detach().double(), value, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------- checks, size, FLOPs

@pytest.mark.parametrize("overrides, phrase", [
    (dict(rope_pairs=3), "rope_pairs must lie in [0, head_dim/2 = 2]"),
    (dict(rope_pairs=-1), "rope_pairs"),
    (dict(key_offset=True), "key_offset acts on the long-window"),
    (dict(resid_lambda_init=1.1), "set resid_mix"),
    (dict(resid_mix=True, resid_lambda_init=float("nan")), "resid_lambda_init must be finite"),
    (dict(xsa="learned", xsa_eps=0.0), "xsa_eps must be > 0"),
    (dict(recurrence=0), "recurrence must be >= 1"),
    (dict(recurrence=2, recurrence_start_frac=1.0), "recurrence_start_frac must lie in [0, 1)"),
    (dict(recurrence_start_frac=0.5), "set recurrence >= 2"),
    (dict(xsa="learned", xsa_betas="0.9"), "xsa_betas must be 2 comma-separated AdamW betas"),
    (dict(xsa="learned", xsa_betas="0.9,1.5"), "xsa_betas must be 2 comma-separated AdamW betas"),
    (dict(xsa="fixed", xsa_betas="0.9,0.95"), "set xsa learned"),
    (dict(out_gate_betas="0.9,0.99"), "set attn_gate"),
    (dict(attn_gate=True, gates_muon=True, out_gate_betas="0.9,0.99"), "not gates_muon"),
])
def test_15min_flags_refuse_bad_values_in_one_line(overrides, phrase):
    with pytest.raises(train_gpt.ConfigError) as error:
        train_gpt.check_hyperparameters(micro_hp(**overrides), 1)
    assert phrase in str(error.value) and "\n" not in str(error.value)


FIFTEEN_MIN_SHAPE = dict(vocab_size=50304, n_layer=16, n_embd=1024, n_head=8, mlp="swiglu", mlp_hidden=2816,
                         seq_len=2048, value_proj=True, attn_gate=True, out_gate_channels=12, unet_skips=True,
                         resid_mix=True, resid_lambda_init=1.1, xsa="learned", window_pattern="SSSL",
                         window_short=1025, rope_pairs=32, key_offset=True, recurrence=2, recurrence_start_frac=0.7)


def test_15min_model_has_the_public_parameter_count_and_flops():
    """The 15min record's model built on the meta device: 316,935,848 parameters (records/TRACKS.md section 3, the
    public GPT counted on the meta device). FLOPs per token by the public estimate_flops written out: 6 x (params -
    wte - 16 + 16 + 8 lambdas/skips - 128 XSA alphas) + 12 H D sum of mean keys (12 S layers of 1025 keys: 768.75,
    4 full: 1024.5); 2 passes: the blocks' and value projections' parameters and the attention twice. Ours counts the
    128 XSA strengths (they sit in our blocks) once per pass: +768 FLOPs per pass."""
    hp = train_gpt.Hyperparameters(**FIFTEEN_MIN_SHAPE)
    model = train_gpt.build_model_meta(hp)
    params = sum(p.numel() for p in model.parameters())
    assert params == 316_935_848
    shared = sum(p.numel() for p in model.blocks.parameters()) - 128  # public: transformer.h + ve_projs
    rest = params - 50304 * 1024 - 16 - 16 - 8 - 128 - shared  # the lm_head
    attention = 12 * 8 * 128 * (12 * 768.75 + 4 * 1024.5)
    for passes, looped in ((1, False), (2, True)):
        public = 6 * (rest + passes * shared) + passes * attention
        assert train_gpt.training_flops_per_token(hp, looped) == public + 768 * passes
    assert round(train_gpt.training_flops_per_token(hp) / 1e9, 2) == 1.76
    assert round(train_gpt.training_flops_per_token(hp, True) / 1e9, 2) == 3.20


# ----------------------------------------------------------------------------------------------- compile, training run

def fifteen_min_micro(**overrides):
    settings = {**FIFTEEN_MIN_SHAPE, **dict(vocab_size=64, bos_id=63, n_layer=2, n_embd=16, n_head=2, mlp_hidden=0,
                                            seq_len=16, window_short=9, rope_pairs=2, dropout=0.1, dropout_mlp=False,
                                            xsa_eps=1e-4, xsa_betas="0.9,0.95", out_gate_betas="0.9,0.99")}
    return train_gpt.Hyperparameters(**{**settings, **overrides})


def compile_recording_graphs(model):
    """torch.compile(fullgraph=True) whose backend keeps each graph it is handed: one per (re)compilation."""
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward
    return torch.compile(model, fullgraph=True, backend=backend), graphs


def test_compiled_step_with_every_15min_flag_recompiles_once_at_the_recurrence_switch():
    """torch.compile(fullgraph=True) of the 2-layer micro 15min model over 4 steps, recurrence from step 2: one graph
    per training state (1 pass, then 2 passes), 2 in all, the later steps reusing them; the compiled 2-pass step's
    loss and gradients equal the eager ones (same dropout draws). (Evaluation adds one graph per state it meets, as
    for looped layers: tests/test_gpu_readiness.py.)"""
    torch._dynamo.reset()
    hp = fifteen_min_micro(recurrence_start_frac=0.5)
    train_gpt.check_hyperparameters(hp, 1)
    model = train_gpt.build_model(hp, train_gpt.Dist(), seed=0)
    compiled, graphs = compile_recording_graphs(model)
    idx = torch.randint(0, 64, (2, hp.seq_len + 1), generator=torch.Generator().manual_seed(0))
    for step in range(4):
        model.recurrence_active = train_gpt.recurrence_on(step, 4, hp)
        torch.manual_seed(step)
        loss = train_gpt.cross_entropy_sum(compiled(idx[:, :-1]), idx[:, 1:])
        loss.backward()
        if step < 3:  # the last step's gradients are compared with eager ones
            model.zero_grad(set_to_none=True)
    compiled_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    eager = train_gpt.cross_entropy_sum(model(idx[:, :-1]), idx[:, 1:])
    eager.backward()
    assert torch.allclose(loss, eager, rtol=1e-5)
    for name, p in model.named_parameters():
        assert torch.allclose(compiled_grads[name], p.grad, rtol=1e-4, atol=1e-6), name
    assert len(graphs) == 2, f"{len(graphs)} graphs"


def test_a_run_switches_recurrence_on_and_the_saved_model_scores_as_the_run(micro_data, tmp_path):
    """train_gpt.main at micro width with the 15min model flags and recurrence from half-way: loss finite and
    falling; the saved member keeps the pass count in force (2) and, reloaded, scores the run's final val loss."""
    train_path, val_path = micro_data
    flags = micro_flags(train_path, val_path, str(tmp_path), "micro15", n_layer=2, window_pattern="SL",
                        window_short=9, rope_pairs=4, key_offset=True, resid_mix=True, resid_lambda_init=1.1,
                        dropout=0.1, dropout_mlp=False, xsa="learned", xsa_eps=1e-4, xsa_betas="0.9,0.95",
                        attn_gate=True, out_gate_channels=12, out_gate_betas="0.9,0.99", value_proj=True,
                        unet_skips=True, recurrence=2, recurrence_start_frac=0.5, max_steps=4, val_every=-1,
                        checkpoint_every=-1, save_model=True, val_tokens=512)
    assert train_gpt.main(flags) == 0
    rows = read_metrics(str(tmp_path / "micro15"))
    losses = [row["train_loss"] for row in rows if "train_loss" in row]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    final_val = [row["val_loss"] for row in rows if "val_loss" in row][-1]
    model, saved = train_gpt.load_member(str(tmp_path / "micro15" / "model.pt"), torch.device("cpu"))
    assert saved["inference_state"]["recurrence_active"] is True and model.recurrence == 2
    data = train_gpt.EvalData(train_gpt.load_tokens(val_path, 256, "val")[:512], 32, "val")
    assert train_gpt.score([model], [1.0], data, train_gpt.Dist(), 4)[0] == pytest.approx(final_val, rel=1e-5)
