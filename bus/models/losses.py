"""The pre-training losses, apart from the towers that produce their inputs (open_clip style).

- :func:`ptm_loss`: Patch-Text Matching on each TSPS layer's relevance scores (both stacks).
- :class:`FeatureQueue` + :func:`itc_distill_loss`: ALBEF/mPLUG image-text contrast against the
  batch (online or momentum features) and a queue of momentum features, with momentum-distilled
  soft targets.
- :func:`hard_negatives` + :func:`itm_loss`: image-text matching on hard negatives drawn from the
  contrastive similarities.
- :func:`mask_tokens` + :func:`token_loss`: BERT masking (MLM), and the cross-entropy shared by MLM
  and PrefixLM.
- :func:`prefix_split`: a random prefix / suffix split of each caption (PrefixLM).

Every loss returns a float32 scalar.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def ptm_loss(records: Sequence[dict], patch_labels: Tensor, zero: Tensor, rows: Optional[int] = None) -> Tensor:
    """Patch-text matching on what the selector ranks by: at every TSPS layer, minus the log of
    the share of relevance (the layer's scores, renormalised over the tokens that are original
    patches with a known label) that falls on the patches the caption names. Samples without a
    named patch are left out. A separate per-patch head would train the patch features but leave
    the ranking untouched (and measurably slowed ITC down, see benchmarks/RESULTS.md).

    ``records``: TSPS records (``scores`` float [R, n], ``patch_ids`` int64 [R, n], -1 = not a
    patch); ``patch_labels`` float [B, P] (1 named, 0 not, -1 unknown); ``rows``: use only the first
    ``rows`` (= B) rows of each record (a pass over more rows than images, e.g. ITM negatives).
    Returns a float32 scalar (``zero`` when no sample has a named patch)."""
    # No data-dependent branch (no host sync, shape-only tracing works): every layer yields its mean
    # over the samples with a named patch and whether it had any; layers without any are left out.
    values, has = [], []
    tiny = torch.finfo(torch.float32).tiny  # only guards an exact 0; keeps the gradient otherwise
    for rec in records:
        ids, scores = rec["patch_ids"], rec["scores"].float()
        if rows is not None:
            ids, scores = ids[:rows], scores[:rows]
        labels = patch_labels.gather(1, ids.clamp(min=0))
        known = (ids >= 0) & (labels >= 0)
        pos = known & (labels > 0)
        use = pos.any(dim=1).float()
        per = (scores * known).sum(dim=1).clamp(min=tiny).log() - (scores * pos).sum(dim=1).clamp(min=tiny).log()
        n = use.sum()
        values.append((per * use).sum() / n.clamp(min=1))
        has.append((n > 0).float())
    if not values:
        return zero
    has_t = torch.stack(has)
    return (torch.stack(values) * has_t).sum() / has_t.sum().clamp(min=1) + zero


class FeatureQueue(nn.Module):
    """A ring buffer of normalised momentum features (ALBEF/MoCo) for the contrastive loss.

    Buffers (saved in the state dict, so resume continues with the same queue): ``image``,
    ``text`` float32 [size, dim], ``ptr`` (next slot) and ``filled`` (valid entries) int64 scalars.
    Only the filled entries count (the others are masked out of the softmax), so the first steps
    contrast against fewer negatives instead of random vectors; shapes never depend on ``filled``
    (no host sync per step)."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 0:
            raise ValueError(f"FeatureQueue: size={size} must be >= 0")
        self.size = size
        self.register_buffer("image", torch.zeros(size, dim))
        self.register_buffer("text", torch.zeros(size, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    def features(self) -> tuple[Tensor, Tensor, Tensor]:
        """(image [size, dim], text [size, dim], valid bool [size]): every slot, and which are filled
        (slots fill in order from 0, so the valid ones are the first ``filled``)."""
        valid = torch.arange(self.size, device=self.image.device) < self.filled
        return self.image, self.text, valid

    @torch.no_grad()
    def enqueue(self, image: Tensor, text: Tensor) -> None:
        """Writes the rows of ``image``/``text`` [B, dim] at the pointer, wrapping around; with
        B > size only the last ``size`` rows are kept."""
        if self.size == 0:
            return
        image, text = image[-self.size:], text[-self.size:]
        n = image.shape[0]
        slots = (self.ptr + torch.arange(n, device=image.device)) % self.size
        self.image[slots] = image.float()
        self.text[slots] = text.float()
        self.ptr.copy_((self.ptr + n) % self.size)
        self.filled.copy_(torch.clamp(self.filled + n, max=self.size))


@torch.no_grad()
def gather_across_ranks(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Each tensor [B, ...] concatenated over every rank of the default process group, in rank
    order ([world * B, ...]; ALBEF's ``concat_all_gather``); unchanged without a process group.
    No gradient (for momentum features). Every rank must pass the same shapes."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    out = []
    for t in tensors:
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        out.append(torch.cat(parts))
    return tuple(out)


def itc_distill_loss(img: Tensor, txt: Tensor, img_m: Tensor, txt_m: Tensor, queue: FeatureQueue,
                     scale: Tensor, alpha: float, batch: str = "online") -> tuple[Tensor, Tensor]:
    """ITC with momentum distillation and a queue (ALBEF), with a choice of in-batch candidates.

    ``img``, ``txt``: normalised online features [B, E]; ``img_m``, ``txt_m``: normalised momentum
    features [B, E] (no grad). Each side is contrasted against B in-batch candidates of the other
    modality plus the queue's (momentum) features:

    - ``batch="momentum"`` (ALBEF exactly): the in-batch candidates are the momentum features
      ``txt_m`` / ``img_m``; the image gradient never reaches the text encoder and vice versa.
    - ``batch="online"``: the in-batch candidates are the online features ``txt`` / ``img`` (as CLIP
      and the small stack), so both encoders get the gradient of every in-batch term.

    Why "online" exists: ALBEF starts from a pretrained BERT and ViT. From random init every [CLS]
    feature is nearly the same (cosine 1 - 1e-5 between captions at width 64), and contrasting the
    online side against momentum features that trail it by ~1 / (1 - momentum) steps, plus a queue
    of even older ones, kept ITC on its chance plateau for ~800 of 1000 steps on ``paper_tiny``
    (150-450 with "online"; the plateau sits below ln(batch + queue), consistent with ITC telling
    fresh features from stale ones rather than matching images to captions; measured:
    benchmarks/RESULTS.md, the paper stack's quality section).

    Targets (both forms): ``alpha`` * softmax of the momentum similarities (momentum features
    against ``[batch momentum; queue]``) + (1 - ``alpha``) * the one-hot positives. Empty queue slots
    are masked out. Returns (loss float32 scalar, in-batch similarities image->text [B, B] (online
    image against the in-batch text candidates) for ITM hard negatives)."""
    if batch not in ("online", "momentum"):
        raise ValueError(f"itc_distill_loss: batch={batch!r} must be 'online' or 'momentum'")
    q_img, q_txt, q_valid = queue.features()
    img_b, txt_b = (img, txt) if batch == "online" else (img_m, txt_m)
    img_all = torch.cat([img_b, q_img.to(img_b.dtype)])
    txt_all = torch.cat([txt_b, q_txt.to(txt_b.dtype)])
    B = img.shape[0]
    # empty slots: -inf logits (no probability, no gradient)
    bias = torch.zeros(img_all.shape[0], device=img.device).masked_fill(
        ~torch.cat([torch.ones(B, dtype=torch.bool, device=img.device), q_valid]), float("-inf"))
    with torch.no_grad():
        onehot = torch.zeros(B, img_all.shape[0], device=img.device)
        onehot[:, :B] = torch.eye(B, device=img.device)
        if batch == "momentum":  # the candidates are the momentum features already
            img_all_m, txt_all_m = img_all, txt_all
        else:
            img_all_m = torch.cat([img_m, q_img.to(img_m.dtype)])
            txt_all_m = torch.cat([txt_m, q_txt.to(txt_m.dtype)])
        t_i2t = alpha * (scale * img_m @ txt_all_m.t() + bias).softmax(dim=1) + (1 - alpha) * onehot
        t_t2i = alpha * (scale * txt_m @ img_all_m.t() + bias).softmax(dim=1) + (1 - alpha) * onehot
    sim_i2t = scale * img @ txt_all.t() + bias
    sim_t2i = scale * txt @ img_all.t() + bias
    # masked slots have target 0 and log-probability -inf: where() keeps 0 * -inf out of the sum
    loss_i2t = -torch.where(t_i2t > 0, F.log_softmax(sim_i2t, dim=1) * t_i2t, 0.0).sum(dim=1).mean()
    loss_t2i = -torch.where(t_t2i > 0, F.log_softmax(sim_t2i, dim=1) * t_t2i, 0.0).sum(dim=1).mean()
    return (loss_i2t + loss_t2i) / 2, sim_i2t[:, :B]


@torch.no_grad()
def hard_negatives(sim_i2t: Tensor) -> tuple[Tensor, Tensor]:
    """For every image a negative caption and for every caption a negative image, drawn in
    proportion to the softmax of the contrastive similarity ``sim_i2t`` [B, B] (B >= 2), the
    positive excluded. Returns (neg_txt int64 [B], neg_img int64 [B])."""
    B = sim_i2t.shape[0]
    eye = torch.eye(B, dtype=torch.bool, device=sim_i2t.device)
    out = []
    for s in (sim_i2t, sim_i2t.t()):
        w = s.float().softmax(dim=1).masked_fill(eye, 0)
        out.append(torch.multinomial(w + 1e-9 * (w.sum(1, keepdim=True) == 0) * ~eye, 1).squeeze(1))
    return out[0], out[1]


def itm_loss(logits: Tensor, batch: int) -> Tensor:
    """Cross-entropy of the ITM head's ``logits`` [3B, 2] on rows (positives, image + negative
    caption, negative image + caption)."""
    labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long().to(logits.device)
    return F.cross_entropy(logits.float(), labels)


def mask_tokens(ids: Tensor, attention_mask: Tensor, *, prob: float, mask_id: int, vocab_size: int,
                special_below: int, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """BERT masking: each real token with id >= ``special_below`` is chosen with probability
    ``prob``; chosen tokens become ``mask_id`` (80%), a random non-special id (10%) or stay (10%).
    Returns (masked ids [B, L], labels [B, L]: the original id where chosen, else -100)."""
    rand = lambda: torch.rand(ids.shape, device=ids.device, generator=generator)  # noqa: E731
    eligible = (attention_mask > 0) & (ids >= special_below)
    chosen = eligible & (rand() < prob)
    labels = ids.masked_fill(~chosen, -100)
    r = rand()
    to_mask = chosen & (r < 0.8)
    to_random = chosen & (r >= 0.8) & (r < 0.9)
    random_ids = torch.randint(special_below, vocab_size, ids.shape, device=ids.device, generator=generator)
    out = ids.masked_fill(to_mask, mask_id)
    out = torch.where(to_random, random_ids, out)
    return out, labels


def prefix_split(ids: Tensor, attention_mask: Tensor, *, bos_id: int, pad_id: int,
                 generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Splits each caption ``[CLS] w1 .. wn [SEP]`` at a random point s in [1, n] (per sample):
    the prefix ``[CLS] w1 .. w(s-1)`` goes to the encoders, the decoder reads ``[BOS] ws .. wn``
    and predicts ``ws .. wn [SEP]`` (mPLUG's PrefixLM). Captions with no word (n = 0) get an empty
    prefix after [CLS] and predict [SEP].

    Returns (prefix_ids [B, L], prefix_mask [B, L], dec_ids [B, L], dec_mask [B, L]), all int64,
    padded with ``pad_id`` / 0."""
    B, L = ids.shape
    lengths = attention_mask.long().sum(dim=1)  # [CLS] + n words + [SEP]
    n = (lengths - 2).clamp(min=0)
    u = torch.rand(B, device=ids.device, generator=generator)
    s = 1 + (u * n.clamp(min=1)).long().clamp(max=(n - 1).clamp(min=0))  # in [1, max(n, 1)]
    pos = torch.arange(L, device=ids.device)[None, :]
    prefix_mask = (pos < s[:, None]).long() & attention_mask.long()
    prefix_ids = ids.masked_fill(prefix_mask == 0, pad_id)
    # decoder: [BOS] then ids[s .. lengths-1]
    src = (s[:, None] + pos - 1).clamp(max=L - 1)
    dec_len = lengths - s + 1
    dec_mask = (pos < dec_len[:, None]).long()
    dec_ids = ids.gather(1, src).masked_fill(dec_mask == 0, pad_id)
    dec_ids[:, 0] = bos_id
    return prefix_ids, prefix_mask, dec_ids, dec_mask


def token_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of ``logits`` [..., V] against ``labels`` [...] (-100 ignored), float32;
    0 when no label is set (no data-dependent branch)."""
    labels = labels.reshape(-1)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels, ignore_index=-100, reduction="sum")
    return total / (labels != -100).sum().clamp(min=1)
