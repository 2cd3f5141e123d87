"""The run-time helpers: device resolution, a model's device, and process tuning that is opt-in."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch

from voxreg._runtime import model_device, resolve_device


def _python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_import_changes_no_process_state():
    """``import voxreg`` (and using it) leaves glibc's allocator alone; the opt-in call tunes it."""
    code = ("import voxreg, voxreg.transforms, voxreg.training; from voxreg import _runtime; "
            "print(_runtime.allocator_tuned()); print(voxreg.tune_allocator())")
    before, applied = _python(code).splitlines()
    assert before == "False"

    assert applied == str(platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")


def test_command_applies_tuning_unless_disabled(monkeypatch):
    from voxreg import _runtime

    monkeypatch.setenv("VOXREG_MALLOC_TUNING", "0")
    assert _runtime.apply_default_tuning() is False


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == resolve_device("auto") == resolve_device("AUTO")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'banana'"):
        resolve_device("banana")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")


def test_model_device():
    assert model_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert model_device(torch.nn.Identity()) == torch.device("cpu")
