"""Tokenizers with one interface for Python callers (evaluators) and tf.data pipelines.

Every encoding is fixed-length: tokens are truncated to max_len - 1, EOS is appended and the
rest is filled with `pad_id`, so each row holds exactly one EOS. Both encode paths lowercase
with TensorFlow's UTF-8 lowercasing so that they give identical ids.
"""

import io
import os
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np
import sentencepiece as spm
from big_vlp.data import tf_cpu  # noqa: F401  (hides GPUs from TF first)
import tensorflow as tf

from big_vlp.config_errors import ConfigError, fail


class Tokenizer(Protocol):
  """What models, ops and evaluators rely on."""
  vocab_size: int
  pad_id: int
  eos_id: int

  def encode(self, texts: Sequence[str], max_len: int, lower: bool = True) -> np.ndarray:
    """Python path: int32 [len(texts), max_len]."""

  def encode_tf(self, text: tf.Tensor, max_len: int, lower: bool = True) -> tf.Tensor:
    """tf.data path: scalar string -> int32 [max_len]."""

  def decode(self, ids: Sequence[int]) -> str:
    """Text of the ids before the first EOS, without padding."""


def _lower_bytes(texts: Sequence[str], lower: bool) -> list[bytes]:
  """UTF-8 bytes of `texts`, lowercased exactly as tf.strings.lower does in the graph."""
  if not texts:
    return []
  raw = tf.constant([t.encode("utf-8") if isinstance(t, str) else t for t in texts], tf.string)
  if lower:
    raw = tf.strings.lower(raw, encoding="utf-8")
  return list(raw.numpy())


def _pack(token_lists: Iterable[Sequence[int]], max_len: int, pad_id: int,
          eos_id: int) -> np.ndarray:
  """Truncates to max_len - 1, appends EOS, pads: int32 [n, max_len]."""
  if max_len < 1:
    raise ValueError(f"max_len must be >= 1, got {max_len}")
  rows = []
  for tokens in token_lists:
    row = np.full([max_len], pad_id, np.int32)
    tokens = list(tokens)[:max_len - 1]
    row[:len(tokens)] = tokens
    row[len(tokens)] = eos_id
    rows.append(row)
  return np.stack(rows) if rows else np.zeros([0, max_len], np.int32)


def _pack_tf(tokens: tf.Tensor, max_len: int, pad_id: int, eos_id: int) -> tf.Tensor:
  """In-graph version of `_pack` for one 1-D int32 token vector."""
  tokens = tf.concat([tokens[:max_len - 1], tf.constant([eos_id], tf.int32)], axis=0)
  tokens = tf.pad(tokens, [[0, max_len - tf.shape(tokens)[0]]], constant_values=pad_id)
  tokens.set_shape([max_len])
  return tokens


def _strip(ids: Sequence[int], pad_id: int, eos_id: int) -> list[int]:
  """Ids before the first EOS, without padding."""
  out = []
  for i in np.asarray(ids).reshape(-1).tolist():
    if i == eos_id:
      break
    if i != pad_id:
      out.append(i)
  return out


class ByteTokenizer:
  """UTF-8 bytes: byte b -> id b + 2; pad 0, EOS 1. Needs no model file."""

  vocab_size = 258
  pad_id = 0
  eos_id = 1

  def encode(self, texts: Sequence[str], max_len: int, lower: bool = True) -> np.ndarray:
    """Python path: int32 [len(texts), max_len]."""
    return _pack((np.frombuffer(b, np.uint8).astype(np.int32) + 2
                  for b in _lower_bytes(texts, lower)), max_len, self.pad_id, self.eos_id)

  def encode_tf(self, text: tf.Tensor, max_len: int, lower: bool = True) -> tf.Tensor:
    """tf.data path, pure TF ops: scalar string -> int32 [max_len]."""
    if lower:
      text = tf.strings.lower(text, encoding="utf-8")
    tokens = tf.cast(tf.io.decode_raw(text, tf.uint8), tf.int32) + 2
    return _pack_tf(tokens, max_len, self.pad_id, self.eos_id)

  def decode(self, ids: Sequence[int]) -> str:
    """Text of the ids before the first EOS (invalid UTF-8 is replaced)."""
    data = bytes(i - 2 for i in _strip(ids, self.pad_id, self.eos_id) if 2 <= i < 258)
    return data.decode("utf-8", errors="replace")


