"""Byte and SentencePiece tokenizers: ids, EOS/padding, Python == tf.data, building."""

import io
import os

import numpy as np
import pytest
import sentencepiece as spm
import tensorflow as tf

from big_vlp.config_errors import ConfigError
from big_vlp.data import shapes
from big_vlp.data import tokenizers

TEXTS = ["A Red Circle", "", "ünïcödé Ω text", "x" * 40, "two  spaces, punctuation!"]


@pytest.fixture(scope="module")
def captions() -> list[str]:
  return [shapes.render_split_example("train", i)[1] for i in range(1500)]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory, captions) -> str:
  path = str(tmp_path_factory.mktemp("sp") / "captions.model")
  return tokenizers.train_sentencepiece(captions, 120, path, model_type="bpe")


def encode_in_graph(tok, texts, max_len, lower=True) -> np.ndarray:
  ds = tf.data.Dataset.from_tensor_slices(texts).map(
      lambda t: tok.encode_tf(t, max_len, lower=lower))
  return np.stack(list(ds.as_numpy_iterator()))


def check_layout(ids: np.ndarray, pad_id: int, eos_id: int) -> None:
  """Exactly one EOS per row, followed only by padding."""
  for row in ids:
    eos = np.flatnonzero(row == eos_id)
    assert len(eos) == 1, row
    assert np.all(row[eos[0] + 1:] == pad_id), row


def test_byte_tokenizer_ids_and_layout():
  tok = tokenizers.ByteTokenizer()
  assert (tok.vocab_size, tok.pad_id, tok.eos_id) == (258, 0, 1)
  ids = tok.encode(["Hi!", ""], max_len=6)
  np.testing.assert_array_equal(ids, [[ord("h") + 2, ord("i") + 2, ord("!") + 2, 1, 0, 0],
                                      [1, 0, 0, 0, 0, 0]])
  assert ids.dtype == np.int32
  long = tok.encode(["abcdefgh"], max_len=4)[0]
  np.testing.assert_array_equal(long, [99, 100, 101, 1])  # Truncated to max_len - 1, then EOS.
  np.testing.assert_array_equal(tok.encode(["AB"], 4, lower=False)[0], [67, 68, 1, 0])
  check_layout(tok.encode(TEXTS, 12), 0, 1)


def test_byte_tokenizer_roundtrip_and_graph_equality():
  tok = tokenizers.ByteTokenizer()
  ids = tok.encode(TEXTS, max_len=64)
  assert [tok.decode(r) for r in ids] == [t.lower() for t in TEXTS]
  for max_len in (1, 5, 64):
    np.testing.assert_array_equal(encode_in_graph(tok, TEXTS, max_len),
                                  tok.encode(TEXTS, max_len))
  np.testing.assert_array_equal(encode_in_graph(tok, TEXTS, 20, lower=False),
                                tok.encode(TEXTS, 20, lower=False))


def test_sentencepiece_train_load_encode(sp_model, captions):
  tok = tokenizers.SentencePieceTokenizer(sp_model)
  assert (tok.pad_id, tok.eos_id) == (0, 1)
  assert 50 < tok.vocab_size <= 120
  texts = captions[:50] + TEXTS
  ids = tok.encode(texts, max_len=16)
  assert ids.shape == (len(texts), 16) and ids.dtype == np.int32
  check_layout(ids, tok.pad_id, tok.eos_id)
  np.testing.assert_array_equal(encode_in_graph(tok, texts, 16), ids)
  assert tok.decode(tok.encode([captions[0]], 48)[0]) == captions[0].lower()
  assert tok.decode(tok.encode(["A RED CIRCLE"], 48)[0]) == "a red circle"


def test_sentencepiece_vocab_larger_than_corpus_allows(tmp_path, captions):
  for model_type in ("unigram", "bpe"):
    path = tokenizers.train_sentencepiece(captions[:300], 5000, str(tmp_path / model_type),
                                          model_type=model_type)
    tok = tokenizers.SentencePieceTokenizer(path)
    assert 30 < tok.vocab_size < 5000


def test_sentencepiece_without_pad_gets_an_extra_id(tmp_path, captions):
  # SentencePiece's defaults: unk=0 (a real piece), bos=1, eos=2 and no pad.
  proto = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(captions), model_writer=proto,
                                 vocab_size=60, model_type="bpe", minloglevel=2)
  path = tmp_path / "default_ids.model"
  path.write_bytes(proto.getvalue())
  tok = tokenizers.SentencePieceTokenizer(str(path))
  assert (tok.pad_id, tok.eos_id, tok.vocab_size) == (60, 2, 61)
  ids = tok.encode(["a red circle"], 20)
  check_layout(ids, 60, 2)
  np.testing.assert_array_equal(encode_in_graph(tok, ["a red circle"], 20), ids)
  assert tok.decode(ids[0]) == "a red circle"


