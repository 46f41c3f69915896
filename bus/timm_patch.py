"""``patch_timm``: a drop-in TSPS for timm ``VisionTransformer`` models (and models built on it).

Patching swaps the classes of the model and of its blocks for thin subclasses (as ToMe does)
whose ``forward`` reuses the blocks' own modules; nothing of timm's forward code is copied, so
the patch follows timm releases. Blocks before the first pruning layer run their own forward;
the patch embedding, the norms, the pooling and the head are untouched.

How it stays compatible with timm's training tools:

- **One state per block, passed through.** Each patched block is a pure step
  ``(tokens, PruneState in) -> (tokens, PruneState out)`` (:func:`_block_step`): it never mutates
  its input state. The model wrapper threads the state from block to block, so a recompute
  (gradient checkpointing) sees exactly the input of the original forward.
- **Gradient checkpointing** (``model.set_grad_checkpointing(True)``): the wrapper runs timm's
  forward with its block-level checkpointing switched off and checkpoints every block itself
  (non-reentrant ``torch.utils.checkpoint``) with the state as an explicit argument.
- **deepcopy / EMA / pickling**: the per-forward state lives in a :class:`_Holder` that copies
  and pickles as an empty one, and the generated classes pickle as "host class + patch", so
  ``copy.deepcopy``, ``timm.utils.ModelEmaV3`` and ``torch.save(model)`` work.
- **torch.fx** (``symbolic_trace``, timm / torchvision ``create_feature_extractor``,
  ``FeatureGraphNet``): every block from the first pruning layer on is traced as one leaf node
  that prunes in eager mode inside (see ``_trace_block``), so no traced value depends on the
  pruning; the rest of the model is traced as timm's.
- **torch.compile with** ``mass=``: ``max_keep=`` bounds the per-sample counts; the blocks after
  the first pruning layer then run on a fixed-shape padded batch (see :mod:`bus.tsps`): no graph
  break, no host sync.
- **RoPE models** (timm ``Eva``, EVA-02): the host ``EvaBlock`` forward runs on the current
  tokens with each token's own RoPE row (gathered by its patch id; the fused token gets the
  identity rotation), and a TSPS prunes the block's output (:func:`_rope_block_step`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

import bus_kernels as bk

from ._patching import StateHolder, check_text, reduce_as
from .tsps import PruneState, TSPS, keep_count, pruned_block_forward


class _Holder(StateHolder):
    """Per-forward state shared by a patched model and its patched blocks.

    ``state``: the state between blocks of the forward in flight (``None`` outside a forward);
    ``last``: the finished state of the last forward (``model.pruning_state()``). A copy or a
    pickle of the model gets an empty holder (:class:`bus._patching.StateHolder`).
    """

    def __init__(self):
        self.state: Optional[PruneState] = None
        self.last: Optional[PruneState] = None
        self.records: list = []
        self.block_ids: dict = {}
        self.checkpoint = False
        self.eager = False  # a forward of the patched model (not of a traced graph) is in flight
        self.tracing: Optional[dict] = None  # the model's traced inputs while torch.fx traces it


_BLOCK_CLASSES: dict[type, type] = {}
_MODEL_CLASSES: dict[type, type] = {}


def _rebuild(host_cls: type, kind: str):
    """Unpickling / deepcopy constructor of a patched object: an empty instance of the generated
    class for ``host_cls`` (the state dict is restored by ``nn.Module.__setstate__``)."""
    factory = {"model": _pruned_model_class, "block": _pruned_block_class, "rope_block": _rope_block_class}[kind]
    cls = factory(host_cls)
    return cls.__new__(cls)


def _reduce_as(host_cls: type, kind: str):
    return reduce_as(_rebuild, host_cls, kind)


def _block_step(block: nn.Module, x: Tensor, state: PruneState):
    """One patched block as a pure function of its inputs: returns ``(tokens, new state)``.

    ``state`` is left as it was (the block works on a copy), so running the step again on the
    same inputs, as gradient checkpointing does in the backward pass, does the same work.
    """
    st = dataclasses.replace(state, records=[])
    x = pruned_block_forward(block, x, st)
    if block._bus_last and st.packed:
        # Back to a padded batch for the model's final norm and head; lengths kept.
        st.lengths = (st.cu_seqlens[1:] - st.cu_seqlens[:-1]).long()
        x = bk.unpack(x, st.cu_seqlens, st.max_seqlen)
    elif block._bus_last and st.padded:
        # The bounded layout ends as the unpacked one does: padding rows are zeros.
        x = x.masked_fill(~st.valid()[..., None], 0.0)
    return x, st


def _run_step(block: nn.Module, step, x: Tensor, *args) -> Tensor:
    """Runs ``step(block, x, *args, state)`` for the forward in flight (checkpointed when the model
    asked for gradient checkpointing) and threads the new state on to the next block."""
    holder: _Holder = block._bus_holder
    if holder.checkpoint and torch.is_grad_enabled():
        x, st = torch.utils.checkpoint.checkpoint(step, block, x, *args, holder.state, use_reentrant=False)
    else:
        x, st = step(block, x, *args, holder.state)
    holder.state = st
    holder.records.extend(st.records)
    holder.block_ids[block._bus_index] = st.patch_ids
    return x


def _pruned_block_class(cls: type) -> type:
    if cls not in _BLOCK_CLASSES:

        def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False,
                    _bus_fx: Optional[tuple] = None) -> Tensor:
            if isinstance(x, torch.fx.Proxy):
                return _trace_block(self, cls.forward, x, dict(attn_mask=attn_mask, is_causal=is_causal))
            if _bus_fx is not None:  # a call from a torch.fx graph of the patched model
                return _fx_step(self, _block_step, x, _bus_fx)
            holder: _Holder = self._bus_holder
            if not holder.eager:  # called outside the patched model: behave as the host block
                return cls.forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
            if attn_mask is not None or is_causal:
                raise NotImplementedError("bus.patch_timm: attn_mask/is_causal are not supported with pruning")
            if not self._bus_pruned:  # before the first pruning layer: the host block, as it is
                if holder.checkpoint and torch.is_grad_enabled():
                    return torch.utils.checkpoint.checkpoint(cls.forward, self, x, use_reentrant=False)
                return cls.forward(self, x)
            return _run_step(self, _block_step, x)

        _BLOCK_CLASSES[cls] = type(f"Pruned{cls.__name__}", (cls,),
                                   {"forward": forward, "__reduce_ex__": _reduce_as(cls, "block")})
    return _BLOCK_CLASSES[cls]


# ------------------------------------------------------------------ RoPE blocks (timm Eva)
def _rope_rows(rope: Optional[Tensor], state: PruneState) -> Optional[Tensor]:
    """The RoPE rows (``[N, 2 * head_dim]``, sin then cos) of the current tokens: each kept patch
    keeps its own position; a fused token gets the identity rotation (sin 0, cos 1)."""
    if rope is None or state.patch_ids is None:
        return rope
    hd = rope.shape[-1] // 2
    identity = torch.cat([rope.new_zeros(hd), rope.new_ones(hd)])[None]
    table = torch.cat([rope, identity])
    ids = state.patch_ids[:, state.num_prefix:]
    return table[ids.where(ids >= 0, rope.shape[0])][:, None]  # [B, 1, n, 2 * hd]: broadcast over heads


def _rope_qk(attn: nn.Module, h: Tensor) -> tuple[Tensor, Tensor]:
    """This block's (unrotated) queries and keys ``[B, H, L, hd]`` of ``h``, by its own weights."""
    B, L, _ = h.shape
    H, hd = attn.num_heads, attn.head_dim
    A = H * hd
    if attn.qkv is not None:
        w = attn.qkv.weight
        q = F.linear(h, w[:A], attn.q_bias if attn.q_bias is not None else (None if attn.qkv.bias is None else attn.qkv.bias[:A]))
        k = F.linear(h, w[A:2 * A], attn.k_bias if attn.q_bias is not None else (None if attn.qkv.bias is None else attn.qkv.bias[A:2 * A]))
    else:
        q, k = attn.q_proj(h), attn.k_proj(h)
    return (attn.q_norm(q.reshape(B, L, H, hd).transpose(1, 2)), attn.k_norm(k.reshape(B, L, H, hd).transpose(1, 2)))


