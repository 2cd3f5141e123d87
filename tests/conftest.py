"""Shared test fixtures."""

from __future__ import annotations

import pytest
import torch

#: the devices device-agnostic tests run on: the CPU, and CUDA where this machine has it
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
#: the floating-point types of the functional core
DTYPES = [torch.float32, torch.float64]


@pytest.fixture
def one_thread():
    """Tiny tensors: thread start-up costs more than it saves (and the machine may be shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=DEVICES)
def device(request):
    """Each device of this machine in turn (``cpu``, and ``cuda`` when available).

    A device-agnostic test builds its inputs as before (seeded CPU generators, numpy), moves them
    with ``.to(device)`` and brings results back with ``.cpu()`` for the references, so on a
    machine without CUDA it runs exactly as it did without the fixture. On CUDA, TF32 is turned
    off while the test runs: the tests check the float32 / float64 arithmetic against references.
    """
    if request.param != "cuda":
        yield torch.device(request.param)
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield torch.device(request.param)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(params=DTYPES, ids=["float32", "float64"])
def dtype(request) -> torch.dtype:
    """Each floating-point type of the core in turn (float32, float64)."""
    return request.param
