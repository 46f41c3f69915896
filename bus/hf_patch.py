"""``patch_hf``: the TSPS drop-in for Hugging Face ``transformers`` vision towers.

Covers ``ViTModel``, ``CLIPVisionModel``, ``SiglipVisionModel`` and ``Dinov2Model`` (and other
towers whose encoder layers have a pre-attention norm and an attention with ``q_proj``/``k_proj``).
As :func:`bus.patch_timm` does, it swaps the classes of the model and of the chosen layers for thin
subclasses that call the host ``forward`` unchanged; nothing of transformers' forward code is
copied. A patched layer runs as it is, then scores its patch tokens with its own attention's
query and key projections (applied after its own pre-attention norm to the layer's input; the
text, when given, goes through the same norm and query projection) and keeps the most relevant
ones with :func:`bus_kernels.relevance_scores` and :func:`bus_kernels.select_tokens`, fusing the
rest into one token. Differences from ``patch_timm``: pruning happens after the whole layer
(attention and MLP) rather than between them, and attention is not proportional to token sizes
(transformers layers take no per-key bias).

``mass=`` (per-sample counts): transformers layers run on ``[B, L, D]`` only, so the tokens stay
padded rather than packed: each sample's prefix, kept tokens and fused token, then padding rows
(:func:`bus.tsps.select_padded`), and every layer from the first pruning layer on gets an
additive ``attention_mask`` that hides the padding keys (its own ``attention_mask`` argument, as
transformers' attention adds it to the logits). ``L`` is the bound ``max_keep`` (static shapes,
no host sync) or, without one, the batch's largest count (one host sync per pruning layer).

Gradient checkpointing (``model.gradient_checkpointing_enable()``): a patched layer is a pure step
``(hidden states, HFPruneState in) -> (output, HFPruneState out)`` (:func:`_layer_step`); with
checkpointing on it checkpoints that step itself (non-reentrant ``torch.utils.checkpoint``) with
the state as an argument, so the recompute sees the original inputs; transformers' own
checkpointing wrapper is kept off the patched layer (it would recompute the layer after the
forward's state is gone).
"""
from __future__ import annotations

import contextlib
import dataclasses
from functools import partial
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

import bus_kernels as bk

from ._patching import StateHolder, check_text, reduce_as
from .tsps import TSPS, keep_count, lengths_mask, mass_keep, select_padded

_NORMS = ("layernorm_before", "layer_norm1", "norm1")
_ATTNS = ("attention", "self_attn")


@dataclass
class HFPruneState:
    """The last forward of a :func:`patch_hf` model.

    ``patch_ids``: int64 ``[B, N']``, the original patch index of each output token (-1 for prefix
    and fused tokens; ``None`` when nothing was pruned). ``records``: one dict per pruning layer
    with ``scores`` (float32 ``[B, n]``, relevance of the rankable tokens at that layer, summing to
    1) and their ``patch_ids``. With ``mass=``: ``lengths`` int64 ``[B]`` (rows ``>= lengths[b]``
    of the output are padding, zeros, id -1) and ``sizes`` float32 ``[B, N']`` (patches per token).
    """

    batch: int
    num_prefix: int = -1  # set at the first patched layer
    text: Optional[Tensor] = None
    text_mask: Optional[Tensor] = None
    patch_ids: Optional[Tensor] = None
    records: list = field(default_factory=list)
    num_patches: int = 0  # patches of this forward's images (the rest of the first layer's input is prefix)
    sizes: Optional[Tensor] = None
    lengths: Optional[Tensor] = None

    def valid(self, L: int) -> Tensor:
        """bool ``[B, L]``: True for the real rows of the padded (``mass=``) layout."""
        return lengths_mask(self.lengths, L)


class _Holder(StateHolder):
    """The forward in flight and the last one; copies and pickles as an empty holder."""

    def __init__(self):
        self.state: Optional[HFPruneState] = None
        self.last: Optional[HFPruneState] = None