class SentencePieceTokenizer:
  """A SentencePiece model (local path or any tf.io.gfile path, e.g. gs://).

  Special ids follow the model: its own pad and EOS ids are used when it defines them. A
  model without a pad id pads with 0 if piece 0 is a control or unused piece (it never
  appears in encoded text); otherwise, and for a model without EOS, a new id after the last
  piece is used, and `vocab_size` grows to cover it (the text embedding must be that large).
  """

  def __init__(self, model_path: str):
    with tf.io.gfile.GFile(model_path, "rb") as f:
      self._sp = spm.SentencePieceProcessor(model_proto=f.read())
    self.model_path = model_path
    self.num_pieces = self._sp.get_piece_size()
    next_free = self.num_pieces
    if self._sp.pad_id() >= 0:
      self.pad_id = self._sp.pad_id()
    elif self._sp.is_control(0) or self._sp.is_unused(0):
      self.pad_id = 0
    else:
      self.pad_id, next_free = next_free, next_free + 1
    if self._sp.eos_id() >= 0:
      self.eos_id = self._sp.eos_id()
    else:
      self.eos_id, next_free = next_free, next_free + 1
    self.vocab_size = next_free

  def _tokens(self, lowered: bytes) -> list[int]:
    return self._sp.encode(lowered.decode("utf-8"), out_type=int)

  def encode(self, texts: Sequence[str], max_len: int, lower: bool = True) -> np.ndarray:
    """Python path: int32 [len(texts), max_len]."""
    return _pack((self._tokens(b) for b in _lower_bytes(texts, lower)), max_len,
                 self.pad_id, self.eos_id)

  def encode_tf(self, text: tf.Tensor, max_len: int, lower: bool = True) -> tf.Tensor:
    """tf.data path via tf.numpy_function: scalar string -> int32 [max_len]."""
    if lower:
      text = tf.strings.lower(text, encoding="utf-8")

    def encode_one(raw) -> np.ndarray:
      raw = raw.item() if isinstance(raw, np.ndarray) else raw
      return _pack([self._tokens(raw)], max_len, self.pad_id, self.eos_id)[0]

    ids = tf.numpy_function(encode_one, [text], tf.int32, stateful=False)
    ids.set_shape([max_len])
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    """Text of the ids before the first EOS, without padding or ids outside the model."""
    pieces = [i for i in _strip(ids, self.pad_id, self.eos_id) if i < self.num_pieces]
    return self._sp.decode(pieces)


def train_sentencepiece(texts: Iterable[str], vocab_size: int, out_path: str,
                        model_type: str = "unigram") -> str:
  """Trains a lowercased SentencePiece model (pad 0, EOS 1, unk 2, no BOS); returns its path."""
  sentences = [b.decode("utf-8") for b in _lower_bytes([t for t in texts if t.strip()], True)]
  if not sentences:
    raise ValueError("cannot train a SentencePiece model on an empty corpus")
  options = dict(
      model_type=model_type, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      character_coverage=1.0, input_sentence_size=len(sentences),
      num_threads=max(1, min(8, os.cpu_count() or 1)), minloglevel=2)
  if model_type == "unigram":
    options["hard_vocab_limit"] = False  # Shrink instead of failing on a small corpus.
  size = vocab_size
  while True:
    proto = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=proto,
                                     vocab_size=size, **options)
      break
    except RuntimeError as e:
      # "Vocabulary size too high (N). Please set it to a value <= M." -> retry with M.
      allowed = _max_vocab_from_error(str(e))
      if allowed is None or allowed >= size:
        raise
      size = allowed
  tmp = f"{out_path}.tmp{os.getpid()}"
  with tf.io.gfile.GFile(tmp, "wb") as f:
    f.write(proto.getvalue())
  tf.io.gfile.rename(tmp, out_path, overwrite=True)  # Readers never see a partial file.
  return out_path


def _max_vocab_from_error(message: str) -> int | None:
  marker = "value <= "
  if marker not in message:
    return None
  digits = message.split(marker, 1)[1].split(".")[0].strip()
  return int(digits) if digits.isdigit() else None


TOKENIZER_SPECS = ("'bytes'", "'sp:PATH'", "'sp_train:VOCAB_SIZE[:bpe|unigram|word|char]'")
MODEL_TYPES = ("bpe", "unigram", "word", "char")


def build_tokenizer(spec: str, *, workdir: str | None = None,
                    texts_fn: Callable[[], Iterable[str]] | None = None,
                    field: str = "tokenizer") -> Tokenizer:
  """Tokenizer from a config string: 'bytes', 'sp:PATH' or 'sp_train:VOCAB_SIZE[:TYPE]'.

  'sp_train:N' trains on texts_fn() and saves `{workdir}/tokenizer.model`; an existing file
  there is reused, so resumed runs and evaluation see the same vocabulary. The model type
  defaults to BPE: on templated captions (few distinct words, always in the same phrases)
  SentencePiece's unigram seeding drops whole words and splits them into letters, e.g.
  the big_vlp_shapes captions average 18 unigram tokens against 10 BPE tokens.
  """
  kind, _, arg = spec.partition(":")
  if spec == "bytes":
    return ByteTokenizer()
  if kind == "sp" and arg:
    if not tf.io.gfile.exists(arg):
      fail(field, spec, f"SentencePiece model file {arg!r} does not exist")
    return SentencePieceTokenizer(arg)
  if kind == "sp_train" and arg:
    size, _, model_type = arg.partition(":")
    model_type = model_type or "bpe"
    if not size.isdigit() or int(size) < 8 or model_type not in MODEL_TYPES:
      fail(field, spec, "expected 'sp_train:VOCAB_SIZE' with an integer size >= 8, optionally "
           "followed by ':TYPE' with TYPE one of " + ", ".join(MODEL_TYPES))
    if workdir is None:
      raise ValueError(f"tokenizer {spec!r} needs a workdir to keep the trained model in")
    path = os.path.join(workdir, "tokenizer.model")
    if not tf.io.gfile.exists(path):
      if texts_fn is None:
        raise ValueError(f"tokenizer {spec!r}: {path} does not exist and no texts_fn to train on")
      tf.io.gfile.makedirs(workdir)
      train_sentencepiece(texts_fn(), int(size), path, model_type=model_type)
    return SentencePieceTokenizer(path)
  raise ConfigError(f"config.{field}={spec!r} is not valid; allowed forms: "
                    + ", ".join(TOKENIZER_SPECS))
