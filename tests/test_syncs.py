"""Host synchronisations in the hot path, counted on CPU.

On a GPU every call that needs a tensor's value on the host (``.item()``, ``.tolist()``,
``bool()``/``int()`` of a tensor, ``.cpu()``/``.numpy()``, and ops whose output size depends on
data: ``nonzero``, boolean-mask indexing, ``repeat_interleave`` without ``output_size``, ...)
stalls the launch queue and breaks CUDA-graph capture. None of them stalls on CPU, so
:class:`SyncCounter` counts the calls instead: a ``TorchDispatchMode`` sees
``aten._local_scalar_dense`` / ``is_nonzero`` and the data-dependent ops whatever the device, and
patched ``Tensor`` methods see ``tolist``/``cpu``/``numpy``/``to("cpu")``; the bodies of the
library's custom ops run under the mode too. Each event is attributed
to the first Python frame outside torch: the library (``bus_kernels/``, ``bus/``), the Triton
interpreter (its host copies exist only because it runs kernels on the CPU; not counted), or
anything else (the test itself, timm).

With value checks off (``set_value_checks(False)``, the default for CUDA tensors) and the Triton
kernels (the interpreter, ``TRITON_INTERPRET=1``), the budgets of DESIGN.md section 2 hold per
call, forward and backward: relevance_scores, select_tokens, varlen_attention (given max_seqlen),
pack/unpack (given sizes) 0; select_tokens_varlen at most 1, 0 given total and max_seqlen; a
patched timm ViT train step 0 with a fixed keep, at most 1 per TSPS layer with ``mass=``, and
0 with ``mass=`` and a ``max_keep`` bound (asserted in ``tests/test_timm_trace.py``).
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode

import bus_kernels as bk
from bus_kernels import _backend
from conftest import require_backend

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = (str(ROOT / "bus_kernels") + os.sep, str(ROOT / "bus") + os.sep)
TORCH_DIR = str(Path(torch.__file__).parent) + os.sep
aten = torch.ops.aten

# Ops that read a tensor's value on the host (a sync on a GPU) whatever their arguments.
_SCALAR_OPS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default}
# Ops whose output size depends on the data (a sync on a GPU).
_DATA_SIZED = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default,
               aten.unique_dim.default, aten.unique_consecutive.default}


def _where() -> str:
    """'library', 'interpreter' or 'other': who made the call, from the first frame outside torch."""
    frame = sys._getframe(2)
    while frame is not None:
        fn = frame.f_code.co_filename
        if not fn.startswith(TORCH_DIR) and fn != __file__:
            if fn.startswith(LIBRARY):
                return "library"
            if f"{os.sep}triton{os.sep}" in fn:
                return "interpreter"
            return "other"
        frame = frame.f_back
    return "other"


class SyncCounter(TorchDispatchMode):
    """Counts sync-forcing calls by origin (``.counts["library"]``), with ``.events`` for messages."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()
        self.events: list[str] = []
        self._patches = contextlib.ExitStack()

    def _record(self, what: str) -> None:
        where = _where()
        self.counts[where] += 1
        if where != "interpreter":
            frame = sys._getframe(2)
            while frame is not None and (frame.f_code.co_filename.startswith(TORCH_DIR) or frame.f_code.co_filename == __file__):
                frame = frame.f_back
            loc = f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame is not None else "?"
            self.events.append(f"{where}: {what} at {loc}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        opdef = OPDEFS.get(func._schema.name) if func.namespace == "bus_kernels" else None
        if opdef is not None:
            # A bus_kernels custom op: run its Python body with the mode active again, so that
            # what it does inside (value checks, launcher code) is seen too.
            TorchDispatchMode.__enter__(self)
            try:
                return opdef._init_fn(*args, **kwargs)
            finally:
                TorchDispatchMode.__exit__(self, None, None, None)
        if func in _SCALAR_OPS or func in _DATA_SIZED:
            self._record(str(func))
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self._record("repeat_interleave without output_size")
        elif func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
            idx = args[1] if len(args) > 1 else ()
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in idx):
                self._record(f"{func} with a boolean mask")
        return func(*args, **kwargs)

    def _wrap(self, name: str, is_sync):
        original = getattr(torch.Tensor, name)
        counter = self

        def wrapper(t, *a, **kw):
            if is_sync(a, kw):
                counter._record(f"Tensor.{name}")
            return original(t, *a, **kw)

        self._patches.enter_context(_setattr(torch.Tensor, name, wrapper))

    def __enter__(self):
        always = lambda a, kw: True  # noqa: E731

        def to_cpu(a, kw):
            dev = kw.get("device", a[0] if a else None)
            return isinstance(dev, (str, torch.device)) and torch.device(dev).type == "cpu"

        for name in ("tolist", "cpu", "numpy"):
            self._wrap(name, always)
        self._wrap("to", to_cpu)
        return super().__enter__()

    def __exit__(self, *exc):
        self._patches.close()
        return super().__exit__(*exc)

    @property
    def library(self) -> int:
        return self.counts["library"]

    def report(self) -> str:
        return "\n".join(self.events) or "no events"


