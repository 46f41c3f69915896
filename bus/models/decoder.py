"""The paper stack's text decoder: ``transformers``' ``BertLMHeadModel`` (``is_decoder``,
``add_cross_attention``; mPLUG's 12-layer ``BertPrefixModel``), causal over the caption's suffix,
cross-attending to the fusion's output [visual tokens; prefix text] (PrefixLM, captioning)."""
from __future__ import annotations

from torch import Tensor, nn


class TextDecoder(nn.Module):
    """``forward(ids [R, L], mask [R, L], memory [R, K, Dt], memory_mask [R, K])`` -> vocabulary
    logits [R, L, V]; position t sees ids[:, :t+1] and the whole memory."""

    def __init__(self, bert_cfg):
        super().__init__()
        from transformers import BertLMHeadModel

        self.lm = BertLMHeadModel(bert_cfg)
        pred = self.lm.cls.predictions
        pred.decoder.bias = pred.bias  # one output bias, as on load

    def forward(self, ids: Tensor, mask: Tensor, memory: Tensor, memory_mask: Tensor) -> Tensor:
        return self.lm(input_ids=ids, attention_mask=mask, encoder_hidden_states=memory,
                       encoder_attention_mask=memory_mask, use_cache=False).logits
