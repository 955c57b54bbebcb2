"""Procedural image-caption dataset `big_vlp_shapes`: coloured shapes on noisy backgrounds.

Every example is rendered with NumPy from a seed derived from (split, index), so the dataset
is identical on every machine and needs no download. The task is small enough for a tiny
two-tower to learn in minutes on a CPU, yet it needs spatial reasoning: the object moves, its
size varies and the background is tinted and noisy, so no single pixel gives the label away.
"""

import dataclasses
import os
import re
import struct
import zlib

from etils import epath
import numpy as np
from big_vlp.data import tf_cpu  # noqa: F401  (hides GPUs from TF first)
import tensorflow_datasets as tfds

from big_vlp.config_errors import check_choice

IMAGE_SIZE = 64
COLOURS = {
    "red": (220, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 220, 35),
    "green": (40, 175, 55),
    "cyan": (35, 205, 220),
    "blue": (35, 65, 225),
    "purple": (140, 45, 205),
    "pink": (245, 110, 185),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
CLASS_NAMES = [f"{c} {s}" for c in COLOURS for s in SHAPES]

# Caption vocabulary. The canonical name comes first and is listed twice so that it
# dominates: zero-shot prompts use the canonical names.
COLOUR_WORDS = {c: [c] for c in COLOURS}
COLOUR_WORDS["purple"] = ["purple", "purple", "violet"]
COLOUR_WORDS["pink"] = ["pink", "pink", "magenta"]
SHAPE_WORDS = {
    "circle": ["circle", "circle", "disc"],
    "square": ["square", "square", "box"],
    "triangle": ["triangle"],
    "diamond": ["diamond", "diamond", "rhombus"],
    "cross": ["cross", "cross", "plus sign"],
    "ring": ["ring", "ring", "donut"],
}
COLOUR_OMIT_PROB = 0.3
SIZE_WORDS = {"small": ["small", "little", "tiny"], "large": ["large", "big"]}
# Position phrases per (row, col) cell of a 3x3 grid.
POSITION_PHRASES = {
    (0, 0): ["in the top left", "in the upper left corner"],
    (0, 1): ["at the top", "near the top"],
    (0, 2): ["in the top right", "in the upper right corner"],
    (1, 0): ["on the left", "on the left side"],
    (1, 1): ["in the center", "in the middle"],
    (1, 2): ["on the right", "on the right side"],
    (2, 0): ["in the bottom left", "in the lower left corner"],
    (2, 1): ["at the bottom", "near the bottom"],
    (2, 2): ["in the bottom right", "in the lower right corner"],
}
SECOND_OBJECT_PHRASES = [
    " and a small {obj}", ", next to a {obj}", " with a little {obj} nearby",
    " and a tiny {obj}"]

_SPLIT_IDS = {"train": 1, "val": 2, "test": 3}
_SEED_SALT = 0x5EED5
_SIZE_RADII = {"small": (7.0, 10.0), "large": (13.0, 17.0)}
_SECOND_RADII = (5.0, 7.0)
_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
  """Linear-interpolation matrix that upsamples a length-n_in signal to n_out samples."""
  pos = np.linspace(0, n_in - 1, n_out)
  lo = np.floor(pos).astype(int)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = pos - lo
  mat = np.zeros((n_out, n_in), np.float32)
  mat[np.arange(n_out), lo] += 1 - frac
  mat[np.arange(n_out), hi] += frac
  return mat


_UPSAMPLE = _interp_matrix(IMAGE_SIZE, 6)
# Pixel noise is picked from a fixed bank: drawing 12k normals per image would dominate the
# cost of building the dataset.
_NOISE_BANK = np.random.default_rng(_SEED_SALT).normal(
    0, 3.0, size=(64, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)


def shape_sdf(shape: str, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
  """Approximate signed distance (pixels, negative inside) at offsets (dy, dx) from the centre."""
  ady, adx = np.abs(dy), np.abs(dx)
  if shape == "circle":
    return np.sqrt(dx * dx + dy * dy) - r
  if shape == "square":
    return np.maximum(adx, ady) - 0.85 * r
  if shape == "diamond":
    return (adx + ady - 1.2 * r) * np.float32(0.7071)
  if shape == "ring":
    return np.abs(np.sqrt(dx * dx + dy * dy) - 0.72 * r) - 0.28 * r
  if shape == "cross":
    w = 0.33 * r
    return np.minimum(np.maximum(adx - w, ady - r), np.maximum(ady - w, adx - r))
  if shape == "triangle":
    # Upward equilateral triangle with circumradius R, shifted so its box is centred.
    big_r = 1.25 * r
    dy = dy - 0.25 * big_r
    return np.maximum(dy - 0.5 * big_r, 0.866 * adx - 0.5 * dy - 0.5 * big_r)
  raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _paint(image: np.ndarray, shape: str, cy: float, cx: float, r: float,
           rgb: np.ndarray) -> None:
  """Alpha-blends a flat-coloured shape into `image` (float32 [3, H, W], in place)."""
  # Only the shape's bounding window is touched: this keeps rendering cheap.
  extent = 1.25 * r + 2
  y0, y1 = max(int(cy - extent), 0), min(int(cy + extent) + 1, IMAGE_SIZE)
  x0, x1 = max(int(cx - extent), 0), min(int(cx + extent) + 1, IMAGE_SIZE)
  sdf = shape_sdf(shape, _YY[y0:y1, x0:x1] - cy, _XX[y0:y1, x0:x1] - cx, r)
  alpha = np.clip(0.5 - sdf, 0.0, 1.0)
  window = image[:, y0:y1, x0:x1]
  window += alpha * (rgb[:, None, None] - window)


def _background(rng: np.random.Generator) -> np.ndarray:
  """A low-saturation random tint with smooth blotches, float32 [3, H, W] (channels first)."""
  grey = rng.uniform(60, 195)
  tint = (grey + rng.uniform(-22, 22, size=(3, 1, 1))).astype(np.float32)
  blotches = rng.normal(0, 14, size=(3, 6, 6)).astype(np.float32) + tint
  return _UPSAMPLE @ blotches @ _UPSAMPLE.T


def _jittered_colour(rng: np.random.Generator, colour: str) -> np.ndarray:
  """The colour's RGB with per-example brightness and channel jitter."""
  rgb = np.asarray(COLOURS[colour], np.float32) * rng.uniform(0.85, 1.08)
  return np.clip(rgb + rng.uniform(-18, 18, size=3), 0, 255).astype(np.float32)


def _place(rng: np.random.Generator, cell: tuple[int, int], r: float) -> tuple[float, float]:
  """Centre (y, x) for an object of radius r inside a 3x3 grid cell, kept in the image."""
  lo, hi = 1.2 * r + 1.0, IMAGE_SIZE - 1.2 * r - 1.0
  centre = [lo + (hi - lo) * c / 2 + rng.uniform(-3, 3) for c in cell]
  return tuple(float(np.clip(c, lo, hi)) for c in centre)


def _choice(rng: np.random.Generator, items):
  return items[rng.integers(len(items))]


def _caption(rng, colour, shape, size, cell, second) -> str:
  """Describes the scene with a random template, optional attributes and synonyms."""
  # Some captions leave the colour out: colour alone tells most pairs of a batch apart,
  # and without such captions neither tower has a reason to learn shape early on.
  col = _choice(rng, COLOUR_WORDS[colour]) if rng.random() >= COLOUR_OMIT_PROB else None
  shp = _choice(rng, SHAPE_WORDS[shape])
  obj = f"{col} {shp}" if col else shp
  size_word = _choice(rng, SIZE_WORDS[size]) if rng.random() < 0.55 else None
  pos = _choice(rng, POSITION_PHRASES[cell]) if rng.random() < 0.65 else None
  sized = f"{size_word} {obj}" if size_word else obj
  where = f" {pos}" if pos else ""
  template = rng.integers(7)
  if template == 0:
    text = f"a {sized}{where}"
  elif template == 1:
    text = f"there is a {obj}{where}"
  elif template == 2:
    parts = [obj] + ([size_word] if size_word else []) + ([pos] if pos else [])
    text = ", ".join(parts)
  elif template == 3:
    text = f"a photo of a {sized}"
  elif template == 4:
    text = f"an image with a {sized}{where}"
  elif template == 5:
    text = f"{sized}{where}"
  else:
    text = f"a picture of a {obj}{where}"
  if second is not None:
    c2, s2 = second
    obj = f"{_choice(rng, COLOUR_WORDS[c2])} {_choice(rng, SHAPE_WORDS[s2])}"
    text += _choice(rng, SECOND_OBJECT_PHRASES).format(obj=obj)
  return re.sub(r"\ba ([aeiou])", r"an \1", text)


def render_example(rng: np.random.Generator, label: int | None = None,
                   second_object_prob: float = 0.5) -> tuple[np.ndarray, str, int]:
  """Renders one scene: (image uint8 [64, 64, 3], caption, label of the main object)."""
  if label is None:
    label = int(rng.integers(len(CLASS_NAMES)))
  colour, shape = CLASS_NAMES[label].split(" ")
  size = "large" if rng.random() < 0.5 else "small"
  r = rng.uniform(*_SIZE_RADII[size])
  cell = (int(rng.integers(3)), int(rng.integers(3)))
  image = _background(rng)

  second = None
  if rng.random() < second_object_prob:
    c2 = _choice(rng, [c for c in COLOURS if c != colour])
    s2 = _choice(rng, [s for s in SHAPES if s != shape])
    # Prefer a cell two steps away so the main object (drawn on top) rarely hides it.
    cells = [(a, b) for a in range(3) for b in range(3)]
    far = [c for c in cells if max(abs(c[0] - cell[0]), abs(c[1] - cell[1])) >= 2]
    near = [c for c in cells if c != cell]
    cell2 = _choice(rng, far or near)
    r2 = rng.uniform(*_SECOND_RADII)
    _paint(image, s2, *_place(rng, cell2, r2), r2, _jittered_colour(rng, c2))
    second = (c2, s2)

  _paint(image, shape, *_place(rng, cell, r), r, _jittered_colour(rng, colour))
  image += _NOISE_BANK[rng.integers(len(_NOISE_BANK))]
  image += 0.5  # Round rather than truncate on the cast below.
  image = np.clip(image, 0, 255, out=image).astype(np.uint8).transpose(1, 2, 0)
  return np.ascontiguousarray(image), _caption(
      rng, colour, shape, size, cell, second), label


def example_rng(split: str, index: int) -> np.random.Generator:
  """The generator that renders example `index` of `split`."""
  return np.random.default_rng([_SEED_SALT, _SPLIT_IDS[split], index])


def render_split_example(split: str, index: int) -> tuple[np.ndarray, str, int]:
  """Renders example `index` of `split` exactly as it is stored in the dataset."""
  rng = example_rng(split, index)
  if split == "test":
    # Single object, classes cycled so every class gets the same number of examples.
    return render_example(rng, label=index % len(CLASS_NAMES), second_object_prob=0.0)
  return render_example(rng)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
  return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(image: np.ndarray) -> bytes:
  """Lossless PNG bytes of a uint8 RGB image [H, W, 3].

  A minimal writer rather than PIL, whose encoder measured 3x slower on these images
  (~380 vs ~120 us) and would dominate the dataset build. Every row uses the 'Up' filter
  (difference to the row above) and run-length deflate: files within 5% of PIL's size.
  """
  h, w, _ = image.shape
  flat = image.reshape(h, w * 3)
  rows = np.empty((h, 1 + w * 3), np.uint8)
  rows[:, 0] = 2  # PNG filter type 'Up'.
  rows[0, 1:] = flat[0]
  np.subtract(flat[1:], flat[:-1], out=rows[1:, 1:])  # Wraps modulo 256, as PNG specifies.
  deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
  data = deflate.compress(rows.tobytes()) + deflate.flush()
  header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace.
  return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data)
          + _png_chunk(b"IEND", b""))


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  """Split sizes of one variant of the dataset."""
  num_train: int = 30_000
  num_val: int = 1_000
  num_test: int = 960


class BigVlpShapes(tfds.core.GeneratorBasedBuilder):
  """Coloured shapes with captions; `label` is the main object's '{colour} {shape}'."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Initial release.",
                   "1.1.0": "30% of captions omit the colour, so shape must be learned."}
  # tfds would locate this file through `importlib_resources`, which the pinned stack lacks.
  code_path = epath.Path(__file__)
  BUILDER_CONFIGS = [
      ShapesConfig(name="default", description="train 30000 / val 1000 / test 960",
                   num_train=30_000, num_val=1_000, num_test=960),
      ShapesConfig(name="small", description="train 2000 / val 200 / test 480 (for tests)",
                   num_train=2_000, num_val=200, num_test=480),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="png"),
            "caption": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=CLASS_NAMES),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    cfg = self.builder_config
    return {
        "train": self._generate_examples("train", cfg.num_train),
        "val": self._generate_examples("val", cfg.num_val),
        "test": self._generate_examples("test", cfg.num_test),
    }

  def _generate_examples(self, split: str, count: int):
    for index in range(count):
      image, caption, label = render_split_example(split, index)
      yield index, {"image": encode_png(image), "caption": caption, "label": label}


CONFIG_NAMES = [c.name for c in BigVlpShapes.BUILDER_CONFIGS]


def ensure_built(data_dir: str | None, config: str = "default") -> tfds.core.DatasetBuilder:
  """Returns the `big_vlp_shapes/{config}` builder, generating the data first if needed."""
  check_choice("data.name", f"big_vlp_shapes/{config}",
               [f"big_vlp_shapes/{c}" for c in CONFIG_NAMES])
  if data_dir is not None:
    data_dir = os.fspath(data_dir)
  builder = BigVlpShapes(config=config, data_dir=data_dir)
  if not builder.is_prepared():
    try:
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    except Exception:  # pylint: disable=broad-except
      # Another process sharing data_dir may have completed the same build first.
      builder = BigVlpShapes(config=config, data_dir=data_dir)
      if not builder.is_prepared():
        raise
  return builder
