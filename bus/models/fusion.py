"""mPLUG's skip-connected fusion (``alibaba/AliceMind``, ``mPLUG/models/modeling_mplug.py``,
``FusionEncoder``/``FusionLayer``), built from ``transformers`` BERT layers.

Layer i of ``depth`` is

- *asymmetric co-attention* (i == 0 or i % ``connect_every`` != 0): text self-attention,
  cross-attention from the text to the visual tokens, FFN; the visual tokens pass unchanged
  (a ``BertLayer`` with ``add_cross_attention``, its self-attention bidirectional);
- *connected* (i > 0 and i % ``connect_every`` == 0): one BERT layer over the concatenation
  [visual; text]; its visual half is added to the visual tokens (the skip connection), its text
  half replaces the text. This is the only place the visual tokens are updated, and what makes
  the fusion's cost grow with the number of visual tokens beyond the cross-attention's keys.

With 6 layers and ``connect_every=3`` (mPLUG-base), layers 0-2 and 4-5 are asymmetric, layer 3
is connected.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


def _key_mask(valid: Tensor) -> Tensor:
    """bool [R, K] (True = attend) -> SDPA mask [R, 1, 1, K]."""
    return valid[:, None, None, :]


class SkipConnectedFusion(nn.Module):
    """``forward(text [R, L, Dt], text_valid bool [R, L], image [R, M, Dt], image_valid bool [R, M]
    or None)`` -> (image [R, M, Dt], text [R, L, Dt]); ``valid`` masks are True on real tokens."""

    def __init__(self, cross_cfg, self_cfg, depth: int, connect_every: int):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertLayer

        if connect_every < 1:
            raise ValueError(f"BUSConfig.connect_every={connect_every} must be >= 1")
        self.connected = [i > 0 and i % connect_every == 0 for i in range(depth)]
        layers = []
        for i, conn in enumerate(self.connected):
            layer = BertLayer(self_cfg if conn else cross_cfg, layer_idx=i)
            # cross_cfg has is_decoder=True (transformers requires it for cross-attention); the
            # fusion's text self-attention is bidirectional, and masks are always passed explicitly.
            layer.attention.self.is_causal = False
            layers.append(layer)
        self.layers = nn.ModuleList(layers)

    def forward(self, text: Tensor, text_valid: Tensor, image: Tensor,
                image_valid: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        R, M = image.shape[:2]
        if image_valid is None:
            image_valid = torch.ones(R, M, dtype=torch.bool, device=image.device)
        text_valid, image_valid = text_valid.bool(), image_valid.bool()
        t_mask, i_mask = _key_mask(text_valid), _key_mask(image_valid)
        both = _key_mask(torch.cat([image_valid, text_valid], dim=1))
        for layer, conn in zip(self.layers, self.connected):
            if conn:
                out = layer(torch.cat([image, text], dim=1), attention_mask=both)
                image, text = image + out[:, :M], out[:, M:]
            else:
                text = layer(text, attention_mask=t_mask, encoder_hidden_states=image,
                             encoder_attention_mask=i_mask)
        return image, text
