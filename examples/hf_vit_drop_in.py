"""TSPS in a Hugging Face ``transformers`` ViT with :func:`bus.patch_hf` (random weights, no download).

``bus.patch_hf`` swaps the classes of the tower and of the chosen encoder layers for thin
subclasses that run the host layers unchanged and then keep the patches most relevant to a text
embedding: the text goes through the layer's own query projection, the patches through its own
key projection (both after its pre-attention norm), and :func:`bus_kernels.relevance_scores` +
:func:`bus_kernels.select_tokens` do the rest. The same call works for ``CLIPVisionModel``,
``SiglipVisionModel`` (no class token: the mean patch query guides without text) and
``Dinov2Model``.

    python examples/hf_vit_drop_in.py
"""
from __future__ import annotations

import torch

import bus


def main(size: int = 224, hidden: int = 192, layers=(4, 7, 10), keep: float = 0.7, batch: int = 2):
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(image_size=size, hidden_size=hidden, num_hidden_layers=12, num_attention_heads=3,
                    intermediate_size=4 * hidden)
    model = ViTModel(cfg, add_pooling_layer=False).eval()
    images = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        full = model(pixel_values=images).last_hidden_state
        bus.patch_hf(model, layers=layers, keep=keep)
        pruned = model(pixel_values=images, text=torch.randn(batch, hidden)).last_hidden_state
    print(f"transformers ViT: {tuple(full.shape)} tokens without pruning, {tuple(pruned.shape)} with TSPS at {layers}")
    return full, pruned


if __name__ == "__main__":
    main()