_LAYER_CLASSES: dict[type, type] = {}
_MODEL_CLASSES: dict[type, type] = {}


def _rebuild(host_cls: type, kind: str):
    cls = _model_class(host_cls) if kind == "model" else _layer_class(host_cls)
    return cls.__new__(cls)


def _reduce_as(host_cls: type, kind: str):
    return reduce_as(_rebuild, host_cls, kind)


def _heads(proj: nn.Linear, h: Tensor, head_dim: int) -> Tensor:
    B, L, _ = h.shape
    return proj(h).view(B, L, -1, head_dim).transpose(1, 2)  # [B, H, L, hd]


def _prune(layer: nn.Module, x_in: Tensor, out: Tensor, st: HFPruneState) -> Tensor:
    """Scores the rankable tokens of ``x_in`` with ``layer``'s own projections; prunes ``out``."""
    attn, norm = getattr(layer, layer._bus_attn), getattr(layer, layer._bus_norm)
    hd = attn.head_dim
    scale = getattr(attn, "scaling", getattr(attn, "scale", hd ** -0.5))
    P = st.num_prefix
    B, N, _ = out.shape
    n = N - P
    h = norm(x_in)
    k = _heads(attn.k_proj, h[:, P:], hd)
    valid = None if st.lengths is None else st.valid(N)
    q_mask = None
    if st.text is not None and layer._bus_guidance in ("auto", "text"):
        text = st.text if st.text.dim() == 3 else st.text[:, None]
        q, q_mask = _heads(attn.q_proj, norm(text), hd), st.text_mask
    elif layer._bus_guidance == "text":
        raise ValueError("bus.patch_hf: guidance='text' needs text=... in the model call")
    elif P >= 1 and layer._bus_guidance != "mean":  # the tower's [CLS] query (EViT)
        q = _heads(attn.q_proj, h[:, :1], hd)
    elif valid is None:  # no class token (SigLIP): the mean query of the patches
        q = _heads(attn.q_proj, h[:, P:], hd).mean(dim=2, keepdim=True)
    else:  # ... of the real ones
        w = valid[:, P:].to(h.dtype)
        q = (_heads(attn.q_proj, h[:, P:], hd) * w[:, None, :, None]).sum(dim=2, keepdim=True)
        q = q / w.sum(dim=1)[:, None, None, None]
    if valid is None:
        scores = bk.relevance_scores(q, k.contiguous(), scale=scale, q_mask=q_mask)
    else:  # padding keys get no probability
        scores = TSPS._masked_relevance(q, k, q_mask, valid[:, P:], scale)
    ids = st.patch_ids
    if ids is None:
        ids = torch.arange(-P, n, device=out.device).expand(B, N).clone()
        ids[:, :P] = -1
    st.records.append({"scores": scores, "patch_ids": ids[:, P:]})
    if layer._bus_mass is not None:
        sizes = st.sizes if st.sizes is not None else torch.ones(B, N, device=out.device)
        n_real = valid[:, P:].sum(dim=1) if valid is not None else torch.full((B,), n, device=out.device)
        keep = mass_keep(scores, layer._bus_mass, layer._bus_min_keep)
        if layer._bus_max_keep is not None:
            bound = keep_count(layer._bus_max_keep, n)
        else:  # the batch's largest count: one device-to-host copy
            bound = max(1, int(torch.minimum(keep, n_real).max()))
        tokens, st.patch_ids, st.sizes, st.lengths = select_padded(
            out, scores, ids, sizes, keep, n_real, bound, num_prefix=P, fuse=layer._bus_fuse)
        return tokens
    keep = layer._bus_keep
    count = keep_count(keep, n)
    if count >= n:  # nothing to drop: the layer's output as it was
        return out
    sel = bk.select_tokens(out, scores, count, num_prefix=P, fuse=layer._bus_fuse)
    parts = [ids[:, :P], ids.gather(1, sel.indices)]
    if layer._bus_fuse is not None:
        parts.append(torch.full_like(ids[:, :1], -1))
    st.patch_ids = torch.cat(parts, dim=1)
    return sel.tokens


