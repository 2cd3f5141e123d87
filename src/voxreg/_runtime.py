"""Run-time environment: which device to run on, and opt-in process tuning.

* :func:`resolve_device` turns a user's ``device`` argument (``None``/``"auto"``, ``"cpu"``,
  ``"cuda"``, ``"cuda:1"``, a :class:`torch.device`) into a :class:`torch.device`, the one place
  where ``"auto"`` is decided; :func:`model_device` is the device a model's weights live on.
* :func:`tune_allocator` is **opt-in**: importing voxreg changes no process-wide state. The
  ``voxreg`` command calls :func:`apply_default_tuning` at start-up; a library user who wants the
  same calls :func:`voxreg.tune_allocator` once.

Large 3D registrations allocate and free buffers of tens to hundreds of megabytes at every call.
glibc serves such blocks with ``mmap`` and returns them with ``munmap``, so each new buffer costs a
page fault per 4 KiB page when it is first touched, a large share of the CPU time of a 3D
integration. Keeping large blocks in the heap (no ``mmap`` for them, and freed memory kept up to a
bound instead of trimmed) removes it.

This changes the allocator of the whole process, which is why it is never done on import, only on
Linux with glibc, can be turned off for the command with the environment variable
``VOXREG_MALLOC_TUNING=0``, and keeps at most ``trim_threshold`` bytes of freed memory in the
process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from pathlib import Path

import torch
from torch import nn

MODELS_DIR = Path(__file__).resolve().parent / "models"
"""Where the shipped models and their reference images live (``voxreg/models``)."""

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4

_state = {"tuned": False}


def tune_allocator(trim_threshold: int = 1 << 30, top_pad: int = 64 << 20) -> bool:
    """Keep large blocks in glibc's heap to avoid page faults on buffer reuse.

    Returns True when the settings were applied (Linux with glibc), False otherwise. It changes
    the whole process, so it is never called on import (the ``voxreg`` command calls it through
    :func:`apply_default_tuning`).

    >>> tune_allocator() in (True, False)   # doctest: +SKIP
    True
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = (
            libc.mallopt(_M_MMAP_MAX, 0)
            and libc.mallopt(_M_TRIM_THRESHOLD, int(min(trim_threshold, 2**31 - 1)))
            and libc.mallopt(_M_TOP_PAD, int(min(top_pad, 2**31 - 1)))
        )
    except (OSError, AttributeError):
        return False
    _state["tuned"] = bool(ok)
    return bool(ok)


def allocator_tuned() -> bool:
    """Whether :func:`tune_allocator` is in effect in this process.

    >>> isinstance(allocator_tuned(), bool)   # False until someone calls tune_allocator()
    True
    """
    return _state["tuned"]


def apply_default_tuning() -> bool:
    """What the ``voxreg`` command does at start-up: :func:`tune_allocator` unless the environment
    variable ``VOXREG_MALLOC_TUNING`` is ``0``/``false``/``no``/``off``. Returns whether it tuned.

    >>> os.environ["VOXREG_MALLOC_TUNING"] = "0"
    >>> apply_default_tuning()
    False
    >>> del os.environ["VOXREG_MALLOC_TUNING"]
    """
    if os.environ.get("VOXREG_MALLOC_TUNING", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return tune_allocator()


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The :class:`torch.device` a user's ``device`` argument names.

    ``None`` or ``"auto"`` picks CUDA when available, else the CPU. Anything else must name a
    device this machine has.

    Raises:
        ValueError: for a name torch does not know (``"banana"``), or a CUDA device on a machine
            without one (the message says which devices there are).

    >>> resolve_device("cpu")
    device(type='cpu')
    >>> resolve_device(None).type in ("cuda", "cpu")        # "auto": CUDA when available
    True
    >>> resolve_device("banana")
    Traceback (most recent call last):
    ...
    ValueError: device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'banana'
    """
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {device!r} asked for CUDA, but this machine has no CUDA "
                             "device; use 'cpu' or 'auto'")
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device {device!r}: this machine has {count} CUDA device(s)")
    return resolved


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (or buffer); the CPU for a model with neither.

    >>> model_device(nn.Linear(2, 2)), model_device(nn.ReLU())
    (device(type='cpu'), device(type='cpu'))
    """
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")
