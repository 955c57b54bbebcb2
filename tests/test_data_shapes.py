"""The procedural big_vlp_shapes dataset: content, determinism, balance, difficulty."""

import collections
import io

import numpy as np
from PIL import Image
import tensorflow as tf
import tensorflow_datasets as tfds

from big_vlp.data import shapes
from data_fixtures import SMALL, shapes_dir  # noqa: F401  (pytest fixture)


def _words_for(label: int) -> tuple[list[str], list[str]]:
  colour, shape = shapes.CLASS_NAMES[label].split(" ")
  return shapes.COLOUR_WORDS[colour], shapes.SHAPE_WORDS[shape]


def test_class_names_are_colour_shape_pairs():
  assert len(shapes.CLASS_NAMES) == 48 == len(set(shapes.CLASS_NAMES))
  assert shapes.CLASS_NAMES[0] == "red circle"
  for name in shapes.CLASS_NAMES:
    colour, shape = name.split(" ")
    assert colour in shapes.COLOURS and shape in shapes.SHAPES


def test_rendering_is_deterministic_per_split_and_index():
  a_img, a_cap, a_label = shapes.render_split_example("train", 7)
  b_img, b_cap, b_label = shapes.render_split_example("train", 7)
  np.testing.assert_array_equal(a_img, b_img)
  assert (a_cap, a_label) == (b_cap, b_label)
  assert a_img.shape == (64, 64, 3) and a_img.dtype == np.uint8
  other = shapes.render_split_example("val", 7)[0]
  assert not np.array_equal(a_img, other)


def test_captions_name_the_main_object_and_vary():
  captions = set()
  with_colour = 0
  for i in range(300):
    image, caption, label = shapes.render_split_example("train", i)
    colours, shape_words = _words_for(label)
    main = caption.split(" and a ")[0].split(" next to")[0].split(" with a ")[0]
    with_colour += any(c in main for c in colours)
    assert any(s in caption for s in shape_words), (caption, shapes.CLASS_NAMES[label])
    assert image.std() > 5  # Never a constant image.
    captions.add(caption)
  assert len(captions) > 250  # Templates, synonyms and optional attributes vary the text.
  # The main object's colour is named in most captions, left out of about 30%.
  assert 0.6 < with_colour / 300 < 0.8, with_colour
  second = sum(" and a " in c or "next to" in c or "nearby" in c for c in captions)
  assert 0.3 < second / len(captions) < 0.7  # About half mention a second object.


def test_png_encoding_is_lossless():
  random = np.random.default_rng(0).integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
  for image in (random, shapes.render_split_example("val", 0)[0]):
    np.testing.assert_array_equal(tf.io.decode_png(shapes.encode_png(image)).numpy(), image)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(shapes.encode_png(image)))),
                                  image)


def test_test_split_is_single_object_and_balanced():
  labels = [shapes.render_split_example("test", i)[2] for i in range(480)]
  assert set(collections.Counter(labels).values()) == {10}


def test_no_single_pixel_reveals_the_shape():
  n = 1200
  examples = [shapes.render_split_example("test", i) for i in range(n)]
  images = np.stack([e[0] for e in examples])
  labels = np.array([e[2] for e in examples])

  def best_single_pixel_rule_accuracy(targets: np.ndarray, num_classes: int) -> float:
    # Each pixel's colour, quantised to 8 RGB octants, predicts the majority target.
    bits = (images >= 128).astype(np.int64)
    code = (bits[..., 0] * 4 + bits[..., 1] * 2 + bits[..., 2]).reshape(n, -1)
    counts = np.zeros((code.shape[1], 8, num_classes), np.int64)
    pixel = np.broadcast_to(np.arange(code.shape[1]), code.shape)
    np.add.at(counts, (pixel, code, np.broadcast_to(targets[:, None], code.shape)), 1)
    return float((counts.max(-1).sum(-1) / n).max())

  # Chance is 1/6 for the shape and 1/48 for the label; the margins cover the in-sample bias.
  assert best_single_pixel_rule_accuracy(labels % 6, 6) < 0.26
  assert best_single_pixel_rule_accuracy(labels, 48) < 0.12


def test_built_dataset_matches_renderer(shapes_dir):
  builder = shapes.ensure_built(shapes_dir, "small")
  assert builder.info.full_name.startswith(SMALL)
  splits = builder.info.splits
  assert (splits["train"].num_examples, splits["val"].num_examples,
          splits["test"].num_examples) == (2000, 200, 480)
  assert builder.info.features["label"].names == shapes.CLASS_NAMES

  test = list(tfds.as_numpy(builder.as_dataset(split="test")))
  assert set(collections.Counter(int(e["label"]) for e in test).values()) == {10}
  # Stored examples are exactly the rendered ones (PNG is lossless), in some file order.
  val = list(tfds.as_numpy(builder.as_dataset(split="val")))
  for index in (0, 3, 199):
    image, caption, label = shapes.render_split_example("val", index)
    assert any(np.array_equal(e["image"], image) and e["caption"].decode() == caption
               and e["label"] == label for e in val)


def test_ensure_built_reuses_prepared_data(shapes_dir):
  builder = shapes.ensure_built(shapes_dir, "small")
  assert builder.is_prepared()
  assert builder.data_dir.startswith(shapes_dir)