def _layer_step(layer: nn.Module, host_forward, hidden_states: Tensor, st_in: HFPruneState, args: tuple,
                kwargs: dict):
    """A patched layer as a pure function of its inputs: the host layer, then the pruning of its
    output; returns ``(output, new state)`` and leaves ``st_in`` as it was, so that running it
    again on the same inputs (a checkpoint's recompute) does the same work."""
    st = dataclasses.replace(st_in, records=list(st_in.records))
    if st.lengths is not None:  # padded layout (mass=): the padding keys are hidden
        args, kwargs = _with_key_mask(hidden_states, st, args, kwargs)
    out = host_forward(layer, hidden_states, *args, **kwargs)
    hs = out[0] if isinstance(out, tuple) else out
    if layer._bus_prunes:
        if st.num_prefix < 0:  # first pruning layer: every patch is still there
            st.num_prefix = hidden_states.shape[1] - st.num_patches
        hs = _prune(layer, hidden_states, hs, st)
    if layer._bus_last and st.lengths is not None:  # the tower's output: padding rows are zeros
        hs = hs.masked_fill(~st.valid(hs.shape[1])[..., None], 0.0)
    return ((hs, *out[1:]) if isinstance(out, tuple) else hs), st


def _with_key_mask(hidden_states: Tensor, st: HFPruneState, args: tuple, kwargs: dict):
    """The layer's arguments with ``attention_mask`` = an additive ``[B, 1, 1, L]`` mask: 0 on the
    real keys, the dtype's lowest value on padding keys (in the autocast dtype under autocast:
    transformers' SDPA path wants the query's dtype)."""
    dev = hidden_states.device
    dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else hidden_states.dtype
    pad = ~st.valid(hidden_states.shape[1])[:, None, None, :]
    mask = torch.zeros(pad.shape, dtype=dtype, device=dev).masked_fill(pad, torch.finfo(dtype).min)
    given = args[0] if args else kwargs.get("attention_mask")
    if given is not None:
        raise NotImplementedError("bus.patch_hf: mass= with an attention_mask of the caller is not supported")
    if args:
        return (mask, *args[1:]), kwargs
    return args, {**kwargs, "attention_mask": mask}


def _checkpointing(layer: nn.Module) -> bool:
    return bool(getattr(layer, "gradient_checkpointing", False)) and layer.training and torch.is_grad_enabled()


def _layer_class(cls: type) -> type:
    if cls not in _LAYER_CLASSES:

        def forward(self, hidden_states: Tensor, *args, **kwargs):
            holder: _Holder = self._bus_holder
            st = holder.state
            if st is None:  # outside the patched model: the host layer (checkpointed as transformers does)
                if _checkpointing(self) and hasattr(self, "_gradient_checkpointing_func"):
                    return self._gradient_checkpointing_func(partial(cls.forward, self, **kwargs), hidden_states, *args)
                return cls.forward(self, hidden_states, *args, **kwargs)
            if _checkpointing(self):
                out, holder.state = torch.utils.checkpoint.checkpoint(
                    _layer_step, self, cls.forward, hidden_states, st, args, kwargs, use_reentrant=False)
            else:
                out, holder.state = _layer_step(self, cls.forward, hidden_states, st, args, kwargs)
            return out

        new = type(f"BUS{cls.__name__}", (cls,), {"forward": forward, "__reduce_ex__": _reduce_as(cls, "layer")})
        # transformers (GradientCheckpointingLayer.__init_subclass__) wraps the forward of every
        # subclass in its checkpointing; that would recompute the pruning after the forward's
        # state is gone, so the patched layer keeps its own forward and checkpoints its pure step.
        # The host forward called inside is then not the outermost one and does not checkpoint.
        new.forward = forward
        _LAYER_CLASSES[cls] = new
    return _LAYER_CLASSES[cls]


