"""Every op is a torch.library custom op: opcheck passes, and torch.compile(fullgraph=True) traces
through the public functions on CPU (forward and backward) with results equal to eager."""
import importlib

import pytest
import torch

import bus_kernels as bk
from bus_kernels import _backend

ops = torch.ops.bus_kernels


def _cpu_backends(implemented):
    return [b for b in ("torch", "cpu") if b in implemented and _backend._why_unavailable(b) is None]


def rnd(*shape, grad=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(sum(shape) + len(shape))
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)


def _cases():
    x, s = rnd(3, 11, 8, grad=True), rnd(3, 10, grad=True)
    keep = torch.tensor([0, 4, 10])
    lengths = (keep + 2).tolist()  # prefix + kept + fused
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    total = int(cu[-1])
    q, k = rnd(2, 3, 4, 8, grad=True), rnd(2, 3, 13, 8, grad=True)
    qm = torch.tensor([[True, False, True, True], [True, True, True, True]])
    qa, ka, va = rnd(12, 2, 8, grad=True), rnd(12, 2, 8, grad=True), rnd(12, 2, 8, grad=True)
    cua = torch.tensor([0, 5, 5, 12], dtype=torch.int32)
    bias = rnd(12, 2, grad=True)
    idx = torch.tensor([[1, 4, 7], [2, 3, 10], [5, 6, 9]])
    g_tok = rnd(3, 5, 8)
    return {
        "select_tokens": [(x, s, 3, 1, f, o) for f in ("sum", "mean", "none") for o in ("index", "score")],
        # grad has P + k (+1 fused) rows: 5 with a fused token, 4 without
        "select_tokens_backward": [(g_tok if f != "none" else g_tok[:, :4].contiguous(), x.detach(), s.detach(), idx, 1, f)
                                   for f in ("sum", "mean", "none")],
        "select_tokens_varlen": [(x, s, keep, cu, total, 1, f) for f in ("sum", "mean")],
        "mass_keep": [(s.detach().abs(), 0.5, 1)],
        "relevance_scores": [(q, k, 0.35, None), (q, k, 0.35, qm)],
        "varlen_attention": [(qa, ka, va, cua, 8, 0.3, c, b) for c in (False, True) for b in (None, bias)],
        "pack": [(rnd(3, 5, 2, 4, grad=True), torch.tensor([0, 2, 2, 7], dtype=torch.int32), 7)],
        "unpack": [(rnd(7, 2, 4, grad=True), torch.tensor([0, 2, 2, 7], dtype=torch.int32), 6)],
    }


def _implemented(module):
    return importlib.import_module(f"bus_kernels.ops.{module}").IMPLEMENTED


IMPLEMENTED = {
    "select_tokens": _implemented("select"),
    "select_tokens_backward": _implemented("select"),
    "select_tokens_varlen": _implemented("select_varlen"),
    "mass_keep": ("torch",),
    "relevance_scores": _implemented("relevance"),
    "varlen_attention": _implemented("varlen_attention"),
    "pack": _implemented("pack"),
    "unpack": _implemented("pack"),
}

CASES = [
    pytest.param(name, i, backend, id=f"{name}-{i}-{backend}")
    for name, cases in _cases().items()
    for i in range(len(cases))
    for backend in _cpu_backends(IMPLEMENTED[name])
]


@pytest.mark.parametrize("name,i,backend", CASES)
def test_opcheck(name, i, backend):
    args = _cases()[name][i] + (backend,)
    torch.library.opcheck(getattr(ops, name).default, args)


# ------------------------------------------------------------------------ torch.compile
def _compile_and_compare(fn, inputs, backend="inductor"):
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    eager_in = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    comp_in = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    want, got = fn(*eager_in), compiled(*comp_in)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(want)
    want.backward(g)
    got.backward(g)
    for a, b in zip(comp_in, eager_in):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.slow
def test_compile_select_tokens():
    def fn(x, s):
        tok, idx = bk.select_tokens(x, s, 0.5, fuse="mean")
        return tok * 2 + idx.sum()

    _compile_and_compare(fn, [rnd(2, 17, 8, grad=True), rnd(2, 16, grad=True)])


@pytest.mark.slow
def test_compile_relevance_then_select():
    def fn(q, k, x):
        s = bk.relevance_scores(q, k)
        return bk.select_tokens(x, s[:, 1:], 5).tokens

    _compile_and_compare(fn, [rnd(2, 2, 1, 8, grad=True), rnd(2, 2, 12, 8, grad=True), rnd(2, 12, 8, grad=True)])


@pytest.mark.slow
def test_compile_varlen_attention_and_pack():
    cu = torch.tensor([0, 3, 3, 9], dtype=torch.int32)

    def fn(q, k, v, b):
        out = bk.varlen_attention(q, k, v, cu, 6, causal=True, key_bias=b)
        return bk.unpack(out, cu, 6).sum(1) + bk.pack(out.reshape(3, 3, 2, 8), [1, 2, 3]).packed.sum(0)

    _compile_and_compare(fn, [rnd(9, 2, 8, grad=True), rnd(9, 2, 8, grad=True), rnd(9, 2, 8, grad=True), rnd(9, grad=True)])


@pytest.mark.slow
def test_compile_select_varlen():
    """Packed sizes depend on data: dynamo captures them as unbacked ints."""
    keep = torch.tensor([2, 0, 5])

    def fn(x, s):
        out = bk.select_tokens_varlen(x, s, keep=keep, fuse="sum")
        return bk.unpack(out.tokens, out.cu_seqlens, 7)

    with torch._dynamo.config.patch(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True):
        _compile_and_compare(fn, [rnd(3, 6, 4, grad=True), rnd(3, 5, grad=True)], backend="aot_eager")
