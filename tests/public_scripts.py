"""The public slowrun scripts as a test oracle: load one on the CPU, patching only what cannot run there.

The scripts (third-party, MIT; see ../shared/reference/README.md) live at ../shared/reference/slowrun/ from the
project root, on the development and CI machines, not in a user's clone: every test that needs them asks
`require_public()` first and skips with the reason when they are absent. Nothing of theirs is copied here; each is
read from its file and executed at test time.

A public script is a program, not a module: its definitions (model, optimizer, data loader, evaluation) come first,
then top-level code that sets up CUDA, data and the training loop. `load_public` executes the definitions only: the
source up to the first top-level statement of the run (`run_marker`), as the named file, so tracebacks point into
it. What it patches, all here and nowhere else:
  - `sys.argv` is the script name plus the given flags (its argparse runs at import);
  - `wandb` is an empty module (imported at the top, used only by the run);
  - `torch.compile` is the identity while the definitions execute (its decorators on the fused optimizer steps would
    otherwise compile on first call, with no CUDA);
  - FlashAttention 3 (`_fa3`, None without a Hopper GPU) is `fa3_on_sdpa`: FA3's interface on (B, T, H, D) tensors
    with its window rule, a query at i sees keys i - w .. i (w + 1 keys), on masked scaled-dot-product attention. The
    scripts that carry their own SDPA fallback (15min, unlimited, baseline) keep it: `_fa3` stays None there.
  - the 15min script's `cuda_kernels` (a CUDA extension built at import) is `tiny_cuda_kernels_stub`: the names the
    script imports, the fused loss raising if called (the script takes its PyTorch path on the CPU).
  - the unlimited script imports `gradient_select` from its own folder: that folder is on sys.path while it loads;
  - `print0`, its rank-0 print, is silent (the loader's "Starting epoch" lines would fill the test output).

Two patches the tests apply where they need them, defined once here: `ONE_RANK_DIST`, torch.distributed as the
public DistMuonAdamW calls it, on one rank (gloo's reduce_scatter_tensor has no future, so a real one-rank group
cannot step it), and `bfloat16_as_float32()`, inside which Tensor.bfloat16 returns float32, so that the public's
explicit bf16 casts (Muon's orthogonalisation, its RoPE tables) compute in float32 for a comparison of mathematics.

`public_block(track, first, last)` returns lines of the run's own top-level code (a schedule function, the loop's
LR lines) dedented, for a test to execute with the names they need: the public arithmetic itself, not a re-typing.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import textwrap
import types

import pytest
import torch
import torch.nn.functional as F

REFERENCE = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
                                          "reference", "slowrun"))

# preset -> (script, the first top-level line of its run: everything above it is definitions)
SCRIPTS = {
    "1h": ("fd342f0/train.py", "ddp, ddp_rank, ddp_local_rank, ddp_world_size = get_dist_info()"),
    "15min": ("fd342f0/tiny/train.py", "ddp, ddp_rank, ddp_local_rank, ddp_world_size = get_dist_info()"),
    "2h": ("fd342f0/two_hour/train.py", "ddp, ddp_rank, ddp_local_rank, ddp_world_size = get_dist_info()"),
    "unlimited": ("fd342f0/unlimited/train.py", 'if __name__ == "__main__":'),
    "baseline": ("0d49316/train.py", "ddp, ddp_rank, ddp_local_rank, ddp_world_size = get_dist_info()"),
}
OWN_SDPA_FALLBACK = {"15min", "unlimited", "baseline"}  # these define _sdpa_attention for _fa3 = None


def public_path(track: str) -> str:
    return os.path.join(REFERENCE, SCRIPTS[track][0])


def require_public(track: str | None = None) -> None:
    """Skips the calling test, with the reason, when the public scripts are not on this machine."""
    path = public_path(track) if track else REFERENCE
    if not os.path.exists(path):
        pytest.skip(f"the public slowrun scripts are not at {path} (../shared/reference/slowrun: on the "
                    f"development and CI machines only)")


def fa3_on_sdpa(q, k, v, causal=False, window_size=(-1, -1), softmax_scale=None):
    """FlashAttention 3's flash_attn_func on the CPU: q, k, v (B, T, H, D); causal; window_size (left, right) with
    left = w letting query i see keys i - w .. i (w + 1 of them), -1 = unbounded; softmax_scale None = 1/sqrt(D)."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    time_q, time_k = q.size(2), k.size(2)
    rows = (time_k - time_q) + torch.arange(time_q).unsqueeze(1)
    cols = torch.arange(time_k).unsqueeze(0)
    mask = torch.ones(time_q, time_k, dtype=torch.bool)
    if causal:
        mask &= cols <= rows
    left, right = window_size
    if left >= 0:
        mask &= rows - cols <= left
    if right >= 0 and not causal:
        mask &= cols - rows <= right
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=softmax_scale,
                                         enable_gqa=q.size(1) != k.size(1))
    return out.transpose(1, 2)


def _stub_module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


def _fused_ce_unavailable(*args, **kwargs):
    raise RuntimeError("the 15min script's fused CUDA cross-entropy was called on the CPU (test harness stub)")


