"""Converts an image-text corpus into a tfds dataset that tfds.builder(NAME, data_dir=DIR) reads.

  python tools/build_dataset.py --format webdataset --input 'shards/{00000..00009}.tar' \
      --name my_corpus --data_dir ~/tfds [--split train] [--workers 8] [--max_size 512]
  python tools/build_dataset.py --format folder --input captions_dir_or.jsonl|.csv|.tsv \
      --name my_pairs --data_dir ~/tfds [--image_key filepath --caption_key title]
  python tools/build_dataset.py --format classes --input imagenet/val --name my_imagenet \
      --data_dir ~/tfds [--class_names names.txt]   # split 'test' by default

An interrupted build resumes when rerun with the same flags; a finished split is left alone
unless --overwrite is given. Logic and flag list: big_vlp/data/build.py.
"""

import os
import sys

# Runnable as `python tools/build_dataset.py` from a checkout without installing big_vlp.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
  # Imported here, not at the top: worker processes ('spawn') re-import this file, and
  # importing big_vlp.data there would load TensorFlow into every worker.
  from big_vlp.data import build  # pylint: disable=import-outside-toplevel
  sys.exit(build.main(sys.argv[1:]))


if __name__ == "__main__":
  main()
