"""Backend selection, availability reporting and the compiled extension."""
import glob
import importlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bus_kernels as bk
from bus_kernels import _backend, _ext
from conftest import device_for, require_backend

x, s = torch.randn(2, 9, 4), torch.randn(2, 8)


def test_available_backends_lists_torch_first():
    avail = bk.available_backends()
    assert avail[0] == "torch" and set(avail) <= {"torch", "triton", "cuda", "cpu"}
    assert ("cpu" in avail) == _ext.compiled()


def test_explicit_unimplemented_backend_says_why():
    missing = [b for b in ("cuda", "cpu") if b not in bk.ops.select.IMPLEMENTED]
    for b in missing:
        with pytest.raises(RuntimeError, match=f"backend '{b}'"):
            bk.select_tokens(x, s, 3, backend=b)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_backend_without_gpu_says_why():
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        bk.pack(x, [1, 2], backend="cuda")
    with pytest.raises(RuntimeError, match="set_backend: backend 'cuda' is not available"):
        bk.set_backend("cuda")


def test_set_backend_and_env(monkeypatch):
    assert bk.get_backend() in ("auto",) or os.environ.get("BUS_KERNELS_BACKEND")
    bk.set_backend("torch")
    assert bk.get_backend() == "torch"
    with pytest.raises(ValueError, match="backend='nope'"):
        bk.set_backend("nope")
    bk.set_backend(None)
    monkeypatch.setenv("BUS_KERNELS_BACKEND", "torch")
    assert bk.get_backend() == "torch"
    monkeypatch.setenv("BUS_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend='bogus'"):
        bk.select_tokens(x, s, 3)


def test_auto_prefers_compiled_cpu_kernels():
    impl = importlib.import_module("bus_kernels.ops.pack").IMPLEMENTED
    want = "cpu" if _ext.compiled() else "torch"
    assert _backend.resolve("pack", "auto", torch.device("cpu"), impl) == want
    # float64 never goes to a fused backend
    assert _backend.resolve("pack", "auto", torch.device("cpu"), ("torch", "cpu"), torch.float64) == "torch"
    if _ext.compiled():
        with pytest.raises(RuntimeError, match="float64 runs on 'torch'"):
            _backend.resolve("op", "cpu", torch.device("cpu"), ("torch", "cpu"), torch.float64)


def test_auto_never_picks_the_cuda_relevance_kernel(monkeypatch):
    """On CUDA tensors without Triton, "auto" runs relevance_scores on torch, not on the CUDA
    kernel (see _AUTO_SKIP); select still goes to the CUDA kernel; naming "cuda" still works."""
    monkeypatch.setattr(_backend, "_why_unavailable", lambda name: "absent" if name == "triton" else None)
    monkeypatch.setattr(_backend, "_runs_on", lambda name, device: True)
    cuda = torch.device("cuda")
    rel = importlib.import_module("bus_kernels.ops.relevance").IMPLEMENTED
    sel = importlib.import_module("bus_kernels.ops.select").IMPLEMENTED
    assert "cuda" in rel
    assert _backend.resolve("relevance_scores", "auto", cuda, rel, torch.bfloat16) == "torch"
    assert _backend.resolve("relevance_scores", "cuda", cuda, rel, torch.bfloat16) == "cuda"
    assert _backend.resolve("select_tokens", "auto", cuda, sel, torch.bfloat16) == "cuda"


def test_import_without_extension_warns_once_and_works():
    """A source checkout without the built extension: import works, one warning, only 'torch'."""
    code = (
        "import sys, warnings; warnings.simplefilter('always');"
        "sys.modules['bus_kernels._C'] = None;"  # makes `import bus_kernels._C` fail
        "import bus_kernels as bk, torch;"
        "print(bk.available_backends());"
        "print(bk.select_tokens(torch.randn(1, 4, 2), torch.randn(1, 3), 2).tokens.shape)"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("bus_kernels._C is not available") == 1
    assert "'cpu'" not in proc.stdout.splitlines()[0]


def _fatbin_archs(so_path: str) -> list[int]:
    """SM architectures of the cubins embedded in a shared library's CUDA fat binary."""
    data = Path(so_path).read_bytes()
    off = data.find(struct.pack("<I", 0xBA55ED50))  # fatbin header magic
    if off < 0:
        return []
    _, _, header_size, fat_size = struct.unpack_from("<IHHQ", data, off)
    pos, end, archs = off + header_size, off + header_size + fat_size, []
    while pos < end:
        kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, pos)
        if kind == 2:  # ELF cubin
            archs.append(struct.unpack_from("<I", data, pos + 28)[0])
        pos += entry_header + payload
    return archs