def _rope_block_step(block: nn.Module, x: Tensor, rope: Optional[Tensor], state: PruneState):
    """A RoPE block (timm ``EvaBlock``) as a pure step: the host forward on the current tokens,
    each with its own RoPE position; then, with a TSPS, the tokens are scored by this block's own
    (unrotated, content-only) queries and keys of its input and its output is pruned."""
    st = dataclasses.replace(state, records=[])
    out = block._bus_host_forward(x, rope=_rope_rows(rope, st))
    tsps: Optional[TSPS] = getattr(block, "bus_tsps", None)
    if tsps is None:
        return out, st
    P, (B, N, _) = st.num_prefix, out.shape
    n, attn = N - P, block.attn
    h = block.norm1(x)
    q_img, k = _rope_qk(attn, h)
    ids = st.patch_ids if st.patch_ids is not None else tsps._initial_ids(B, N, P, x.device)
    sizes = st.sizes if st.sizes is not None else torch.ones(B, N, device=x.device)
    if st.text is not None and tsps.guidance in ("text", "auto"):
        text = st.text if st.text.dim() == 3 else st.text[:, None]
        qg, q_mask = _rope_qk(attn, block.norm1(text))[0], (st.text_mask if st.text.dim() == 3 else None)
    else:
        qg, q_mask = tsps._queries(attn, block.norm1, st, q_img, sizes)
    scores = bk.relevance_scores(qg, k[:, :, P:].contiguous(), scale=attn.scale, q_mask=q_mask)
    tsps._record(out[:, P:], scores, ids[:, P:], st)
    count = keep_count(tsps.keep, n)
    if count >= n:  # nothing to drop: the block is left exactly as it was
        return out, st
    sel = bk.select_tokens(out, scores, count, num_prefix=P, fuse=tsps.fuse)
    st.patch_ids, st.sizes = tsps._carry(ids, sizes, sel.indices, P)
    return sel.tokens, st