@contextlib.contextmanager
def _setattr(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@pytest.fixture
def no_value_checks():
    bk.set_value_checks(False)
    yield
    bk.set_value_checks(None)


@pytest.fixture
def triton_first(monkeypatch):
    """"auto" prefers Triton on CPU tensors as it does on CUDA ones (interpreter), then C++."""
    require_backend("triton")
    monkeypatch.setitem(_backend._AUTO_ORDER, "cpu", ("triton", "cpu", "torch"))


def _rnd(*shape, seed=0, grad=True):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(grad)


def _count(fn) -> SyncCounter:
    with SyncCounter() as c:
        fn()
    return c


# ------------------------------------------------------------------ the counter can fail


def test_counter_counts_deliberate_syncs():
    t = torch.arange(4.0)
    c = _count(lambda: (t.sum().item(), t.tolist(), bool(t[0]), int(t[1]), t.cpu(), t[t > 1], t.nonzero()))
    assert c.counts["other"] == 7, c.report()
    assert c.library == 0


def test_counter_attributes_library_syncs(triton_first):
    """With value checks on, the library's own checks show up as library syncs."""
    q, k = _rnd(2, 2, 3, 16), _rnd(2, 2, 20, 16, seed=1)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    bk.set_value_checks(True)
    try:
        c = _count(lambda: bk.relevance_scores(q, k, q_mask=mask))
    finally:
        bk.set_value_checks(None)
    assert c.library >= 1, c.report()
    bk.set_value_checks(False)
    try:
        c = _count(lambda: bk.relevance_scores(q, k, q_mask=mask))
    finally:
        bk.set_value_checks(None)
    assert c.library == 0, c.report()


def test_value_check_switch(monkeypatch):
    assert bk.value_checks_enabled("cpu") and not bk.value_checks_enabled("cuda")
    bk.set_value_checks(True)
    assert bk.value_checks_enabled("cuda")
    bk.set_value_checks(False)
    assert not bk.value_checks_enabled("cpu")
    monkeypatch.setenv("BUS_KERNELS_VALUE_CHECKS", "1")
    bk.set_value_checks(None)  # back to the environment
    assert bk.value_checks_enabled("cuda")
    monkeypatch.setenv("BUS_KERNELS_VALUE_CHECKS", "0")
    bk.set_value_checks(None)
    assert not bk.value_checks_enabled("cpu")
    monkeypatch.delenv("BUS_KERNELS_VALUE_CHECKS")
    bk.set_value_checks(None)
    assert bk.value_checks_enabled("cpu") and not bk.value_checks_enabled("cuda")
    with pytest.raises(TypeError, match="set_value_checks"):
        bk.set_value_checks(1)
    if bk._ext.compiled() and hasattr(bk._ext.ops(), "value_checks"):
        bk.set_value_checks(True)
        assert bk._ext.ops().value_checks()  # the CUDA wrappers' copy follows
        bk.set_value_checks(None)
        assert not bk._ext.ops().value_checks()


def test_checks_off_skips_value_errors():
    x, s = torch.randn(2, 9, 4), torch.randn(2, 8)
    s[0, 3] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        bk.select_tokens(x, s, 3, backend="torch")
    bk.set_value_checks(False)
    try:
        tok, idx = bk.select_tokens(x, s, 3, backend="torch")  # unchecked: no error, no sync
        assert tok.shape == (2, 5, 4)
    finally:
        bk.set_value_checks(None)


# ---------------------------------------------------------------------- per-op budgets


def _fwd_bwd(fn, *inputs):
    out = fn()
    out = out[0] if isinstance(out, tuple) else out
    grads = torch.autograd.grad(out.float().square().sum(), [t for t in inputs if t.requires_grad])
    assert all(g is not None for g in grads)


@pytest.mark.usefixtures("no_value_checks", "triton_first")
def test_relevance_scores_makes_no_sync():
    q, k = _rnd(2, 3, 5, 16), _rnd(2, 3, 37, 16, seed=1)
    mask = torch.tensor([[True, False, True, True, False], [True] * 5])
    c = _count(lambda: _fwd_bwd(lambda: bk.relevance_scores(q, k, q_mask=mask), q, k))
    assert c.library == 0, c.report()


@pytest.mark.usefixtures("no_value_checks", "triton_first")
@pytest.mark.parametrize("fuse,order", [("sum", "index"), ("mean", "score"), (None, "index")])
def test_select_tokens_makes_no_sync(fuse, order):
    x, s = _rnd(2, 37, 32), _rnd(2, 36, seed=1)
    c = _count(lambda: _fwd_bwd(lambda: bk.select_tokens(x, s, 9, fuse=fuse, order=order).tokens, x, s))
    assert c.library == 0, c.report()


@pytest.mark.usefixtures("no_value_checks", "triton_first")
def test_select_tokens_varlen_budget():
    x, s = _rnd(3, 37, 32), _rnd(3, 36, seed=1)
    keep = torch.tensor([0, 5, 36])
    c = _count(lambda: _fwd_bwd(lambda: bk.select_tokens_varlen(x, s, keep=keep).tokens, x, s))
    assert c.library <= 1, c.report()
    total = 3 * 2 + 41
    c = _count(lambda: _fwd_bwd(lambda: bk.select_tokens_varlen(x, s, keep=keep, total=total, max_seqlen=38).tokens, x, s))
    assert c.library == 0, c.report()
    sp = s.detach().abs().requires_grad_()
    c = _count(lambda: _fwd_bwd(lambda: bk.select_tokens_varlen(x, sp, mass=0.5).tokens, x, sp))
    assert c.library <= 1, c.report()


@pytest.mark.usefixtures("no_value_checks", "triton_first")
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_attention_makes_no_sync(causal):
    q, k, v = _rnd(12, 2, 16), _rnd(12, 2, 16, seed=1), _rnd(12, 2, 16, seed=2)
    bias = _rnd(12, 2, seed=3)
    cu = torch.tensor([0, 5, 5, 12], dtype=torch.int32)
    c = _count(lambda: _fwd_bwd(lambda: bk.varlen_attention(q, k, v, cu, 7, causal=causal, key_bias=bias), q, k, v, bias))
    assert c.library == 0, c.report()


@pytest.mark.usefixtures("no_value_checks", "triton_first")
def test_pack_unpack_make_no_sync_given_sizes():
    x = _rnd(3, 6, 2, 4)
    lengths = torch.tensor([2, 0, 5])
    c = _count(lambda: _fwd_bwd(lambda: bk.pack(x, lengths, total=7, max_seqlen=5).packed, x))
    assert c.library == 0, c.report()
    c = _count(lambda: _fwd_bwd(lambda: bk.pack(x, [2, 0, 5]).packed, x))
    assert c.library == 0, c.report()
    c = _count(lambda: bk.pack(x, lengths))  # sizes read from the device: one copy
    assert c.library == 1, c.report()
    p = _rnd(7, 2, 4)
    cu = torch.tensor([0, 2, 2, 7], dtype=torch.int32)
    c = _count(lambda: _fwd_bwd(lambda: bk.unpack(p, cu, 5), p))
    assert c.library == 0, c.report()


# ----------------------------------------------------------------- a patched train step


def _train_step_syncs(**patch) -> tuple[SyncCounter, int]:
    timm = pytest.importorskip("timm")
    import bus
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5)
    layers = (1, 2)
    bus.patch_timm(model, layers=layers, **patch)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    images = torch.randn(3, 3, 32, 32)
    text = torch.randn(3, 4, 32)
    text_mask = torch.tensor([[True, True, False, False], [True] * 4, [True, False, True, False]])
    target = torch.tensor([0, 3, 1])

    def step():
        loss = torch.nn.functional.cross_entropy(model(images, text=text, text_mask=text_mask), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up outside the counter (lazy initialisation, Triton kernel set-up)
    c = _count(step)
    del timm
    return c, len(layers)


@pytest.mark.usefixtures("no_value_checks", "triton_first")
def test_fixed_keep_train_step_makes_no_sync():
    c, _ = _train_step_syncs(keep=0.5)
    assert c.library == 0, c.report()


@pytest.mark.usefixtures("no_value_checks", "triton_first")
def test_mass_train_step_syncs_once_per_tsps_layer():
    c, layers = _train_step_syncs(mass=0.6, min_keep=2)
    assert c.library <= layers, c.report()
