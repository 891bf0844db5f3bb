"""Input pipelines: sources → tokenizer → packed, stateless, host-sliced batches.

ds = data.make(config.data, seed=0)
batch = ds.train_batch(step, batch_size, jax.process_index(), jax.process_count())
"""

from keel_jax.data.arith import exact_match
from keel_jax.data.dataset import Dataset, make
from keel_jax.data.tokenizers import ByteTokenizer, SentencePieceTokenizer

__all__ = ["ByteTokenizer", "Dataset", "SentencePieceTokenizer", "exact_match", "make"]
