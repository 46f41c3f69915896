"""Evaluation during training: text-free image<->text retrieval (recall@k, optional ITM
re-ranking) and the relevance picture of what TSPS keeps."""
from __future__ import annotations

import os
import time
from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import Subset

from .distributed import barrier
from .loop import Run, autocast

__all__ = ["evaluate_retrieval", "relevance_picture", "run_evaluation"]


def _recall(ranks: Tensor, ks=(1, 5)) -> Dict[int, float]:
    return {k: float((ranks < k).float().mean()) for k in ks}


@torch.no_grad()
def evaluate_retrieval(model: nn.Module, loader, device: torch.device, *, precision: str = "fp32",
                       itm_rerank: int = 0) -> Dict[str, float]:
    """Image<->text retrieval on a held-out loader: recall@1/5 both ways from ITC embeddings.

    Image embeddings come from :meth:`BUSModel.image_embedding`, the text-free (CLS-guided)
    forward, so no caption ever guides the pruning of an image it is scored against. Each item's
    own caption is its only positive (the synthetic set can have look-alike captions, which only
    makes the numbers conservative). With ``itm_rerank = K > 0`` the top-K images of each caption
    are re-ranked by :meth:`BUSModel.itm_scores` (text-guided pruning is fine there: every
    candidate is pruned for the query caption alike) and ``t2i_itm_r@k`` are added.

    Returns ``{"n", "i2t_r@1", "i2t_r@5", "t2i_r@1", "t2i_r@5"[, "t2i_itm_r@k"]}`` (floats in [0, 1]).
    """
    model.eval()
    img_emb, txt_emb, images, ids, masks = [], [], [], [], []
    with autocast(device, precision):
        for batch in loader:
            x = batch["images"].to(device)
            i, m = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            img_emb.append(model.image_embedding(x).float())
            txt_emb.append(model.text_embedding(i, m).float())
            if itm_rerank > 0:
                images.append(x)
                # Captions of different batches have different padded lengths: keep per item.
                ids.extend(i.unbind(0))
                masks.extend(m.unbind(0))
    I, T = torch.cat(img_emb), torch.cat(txt_emb)
    n = I.shape[0]
    sim = I @ T.t()  # [images, captions]
    gt = torch.arange(n, device=sim.device)
    # rank of the true item = number of candidates scored strictly higher
    i2t_rank = (sim > sim[gt, gt][:, None]).sum(1)
    t2i_rank = (sim.t() > sim[gt, gt][:, None]).sum(1)
    out = {"n": n}
    for k, v in _recall(i2t_rank).items():
        out[f"i2t_r@{k}"] = v
    for k, v in _recall(t2i_rank).items():
        out[f"t2i_r@{k}"] = v
    if itm_rerank > 0:
        for k, v in _recall(_itm_ranks(model, sim, torch.cat(images), ids, masks, t2i_rank, itm_rerank,
                                       device, precision)).items():
            out[f"t2i_itm_r@{k}"] = v
    return out


def _itm_ranks(model, sim, X, ids, masks, t2i_rank, itm_rerank, device, precision) -> Tensor:
    """Rank of each caption's image after ITM re-ranks its top-K ITC candidates."""
    n = X.shape[0]
    K = min(itm_rerank, n)
    top = sim.t().topk(K, dim=1).indices  # [captions, K]
    ranks = []
    with autocast(device, precision):
        for c in range(n):
            cand = top[c]
            score = model.itm_scores(X[cand], ids[c].expand(K, -1), masks[c].expand(K, -1)).float()
            order = cand[score.argsort(descending=True)]
            hit = (order == c).nonzero()
            # outside the top-K: keep its ITC rank (re-ranking only permutes the top K)
            ranks.append(int(hit[0, 0]) if hit.numel() else int(t2i_rank[c]))
    return torch.tensor(ranks)


@torch.no_grad()
def relevance_picture(model: nn.Module, batch: dict, device: torch.device, path: str, *,
                      precision: str = "fp32", title: Optional[str] = None) -> Optional[str]:
    """Write the relevance PNG for ``batch``: each image pruned under its own caption (a
    text-guided forward), kept patches outlined, dropped ones dimmed. None for the baseline."""
    from ..data import denormalize
    from ..viz import kept_patch_mask, relevance_figure

    if not getattr(model, "use_tsps", False):
        return None
    model.eval()
    with autocast(device, precision):
        model.itm_scores(batch["images"].to(device), batch["input_ids"].to(device),
                         batch["attention_mask"].to(device))
    pe = model.vision.patch_embed
    kept = kept_patch_mask(model.vision.pruning_state(), pe.num_patches)
    return relevance_figure(denormalize(batch["images"].cpu()), kept, batch["captions"], pe.patch_size[0],
                            path, title=title)


def run_evaluation(run: Run, at: int) -> Dict[str, Any]:
    """Evaluate ``run`` at step ``at`` on rank 0 (the others wait), log it, return the results.

    Runs inside ``torch.random.fork_rng`` so evaluation never shifts the training RNG stream
    (exact resume with any ``--eval-every``), on the unwrapped model."""
    from ..data import make_loader

    cfg, res = run.cfg, {}
    if run.d.main:
        devs = [run.device.index] if run.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devs):
            t0 = time.time()
            res = evaluate_retrieval(run.model, run.val_loader, run.device, precision=cfg.precision,
                                     itm_rerank=cfg.itm_rerank)
            if cfg.viz_samples > 0 and cfg.model == "bus":
                val_set = run.data.val_set
                vb = next(iter(make_loader(Subset(val_set, range(min(cfg.viz_samples, len(val_set)))),
                                           run.data.tokenizer, batch_size=cfg.viz_samples, shuffle=False,
                                           max_length=run.mcfg.max_text_len)))
                png = relevance_picture(run.model, vb, run.device, os.path.join(cfg.out, f"relevance_step{at}.png"),
                                        precision=cfg.precision, title=f"{cfg.model} step {at}")
                if png:
                    res["picture"] = os.path.basename(png)
            res["eval_s"] = round(time.time() - t0, 3)
        run.metrics.write({"kind": "eval", "step": at, **res})
        run.model.train()
    barrier(run.d)
    return res
