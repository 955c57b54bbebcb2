"""Trains a SentencePiece model on the captions of a tfds dataset.

  python tools/train_tokenizer.py --data big_vlp_shapes --split train --data_dir DIR \
      --key caption --vocab_size 1000 --output /tmp/shapes.model

Use the result with the config string `tokenizer='sp:/tmp/shapes.model'`.
"""

import argparse
import os
import sys
import time

# Runnable as `python tools/train_tokenizer.py` from a checkout without installing big_vlp.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from big_vlp.data import pipeline  # pylint: disable=wrong-import-position
from big_vlp.data import tokenizers  # pylint: disable=wrong-import-position


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Command-line flags."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data", default="big_vlp_shapes", help="tfds name[/config]")
  parser.add_argument("--split", default="train")
  parser.add_argument("--data_dir", default=None, help="tfds data dir (default: tfds's)")
  parser.add_argument("--key", default="caption", help="text feature to train on")
  parser.add_argument("--vocab_size", type=int, default=1000)
  parser.add_argument("--model_type", default="bpe", choices=tokenizers.MODEL_TYPES,
                      help="bpe keeps whole words of templated captions; unigram splits them")
  parser.add_argument("--limit", type=int, default=None, help="use at most this many texts")
  parser.add_argument("--output", required=True, help="path of the .model file to write")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
  """Trains, saves and prints a sample encoding."""
  args = parse_args(argv)
  start = time.time()
  texts = list(pipeline.iterate_texts(args.data, args.split, args.data_dir, key=args.key,
                                      limit=args.limit))
  tokenizers.train_sentencepiece(texts, args.vocab_size, args.output, args.model_type)
  tok = tokenizers.SentencePieceTokenizer(args.output)
  print(f"trained on {len(texts)} texts in {time.time() - start:.1f}s -> {args.output}")
  print(f"vocab_size={tok.vocab_size} (requested {args.vocab_size}) "
        f"pad_id={tok.pad_id} eos_id={tok.eos_id}")
  sample = texts[0]
  ids = tok.encode([sample], max_len=24)[0]
  print(f"sample: {sample!r}\n  ids: {ids.tolist()}\n  decoded: {tok.decode(ids)!r}")


if __name__ == "__main__":
  main()
