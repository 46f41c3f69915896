"""A download-free tokenizer: a small deterministic WordPiece vocabulary (built from captions or
from the synthetic set's word lists) run by ``tokenizers`` behind a ``transformers`` front end."""
from __future__ import annotations

from typing import Any, Dict, Iterable, List

from .synthetic import synthetic_vocabulary

__all__ = ["SPECIAL_TOKENS", "build_tokenizer", "synthetic_tokenizer"]

# BERT order, so [PAD] gets id 0 and matches BertConfig's default pad_token_id.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _wrap_tokenizer(tok: Any, model_max_length: int = 512):
    """Give a ``tokenizers.Tokenizer`` BERT-style normalisation, [CLS] x [SEP] framing and a
    ``transformers`` front end with the special tokens registered."""
    from tokenizers import decoders, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
        # The WordPiece decoder already re-attaches punctuation; a second cleanup pass would
        # also rewrite things like " n't", breaking decode(encode(x)) == x.lower().
        clean_up_tokenization_spaces=False,
    )


_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def _wordpiece_from_vocab(tokens: Iterable[str]):
    """A WordPiece tokenizer whose ids follow the order of ``tokens`` (specials first)."""
    from tokenizers import Tokenizer, models

    vocab: Dict[str, int] = {}
    for t in list(SPECIAL_TOKENS) + list(tokens):
        vocab.setdefault(t, len(vocab))
    model = models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100)
    return _wrap_tokenizer(Tokenizer(model))


def build_tokenizer(captions: Iterable[str], *, vocab_size: int = 1000):
    """Build a small lowercase WordPiece tokenizer from ``captions`` (no download, deterministic).

    The vocabulary is: the special tokens, then single characters and their ``##`` continuations
    (a-z, 0-9 always, then other characters seen, most frequent first), then whole words by
    decreasing count (ties alphabetical) until ``vocab_size``. Frequent words are one token; rarer
    or unseen words fall back to characters, never to [UNK] for a-z/0-9 text.

    Not ``tokenizers.trainers.WordPieceTrainer``: its token ids (and, when ``vocab_size`` cuts
    through equal counts, its token set) change from process to process, so DDP ranks or a
    resumed run would disagree about ids. This selection is a pure function of the captions.

    BERT conventions: ``[PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4``; BERT normalisation
    (lowercase, accents stripped) and pre-tokenisation (whitespace and punctuation); a single
    sequence encodes as ``[CLS] tokens [SEP]``, so a ``transformers.BertConfig(vocab_size=len(tok),
    pad_token_id=tok.pad_token_id)`` text model can use it.

    Args:
        captions: the text, any iterable of str (consumed once).
        vocab_size: upper bound on the vocabulary (a small corpus yields fewer tokens).
    Returns:
        ``transformers.PreTrainedTokenizerFast``; ``len(tok)`` is the vocabulary size.
    """
    from collections import Counter

    from tokenizers import normalizers, pre_tokenizers

    base = len(SPECIAL_TOKENS) + 2 * len(_ALPHABET)
    if vocab_size < base:
        raise ValueError(f"vocab_size={vocab_size} is too small: the specials and a-z/0-9 pieces need {base}")
    norm = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    words: Counter = Counter()
    for caption in captions:
        words.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(str(caption))))
    chars: Counter = Counter()
    for w, n in words.items():
        for ch in w:
            chars[ch] += n

    tokens: List[str] = [c for c in _ALPHABET] + ["##" + c for c in _ALPHABET]
    budget = vocab_size - base
    for ch in sorted((c for c in chars if c not in _ALPHABET), key=lambda c: (-chars[c], c)):
        if budget < 2:
            break
        tokens += [ch, "##" + ch]
        budget -= 2
    for w in sorted((w for w in words if len(w) > 1), key=lambda w: (-words[w], w)):
        if budget < 1:
            break
        tokens.append(w)
        budget -= 1
    return _wordpiece_from_vocab(tokens)


def synthetic_tokenizer():
    """The tokenizer for :class:`SyntheticShapes`: every caption word is a single token.

    Built from :func:`synthetic_vocabulary` (the generator's word lists, not sampled captions):
    specials, then the sorted words, then a-z/0-9 and their ``##`` continuations, so ids are the
    same on every machine and run. Same conventions as :func:`build_tokenizer`.

    Returns:
        ``transformers.PreTrainedTokenizerFast``.
    """
    return _wordpiece_from_vocab(synthetic_vocabulary() + list(_ALPHABET) + ["##" + c for c in _ALPHABET])
