"""What :func:`bus.patch_timm` and :func:`bus.patch_hf` share: the per-forward state holder that
copies and pickles as an empty one, pickling of the generated classes as "host class + patch",
and the check of the text inputs."""
from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor


class StateHolder:
    """Base of the per-forward state holders of a patched model (shared by its patched blocks).

    A copy (``copy.deepcopy``, EMA) or a pickle (``torch.save(model)``) of the model gets an empty
    holder: the state holds tensors of one forward (possibly with their autograd graph), which are
    neither copyable nor worth saving. Subclasses set their fields in ``__init__`` (no arguments)."""

    def __deepcopy__(self, memo):
        return type(self)()

    def __reduce__(self):
        return (type(self), ())


def reduce_as(rebuild: Callable, host_cls: type, kind: str):
    """A ``__reduce_ex__`` for a generated class: the class is not importable by name, so the
    object pickles as ``rebuild(host_cls, kind)`` (a module-level function that regenerates the
    class and returns an empty instance) plus its ``__getstate__`` (restored by ``nn.Module``)."""

    def __reduce_ex__(self, protocol):
        return rebuild, (host_cls, kind), self.__getstate__()

    return __reduce_ex__


def check_text(who: str, text: Optional[Tensor], text_mask: Optional[Tensor], batch: int, width: int) -> None:
    """ValueError unless ``text`` is None, ``[B, D]`` or ``[B, T, D]`` (``text_mask [B, T]`` with the latter)."""
    if text is None:
        return
    if not isinstance(text, Tensor) or text.dim() not in (2, 3) or text.shape[0] != batch or text.shape[-1] != width:
        raise ValueError(f"{who}: text must be [B={batch}, D={width}] or [B, T, D], got "
                         f"{tuple(text.shape) if isinstance(text, Tensor) else type(text).__name__}")
    if text_mask is not None and (text.dim() != 3 or tuple(text_mask.shape) != tuple(text.shape[:2])):
        raise ValueError(f"{who}: text_mask must be [B, T] matching text [B, T, D]")
