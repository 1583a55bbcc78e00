"""Run the Triton kernels on CPU through the Triton interpreter, for the tests in this directory only.

Triton decides interpreter vs. compiler when `@triton.jit` decorates a function: for our kernels when
`ptscale_kernels.triton_prefix_attention` is imported, and for Triton's own `tl.*` helpers when
`triton.language` is. So TRITON_INTERPRET=1 is set here, before the first `import triton` of the
session; that is early enough unless a test module collected before this directory imported triton
(e.g. via ptscale -> ptscale_kernels), in which case the session fails with a message instead of
silently testing nothing. Triton is a hard dependency on Linux x86_64: if it cannot be imported,
this fails instead of skipping.

After the import the variable is restored, and a fixture sets it again around each test of this
directory: `triton_available("cpu")` also requires it to be set at call time, so code outside these
tests (e.g. an attention backend that asks `triton_available`) keeps seeing "no Triton on CPU".
"""

from __future__ import annotations

import os

import pytest
import torch

_previous = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"

import ptscale_kernels.triton_prefix_attention as _tpa  # noqa: E402
import ptscale_kernels.triton_prefix_plus as _tpp  # noqa: E402
import triton  # noqa: E402  (must follow the environment variable)
import triton.language.standard as _tl_standard  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

if not (isinstance(_tpa._attn_fwd, InterpretedFunction) and isinstance(_tl_standard.zeros, InterpretedFunction)):
    raise RuntimeError(
        f"TRITON_INTERPRET=1 did not take effect (triton {triton.__version__}): triton was imported before "
        "tests/kernels/conftest.py could set it. Run with TRITON_INTERPRET=1 in the environment."
    )

if _previous is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _previous


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def poisoned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every kernel output buffer (of both kernel modules) start as NaN, so an unwritten element fails."""

    def empty(*args, **kwargs):
        return torch.empty(*args, **kwargs).fill_(float("nan"))

    def empty_like(*args, **kwargs):
        return torch.empty_like(*args, **kwargs).fill_(float("nan"))

    for module in (_tpa, _tpp):
        monkeypatch.setattr(module, "_empty", empty)
        monkeypatch.setattr(module, "_empty_like", empty_like)
