"""Input data: document sources, the tokenizer, and the grain pipeline that packs training batches.

Typical use (see pipeline.py for the stages and their guarantees):

    tokenizer = load_or_train_tokenizer(cfg, workdir)
    it = make_train_iterator(cfg, tokenizer, process_index=jax.process_index(),
                             process_count=jax.process_count())
    batch = next(it)   # {'inputs','targets','segment_ids','positions'}: int32 [B/P, seq_len]
                       # plus 'source_tokens' int32 [B/P, num_sources] for the mixture metrics

Sources come from data.sources (readers.py: text, JSONL, Parquet, ArrayRecord; default: the stdlib);
`mai-jax data tokenize` writes token caches (cache.py) that cache_pipeline.py trains from.

This package imports nothing from mai_jax.model or mai_jax.train (imports run one way).
"""

from mai_jax.data.batches import make_eval_batches, make_train_iterator
from mai_jax.data.pipeline import FEATURES, DataMetrics
from mai_jax.data.sources import DocumentSource, SourceError, SourceSpec, load_split, load_splits
from mai_jax.data.tokenizer import (SentencePieceTokenizer, Tokenizer, TokenizerError,
                                    load_or_train_tokenizer, load_tokenizer, train_sentencepiece)
from mai_jax.data.tokenizer_files import HFTokenizer, TiktokenTokenizer

__all__ = [
    "FEATURES", "DataMetrics", "make_eval_batches", "make_train_iterator", "DocumentSource",
    "SourceError", "SourceSpec", "load_split", "load_splits", "HFTokenizer",
    "SentencePieceTokenizer", "TiktokenTokenizer", "Tokenizer", "TokenizerError",
    "load_or_train_tokenizer", "load_tokenizer", "train_sentencepiece",
]
