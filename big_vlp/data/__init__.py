"""Input data: datasets, pre-processing ops, tokenizers and tf.data pipelines.

This package is the only part of big_vlp that imports TensorFlow.
"""

import tensorflow as tf

# TF must never reserve accelerator memory that JAX needs; the input pipeline runs on CPU.
try:
  tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):  # Devices already initialised, or no GPU support built in.
  pass

# pylint: disable=wrong-import-position
from big_vlp.data.ops import get_preprocess_fn, register
from big_vlp.data.pipeline import (class_names, eval_iterator, get_builder, iterate_texts,
                                   num_examples, train_iterator)
from big_vlp.data.shapes import ensure_built
from big_vlp.data.tokenizers import (ByteTokenizer, SentencePieceTokenizer, Tokenizer,
                                     build_tokenizer, train_sentencepiece)

__all__ = [
    "ByteTokenizer", "SentencePieceTokenizer", "Tokenizer", "build_tokenizer",
    "class_names", "ensure_built", "eval_iterator", "get_builder", "get_preprocess_fn",
    "iterate_texts", "num_examples", "register", "train_iterator", "train_sentencepiece",
]
