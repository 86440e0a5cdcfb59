"""Input data: document sources, the tokenizer, and the grain pipeline that packs training batches.

Typical use (see pipeline.py for the stages and their guarantees):

    tokenizer = load_or_train_tokenizer(cfg, workdir)
    it = make_train_iterator(cfg, tokenizer, process_index=jax.process_index(),
                             process_count=jax.process_count())
    batch = next(it)   # {'inputs','targets','segment_ids','positions'}: int32 [B/P, seq_len]

This package imports nothing from mai_jax.model or mai_jax.train (imports run one way).
"""

from mai_jax.data.pipeline import FEATURES, make_eval_batches, make_train_iterator
from mai_jax.data.sources import DocumentSource, SourceError, load_split
from mai_jax.data.tokenizer import (SentencePieceTokenizer, Tokenizer, TokenizerError,
                                    load_or_train_tokenizer, train_sentencepiece)

__all__ = [
    "FEATURES", "make_eval_batches", "make_train_iterator", "DocumentSource", "SourceError",
    "load_split", "SentencePieceTokenizer", "Tokenizer", "TokenizerError",
    "load_or_train_tokenizer", "train_sentencepiece",
]