def _rope_block_class(cls: type) -> type:
    if cls not in _BLOCK_CLASSES:

        def forward(self, x: Tensor, rope: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None,
                    is_causal: bool = False, _bus_fx: Optional[tuple] = None) -> Tensor:
            if isinstance(x, torch.fx.Proxy):
                return _trace_block(self, cls.forward, x, dict(rope=rope, attn_mask=attn_mask, is_causal=is_causal))
            if _bus_fx is not None:
                return _fx_step(self, _rope_block_step, x, _bus_fx, rope)
            holder: _Holder = self._bus_holder
            if not holder.eager:
                return cls.forward(self, x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
            if attn_mask is not None or is_causal:
                raise NotImplementedError("bus.patch_timm: attn_mask/is_causal are not supported with pruning")
            if not self._bus_pruned:
                if holder.checkpoint and torch.is_grad_enabled():
                    return torch.utils.checkpoint.checkpoint(cls.forward, self, x, rope=rope, use_reentrant=False)
                return cls.forward(self, x, rope=rope)
            return _run_step(self, _rope_block_step, x, rope)

        _BLOCK_CLASSES[cls] = type(f"Pruned{cls.__name__}", (cls,),
                                   {"forward": forward, "_bus_host_forward": cls.forward,
                                    "__reduce_ex__": _reduce_as(cls, "rope_block")})
    return _BLOCK_CLASSES[cls]


@contextlib.contextmanager
def _pruning(model: nn.Module, batch: int, text: Optional[Tensor], text_mask: Optional[Tensor]):
    """Sets up the state of one forward; afterwards keeps it as ``model.pruning_state()``.

    While it runs, timm's own block checkpointing is switched off: the patched blocks checkpoint
    themselves with the pruning state as an argument (see the module docstring)."""
    holder: _Holder = model._bus_holder
    if holder.eager:  # nested call (forward -> forward_features): same forward
        yield False
        return
    ckpt = bool(getattr(model, "grad_checkpointing", False))
    _begin(holder, batch, model.embed_dim, model.num_prefix_tokens, text, text_mask, ckpt)
    holder.eager = True
    if ckpt:
        model.grad_checkpointing = False
    try:
        yield True
    finally:
        if ckpt:
            model.grad_checkpointing = True
        holder.last = _finished(holder)
        holder.state, holder.records, holder.block_ids, holder.checkpoint = None, [], {}, False
        holder.eager = False


def _begin(holder: _Holder, batch: int, width: int, num_prefix: int, text: Optional[Tensor],
           text_mask: Optional[Tensor], checkpoint: bool) -> None:
    """Checks the text and starts the pruning state of one forward."""
    check_text("bus", text, text_mask, batch, width)
    holder.state = PruneState(batch=batch, num_prefix=num_prefix, text=text,
                              text_mask=None if text_mask is None else text_mask.bool())
    holder.records, holder.block_ids, holder.checkpoint = [], {}, checkpoint


def _finished(holder: _Holder) -> PruneState:
    """The state so far as ``pruning_state()`` shows it: without the caller's text (and its graph)."""
    return dataclasses.replace(holder.state, text=None, text_mask=None, records=list(holder.records),
                               block_patch_ids=dict(holder.block_ids))


# ------------------------------------------------------------------------------ torch.fx
# A torch.fx trace of a patched model records every block from the first pruning layer on as one
# leaf ``call_module`` node (the block itself, called with a ``_bus_fx`` marker): the pruning
# (per-sample counts, packed or bounded layouts, the state threaded from block to block) runs
# inside the leaves in eager mode, so no traced value depends on it. The first pruned leaf gets
# the traced text inputs (``("begin", text, text_mask)``) and starts the run's state; the others
# get ``("step",)``; the last block ends the run. Blocks before the first pruning layer, the
# embedding, norms and head are traced through as timm's own. Every leaf leaves the run so far
# in ``pruning_state()``, so a graph cut after some block (feature extraction) still has one.
# Gradient checkpointing is not applied inside a traced graph.
def _trace_block(block: nn.Module, host_forward, x, kwargs: dict):
    """Under torch.fx tracing: the host block traced through before the first pruning layer, or
    a leaf call of the patched block from it on."""
    holder: _Holder = block._bus_holder
    tr = holder.tracing
    if tr is None or not block._bus_pruned:  # traced outside the patched model, or a dense block
        return host_forward(block, x, **kwargs)
    if kwargs.get("attn_mask") is not None or kwargs.get("is_causal"):
        raise NotImplementedError("bus.patch_timm: attn_mask/is_causal are not supported with pruning")
    marker = ("step",) if tr["begun"] else ("begin", tr["text"], tr["text_mask"])
    tr["begun"] = True
    kw = {k: v for k, v in kwargs.items() if k not in ("attn_mask", "is_causal")}
    tracer = x.tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(block), (x,), {**kw, "_bus_fx": marker})