def test_build_tokenizer_specs(tmp_path, sp_model, captions):
  assert isinstance(tokenizers.build_tokenizer("bytes"), tokenizers.ByteTokenizer)
  assert tokenizers.build_tokenizer(f"sp:{sp_model}").vocab_size > 50
  with pytest.raises(ConfigError, match=r"config.tokenizer=.*does not exist"):
    tokenizers.build_tokenizer("sp:/no/such.model")
  with pytest.raises(ConfigError, match=r"'bytes', 'sp:PATH', 'sp_train:VOCAB_SIZE"):
    tokenizers.build_tokenizer("wordpiece")
  for bad in ("sp_train:many", "sp_train:100:wordpiece"):
    with pytest.raises(ConfigError, match="config.tokenizer=.*bpe, unigram"):
      tokenizers.build_tokenizer(bad, workdir=str(tmp_path))


def test_build_tokenizer_trains_once_then_reuses_workdir_model(tmp_path, captions):
  calls = []

  def texts():
    calls.append(1)
    return captions[:500]

  tok = tokenizers.build_tokenizer("sp_train:300", workdir=str(tmp_path), texts_fn=texts)
  path = tmp_path / "tokenizer.model"
  assert path.exists() and calls == [1]
  # BPE by default: whole words, so a templated caption stays short.
  assert len(tok.encode(["a photo of a blue diamond"], 16)[0].nonzero()[0]) == 7
  mtime = os.path.getmtime(path)
  again = tokenizers.build_tokenizer("sp_train:300", workdir=str(tmp_path), texts_fn=texts)
  assert calls == [1] and os.path.getmtime(path) == mtime
  np.testing.assert_array_equal(again.encode(captions[:5], 16), tok.encode(captions[:5], 16))
  # A resumed run or `evaluate` may not have the texts at hand at all.
  tokenizers.build_tokenizer("sp_train:300", workdir=str(tmp_path))


@pytest.mark.parametrize("size", [32_000, 250_000])
def test_published_size_vocabulary_loads_and_encodes_in_tf_data(tmp_path, sp_model, size):
  # Stand-in for a published model (32k English / 250k multilingual SentencePiece): the
  # trained caption model grown to `size` pieces, the last one a word it must then use.
  from sentencepiece import sentencepiece_model_pb2 as model_pb2
  proto = model_pb2.ModelProto()
  with open(sp_model, "rb") as f:
    proto.ParseFromString(f.read())
  proto.trainer_spec.model_type = model_pb2.TrainerSpec.UNIGRAM
  lowest = min(p.score for p in proto.pieces)
  while len(proto.pieces) < size - 1:
    proto.pieces.add(piece=f"▁w{len(proto.pieces)}", score=lowest - 1,
                     type=model_pb2.ModelProto.SentencePiece.NORMAL)
  proto.pieces.add(piece="▁zebra", score=0.0, type=model_pb2.ModelProto.SentencePiece.NORMAL)
  path = tmp_path / "big.model"
  path.write_bytes(proto.SerializeToString())
  tok = tokenizers.build_tokenizer(f"sp:{path}")
  assert tok.vocab_size == size and (tok.pad_id, tok.eos_id) == (0, 1)
  texts = ["a Zebra", "a red zebra in the middle"]
  ids = encode_in_graph(tok, texts, 16)
  np.testing.assert_array_equal(ids, tok.encode(texts, 16))
  assert (ids == size - 1).sum(axis=1).tolist() == [1, 1]  # '▁zebra' is one top-id token.
  assert tok.decode(ids[1]) == "a red zebra in the middle"


def test_train_tokenizer_tool_output_drives_the_pipeline(tmp_path):
  import subprocess
  import sys
  from big_vlp.data import pipeline
  data_dir = str(tmp_path / "tfds")
  shapes.ensure_built(data_dir, "small")
  out = str(tmp_path / "shapes.model")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, os.path.join(root, "tools", "train_tokenizer.py"),
                  "--data", "big_vlp_shapes/small", "--data_dir", data_dir,
                  "--vocab_size", "100", "--output", out], check=True, capture_output=True,
                 timeout=300)
  tok = tokenizers.build_tokenizer(f"sp:{out}")
  batch = next(pipeline.eval_iterator(
      name="big_vlp_shapes/small", split="val", data_dir=data_dir,
      pp="tokenize(16, key='caption', out_key='text')|keep('text', 'caption')",
      tokenizer=tok, batch_size=8))
  captions = [c.decode() for c in batch["caption"]]
  np.testing.assert_array_equal(batch["text"], tok.encode(captions, 16))
  assert 3 < tok.vocab_size <= 100 and batch["text"].max() > 2  # Real pieces, not just UNK.