@pytest.mark.skipif(not _ext.compiled(), reason="extension not built")
def test_extension_cuda_part_compiled_when_expected():
    """CI sets BUS_KERNELS_EXPECT_CUDA=1: the CUDA kernels must be in _C, as sm_80 and sm_90 cubins."""
    expect = os.environ.get("BUS_KERNELS_EXPECT_CUDA") == "1"
    so = glob.glob(str(Path(_ext.__file__).with_name("_C")) + "*.so")
    assert so, "extension loaded but its .so was not found"
    archs = _fatbin_archs(so[0])
    if expect:
        assert _ext.cuda_compiled(), "CUDA kernels are not registered in bus_kernels._C"
        assert {80, 90} <= set(archs), f"cubins in _C: {archs}"
    if _ext.cuda_compiled():
        assert archs, "CUDA kernels registered but no cubin embedded"
    elif not expect:
        pytest.skip("extension built without CUDA")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_pack_unpack_matches_reference():
    dev = torch.device("cuda")
    xg = torch.randn(5, 33, 3, 8, device=dev, dtype=torch.bfloat16)
    lengths = [33, 0, 1, 17, 32]
    for backend in ("cuda", "torch"):
        if backend not in bk.available_backends():
            pytest.skip(f"{backend} unavailable")
    a, b = bk.pack(xg, lengths, backend="cuda"), bk.pack(xg, lengths, backend="torch")
    assert torch.equal(a.packed, b.packed)
    assert torch.equal(bk.unpack(a.packed, a.cu_seqlens, 40, backend="cuda"), bk.unpack(a.packed, a.cu_seqlens, 40, backend="torch"))
    odd = torch.randn(4, 9, 3, device=dev, dtype=torch.float16)  # 6-byte rows: 2-byte words path
    assert torch.equal(bk.pack(odd, [1, 9, 0, 4], backend="cuda").packed, bk.pack(odd, [1, 9, 0, 4], backend="torch").packed)


@pytest.mark.parametrize("api", ["matmul", "global"])
def test_fp32_ops_run_when_tf32_is_set_through_the_current_api(api):
    """torch.backends.cuda.matmul.fp32_precision = "tf32" (or torch.backends.fp32_precision) made
    every read of the legacy allow_tf32 raise, so fp32 Triton ops raised a RuntimeError."""
    require_backend("triton")
    import bus_kernels as bk

    owner = torch.backends.cuda.matmul if api == "matmul" else torch.backends
    if not hasattr(owner, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    before = (torch.backends.cuda.matmul.fp32_precision, getattr(torch.backends, "fp32_precision", None))
    owner.fp32_precision = "tf32"
    try:
        assert bk._backend.fp32_dots_allow_tf32()
        g = torch.Generator().manual_seed(0)
        dev = device_for("triton")
        q, k = torch.randn(2, 2, 3, 16, generator=g).to(dev), torch.randn(2, 2, 20, 16, generator=g).to(dev)
        s = bk.relevance_scores(q, k, backend="triton")
        torch.testing.assert_close(s, bk.relevance_scores(q, k, backend="torch"), atol=2e-3, rtol=2e-3)
        x = torch.randn(9, 2, 16, generator=g).to(dev)
        cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=dev)
        o = bk.varlen_attention(x, x, x, cu, 5, backend="triton")
        torch.testing.assert_close(o, bk.varlen_attention(x, x, x, cu, 5, backend="torch"), atol=2e-3, rtol=2e-3)
    finally:
        torch.backends.cuda.matmul.fp32_precision = before[0]
        if before[1] is not None:
            torch.backends.fp32_precision = before[1]
    assert not bk._backend.fp32_dots_allow_tf32()