def _fx_step(block: nn.Module, step, x: Tensor, marker: tuple, *args) -> Tensor:
    """A pruned block called from a traced graph (see above)."""
    holder: _Holder = block._bus_holder
    if marker[0] == "begin":
        _begin(holder, x.shape[0], x.shape[-1], block._bus_num_prefix, marker[1], marker[2], False)
    elif marker[0] != "step" or holder.state is None:
        raise RuntimeError(f"bus: block {block._bus_index} of a traced graph ran before the graph's first pruned block")
    x = _run_step(block, step, x, *args)
    holder.last = _finished(holder)
    if block._bus_last:
        holder.state, holder.records, holder.block_ids = None, [], {}
    return _release_at_backward(holder, x)


def _traced_forward(model: nn.Module, host_forward, x, text, text_mask, kwargs):
    """The patched model's forward (or forward_features) under torch.fx tracing."""
    holder: _Holder = model._bus_holder
    if isinstance(kwargs, torch.fx.Proxy):  # FX hands **kwargs over as one placeholder
        kwargs = {}
    if holder.tracing is not None:  # nested (forward -> forward_features): the same trace
        return host_forward(model, x, **kwargs)
    holder.tracing = {"text": text, "text_mask": text_mask, "begun": False}
    ckpt = bool(getattr(model, "grad_checkpointing", False))
    model.grad_checkpointing = False  # traced as the plain block sequence
    try:
        return host_forward(model, x, **kwargs)
    finally:
        holder.tracing = None
        if ckpt:
            model.grad_checkpointing = True


