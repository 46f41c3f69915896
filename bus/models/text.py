"""The text side of the paper's stack: BERT layers from ``transformers`` (random init).

- :func:`bert_config`: one ``BertConfig`` for every BERT-style part (text encoder, fusion,
  decoder), with SDPA attention so boolean masks pass straight through.
- :class:`TextEncoder`: ``BertModel`` without pooler (mPLUG's 6-layer text encoder).
- :class:`MLMHead`: ``transformers``' ``BertOnlyMLMHead`` (transform + decoder) over fused text.
"""
from __future__ import annotations

from torch import Tensor, nn


def bert_config(config, *, width: int, heads: int, layers: int, decoder: bool = False):
    """A ``transformers.BertConfig`` of ``width`` with ``heads`` heads and ``layers`` layers;
    ``decoder``: causal self-attention plus cross-attention (``is_decoder``, ``add_cross_attention``);
    init std ``config.weight_init_std(width)`` (0.02 at width 768, see ``BUSConfig.init_std``)."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=config.vocab_size, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * width, max_position_embeddings=max(64, config.max_text_len),
        pad_token_id=config.pad_token_id, is_decoder=decoder, add_cross_attention=decoder,
        attn_implementation="sdpa", initializer_range=config.weight_init_std(width),
    )


class TextEncoder(nn.Module):
    """``BertModel(add_pooling_layer=False)``: ``forward(ids [B, L], mask [B, L]) -> [B, L, Dt]``
    (token 0 is [CLS])."""

    def __init__(self, bert_cfg):
        super().__init__()
        from transformers import BertModel

        self.bert = BertModel(bert_cfg, add_pooling_layer=False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class MLMHead(nn.Module):
    """``BertOnlyMLMHead``: hidden [..., Dt] -> vocabulary logits [..., V]."""

    def __init__(self, bert_cfg):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertOnlyMLMHead

        self.head = BertOnlyMLMHead(bert_cfg)
        pred = self.head.predictions
        pred.decoder.bias = pred.bias  # one output bias (a BertForMaskedLM ties them on load)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.head(hidden)
