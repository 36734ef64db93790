"""The model's contracts (causality, shapes, init) and the optimizers' mathematics."""
import dataclasses
import math

import pytest
import torch

import train_gpt


def micro_hp(**overrides) -> train_gpt.Hyperparameters:
    settings = dict(vocab_size=256, bos_id=255, n_layer=2, n_embd=32, n_head=2, seq_len=16)
    settings.update(overrides)
    return train_gpt.Hyperparameters(**settings)


@pytest.mark.parametrize("mlp", ["relu2", "swiglu"])
def test_model_is_causal(mlp):
    torch.manual_seed(0)
    model = train_gpt.GPT(train_gpt.model_config(micro_hp(mlp=mlp)))
    for block in model.blocks:  # the zero-initialised projections would hide any leak: give them weights
        torch.nn.init.normal_(block.attn.c_proj.weight, std=0.1)
        torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.1)
    idx = torch.randint(0, 256, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    before, after = model(idx), model(changed)
    assert before.shape == (2, 16, 256) and before.dtype == torch.float32
    assert torch.allclose(before[:, :10], after[:, :10], atol=1e-6)  # the past does not see the future
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_logit_softcap_bounds_logits():
    torch.manual_seed(0)
    model = train_gpt.GPT(train_gpt.model_config(micro_hp(logit_softcap=2.0)))
    torch.nn.init.normal_(model.lm_head.weight, std=10.0)
    logits = model(torch.randint(0, 256, (1, 16)))
    assert logits.abs().max() <= 2.0 and logits.abs().max() > 1.9


def test_initial_loss_is_near_uniform():
    """nanochat's init (tiny lm_head, zero output projections) starts at the uniform distribution's loss."""
    torch.manual_seed(0)
    model = train_gpt.GPT(train_gpt.model_config(micro_hp()))
    idx = torch.randint(0, 256, (4, 16))
    loss = train_gpt.cross_entropy_sum(model(idx), idx) / idx.numel()
    assert loss.item() == pytest.approx(math.log(256), abs=0.01)


def test_swiglu_matches_relu2_parameter_count():
    def block_count(**overrides) -> int:
        model = train_gpt.GPT(train_gpt.model_config(micro_hp(n_embd=96, n_head=2, **overrides)))
        return sum(p.numel() for p in model.blocks.parameters())
    relu2, swiglu = block_count(), block_count(mlp="swiglu")
    assert abs(swiglu - relu2) / relu2 < 0.05


def test_cross_entropy_ignores_minus_one():
    logits = torch.randn(1, 3, 5)
    targets = torch.tensor([[1, -1, 4]])
    expected = -(torch.log_softmax(logits, -1)[0, 0, 1] + torch.log_softmax(logits, -1)[0, 2, 4])
    assert train_gpt.cross_entropy_sum(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)


# --------------------------------------------------------------------------------------------------------- Muon

@pytest.mark.parametrize("shape", [(64, 32), (32, 128), (128, 512), (96, 96)])
def test_newton_schulz_singular_values_near_one(shape):
    torch.manual_seed(0)
    grad = torch.randn(*shape)
    update = train_gpt.newton_schulz_orthogonalize(grad, steps=5)
    singular = torch.linalg.svdvals(update)
    # Quintic Newton-Schulz lands singular values in about [0.7, 1.2] (measured here: 0.68-1.13 on rectangular
    # Gaussian matrices); a square Gaussian matrix has a few singular values too close to 0 to reach the band in
    # five steps, so there we ask it of 90% of them.
    inside = ((singular > 0.6) & (singular < 1.25)).float().mean().item()
    assert inside >= (0.9 if shape[0] == shape[1] else 1.0), singular
    # and the plain gradient's spread (condition number) is gone
    assert singular.max() / singular[int(0.9 * singular.numel()) - 1] < 2.0


def test_newton_schulz_keeps_singular_vectors():
    """The update is U V^T: it has the gradient's singular vectors, only flattened singular values."""
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(48, 16))
    v, _ = torch.linalg.qr(torch.randn(16, 16))
    grad = u @ torch.diag(torch.linspace(0.5, 3.0, 16)) @ v.T
    update = train_gpt.newton_schulz_orthogonalize(grad, steps=5)
    in_gradient_basis = u.T @ update @ v  # diagonal if and only if the singular vectors are kept
    off_diagonal = in_gradient_basis - torch.diag(torch.diagonal(in_gradient_basis))
    assert off_diagonal.norm() < 1e-4 * in_gradient_basis.norm()
    assert (torch.diagonal(in_gradient_basis) > 0.6).all()  # every direction kept, with the same sign