def _release_at_backward(holder: _Holder, out):
    """Detaches the records of ``model.pruning_state()`` when the backward of this forward
    starts, so that the model does not keep that forward's activations alive afterwards (a loss
    built from the records before the backward, such as PTM, still gets its gradient)."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return out
    last = holder.last

    def release(_grad_outputs):
        if holder.last is last and last is not None:
            holder.last = dataclasses.replace(
                last, records=[{k: v.detach() for k, v in r.items()} for r in last.records])

    for t in torch.utils._pytree.tree_leaves(out):
        if isinstance(t, Tensor) and t.grad_fn is not None:
            t.grad_fn.register_prehook(release)
    return out


def _pruned_model_class(cls: type) -> type:
    if cls not in _MODEL_CLASSES:

        def forward(self, x: Tensor, text: Optional[Tensor] = None, text_mask: Optional[Tensor] = None, **kwargs):
            if isinstance(x, torch.fx.Proxy):
                return _traced_forward(self, cls.forward, x, text, text_mask, kwargs)
            with _pruning(self, x.shape[0], text, text_mask) as outer:
                out = cls.forward(self, x, **kwargs)
            return _release_at_backward(self._bus_holder, out) if outer else out

        def forward_features(self, x: Tensor, text: Optional[Tensor] = None, text_mask: Optional[Tensor] = None, **kwargs):
            if isinstance(x, torch.fx.Proxy):
                return _traced_forward(self, cls.forward_features, x, text, text_mask, kwargs)
            with _pruning(self, x.shape[0], text, text_mask) as outer:
                out = cls.forward_features(self, x, **kwargs)
            return _release_at_backward(self._bus_holder, out) if outer else out

        def forward_intermediates(self, x: Tensor, *args, text: Optional[Tensor] = None,
                                  text_mask: Optional[Tensor] = None, **kwargs):
            """timm's ``forward_intermediates`` with pruning. Intermediates taken after the first
            pruning layer hold the prefix tokens, the kept tokens and the fused token, so they
            need ``output_fmt='NLC'`` (they no longer form a grid); the original patch index of
            every token of block ``i``'s output is ``model.pruning_state().block_patch_ids[i]``
            (-1 for prefix and fused tokens)."""
            self._bus_check_intermediates(x, *args, **kwargs)
            with _pruning(self, x.shape[0], text, text_mask) as outer:
                out = cls.forward_intermediates(self, x, *args, **kwargs)
            return _release_at_backward(self._bus_holder, out) if outer else out

        def _bus_check_intermediates(self, x, *args, **kwargs):
            from timm.models._features import feature_take_indices

            bound = inspect.signature(cls.forward_intermediates).bind(self, x, *args, **kwargs)
            bound.apply_defaults()
            arg = bound.arguments
            take, _ = feature_take_indices(len(self.blocks), arg.get("indices"))
            pruned = [i for i in take if i >= self._bus_first_layer]
            if not pruned or not self._bus_prunes:  # keep=1.0 leaves every token in place
                return
            if self._bus_mass:
                raise NotImplementedError(
                    "bus: forward_intermediates after a pruning layer is not supported with mass= "
                    "(per-sample counts, packed or padded tokens); use a fixed keep, or take indices before layer "
                    f"{self._bus_first_layer}")
            if arg.get("output_fmt", "NCHW") != "NLC":
                raise ValueError(
                    f"bus: forward_intermediates: blocks {pruned} come after pruning, their tokens no "
                    "longer form a grid; pass output_fmt='NLC' (each token's patch index is in "
                    "model.pruning_state().block_patch_ids)")

        def pruning_state(self) -> Optional[PruneState]:
            """The :class:`PruneState` of the last forward (records for PTM, kept patches, lengths).

            With grad enabled its ``records`` carry their autograd graph (the PTM loss
            backpropagates through ``records[i]["scores"]``) until the backward of that forward
            starts (then they are detached, so the model pins no activations), the next forward,
            or :meth:`clear_pruning_state`."""
            return self._bus_holder.last

        def clear_pruning_state(self) -> None:
            """Drops the last forward's state (and any autograd graph its records hold)."""
            self._bus_holder.last = None

        def __prepare_scriptable__(self):
            raise RuntimeError(
                "bus: a patched model cannot be compiled with torch.jit.script (pruning changes token "
                "counts per call and TorchScript is in maintenance upstream); use torch.compile(model), "
                "or torch.export.export for a fixed keep")

        _MODEL_CLASSES[cls] = type(
            f"BUS{cls.__name__}", (cls,),
            {"forward": forward, "forward_features": forward_features,
             "forward_intermediates": forward_intermediates, "_bus_check_intermediates": _bus_check_intermediates,
             "pruning_state": pruning_state, "clear_pruning_state": clear_pruning_state,
             "__prepare_scriptable__": __prepare_scriptable__, "__reduce_ex__": _reduce_as(cls, "model")},
        )
    return _MODEL_CLASSES[cls]


