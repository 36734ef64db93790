"""Issue 24's guards: every preset at micro width gives, bit for bit, the numbers stored before the refactor in
tests/fixtures/preset_fixtures.pt (made by tests/fixtures/make_preset_fixtures.py, whose docstring lists them): logits,
the training objective and its gradients, the parameters after 3 optimizer steps, every schedule's value over a run.
A failure names the preset and the first item that differs. If the refactor renames something the recorder calls,
adapt that one record_* function in make_preset_fixtures.py; never regenerate the fixture to make this pass."""
import os
import platform
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures"))
import make_preset_fixtures as fixtures  # noqa: E402


@pytest.fixture(scope="module")
def stored() -> dict:
    return torch.load(fixtures.FIXTURE_PATH, weights_only=True)


def test_every_preset_is_stored(stored):
    # a preset added later needs its own fixture (run the maker on purpose); one dropped or renamed must say so here
    assert set(stored) == set(fixtures.PRESET_NAMES)
    assert set(fixtures.PRESET_NAMES) <= set(fixtures.train_gpt.PRESETS)


def test_the_cpu_kernels_are_the_fixtures_set():
    """tests/conftest.py pins the AVX2 kernels the fixtures were made with: if torch was loaded before it (a plugin,
    a changed import order), every bitwise test below fails by an ulp, and this one says why."""
    if platform.machine() not in ("x86_64", "AMD64") or os.environ.get("ATEN_CPU_CAPABILITY") != "avx2":
        pytest.skip("not an x86-64 machine, or the kernels were chosen by hand")
    assert torch.backends.cpu.get_cpu_capability() == "AVX2", \
        "torch was loaded before tests/conftest.py pinned it: the stored_bitwise tests skip"


@pytest.mark.stored_bitwise
@pytest.mark.parametrize("preset", fixtures.PRESET_NAMES)
def test_preset_bitwise_unchanged(preset, stored):
    difference = fixtures.first_difference(stored[preset], fixtures.preset_fixture(preset))
    assert difference is None, f"preset {preset}: {difference}"
