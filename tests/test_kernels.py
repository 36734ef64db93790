"""Kernels: each fast path against its plain-PyTorch reference, on fresh random inputs of odd sizes.

The Triton loss kernel runs under TRITON_INTERPRET=1 on CPU tensors (skipped where Triton is missing); FlexAttention
runs its forward on CPU (torch 2.13 has no CPU backward for it) against the masked SDPA reference."""
import json
import os

import pytest
import torch

import train_gpt

torch.set_num_threads(1)
CPU = torch.device("cpu")
# The Triton tests run on CUDA where there is one (compiled kernels); elsewhere interpreted on CPU tensors. The
# interpreter is switched on only without CUDA: it would also turn torch.compile's own Triton kernels into Python.
DEVICE = torch.device("cuda") if torch.cuda.is_available() else CPU
if DEVICE.type == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when Triton is imported: before any test uses it


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


class TinyTeacher(torch.nn.Module):
    """A stand-in teacher: head(features) gives soft-capped logits, as GPT.head does."""

    def __init__(self, width: int, vocab: int, softcap: float, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(vocab, width, generator=generator), requires_grad=False)
        self.softcap = softcap

    def head(self, features: torch.Tensor) -> torch.Tensor:
        logits = features @ self.weight.T
        return self.softcap * torch.tanh(logits / self.softcap) if self.softcap > 0 else logits


def eager_objective(raw: torch.Tensor, targets: torch.Tensor, softcap: float, teachers=None, features=None,
                    alpha: float = 0.0, temperature: float = 1.0) -> torch.Tensor:
    """The training script's eager path without a teacher (soft-cap in float32, then cross_entropy_sum); with
    teachers, an independent float64 autograd reference of (1 - alpha) CE + alpha T^2 KL(teacher mixture || student)."""
    logits = raw.float()
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    if teachers is None:
        return train_gpt.cross_entropy_sum(logits, targets)
    logits, valid = logits.double(), targets >= 0
    ce = torch.nn.functional.cross_entropy(logits[valid], targets[valid], reduction="sum")
    mixture = sum(weight * torch.softmax(teacher.head(feature).double() / temperature, -1)
                  for (teacher, weight), feature in zip(teachers, features))
    kl = (mixture * (mixture.log() - torch.log_softmax(logits / temperature, -1))).sum(-1)[valid].sum()
    return ((1 - alpha) * ce + alpha * temperature**2 * kl).float()


def random_case(batch: int, time_steps: int, vocab: int, width: int, seed: int, ignore: bool):
    generator = torch.Generator().manual_seed(seed)
    raw = (4 * torch.randn(batch, time_steps, vocab, generator=generator)).requires_grad_(True)
    targets = torch.randint(0, vocab, (batch, time_steps), generator=generator)
    if ignore:
        targets[0, -1] = -1  # padded targets take no part
    features = [torch.randn(batch, time_steps, width, generator=generator)]
    return raw, targets, features


@pytest.mark.parametrize("backend", ["chunked", "triton"])
@pytest.mark.parametrize("batch,time_steps,vocab,softcap,alpha,temperature", [
    (1, 1, 37, 15.0, 0.0, 1.0),     # a single row, vocab not a multiple of the tile
    (2, 3, 50, 0.0, 0.0, 1.0),      # softcap off
    (2, 3, 45, 10.0, 0.5, 2.0),     # distillation, T = 2
    (1, 5, 33, 0.0, 1.0, 0.7),      # pure KL, softcap off
])
def test_fused_loss_matches_eager(backend, batch, time_steps, vocab, softcap, alpha, temperature):
    if backend == "triton":
        pytest.importorskip("triton")
    raw, targets, features = random_case(batch, time_steps, vocab, 8, seed=vocab + batch, ignore=batch * time_steps > 1)
    raw, targets, features = raw.detach().to(DEVICE).requires_grad_(True), targets.to(DEVICE), [features[0].to(DEVICE)]
    teachers = [(TinyTeacher(8, vocab, softcap, seed=1).to(DEVICE), 0.6),
                (TinyTeacher(8, vocab, softcap, seed=2).to(DEVICE), 0.4)] if alpha > 0 else None
    expected = eager_objective(raw, targets, softcap, teachers, features, alpha, temperature)
    (expected_grad,) = torch.autograd.grad(expected, raw)
    expected_ce = eager_objective(raw.detach(), targets, softcap)

    extra = {}
    if teachers is not None:
        extra = dict(teacher_rows=train_gpt.teacher_rows(teachers, features, temperature), alpha=alpha,
                     temperature=temperature, chunk_rows=2)  # several chunks of rows, the last one short
    # a 16-wide Triton tile: every vocabulary here spans several tiles and ends in a partial one
    objective, ce = train_gpt.fused_loss_sums(raw, targets, softcap, backend, tile=16, **extra)
    (grad,) = torch.autograd.grad(objective * 1.7, raw)  # a non-unit upstream gradient: backward must scale
    assert relative_error(objective, expected) < 1e-4
    assert relative_error(ce, expected_ce) < 1e-4
    assert relative_error(grad, 1.7 * expected_grad) < 1e-4
    assert not ce.requires_grad