def patch_timm(
    model: nn.Module,
    *,
    layers: Iterable[int] = (4, 7, 10),
    keep=0.7,
    fuse: Optional[str] = "sum",
    guidance: str = "auto",
    mass: Optional[float] = None,
    min_keep: int = 1,
    max_keep=None,
    ptm_head: bool = False,
) -> nn.Module:
    """Patch a timm ``VisionTransformer`` in place so that it prunes patches at ``layers``.

    Args:
        model: a timm ``VisionTransformer`` (``blocks`` of pre-norm blocks with a fused ``qkv``),
            with or without a class token (e.g. SigLIP's MAP pooling, ``global_pool='avg'``), or
            a timm ``Eva`` with RoPE (EVA-02; fixed keep only, pruning after the whole block and
            attention not proportional to token sizes there).
        layers: 0-based indices of the blocks after whose attention a :class:`TSPS` prunes.
        keep: ratio in (0, 1] or count of the rankable tokens kept at each layer.
        fuse: ``"sum"``, ``"mean"`` or ``None`` (see :func:`bus_kernels.select_tokens`).
        guidance: ``"auto"`` (the text when given, else the image's own guide: its [CLS] query, or
            the mean patch query for models without a class token), ``"text"``, ``"cls"`` or
            ``"mean"``.
        mass: per-sample keep by relevance mass (varlen); later blocks run on packed tokens.
        min_keep: lower bound of the per-sample count with ``mass``.
        max_keep: with ``mass``, a bound on each sample's count at each layer: a count (int >= 1)
            or a ratio in (0, 1] of that layer's rankable slots (the patches at the first pruning
            layer, then the previous bound plus the fused token). Counts above it are clamped to
            it (it wins over ``min_keep``); with a bound that does not bind (e.g. ``1.0``) the kept
            tokens and outputs are those of ``mass`` alone. The blocks after the first pruning
            layer then run on a fixed-shape padded batch instead of packed tokens (padding rows
            have size 0: never attended), so a train step makes no host sync and
            ``torch.compile(model, fullgraph=True)`` has no graph break. The output tokens are
            ``[B, P + bound + 1, D]`` with rows ``>= pruning_state().lengths[b]`` zero, as
            ``mass`` alone gives them after unpacking (there ``[B, longest, D]``).
        ptm_head: give each TSPS a linear per-patch head for the Patch-Text Matching loss.

    Returns the same model. Afterwards ``model(images, text=None, text_mask=None)``,
    ``forward_features`` and ``forward_intermediates`` prune, with ``text`` ``[B, D]`` (a text
    [CLS]) or ``[B, T, D]`` plus a ``text_mask [B, T]``, already in the ViT's width D.
    ``keep=1.0`` gives the unpatched outputs. ``model.pruning_state()`` returns the last forward's
    :class:`bus.PruneState`. Gradient checkpointing, ``copy.deepcopy`` (EMA) and pickling work.

    Raises:
        TypeError: the model or one of its blocks is not of the supported kind (the message says
            which and why).
        ValueError: bad ``layers``/``keep``/``guidance``/``max_keep``, or ``mass=`` with a pooling that needs
            a dense batch.
    """
    if isinstance(model, torch.fx.GraphModule) or isinstance(getattr(model, "graph_module", None), torch.fx.GraphModule):
        # e.g. timm.create_model(..., features_only=True, feature_cls="fx"): already traced, dense
        raise TypeError(f"patch_timm: {type(model).__name__} is an FX graph traced from the unpatched model; patch "
                        "the model first, then build the extractor: FeatureGraphNet(bus.patch_timm(model, ...), "
                        "out_indices) or create_feature_extractor(patched_model, return_nodes)")
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(model, "num_prefix_tokens") or not hasattr(model, "embed_dim"):
        raise TypeError(f"patch_timm: expected a timm VisionTransformer, got {type(model).__name__}")
    if getattr(model, "_bus_holder", None) is not None:
        raise ValueError("patch_timm: this model is already patched")
    layers = sorted(set(int(i) for i in layers))
    if not layers or layers[0] < 0 or layers[-1] >= len(blocks):
        raise ValueError(f"patch_timm: layers={layers} must be block indices in [0, {len(blocks) - 1}]")
    if max_keep is not None and mass is None:
        raise ValueError(f"patch_timm: max_keep={max_keep!r} bounds the per-sample counts of mass=; pass mass= "
                         "too (a fixed keep has static shapes already)")
    rope = getattr(model, "rope", None) is not None
    if rope:  # timm Eva (EVA-02): RoPE, SwiGLU
        if getattr(model, "rope_mixed", False):
            raise TypeError("patch_timm: depth-dependent (mixed) RoPE is not supported; plain RoPE (EVA-02) is")
        if mass is not None:
            raise ValueError("patch_timm: mass= (packed tokens) is not supported for RoPE models; use a fixed keep")
    for i in range(layers[0], len(blocks)):
        attn = getattr(blocks[i], "attn", None)
        if rope:
            ok = hasattr(blocks[i], "norm1") and all(hasattr(attn, a) for a in ("qkv", "num_heads", "head_dim", "q_norm", "k_norm", "scale"))
            if not ok or (attn.qkv is None and not hasattr(attn, "k_proj")):
                raise TypeError(f"patch_timm: block {i} ({type(blocks[i]).__name__}) is not a pre-norm timm EvaBlock")
        elif not all(hasattr(attn, a) for a in ("qkv", "num_heads", "head_dim", "q_norm", "k_norm", "proj")) or not hasattr(blocks[i], "ls1"):
            raise TypeError(f"patch_timm: block {i} ({type(blocks[i]).__name__}) is not a pre-norm timm Block with a fused qkv")
    if mass is not None and getattr(model, "global_pool", "token") not in ("token", ""):
        raise ValueError("patch_timm: mass= (packed tokens) needs global_pool='token'")
    has_cls = getattr(model, "cls_token", None) is not None
    if guidance == "cls" and not has_cls:
        raise ValueError(f"patch_timm: guidance='cls' needs a class token; {type(model).__name__} has none "
                         "(use guidance='auto' or 'mean': the mean patch query)")
    holder = _Holder()
    for i in layers:
        blocks[i].bus_tsps = TSPS(model.embed_dim, keep=keep, mass=mass, min_keep=min_keep, fuse=fuse,
                                  guidance=guidance, ptm_head=ptm_head, text_free="cls" if has_cls else "mean",
                                  max_keep=max_keep)
    for i, blk in enumerate(blocks):
        blk.__class__ = (_rope_block_class if rope else _pruned_block_class)(type(blk))
        blk._bus_holder, blk._bus_index, blk._bus_num_prefix = holder, i, model.num_prefix_tokens
        blk._bus_pruned, blk._bus_last = i >= layers[0], i == len(blocks) - 1
    model.__class__ = _pruned_model_class(type(model))
    model._bus_holder, model._bus_first_layer, model._bus_mass = holder, layers[0], mass is not None
    model._bus_prunes = mass is not None or not (isinstance(keep, float) and keep >= 1.0)
    return model
