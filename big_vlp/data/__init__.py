"""Input data: datasets, pre-processing ops, tokenizers and tf.data pipelines.

This package is the only part of big_vlp that imports TensorFlow. Importing the package
itself is cheap (the names below load their module on first use), so TensorFlow-free
modules such as `build` (the dataset builder's workers) import without it.
"""

import importlib
from typing import Any

_EXPORTS = {
    "ByteTokenizer": "tokenizers", "SentencePieceTokenizer": "tokenizers",
    "Tokenizer": "tokenizers", "build_tokenizer": "tokenizers",
    "train_sentencepiece": "tokenizers", "get_preprocess_fn": "ops", "register": "ops",
    "class_names": "pipeline", "eval_iterator": "pipeline", "get_builder": "pipeline",
    "iterate_texts": "pipeline", "num_examples": "pipeline", "train_iterator": "pipeline",
    "ensure_built": "shapes",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"big_vlp.data.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module 'big_vlp.data' has no attribute {name!r}")