def tiny_cuda_kernels_stub() -> types.ModuleType:
    """What tiny/train.py imports from its cuda_kernels.py, without building the CUDA extension."""
    return _stub_module("cuda_kernels", CE_KERNEL_VOCAB_SIZE=50304,
                        FusedSoftcappedCrossEntropy=types.SimpleNamespace(apply=_fused_ce_unavailable))


@functools.lru_cache(maxsize=None)
def public_source(track: str) -> str:
    with open(public_path(track)) as handle:
        return handle.read()


def _compile_identity(model=None, **kwargs):
    return model if model is not None else (lambda function: function)


def load_public(track: str, *flags: str) -> types.ModuleType:
    """The public script's definitions as a module, its argparse given `flags` (cached per track and flags)."""
    require_public(track)
    return _load(track, tuple(flags))


@functools.lru_cache(maxsize=None)
def _load(track: str, flags: tuple[str, ...]) -> types.ModuleType:
    path = public_path(track)
    source, marker = public_source(track), SCRIPTS[track][1]
    cut = source.find("\n" + marker + "\n")
    assert cut > 0, f"{path}: the run's first line {marker!r} is not where the harness expects it"
    module = types.ModuleType(f"public_{track.replace('min', 'm')}")
    module.__file__ = path
    sys.modules[module.__name__] = module  # dataclasses look their module up while the definitions execute
    saved = dict(argv=sys.argv, compile=torch.compile, path=list(sys.path),
                 modules={name: sys.modules.get(name) for name in ("wandb", "cuda_kernels", "gradient_select")})
    sys.argv = [path, *flags]
    torch.compile = _compile_identity
    sys.modules["wandb"] = _stub_module("wandb")
    if track == "15min":
        sys.modules["cuda_kernels"] = tiny_cuda_kernels_stub()
    sys.path.insert(0, os.path.dirname(path))
    sys.modules.pop("gradient_select", None)  # the unlimited folder's own, freshly
    try:
        exec(compile(source[:cut + 1], path, "exec"), module.__dict__)
    finally:
        sys.argv, torch.compile, sys.path[:] = saved["argv"], saved["compile"], saved["path"]
        for name, previous in saved["modules"].items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
    module.print0 = lambda *args, **kwargs: None  # its progress lines (the loader's "Starting epoch") are noise here
    if track not in OWN_SDPA_FALLBACK:
        module._fa3 = types.SimpleNamespace(flash_attn_func=fa3_on_sdpa)
    return module


def public_block(track: str, first: str, last: str, include_last: bool = True) -> str:
    """The public script's lines from the first line containing `first` through the next line containing `last`
    (or up to it), dedented: a piece of the run's top-level code for a test to exec with the names it uses."""
    require_public(track)
    lines = public_source(track).splitlines()
    start = next((i for i, line in enumerate(lines) if first in line), None)
    assert start is not None, f"{public_path(track)}: no line contains {first!r}"
    end = next((i for i in range(start + 1, len(lines)) if last in lines[i]), None)
    assert end is not None, f"{public_path(track)}: no line after {first!r} contains {last!r}"
    return textwrap.dedent("\n".join(lines[start:end + 1 if include_last else end])) + "\n"


def run_block(code: str, **names) -> dict:
    """Executes a public block in a namespace holding `names` (and math); returns the namespace."""
    import math
    namespace = {"math": math, **names}
    exec(compile(code, "<public block>", "exec"), namespace)
    return namespace


class _Finished:
    """The handle of a collective that is already done."""

    def get_future(self):
        return self

    def wait(self):
        return None


def _one_rank(*tensors, op=None, async_op=False):
    """all_reduce (t), reduce_scatter_tensor / all_gather_into_tensor (out, in) on one rank: the average, the scatter
    and the gather of one rank's tensor are that tensor."""
    if len(tensors) == 2 and tensors[0] is not tensors[1]:
        tensors[0].copy_(tensors[1])
    return _Finished()


ONE_RANK_DIST = types.SimpleNamespace(
    get_rank=lambda: 0, get_world_size=lambda: 1, is_initialized=lambda: False, ReduceOp=torch.distributed.ReduceOp,
    all_reduce=_one_rank, reduce_scatter_tensor=_one_rank, all_gather_into_tensor=_one_rank)


@contextlib.contextmanager
def bfloat16_as_float32():
    """Tensor.bfloat16() returns float32 while inside (the public's explicit bf16 casts then compute in float32)."""
    original = torch.Tensor.bfloat16
    torch.Tensor.bfloat16 = lambda self, *args, **kwargs: self.float()
    try:
        yield
    finally:
        torch.Tensor.bfloat16 = original


class StubLoss:
    """A training loss as the public training loops use it (detach, / accumulation steps, backward, item, mean),
    with no autograd: for running a loop's schedule code without a model."""

    def detach(self):
        return self

    def __truediv__(self, other):
        return self

    def backward(self):
        pass

    def item(self):
        return 0.0

    def mean(self):
        return self


class StubModule:
    """The train/eval/zero_grad calls a public training loop makes on its model, doing nothing."""

    def eval(self):
        pass

    def train(self):
        pass

    def zero_grad(self, set_to_none=True):
        pass
