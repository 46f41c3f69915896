"""The bus_kernels selector in a Hugging Face ``transformers`` ViT (random weights, no download).

A wrapper around a chosen ``ViTLayer`` runs the layer unchanged, then keeps the patches most
relevant to a text embedding: the text goes through the layer's own query projection, the
patches through its own key projection (both after its ``layernorm_before``), and
:func:`bus_kernels.relevance_scores` + :func:`bus_kernels.select_tokens` do the rest. The
same 20 lines work for ``CLIPVisionModel`` layers (``layer_norm1``, ``self_attn.q_proj``).

    python examples/hf_vit_drop_in.py
"""
from __future__ import annotations

import torch
from torch import nn

import bus_kernels as bk


class TextGuidedPrune(nn.Module):
    """Runs ``layer``, then keeps ``keep`` of its patch tokens by relevance to ``self.text``."""

    def __init__(self, layer: nn.Module, keep: float):
        super().__init__()
        self.layer, self.keep, self.text = layer, keep, None  # text: [B, D], set per batch

    def _heads(self, proj: nn.Linear, h: torch.Tensor) -> torch.Tensor:
        attn = self.layer.attention
        B, L, _ = h.shape
        return proj(h).view(B, L, -1, attn.head_dim).transpose(1, 2)  # [B, H, L, hd]

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.layer(hidden_states, *args, **kwargs)
        if self.text is None:
            return out
        attn, norm = self.layer.attention, self.layer.layernorm_before
        q = self._heads(attn.q_proj, norm(self.text)[:, None])  # [B, H, 1, hd]
        k = self._heads(attn.k_proj, norm(hidden_states))[:, :, 1:]  # patches only
        scores = bk.relevance_scores(q, k.contiguous(), scale=attn.scaling)
        return bk.select_tokens(out, scores, self.keep, num_prefix=1).tokens


def main(size: int = 224, hidden: int = 192, layers=(4, 7, 10), keep: float = 0.7, batch: int = 2):
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(image_size=size, hidden_size=hidden, num_hidden_layers=12, num_attention_heads=3,
                    intermediate_size=4 * hidden)
    model = ViTModel(cfg, add_pooling_layer=False).eval()
    images = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        full = model(pixel_values=images).last_hidden_state
        for i in layers:
            model.layers[i] = TextGuidedPrune(model.layers[i], keep)
            model.layers[i].text = torch.randn(batch, hidden)
        pruned = model(pixel_values=images).last_hidden_state
    print(f"transformers ViT: {tuple(full.shape)} tokens without pruning, {tuple(pruned.shape)} with TSPS at {layers}")
    return full, pruned


if __name__ == "__main__":
    main()