@contextlib.contextmanager
def _pruning(model: nn.Module, pixel_values: Tensor, text: Optional[Tensor], text_mask: Optional[Tensor]):
    holder: _Holder = model._bus_holder
    B, width = pixel_values.shape[0], model.config.hidden_size
    check_text("bus.patch_hf", text, text_mask, B, width)
    p = model.config.patch_size
    p = p if isinstance(p, int) else p[0]
    holder.state = HFPruneState(batch=B, text=text, text_mask=None if text_mask is None else text_mask.bool(),
                                num_patches=(pixel_values.shape[-2] // p) * (pixel_values.shape[-1] // p))
    try:
        yield
    finally:
        st, holder.state = holder.state, None
        holder.last = dataclasses.replace(st, text=None, text_mask=None)  # no reference to the caller's text


def _model_class(cls: type) -> type:
    if cls not in _MODEL_CLASSES:

        def forward(self, pixel_values: Optional[Tensor] = None, *args, text: Optional[Tensor] = None,
                    text_mask: Optional[Tensor] = None, **kwargs):
            if pixel_values is None:
                raise ValueError("bus.patch_hf: pixel_values is required")
            with _pruning(self, pixel_values, text, text_mask):
                return cls.forward(self, pixel_values, *args, **kwargs)

        def pruning_state(self) -> Optional[HFPruneState]:
            """The :class:`HFPruneState` of the last forward (scores, kept patch ids)."""
            return self._bus_holder.last

        _MODEL_CLASSES[cls] = type(f"BUS{cls.__name__}", (cls,),
                                   {"forward": forward, "pruning_state": pruning_state,
                                    "__reduce_ex__": _reduce_as(cls, "model")})
    return _MODEL_CLASSES[cls]


def _find_layers(model: nn.Module) -> nn.ModuleList:
    for path in ("layers", "encoder.layers", "encoder.layer", "vision_model.encoder.layers"):
        mod = model
        for part in path.split("."):
            mod = getattr(mod, part, None)
        if isinstance(mod, nn.ModuleList):
            return mod
    raise TypeError(f"patch_hf: found no encoder layer list in {type(model).__name__} "
                    "(looked for layers, encoder.layers, encoder.layer)")


def patch_hf(model: nn.Module, *, layers: Iterable[int] = (4, 7, 10), keep=0.7, fuse: Optional[str] = "sum",
             guidance: str = "auto", mass: Optional[float] = None, min_keep: int = 1, max_keep=None) -> nn.Module:
    """Patch a ``transformers`` vision tower in place so that it prunes patches after ``layers``.

    Args:
        model: ``ViTModel``, ``CLIPVisionModel``, ``SiglipVisionModel``, ``Dinov2Model`` (or a
            tower with the same layer layout: a pre-attention norm ``layernorm_before``,
            ``layer_norm1`` or ``norm1``, an ``attention``/``self_attn`` with ``q_proj``, ``k_proj``
            and ``head_dim``).
        layers: 0-based indices of the encoder layers after which tokens are pruned.
        keep: ratio in (0, 1] or count (int >= 1) of the rankable tokens kept at each layer.
        fuse: ``"sum"``, ``"mean"`` or ``None`` (see :func:`bus_kernels.select_tokens`).
        guidance: ``"auto"`` (the text when given, else the [CLS] query, or the mean patch query
            for towers without a class token such as SigLIP), ``"text"``, ``"cls"`` or ``"mean"``.
        mass: per-sample counts instead of ``keep``: each sample keeps its smallest top set
            holding this share of the relevance (as :func:`bus_kernels.select_tokens_varlen`), at
            least ``min_keep``. The tokens stay padded (see the module docstring); the output's
            rows ``>= pruning_state().lengths[b]`` are padding (zeros).
        min_keep: lower bound of the per-sample count with ``mass``.
        max_keep: with ``mass``, a bound on each sample's count (a count, or a ratio of the
            layer's rankable tokens); counts above it are clamped to it. It fixes the shapes
            (no host sync); without it each pruning layer reads the batch's largest count.

    Afterwards ``model(pixel_values, text=None, text_mask=None, ...)`` prunes; ``text`` is
    ``[B, D]`` or ``[B, T, D]`` (+ ``text_mask [B, T]``) in the tower's width ``D =
    config.hidden_size``. The output is the tower's usual output on the kept tokens (prefix
    tokens first, then the kept patches in order, then the fused token). ``keep=1.0`` returns
    exactly the unpatched outputs. ``model.pruning_state()`` gives the last forward's
    :class:`HFPruneState`.
    """
    if not hasattr(model, "config") or not hasattr(model.config, "hidden_size") or not hasattr(model.config, "patch_size"):
        raise TypeError(f"patch_hf: expected a transformers vision tower, got {type(model).__name__}")
    if getattr(model, "_bus_holder", None) is not None:
        raise ValueError("patch_hf: this model is already patched")
    if guidance not in ("auto", "text", "cls", "mean"):
        raise ValueError(f"patch_hf: guidance={guidance!r} must be 'auto', 'text', 'cls' or 'mean'")
    if not (isinstance(keep, int) and not isinstance(keep, bool) and keep >= 1 or isinstance(keep, float) and 0 < keep <= 1):
        raise ValueError(f"patch_hf: keep={keep!r} must be a count >= 1 or a ratio in (0, 1]")
    if fuse not in ("sum", "mean", None):
        raise ValueError(f"patch_hf: fuse={fuse!r} must be 'sum', 'mean' or None")
    if mass is not None or max_keep is not None:
        # the same checks and messages as patch_timm's selector
        try:
            TSPS(1, mass=mass, min_keep=min_keep, max_keep=max_keep if max_keep is not None else 1.0)
        except ValueError as e:
            raise ValueError(str(e).replace("TSPS:", "patch_hf:", 1)) from None
        vision = getattr(model, "vision_model", model)
        if getattr(vision, "use_head", False):
            raise ValueError("patch_hf: mass= (padded tokens) needs a class-token pooling; this tower's attention-pool "
                             "head would attend to the padding (use a fixed keep, or vision_use_head=False)")
    blocks = _find_layers(model)
    layers = sorted(set(int(i) for i in layers))
    if not layers or layers[0] < 0 or layers[-1] >= len(blocks):
        raise ValueError(f"patch_hf: layers={layers} must be layer indices in [0, {len(blocks) - 1}]")
    if guidance == "cls" and "siglip" in type(model).__name__.lower():
        raise ValueError("patch_hf: guidance='cls' needs a class token; SigLIP towers have none (use 'auto' or 'mean')")
    holder = _Holder()
    for i in layers:
        layer = blocks[i]
        norm = next((n for n in _NORMS if isinstance(getattr(layer, n, None), nn.Module)), None)
        attn = next((a for a in _ATTNS if hasattr(getattr(layer, a, None), "q_proj")), None)
        if norm is None or attn is None or not hasattr(getattr(layer, attn), "head_dim"):
            raise TypeError(f"patch_hf: layer {i} ({type(layer).__name__}) has no pre-attention norm "
                            f"({'/'.join(_NORMS)}) or attention with q_proj/k_proj/head_dim")
        layer.__class__ = _layer_class(type(layer))
        layer._bus_holder, layer._bus_norm, layer._bus_attn = holder, norm, attn
        layer._bus_keep, layer._bus_fuse, layer._bus_guidance = keep, fuse, guidance
        layer._bus_mass, layer._bus_min_keep, layer._bus_max_keep = mass, min_keep, max_keep
        layer._bus_prunes, layer._bus_last = True, i == len(blocks) - 1
    if mass is not None:  # every later layer hides the padding keys
        for i in range(layers[0] + 1, len(blocks)):
            if i not in layers:
                blocks[i].__class__ = _layer_class(type(blocks[i]))
                blocks[i]._bus_holder, blocks[i]._bus_prunes, blocks[i]._bus_last = holder, False, i == len(blocks) - 1
    model.__class__ = _model_class(type(model))
    model._bus_holder = holder
    return model
