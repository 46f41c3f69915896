"""Shared test configuration: one tolerance table, one backend list, seeded random inputs.

Without a GPU, Triton kernels run through the Triton interpreter on CPU tensors
(TRITON_INTERPRET=1 must be set before triton is imported, hence here).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

import bus_kernels  # noqa: E402
from bus_kernels import _backend  # noqa: E402

settings.register_profile("ci", deadline=None, max_examples=25, derandomize=True)
settings.register_profile("dev", deadline=None, max_examples=100)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# One table for the whole suite (FlagGems-style): outputs of any backend vs the reference.
# fp16/bf16 outputs round once to their dtype from an fp32 accumulation; fp32 allows for a
# different summation order; fp64 is the gradcheck dtype.
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1.3e-5),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def close_as(actual, expected, dtype, what):
    """assert_close at the table's tolerance for ``dtype``, compared in fp32, naming ``what``."""
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype], msg=lambda m: f"{what}: {m}")


def select_scores(gen, B, n, kind, dtype):
    """[B, n] scores for the selectors: "ties" (few values, -0.0 next to +0.0), "zeros" (only
    +-0.0: the choice is the lowest indices), else positive relevance-like values."""
    if kind == "ties":
        s = torch.randint(0, 3, (B, n), generator=gen).float()
        flip = torch.rand(B, n, generator=gen) < 0.5
        s = torch.where((s == 0) & flip, -0.0, s)
    elif kind == "zeros":
        s = torch.where(torch.rand(B, n, generator=gen) < 0.5, -0.0, 0.0)
    else:
        s = torch.rand(B, n, generator=gen) + 0.05
    return s.to(dtype)


def assert_exp_range(got, want):
    """Probabilities of a CPU kernel (fp32) vs their float64 truth, at the edges of the range of
    the kernels' vectorised exp (csrc/cpu/vec8.h): relative 1e-5 where the truth is a normal fp32,
    and in [0, truth] (flushed to 0, or exact) below FLT_MIN, so neither a flush above ln(FLT_MIN)
    ~ -87.34 nor a clamp that turns -inf or -1e4 into 1e-38 nor an out-of-range exponent passes."""
    got, want = got.double(), want.double()
    normal = want.abs() >= torch.finfo(torch.float32).tiny
    err = (got - want).abs()
    assert (err[normal] <= 1e-5 * want.abs()[normal]).all(), (got[normal], want[normal])
    tiny_got, tiny_want = got[~normal], want[~normal]
    assert ((tiny_got >= 0) & (tiny_got <= tiny_want * (1 + 1e-3) + 1e-45)).all(), (tiny_got, tiny_want)

ALL_BACKENDS = _backend.BACKENDS
# The non-reference backends; kernel tests run once per entry and skip where one cannot run.
FUSED = ("triton", "cpu", "cuda")


@pytest.fixture(params=FUSED)
def fused(request):
    """Each fused backend in turn (tests call ``require_backend(fused, IMPLEMENTED)``)."""
    return request.param


def device_for(backend: str) -> torch.device:
    """The device a backend's tests run on here: CUDA if present, else CPU (interpreter for triton)."""
    if backend == "cpu":
        return torch.device("cpu")
    if backend == "cuda":
        return torch.device("cuda")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def require_backend(backend: str, implemented=None) -> torch.device:
    """Skip (with the reason) when ``backend`` cannot run here or has no kernel for the op."""
    why = _backend._why_unavailable(backend)
    if why is not None:
        pytest.skip(f"backend {backend!r} unavailable: {why}")
    if implemented is not None and backend not in implemented:
        pytest.skip(f"backend {backend!r} has no kernel for this op yet")
    return device_for(backend)


@pytest.fixture(autouse=True)
def _reset_default_backend():
    yield
    bus_kernels.set_backend(None)


@pytest.fixture
def gen():
    """A seeded generator: fresh random inputs per test, reproducible per run."""
    return torch.Generator().manual_seed(1234)
