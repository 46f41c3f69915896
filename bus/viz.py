"""Relevance-map pictures: which patches TSPS kept for a caption.

Used by :mod:`bus.train` during evaluation. matplotlib is imported lazily with the Agg backend so
training never needs a display.
"""
from __future__ import annotations

import textwrap
from typing import Optional, Sequence

import torch
from torch import Tensor


def kept_patch_mask(state, num_patches: int) -> Tensor:
    """bool ``[B, num_patches]``: True for the original patches still present as their own token
    after the last TSPS layer of the forward that produced ``state`` (a :class:`bus.PruneState`).

    Prefix and fused tokens carry patch id -1 and are ignored. Handles both the fixed-ratio layout
    (``patch_ids [B, N']``) and the packed varlen layout (``patch_ids [total]`` + ``cu_seqlens``).
    """
    ids = state.patch_ids
    B = state.batch
    mask = torch.zeros(B, num_patches, dtype=torch.bool)
    if ids is None:  # no selection happened (keep=1.0): everything kept
        mask[:] = True
        return mask
    ids = ids.detach().cpu()
    if state.cu_seqlens is not None and ids.dim() == 1:
        cu = state.cu_seqlens.detach().cpu().tolist()
        rows = [ids[cu[b]:cu[b + 1]] for b in range(B)]
    else:
        rows = list(ids)
    for b, r in enumerate(rows):
        r = r[r >= 0]
        mask[b, r] = True
    return mask


def relevance_figure(
    images: Tensor,
    kept: Tensor,
    captions: Sequence[str],
    patch_size: int,
    path: str,
    *,
    title: Optional[str] = None,
    dim: float = 0.25,
) -> str:
    """Write a PNG grid: each image with its dropped patches dimmed and kept ones outlined.

    Args:
        images: float ``[B, 3, H, W]`` in [0, 1] (already denormalised).
        kept: bool ``[B, (H // patch_size) * (W // patch_size)]`` from :func:`kept_patch_mask`.
        captions: B captions, used as panel titles (wrapped).
        patch_size: ViT patch side in pixels.
        path: output file (``.png``).
        title: optional figure title (e.g. the step).
        dim: brightness factor of the dropped patches (0 = black).
    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    B, _, H, W = images.shape
    gh, gw = H // patch_size, W // patch_size
    # Upsample the patch mask to pixels so the dimming follows the exact patch grid.
    m = kept.view(B, 1, gh, gw).float()
    m = m.repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)
    shown = images.float() * (dim + (1 - dim) * m)

    cols = min(B, 4)
    rows = (B + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for b in range(B):
        ax = axes.flat[b]
        ax.imshow(shown[b].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        for p in torch.nonzero(kept[b]).flatten().tolist():
            r, c = divmod(p, gw)
            ax.add_patch(Rectangle((c * patch_size - 0.5, r * patch_size - 0.5), patch_size, patch_size,
                                   fill=False, edgecolor="lime", linewidth=0.8))
        n_kept = int(kept[b].sum())
        ax.set_title("\n".join(textwrap.wrap(captions[b], 28)) + f"\n[{n_kept}/{gh * gw} kept]", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