def tiny_hp(**overrides) -> train_gpt.Hyperparameters:
    settings = dict(vocab_size=67, bos_id=66, n_layer=2, n_embd=16, n_head=2, seq_len=24, device="cpu", compile="off")
    settings.update(overrides)
    return train_gpt.Hyperparameters(**settings)


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_training_loss_sums_fused_matches_eager(backend):
    """The wiring: the fused path's (loss, objective) and parameter gradients equal the eager path's, with MTP."""
    if backend == "triton":
        pytest.importorskip("triton")
    hp = tiny_hp(mtp_weight=0.3, logit_softcap=5.0)
    torch.manual_seed(3)
    model = train_gpt.GPT(train_gpt.model_config(hp)).to(DEVICE)
    for p in model.parameters():  # the zero-init output projections would hide the layers' gradients
        p.data.add_(0.05 * torch.randn_like(p))
    inputs = torch.randint(0, hp.vocab_size, (2, 11)).to(DEVICE)
    targets = torch.randint(0, hp.vocab_size, (2, 11))
    targets[1, :3] = -1
    targets = targets.to(DEVICE)
    results = []
    for fused in (None, (backend, hp.logit_softcap)):
        model.zero_grad()
        loss, objective = train_gpt.training_loss_sums(model, inputs, targets, hp.mtp_weight, None, fused)
        objective.backward()
        results.append((loss.detach(), objective.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_e, objective_e, grads_e), (loss_f, objective_f, grads_f) = results
    assert relative_error(loss_f, loss_e) < 1e-5 and relative_error(objective_f, objective_e) < 1e-5
    assert max(relative_error(a, b) for a, b in zip(grads_f, grads_e)) < 1e-4


def test_loss_backend_choice():
    assert train_gpt.loss_backend(tiny_hp(), CPU) == "eager"  # auto on CPU: the plain path, exactly as before
    assert train_gpt.loss_backend(tiny_hp(fused_loss="off"), torch.device("cuda")) == "eager"
    assert train_gpt.loss_backend(tiny_hp(fused_loss="chunked"), CPU) == "chunked"
    with pytest.raises(train_gpt.ConfigError):
        train_gpt.check_hyperparameters(tiny_hp(fused_loss="fast"), 1)


# --- FlexAttention (forward only on CPU) against the masked SDPA reference -----------------------------------------

def flex_or_skip():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    probe = torch.zeros(1, 1, 4, 8)
    try:
        with torch.no_grad():
            flex.flex_attention(probe, probe, probe)
    except Exception as error:  # noqa: BLE001 - any failure means this torch cannot run it here
        pytest.skip(f"FlexAttention does not run on CPU here: {error}")


@pytest.mark.parametrize("window,use_documents", [(37, False), (5, False), (37, True), (6, True)])
def test_flex_attention_matches_masked_sdpa(window, use_documents):
    flex_or_skip()
    generator = torch.Generator().manual_seed(window)
    batch, heads, time_steps, head_dim = 2, 2, 37, 8  # T not a multiple of the 128-wide blocks
    q, k, v = (torch.randn(batch, heads, time_steps, head_dim, generator=generator) for _ in range(3))
    idx = torch.randint(0, 10, (batch, time_steps), generator=generator)
    idx[0, [0, 9, 10, 30]] = 99  # document starts, two of them adjacent (a one-token document)
    documents = train_gpt.document_ids(idx, 99) if use_documents else None
    dense = train_gpt.attention_mask_dense(time_steps, window, documents, CPU)
    block = train_gpt.flex_block_mask(time_steps, window, documents, CPU)
    with torch.no_grad():
        expected = train_gpt.attend(q, k, v, dense)
        actual = train_gpt.attend(q, k, v, block)
    assert relative_error(actual, expected) < 1e-5
    if not use_documents and window >= time_steps:  # the full window is plain causal attention
        assert relative_error(train_gpt.attend(q, k, v, None), expected) < 1e-5


def test_document_mask_blocks_attention_across_documents():
    """Changing an earlier document must not change a later document's outputs."""
    idx = torch.tensor([[5, 66, 3, 4, 66, 7, 8, 9]])
    dense = train_gpt.attention_mask_dense(8, 8, train_gpt.document_ids(idx, 66), CPU)[0, 0]
    assert not dense[5, 3] and dense[5, 4] and dense[3, 1] and not dense[1, 0] and not dense[2, 5]


@pytest.mark.parametrize("overrides", [dict(window_pattern="SL", window_short=5), dict(doc_mask=True),
                                       dict(doc_mask=True, window_pattern="SL", window_short=7, value_proj=True)])
def test_gpt_flex_matches_sdpa(overrides):
    """The whole model: attention=flex gives the same logits as attention=sdpa (windows, documents, both)."""
    flex_or_skip()
    idx = torch.randint(0, 66, (2, 24), generator=torch.Generator().manual_seed(0))
    idx[:, [0, 7, 15]] = 66
    logits = []
    for attention in ("sdpa", "flex"):
        torch.manual_seed(0)
        model = train_gpt.GPT(train_gpt.model_config(tiny_hp(**overrides)), attention).eval()
        for p in model.parameters():
            p.data.add_(0.05 * torch.randn_like(p))
        assert model.attention == attention
        with torch.no_grad():
            logits.append(model(idx))
    assert relative_error(logits[1], logits[0]) < 1e-5
    frozen = model.for_inference()  # teachers and snapshots run eagerly: on SDPA, with the same output
    assert frozen.attention == "sdpa" and not any(p.requires_grad for p in frozen.parameters())
    with torch.no_grad():
        assert relative_error(frozen(idx), logits[1]) < 1e-5


def test_doc_mask_changes_the_model_and_off_is_plain():
    """doc_mask on differs from off where documents meet; off with SDPA takes the plain causal path."""
    idx = torch.randint(0, 66, (1, 24), generator=torch.Generator().manual_seed(1))
    idx[0, 10] = 66
    outputs = []
    for doc_mask in (False, True):
        torch.manual_seed(0)
        model = train_gpt.GPT(train_gpt.model_config(tiny_hp(doc_mask=doc_mask))).eval()
        for p in model.parameters():
            p.data.add_(0.05 * torch.randn_like(p))
        assert (model.attention_masks(idx) == {}) == (not doc_mask)  # no mask: SDPA's plain causal kernel
        with torch.no_grad():
            outputs.append(model(idx))
    assert torch.allclose(outputs[0][:, :10], outputs[1][:, :10], atol=1e-6)  # the first document: same context
    assert not torch.allclose(outputs[0][:, 11:], outputs[1][:, 11:], atol=1e-4)


@pytest.mark.parametrize("fused_loss", ["chunked", "on"])
def test_distillation_run_fused_matches_eager(fused_loss, micro_data, tmp_path):
    """train_member's wiring: a 2-member distillation run (with MTP) gives the same losses on the fused path (the
    chunked reference, or Triton interpreted on CPU) as on the eager one, and its log names the path."""
    if fused_loss == "on":
        pytest.importorskip("triton")
    from conftest import member_weights, micro_flags
    train_path, val_path = micro_data
    logs = str(tmp_path / "logs")
    results = {}
    for mode in ("off", fused_loss):
        # 128-token steps: Triton interpreted on CPU runs one Python program per row (~10 ms each)
        flags = micro_flags(train_path, val_path, logs, mode, ensemble_size=2, distill_alpha=0.5,
                            distill_temperature=2.0, distill_chunk=5, mtp_weight=0.2, max_steps=2, fused_loss=mode,
                            batch_tokens=128, device=DEVICE.type, compile="off")
        assert train_gpt.main(flags) == 0
        with open(os.path.join(logs, mode, "result.json")) as handle:
            results[mode] = json.load(handle)
        with open(os.path.join(logs, mode, "log.txt")) as handle:
            expected = {"off": "eager", "chunked": "chunked", "on": "triton"}[mode]
            assert f"loss {expected} | attention sdpa" in handle.read()
    assert results[fused_loss]["member_val_losses"] == pytest.approx(results["off"]["member_val_losses"], rel=1e-4)
    assert results[fused_loss]["val_loss"] == pytest.approx(results["off"]["val_loss"], rel=1e-4)
    # The student's weights: two steps barely move a val loss (a kernel ignoring the temperature passed the losses),
    # but its gradient moves them: measured max |fused - eager| 8e-5 (Adam's embedding rows), <= 3e-7 elsewhere; a
    # temperature off by 1% moves lm_head by 2e-2 and every matrix by >= 1.3e-3.
    weights = [member_weights(os.path.join(logs, mode), 1) for mode in ("off", fused_loss)]
    assert max((weights[1][name] - eager).abs().max().item() for name, eager in weights[0].items()) < 1e-3


# ------------------------------------------------------------------------------------------------ Muon, compiled

@pytest.mark.parametrize("polar_express", [False, True])
def test_compiled_muon_matches_the_plain_iteration(polar_express):
    """--muon_compile on: the torch.compile'd orthogonalisation gives the plain iteration's update (fp32 on CPU)."""
    torch.manual_seed(0)
    weights = [torch.randn(48, 24), torch.randn(24, 40)]
    results = []
    for compiled in (False, True):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        for p in params:
            p.grad = torch.randn_like(p, generator=torch.Generator().manual_seed(p.numel()))
        muon = train_gpt.Muon(params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.1,
                              polar_express=polar_express, compiled=compiled)
        try:
            muon.step()
        except Exception as error:  # noqa: BLE001 - no C++ toolchain for inductor: nothing to compare
            if compiled:
                pytest.skip(f"torch.compile unavailable on this machine: {type(error).__name__}")
            raise
        results.append([p.detach().clone() for p in params])
    for original, plain, fast in zip(weights, *results):
        assert not torch.equal(plain, original)  # the step did move the weights
        torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ Muon's symmetric Gram kernel

@pytest.mark.parametrize("rows,cols,block", [(37, 53, 16), (1, 7, 16), (64, 20, 32), (50, 50, 16)])
def test_symmetric_gram_kernel_matches_matmul(rows, cols, block):
    """alpha A A^T + beta B from the upper-triangle tiles only (mirrored) equals the plain matmul, on sizes that
    are not multiples of the tile; the last case has several tile rows, so the mirrored stores are exercised."""
    pytest.importorskip("triton")
    generator = torch.Generator().manual_seed(rows * 100 + cols)
    a = torch.randn(rows, cols, generator=generator).to(DEVICE)
    add = a @ a.T + torch.eye(rows, device=DEVICE)  # any symmetric matrix
    for alpha, beta, extra in ((1.0, 0.0, None), (-2.5, 0.7, add)):
        fast = train_gpt.symmetric_gram_triton(a, alpha, extra, beta, block=block)
        reference = train_gpt.symmetric_gram_torch(a, alpha, extra, beta)
        assert relative_error(fast, reference) < 1e-5, (alpha, beta)
        assert torch.equal(fast, fast.T)  # the mirrored tiles are the same numbers


@pytest.mark.parametrize("polar_express", [False, True])
def test_orthogonalization_with_the_gram_kernel_matches_reference(polar_express):
    pytest.importorskip("triton")
    generator = torch.Generator().manual_seed(5)
    grad = torch.randn(70, 45, generator=generator).to(DEVICE)  # tall: iterates on the transpose
    function = train_gpt.polar_express_orthogonalize if polar_express else train_gpt.newton_schulz_orthogonalize
    fast = function(grad, 5, gram=train_gpt.symmetric_gram_triton).float()
    reference = function(grad, 5).float()
    assert relative_error(fast, reference) < (2e-2 if DEVICE.type == "cuda" else 1e-4)  # bf16 on CUDA
    singular_values = torch.linalg.svdvals(fast.cpu())
    assert singular_values.min() > 0.5 and singular_values.max() < 1.3


# Compiles both kernels ahead of time for an H100 (sm_90) on this CPU machine, in a fresh process (this module
# interprets Triton). The interpreter that runs the tests above accepts kernels a GPU compile rejects: a kernel
# that lost its tl.constexpr annotations ran fine here and failed on every GPU.
AOT_COMPILE = r"""
import sys, triton, train_gpt
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
cases = [
    (train_gpt._fused_loss_kernel,
     dict(logits_ptr="*bf16", logits_stride="i32", grad_ptr="*bf16", grad_stride="i32", targets_ptr="*i64",
          teacher_ptr="*fp32", teacher_stride="i32", objective_ptr="*fp32", ce_ptr="*fp32", softcap="fp32",
          inv_temperature="fp32", ce_weight="fp32", kl_weight="fp32"),
     dict(n_cols=50304, HAS_SOFTCAP=True, HAS_TEACHER=True, BLOCK=1024)),
    (train_gpt._symmetric_gram_kernel,
     dict(a_ptr="*bf16", out_ptr="*bf16", add_ptr="*bf16", tiles_ptr="*i32", rows="i32", stride_ar="i32",
          stride_ac="i32", stride_or="i32", stride_oc="i32", alpha="fp32", beta="fp32"),
     dict(cols=2048, HAS_ADD=True, BLOCK=64, BLOCK_K=32)),
]
for kernel_source, signature, constexprs in cases:
    kernel = train_gpt.triton_jit(kernel_source, interpret=False)
    declared = sorted(p.name for p in kernel.params if p.is_constexpr)
    assert declared == sorted(constexprs), (kernel_source.__name__, declared)
    signature.update({name: "constexpr" for name in constexprs})
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32))
    assert "ptx" in compiled.asm, (kernel_source.__name__, list(compiled.asm))
    print(kernel_source.__name__, "compiled for sm_90")
"""


def test_triton_kernels_compile_for_an_h100():
    pytest.importorskip("triton")
    import subprocess
    import sys
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", AOT_COMPILE], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("compiled for sm_90") == 2


def test_triton_loss_self_check_passes_and_catches_a_wrong_kernel(monkeypatch):
    """--fused_loss auto runs this check before trusting the kernel on a GPU: it must pass for the real kernel and
    name the difference when the kernel is wrong."""
    pytest.importorskip("triton")
    check = train_gpt.triton_loss_self_check.__wrapped__
    # vocabularies of one partial tile and of several (the last partial); soft-cap on and off; teacher or not
    for vocab, softcap, teacher in ((300, 15.0, True), (2 * train_gpt.LOSS_TILE + 77, 0.0, False)):
        assert check(str(DEVICE), vocab, softcap, teacher, "float32") == "", (vocab, softcap, teacher)
    real = train_gpt.fused_loss_sums

    def off_by_a_bit(raw, targets, softcap, backend, **kwargs):
        objective, ce = real(raw, targets, softcap, backend, **kwargs)
        return (objective * 1.001, ce) if backend == "triton" else (objective, ce)

    monkeypatch.setattr(train_gpt, "fused_loss_sums", off_by_a_bit)
    assert check(str(DEVICE), 300, 15.0, True, "float32").startswith("objective differs")


def test_auto_falls_back_to_the_reference_when_a_kernel_variant_fails_its_check(monkeypatch, capsys):
    """On a GPU, auto checks every variant the run compiles (here: with a teacher too) and trains on the chunked
    reference, saying so, when one fails. The GPU is stood in for: only the choice is under test."""
    checked = []
    monkeypatch.setattr(train_gpt, "fused_loss_available", lambda device: True)
    monkeypatch.setattr(train_gpt, "triton_loss_self_check",
                        lambda *variant: checked.append(variant) or ("wrong" if variant[3] else ""))
    cuda = torch.device("cuda")
    assert train_gpt.loss_backend(tiny_hp(), cuda) == "triton"  # no teacher: the passing variant only
    assert train_gpt.loss_backend(tiny_hp(distill_alpha=0.5), cuda) == "chunked"
    assert [variant[3] for variant in checked] == [False, False, True]
    assert "failed its self-check" in capsys.readouterr().err