def test_muon_step_matches_exact_polar_factor():
    """Muon's step against a float64 reference built on the exact polar factor U V^T (SVD) of the Nesterov direction,
    independent of our orthogonalisers: the momentum, Nesterov, shape scale and decoupled decay must be exact, and the
    orthogonalised part must be U diag(s) V^T with every s in Newton-Schulz's band [0.6, 1.25] (nothing outside the
    direction's singular vectors)."""
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(8, 4))
    start, grad = param.detach().clone().double(), torch.randn(8, 4)
    param.grad = grad.clone()
    train_gpt.Muon([param], lr=0.1, momentum=0.9, nesterov=True, ns_steps=5, weight_decay=0.5).step()
    grad = grad.double()
    direction = grad + 0.9 * (0.1 * grad - grad)  # Nesterov: grad lerped by momentum towards the buffer 0.1 * grad
    u, _, vh = torch.linalg.svd(direction, full_matrices=False)
    update = (start * (1 - 0.1 * 0.5) - param.detach().double()) / 0.1 / math.sqrt(8 / 4)
    in_polar_basis = u.T @ update @ vh.T
    scales = torch.diagonal(in_polar_basis)
    assert (update - u @ in_polar_basis @ vh).norm() < 1e-5 * update.norm()  # nothing outside span(U) x span(V)
    assert (in_polar_basis - torch.diag(scales)).norm() < 1e-5 * update.norm()  # the singular vectors kept
    assert ((scales > 0.6) & (scales < 1.25)).all(), scales
    print(f"Muon vs exact U V^T: scales {scales.min():.3f}-{scales.max():.3f}, "
          f"distance {(update - u @ vh).norm() / (u @ vh).norm():.3f}")


def test_every_parameter_gets_an_optimizer():
    model = train_gpt.GPT(train_gpt.model_config(micro_hp()))
    optimizers = train_gpt.build_optimizers(model, micro_hp(), train_gpt.Dist())
    in_optimizers = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
    assert len(in_optimizers) == len(list(model.parameters()))
    muon = optimizers[1]
    assert all(p.ndim == 2 for group in muon.param_groups for p in group["params"])
    assert all(p is not model.wte.weight and p is not model.lm_head.weight
               for group in muon.param_groups for p in group["params"])
    tricks = micro_hp(value_proj=True, attn_gate=True, head_mix=True, xsa="learned", resid_mix=True, unet_skips=True)
    model = train_gpt.GPT(train_gpt.model_config(tricks))
    adamw, muon = train_gpt.build_optimizers(model, tricks, train_gpt.Dist())
    scalar_group = {id(p) for p in adamw.param_groups[-1]["params"]}
    marked = [p for p in model.parameters() if getattr(p, "scalar_group", False)]
    assert len(marked) == 1 + 3 * 2 + 3  # a value gate (last layer); per layer out gate, head mix, XSA; 2 lambdas, skips
    assert all(id(p) in scalar_group for p in marked)  # 2-D gates included: never Muon
    assert all(p.ndim == 2 and id(p) not in scalar_group for group in muon.param_groups for p in group["params"])
    model.extra = torch.nn.Linear(3, 3)  # a parameter nobody assigned must be an error, not silently frozen
    with pytest.raises(train_gpt.ConfigError, match="extra.weight"):
        train_gpt.build_optimizers(model, micro_hp(), train_gpt.Dist())


def test_member_file_written_before_gptconfig_still_loads(tmp_path):
    """Member files used to store every hyperparameter instead of the GPTConfig: such a file still loads, to the
    same model; a new file stores the GPTConfig only."""
    hp = micro_hp(value_proj=True, loop_repeats=1)
    torch.manual_seed(0)
    model = train_gpt.GPT(train_gpt.model_config(hp))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.loop_active = True
    old = tmp_path / "old.pt"
    torch.save(dict(model=model.state_dict(), hyperparameters=dataclasses.asdict(hp),
                    inference_state=dict(loop_active=True, window_sizes=None), outcome=dict(val_loss=1.0)), old)
    train_gpt.save_candidate(str(tmp_path / "new.pt"), model)
    assert "hyperparameters" not in torch.load(tmp_path / "new.pt", weights_only=True)
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        expected = model.eval()(idx)
    for path in (old, tmp_path / "new.pt"):
        loaded, saved = train_gpt.load_member(str(path), torch.device("cpu"))
        assert loaded.config == train_gpt.model_config(hp) and saved["config"]["seq_len"] == 16
        with torch.no_grad():
            assert torch.equal(loaded(idx), expected)


def test_lr_schedule():
    hp = micro_hp(warmdown_frac=0.5, final_lr_frac=0.1, warmup_steps=2)
    factors = [train_gpt.lr_multiplier(step, 10, hp) for step in range(10)]
    assert factors[:2] == [0.5, 1.0]  # warmup
    assert factors[2:6] == [1.0] * 4  # constant
    assert factors[6] == pytest.approx(1 - 0.2 * 0.9) and factors[9] == pytest.approx(1 - 0.8 * 0.9)
    assert all(a >= b for a, b in zip(factors[1:], factors[2:]))  # never rises after warmup
