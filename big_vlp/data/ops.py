"""Pre-processing ops: a pipeline is a string like `decode|resize(64)|value_range(-1, 1)`.

Each op name maps to a registered factory; `name(args)` calls it with Python-literal args and
the factory returns a function from an example dict (str -> tf.Tensor) to a new example dict.

Random ops take their randomness only from `example['_seed']` (a stateless int64 [2] seed
that the input pipeline derives from the example's position in the stream). Before calling
op number i, `get_preprocess_fn` replaces the seed by fold_in(seed, i), so two random ops in
one pipeline draw independent numbers and a resumed run repeats the same augmentations.
"""

import ast
import functools
import inspect
from typing import Any, Callable

import numpy as np
from big_vlp.data import tf_cpu  # noqa: F401  (hides GPUs from TF first)
import tensorflow as tf

from big_vlp.config_errors import ConfigError

Example = dict[str, tf.Tensor]
ExampleFn = Callable[[Example], Example]
SEED_KEY = "_seed"

_REGISTRY: dict[str, Callable[..., ExampleFn]] = {}
_NEEDS_TOKENIZER: set[str] = set()


def register(name: str, *, needs_tokenizer: bool = False):
  """Decorator registering an op factory `factory(*args, **kwargs) -> fn(example) -> example`.

  With `needs_tokenizer=True` the factory also receives `tokenizer=` from get_preprocess_fn.
  """
  def decorate(factory):
    if name in _REGISTRY:
      raise ValueError(f"pre-processing op {name!r} is already registered")
    _REGISTRY[name] = factory
    if needs_tokenizer:
      _NEEDS_TOKENIZER.add(name)
    return factory
  return decorate


def registered_ops() -> list[str]:
  """Names of all registered ops, sorted."""
  return sorted(_REGISTRY)


def parse_spec(spec: str, field: str = "pp") -> list[tuple[str, tuple, dict]]:
  """Splits a pipeline string into (op name, args, kwargs) triples without evaluating code."""
  if not spec.strip():
    return []
  try:
    tree = ast.parse(spec.strip(), mode="eval").body
  except SyntaxError as e:
    raise ConfigError(f"config.{field}={spec!r}: not a valid op pipeline ({e.msg})") from None
  # `a|b(1)|c` parses as a left-nested chain of BitOr; flatten it in order.
  nodes = []
  while isinstance(tree, ast.BinOp) and isinstance(tree.op, ast.BitOr):
    nodes.append(tree.right)
    tree = tree.left
  nodes.append(tree)
  return [_parse_op(node, spec, field) for node in reversed(nodes)]


def _parse_op(node: ast.AST, spec: str, field: str) -> tuple[str, tuple, dict]:
  """One `name` or `name(literal args)` node of the pipeline."""
  if isinstance(node, ast.Name):
    return node.id, (), {}
  if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
    name = node.func.id
    try:
      args = tuple(ast.literal_eval(a) for a in node.args)
      kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except (ValueError, TypeError, SyntaxError):
      raise ConfigError(
          f"config.{field}={spec!r}: arguments of op {name!r} must be Python literals, "
          f"got {ast.unparse(node)!r}") from None
    if None in kwargs:
      raise ConfigError(f"config.{field}={spec!r}: op {name!r} does not take **kwargs")
    return name, args, kwargs
  raise ConfigError(
      f"config.{field}={spec!r}: {ast.unparse(node)!r} is not an op; write `name` or "
      f"`name(args)` separated by '|'")


def get_preprocess_fn(spec: str, tokenizer=None, *, field: str = "pp") -> ExampleFn:
  """Builds the function applying the ops of `spec` in order; errors name config `field`."""
  fns = []
  for name, args, kwargs in parse_spec(spec, field):
    if name not in _REGISTRY:
      raise ConfigError(
          f"config.{field}={spec!r}: unknown op {name!r}; registered ops: "
          + ", ".join(registered_ops()))
    factory = _REGISTRY[name]
    if name in _NEEDS_TOKENIZER:
      if tokenizer is None:
        raise ConfigError(f"config.{field}={spec!r}: op {name!r} needs a tokenizer, none given")
      kwargs = dict(kwargs, tokenizer=tokenizer)
    try:
      inspect.signature(factory).bind(*args, **kwargs)
    except TypeError as e:
      raise ConfigError(
          f"config.{field}={spec!r}: bad arguments for op {name!r}{_signature(factory)}: {e}"
      ) from None
    try:
      fns.append(factory(*args, **kwargs))
    except OpArgError as e:
      raise ConfigError(f"config.{field}={spec!r}: {e}") from None
    except (TypeError, ValueError) as e:
      raise ConfigError(
          f"config.{field}={spec!r}: bad arguments for op {name!r}{_signature(factory)}: {e}"
      ) from None

  def preprocess(example: Example) -> Example:
    example = dict(example)
    for position, fn in enumerate(fns):
      if SEED_KEY in example:
        seed = example[SEED_KEY]
        example[SEED_KEY] = tf.random.experimental.stateless_fold_in(seed, position)
        example = dict(fn(example))
        example[SEED_KEY] = seed
      else:
        example = dict(fn(example))
    return example
  return preprocess


def _signature(factory) -> str:
  """`(size, key='image', ...)`: the op's parameters as a user writes them."""
  params = []
  for p in inspect.signature(factory).parameters.values():
    if p.name == "tokenizer":
      continue
    prefix = "*" if p.kind is p.VAR_POSITIONAL else ""
    default = "" if p.default is p.empty else f"={p.default!r}"
    params.append(f"{prefix}{p.name}{default}")
  return f"({', '.join(params)})"


def op_seed(example: Example, op: str) -> tf.Tensor:
  """The stateless seed a random op must use (already folded with the op's position)."""
  if SEED_KEY not in example:
    raise ValueError(f"random op {op!r} needs example[{SEED_KEY!r}] (an int64 [2] seed); the "
                     "input pipeline adds it, other callers must add it themselves")
  return example[SEED_KEY]


# ----------------------------------------------------------------------------- arguments


class OpArgError(ConfigError):
  """An op factory rejected one of its arguments."""


def _size_arg(op: str, size: Any) -> tuple[int, int]:
  """`size` as (height, width): an int for a square, or a pair."""
  if isinstance(size, int) and not isinstance(size, bool) and size > 0:
    return size, size
  if (isinstance(size, (list, tuple)) and len(size) == 2
      and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
    return int(size[0]), int(size[1])
  raise OpArgError(f"op {op!r}: size must be a positive int or [height, width], got {size!r}")


def _positive_int_arg(op: str, name: str, value: Any) -> int:
  """A positive int (not a bool); the error names the op and the argument."""
  if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
    raise OpArgError(f"op {op!r}: {name} must be a positive int, got {value!r}")
  return value


def _number_arg(op: str, name: str, value: Any, lo: float, hi: float) -> float:
  """A real number in [lo, hi]; the error names the op and the allowed range."""
  if (not isinstance(value, (int, float)) or isinstance(value, bool)
      or not lo <= value <= hi):
    raise OpArgError(f"op {op!r}: {name} must be a number in [{lo:g}, {hi:g}], got {value!r}")
  return float(value)


_RESIZE_METHODS = ("bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5",
                   "gaussian", "mitchellcubic")


def _method_arg(op: str, method: str) -> str:
  if method not in _RESIZE_METHODS:
    raise OpArgError(f"op {op!r}: method={method!r} is not valid; allowed values: "
                     + ", ".join(repr(m) for m in _RESIZE_METHODS))
  return method


def _keys_arg(op: str, keys: tuple) -> tuple[str, ...]:
  if not all(isinstance(k, str) for k in keys):
    raise OpArgError(f"op {op!r}: keys must be strings, got {keys!r}")
  return keys


def _area_arg(op: str, name: str, area: Any) -> tuple[float, float]:
  """An (area_min, area_max) pair of percentages with 0 < area_min <= area_max <= 100."""
  if (isinstance(area, (list, tuple)) and len(area) == 2
      and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in area)
      and 0 < area[0] <= area[1] <= 100):
    return float(area[0]), float(area[1])
  raise OpArgError(f"op {op!r}: {name} must be (area_min, area_max) percentages with "
                   f"0 < area_min <= area_max <= 100, got {area!r}")


def _resize_like_input(image: tf.Tensor, size, method: str) -> tf.Tensor:
  """Resizes and returns the input's dtype (rounded for integer images)."""
  out = tf.image.resize(image, size, method=method)
  if out.dtype == image.dtype:  # 'nearest' keeps the dtype already.
    return out
  if image.dtype.is_integer:
    out = tf.clip_by_value(tf.round(out), image.dtype.min, image.dtype.max)
  return tf.cast(out, image.dtype)


def _on_key(fn: Callable[[tf.Tensor], tf.Tensor], key: str) -> ExampleFn:
  """Lifts a tensor function to an example function that rewrites `example[key]`."""
  def apply(example: Example) -> Example:
    return {**example, key: fn(example[key])}
  return apply


# ----------------------------------------------------------------------------- image ops


@register("decode")
def decode(key: str = "image", channels: int = 3) -> ExampleFn:
  """Decodes PNG/JPEG/GIF/BMP bytes to uint8 [H, W, channels]; decoded images pass through."""
  def fn(image):
    if image.dtype != tf.string:
      return image
    image = tf.io.decode_image(image, channels=channels, expand_animations=False)
    image.set_shape([None, None, channels])
    return image
  return _on_key(fn, key)


@register("resize")
def resize(size, key: str = "image", method: str = "bilinear") -> ExampleFn:
  """Resizes to `size` (int or [h, w]), keeping the dtype."""
  size = _size_arg("resize", size)
  method = _method_arg("resize", method)
  return _on_key(lambda im: _resize_like_input(im, size, method), key)


def _resize_side(size: int, method: str, key: str, longer: bool) -> ExampleFn:
  """Resizes so that the shorter (or longer) side is `size`, keeping aspect ratio and dtype."""
  def fn(image):
    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
    scale = size / (tf.maximum(h, w) if longer else tf.minimum(h, w))
    new = tf.cast(tf.round(tf.stack([h * scale, w * scale])), tf.int32)
    new = tf.clip_by_value(new, 1, size) if longer else tf.maximum(new, size)
    return _resize_like_input(image, new, method)
  return _on_key(fn, key)


@register("resize_small")
def resize_small(size: int, key: str = "image", method: str = "bilinear") -> ExampleFn:
  """Resizes so that the shorter side is `size`, keeping the aspect ratio and dtype."""
  size = _size_arg("resize_small", size)[0]
  return _resize_side(size, _method_arg("resize_small", method), key, longer=False)


@register("resize_long")
def resize_long(size: int, key: str = "image", method: str = "bilinear") -> ExampleFn:
  """Resizes so that the longer side is `size`, keeping the aspect ratio and dtype."""
  size = _positive_int_arg("resize_long", "size", size)
  return _resize_side(size, _method_arg("resize_long", method), key, longer=True)


@register("central_crop")
def central_crop(size, key: str = "image") -> ExampleFn:
  """Crops the central [h, w] window."""
  h, w = _size_arg("central_crop", size)

  def fn(image):
    shape = tf.shape(image)
    top, left = (shape[0] - h) // 2, (shape[1] - w) // 2
    return tf.image.crop_to_bounding_box(image, top, left, h, w)
  return _on_key(fn, key)


@register("random_crop")
def random_crop(size, key: str = "image") -> ExampleFn:
  """Crops a uniformly placed [h, w] window (seeded by `_seed`)."""
  h, w = _size_arg("random_crop", size)

  def fn(example):
    image = example[key]
    crop = tf.image.stateless_random_crop(
        image, [h, w, tf.shape(image)[-1]], seed=op_seed(example, "random_crop"))
    return {**example, key: crop}
  return fn


def _distorted_crop(image: tf.Tensor, seed: tf.Tensor, area_min: float,
                    area_max: float) -> tf.Tensor:
  """An Inception-style window: area_min..area_max % of the image, aspect ratio 3/4..4/3."""
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), tf.zeros([0, 0, 4], tf.float32), seed=seed,
      area_range=(area_min / 100, area_max / 100), aspect_ratio_range=(3 / 4, 4 / 3),
      use_image_if_no_bounding_boxes=True)
  crop = tf.slice(image, begin, crop_size)
  crop.set_shape([None, None, image.shape[-1]])
  return crop


@register("inception_crop")
def inception_crop(size=None, area_min: float = 5, area_max: float = 100, key: str = "image",
                   method: str = "bilinear") -> ExampleFn:
  """Inception-style crop of area_min..area_max % of the image, resized to `size` if given."""
  out_size = None if size is None else _size_arg("inception_crop", size)
  method = _method_arg("inception_crop", method)
  if not 0 < area_min <= area_max <= 100:
    raise OpArgError(
        f"op 'inception_crop': need 0 < area_min <= area_max <= 100, got {area_min}, {area_max}")

  def fn(example):
    image = example[key]
    crop = _distorted_crop(image, op_seed(example, "inception_crop"), area_min, area_max)
    if out_size is not None:
      crop = _resize_like_input(crop, out_size, method)
    return {**example, key: crop}
  return fn


@register("flip_lr")
def flip_lr(key: str = "image") -> ExampleFn:
  """Mirrors left-right with probability 1/2 (seeded by `_seed`)."""
  def fn(example):
    flipped = tf.image.stateless_random_flip_left_right(
        example[key], seed=op_seed(example, "flip_lr"))
    return {**example, key: flipped}
  return fn


@register("multi_crop")
def multi_crop(global_size=224, local_size=96, global_crops: int = 2, local_crops: int = 8,
               global_area=(40, 100), local_area=(5, 40), key: str = "image",
               flip: bool = True, keep_image: bool = False,
               method: str = "bilinear") -> ExampleFn:
  """DINO / SILC multi-crop: `{key}_global` [G, gh, gw, C] and `{key}_local` [L, lh, lw, C].

  Every crop is an independent inception_crop (area in % of the image, aspect ratio
  3/4..4/3) resized to its size, then mirrored left-right with probability 1/2 if `flip`.
  Defaults are SILC's (2 global crops of 40-100% at 224, 8 local crops of 5-40% at 96).
  Put it where inception_crop would go: it keeps the input dtype (uint8 in, uint8 out), so
  value_range / normalize follow, once per output key (`value_range(-1, 1, key='image_global')`).
  Unless `keep_image`, `example[key]` becomes global crop 0, the view the contrastive loss
  sees; with it, `example[key]` is left as it was.
  """
  global_hw = _size_arg("multi_crop", global_size)
  local_hw = _size_arg("multi_crop", local_size)
  num_global = _positive_int_arg("multi_crop", "global_crops", global_crops)
  if not (isinstance(local_crops, int) and not isinstance(local_crops, bool)
          and local_crops >= 0):
    raise OpArgError(f"op 'multi_crop': local_crops must be an int >= 0, got {local_crops!r}")
  global_area = _area_arg("multi_crop", "global_area", global_area)
  local_area = _area_arg("multi_crop", "local_area", local_area)
  method = _method_arg("multi_crop", method)
  _keys_arg("multi_crop", (key,))
  views = [(global_hw, global_area)] * num_global + [(local_hw, local_area)] * local_crops

  def crop_view(image, size, area, box_seed, flip_seed):
    crop = _resize_like_input(_distorted_crop(image, box_seed, *area), size, method)
    if flip:
      crop = tf.image.stateless_random_flip_left_right(crop, seed=flip_seed)
    return crop

  def fn(example):
    image = example[key]
    if image.shape.rank is not None and image.shape.rank != 3:
      raise ValueError(f"op 'multi_crop' needs an image [H, W, C] in example[{key!r}], got "
                       f"shape {image.shape}")
    # Two seeds per crop (window, flip), all drawn from the op's seed: the crops of one
    # example are independent of each other and repeat exactly for the same seed.
    seeds = tf.random.experimental.stateless_split(op_seed(example, "multi_crop"),
                                                   2 * len(views))
    crops = [crop_view(image, size, area, seeds[2 * i], seeds[2 * i + 1])
             for i, (size, area) in enumerate(views)]
    out = {**example, f"{key}_global": tf.stack(crops[:num_global])}
    if local_crops:
      out[f"{key}_local"] = tf.stack(crops[num_global:])
    else:
      out[f"{key}_local"] = tf.zeros([0, *local_hw, tf.shape(image)[-1]], image.dtype)
    if not keep_image:
      out[key] = crops[0]
    return out
  return fn


@register("value_range")
def value_range(vmin: float, vmax: float, in_min: float = 0, in_max: float = 255,
                clip_values: bool = False, key: str = "image") -> ExampleFn:
  """Maps [in_min, in_max] linearly to [vmin, vmax] as float32."""
  if in_max == in_min:
    raise OpArgError(f"op 'value_range': in_min and in_max must differ, both are {in_min}")

  def fn(image):
    image = tf.cast(image, tf.float32)
    image = vmin + (image - in_min) * ((vmax - vmin) / (in_max - in_min))
    if clip_values:
      image = tf.clip_by_value(image, min(vmin, vmax), max(vmin, vmax))
    return image
  return _on_key(fn, key)


@register("normalize")
def normalize(mean, std, key: str = "image") -> ExampleFn:
  """(image - mean) / std in float32; mean and std are scalars or per-channel lists."""
  if not np.all(np.asarray(std, np.float32) != 0):
    raise OpArgError(f"op 'normalize': std must be non-zero, got {std!r}")
  mean_t = tf.constant(mean, tf.float32)
  std_t = tf.constant(std, tf.float32)
  return _on_key(lambda im: (tf.cast(im, tf.float32) - mean_t) / std_t, key)


# ----------------------------------------------------------------------------- RandAugment
#
# The sub-ops below follow big_vision's pp/autoaugment.py (the TF TPU EfficientNet code) in
# pure TF, on uint8 [H, W, 3] images, returning uint8 of the same shape. Where that code
# meant "equivalent of PIL X" but computes something else, these follow PIL exactly:
#  - Contrast blends towards the mean grey level (big_vision's mean is #pixels / 256, a bug);
#  - Color/Contrast use PIL's integer ITU-R 601 grey, Sharpness PIL's rounded SMOOTH filter;
#  - Posterize(0 bits) gives black (a TF right shift by 8 is clamped to 7 in big_vision);
#  - Solarize(threshold 256), i.e. magnitude 10, is the identity as in PIL (in big_vision,
#    under TF 2.21 at least, the uint8 comparison wraps 256 to 0 and inverts every pixel).

GREY = 128  # Fill for pixels that geometric ops and Cutout leave empty, as in big_vision.
RANDAUG_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color",
               "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX",
               "TranslateY", "Cutout", "SolarizeAdd")


def blend(image1: tf.Tensor, image2: tf.Tensor, factor: float) -> tf.Tensor:
  """image1 + factor * (image2 - image1) in float32, clipped to [0, 255], truncated (PIL).

  `image1` may broadcast against `image2` (a grey [H, W, 1] image, a scalar).
  """
  if factor == 1.0:
    return image2
  if factor == 0.0:
    return tf.broadcast_to(image1, tf.shape(image2))
  a, b = tf.cast(image1, tf.float32), tf.cast(image2, tf.float32)
  return tf.cast(tf.clip_by_value(a + factor * (b - a), 0.0, 255.0), tf.uint8)


def _select(condition: tf.Tensor, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
  """tf.where(condition, x, y) for uint8 via bit masks (SelectV2 is slower on CPU)."""
  mask = tf.cast(condition, tf.uint8) * 255
  return tf.bitwise.bitwise_or(tf.bitwise.bitwise_and(x, mask),
                               tf.bitwise.bitwise_and(y, tf.bitwise.invert(mask)))


def grey(image: tf.Tensor) -> tf.Tensor:
  """uint8 [H, W] luma as PIL's convert('L'): (19595 R + 38470 G + 7471 B + 2^15) >> 16."""
  rgb = tf.cast(image, tf.int32)
  luma = rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000
  return tf.cast(tf.bitwise.right_shift(luma, 16), tf.uint8)


def _per_channel_lut(image: tf.Tensor, lut: tf.Tensor) -> tf.Tensor:
  """Maps value v of channel c to lut[c, v]; `lut` is int [3, 256] with values in [0, 255]."""
  lut = tf.cast(lut, tf.uint8)
  return tf.stack([tf.gather(lut[c], tf.cast(image[..., c], tf.int32)) for c in range(3)], -1)


def _histograms(image: tf.Tensor) -> tf.Tensor:
  """int32 [3, 256]: the value histogram of each channel."""
  return tf.stack([tf.histogram_fixed_width(tf.cast(image[..., c], tf.int32), [0, 255], 256)
                   for c in range(3)])


def autocontrast(image: tf.Tensor) -> tf.Tensor:
  """Stretches each channel linearly so its min becomes 0 and max 255 (PIL autocontrast).

  Computed as PIL does, in float64: int(value * scale + offset), offset = -lo * scale.
  """
  lo = tf.cast(tf.reduce_min(image, axis=[0, 1]), tf.float64)
  hi = tf.cast(tf.reduce_max(image, axis=[0, 1]), tf.float64)
  scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1.0), 1.0)  # Constant channels stay.
  offset = tf.where(hi > lo, -lo * scale, 0.0)
  out = tf.floor(tf.cast(image, tf.float64) * scale + offset)
  return tf.cast(tf.clip_by_value(out, 0.0, 255.0), tf.uint8)


def equalize(image: tf.Tensor) -> tf.Tensor:
  """Histogram-equalizes each channel (PIL ImageOps.equalize)."""
  hist = _histograms(image)
  top = tf.cast(tf.reduce_max(image, axis=[0, 1]), tf.int32)  # The last non-empty bin.
  step = (tf.reduce_sum(hist, axis=1) - tf.gather(hist, top, batch_dims=1)) // 255
  step = step[:, None]
  lut = (tf.cumsum(hist, axis=1) + step // 2) // tf.maximum(step, 1)
  lut = tf.clip_by_value(tf.concat([tf.zeros([3, 1], tf.int32), lut[:, :-1]], axis=1), 0, 255)
  lut = tf.where(step == 0, tf.range(256)[None, :], lut)
  return _per_channel_lut(image, lut)


def invert(image: tf.Tensor) -> tf.Tensor:
  """255 - image."""
  return 255 - image


def posterize(image: tf.Tensor, bits: int) -> tf.Tensor:
  """Keeps the `bits` (0..8) most significant bits of every value (PIL ImageOps.posterize)."""
  mask = (0xFF << (8 - bits)) & 0xFF
  return tf.bitwise.bitwise_and(image, tf.constant(mask, tf.uint8))


def solarize(image: tf.Tensor, threshold: int) -> tf.Tensor:
  """Inverts the values >= `threshold` (a Python int); above 255 nothing changes."""
  if threshold > 255:
    return image
  above = tf.cast(image >= tf.constant(max(threshold, 0), tf.uint8), tf.uint8)
  return tf.bitwise.bitwise_xor(image, above * 255)  # v ^ 255 == 255 - v.


def solarize_add(image: tf.Tensor, addition: int, threshold: int = 128) -> tf.Tensor:
  """Adds `addition` (clipped to [0, 255]) to the values below `threshold` (Python ints)."""
  if threshold <= 0 or addition == 0:
    return image
  below = tf.ones_like(image) if threshold > 255 else tf.cast(image < threshold, tf.uint8)
  if addition > 0:  # uint8 arithmetic, never leaving [0, 255].
    return image + below * tf.minimum(255 - image, min(addition, 255))
  return image - below * tf.minimum(image, min(-addition, 255))


def color(image: tf.Tensor, factor: float) -> tf.Tensor:
  """Blends with the image's greyscale version (PIL ImageEnhance.Color)."""
  return blend(tf.tile(grey(image)[..., None], [1, 1, 3]), image, factor)


def contrast(image: tf.Tensor, factor: float) -> tf.Tensor:
  """Blends with a flat image of the mean grey level, rounded (PIL ImageEnhance.Contrast)."""
  mean = tf.reduce_mean(tf.cast(grey(image), tf.float64))
  return blend(tf.cast(tf.floor(mean + 0.5), tf.uint8), image, factor)


def brightness(image: tf.Tensor, factor: float) -> tf.Tensor:
  """Blends with black (PIL ImageEnhance.Brightness)."""
  return blend(tf.constant(0, tf.uint8), image, factor)


def sharpness(image: tf.Tensor, factor: float) -> tf.Tensor:
  """Blends with PIL's SMOOTH filter of the image, whose border pixels stay unfiltered."""
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32)  # / 13 below.
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  sums = tf.nn.depthwise_conv2d(tf.cast(image, tf.float32)[None], kernel, [1, 1, 1, 1],
                                "SAME")[0]  # Exact integers, so the rounding matches PIL.
  smooth = tf.cast(tf.floor(sums / 13.0 + 0.5), tf.uint8)
  shape = tf.shape(image)
  rows, cols = tf.range(shape[0]), tf.range(shape[1])
  inner = (((rows > 0) & (rows < shape[0] - 1))[:, None, None]
           & ((cols > 0) & (cols < shape[1] - 1))[None, :, None])
  return blend(_select(inner, smooth, image), image, factor)


def transform(image: tf.Tensor, matrix) -> tf.Tensor:
  """Projective transform with nearest-neighbour sampling; pixels from outside are GREY.

  `matrix` is [a0, a1, a2, b0, b1, b2, c0, c1] mapping each output pixel (x, y) to the input
  point ((a0 x + a1 y + a2) / k, (b0 x + b1 y + b2) / k), k = c0 x + c1 y + 1, as in tfa.
  """
  matrix = tf.reshape(tf.cast(tf.stack(matrix), tf.float32), [1, 8])
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=matrix, output_shape=tf.shape(image)[:2],
      fill_value=float(GREY), interpolation="NEAREST", fill_mode="CONSTANT")
  return out[0]


def rotate(image: tf.Tensor, degrees) -> tf.Tensor:
  """Rotates counter-clockwise about the image centre (tfa.image.rotate)."""
  radians = tf.cast(degrees, tf.float32) * (np.pi / 180)
  shape = tf.cast(tf.shape(image), tf.float32)
  h, w = shape[0] - 1, shape[1] - 1
  cos, sin = tf.cos(radians), tf.sin(radians)
  x_offset = (w - (cos * w - sin * h)) / 2
  y_offset = (h - (sin * w + cos * h)) / 2
  return transform(image, [cos, -sin, x_offset, sin, cos, y_offset, 0.0, 0.0])


def shear_x(image: tf.Tensor, level) -> tf.Tensor:
  """Output (x, y) samples the input at (x + level * y, y)."""
  return transform(image, [1.0, level, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])


def shear_y(image: tf.Tensor, level) -> tf.Tensor:
  """Output (x, y) samples the input at (x, level * x + y)."""
  return transform(image, [1.0, 0.0, 0.0, level, 1.0, 0.0, 0.0, 0.0])


def translate_x(image: tf.Tensor, pixels) -> tf.Tensor:
  """Moves the content `pixels` to the LEFT (output x samples input x + pixels), as big_vision."""
  return transform(image, [1.0, 0.0, pixels, 0.0, 1.0, 0.0, 0.0, 0.0])


def translate_y(image: tf.Tensor, pixels) -> tf.Tensor:
  """Moves the content `pixels` UP (output y samples input y + pixels), as big_vision."""
  return transform(image, [1.0, 0.0, 0.0, 0.0, 1.0, pixels, 0.0, 0.0])


def cutout_at(image: tf.Tensor, center_y, center_x, pad_size: int) -> tf.Tensor:
  """Greys rows [cy - pad, cy + pad) x columns [cx - pad, cx + pad), clipped to the image."""
  shape = tf.shape(image)
  top = tf.clip_by_value(center_y - pad_size, 0, shape[0])
  bottom = tf.clip_by_value(center_y + pad_size, 0, shape[0])
  left = tf.clip_by_value(center_x - pad_size, 0, shape[1])
  right = tf.clip_by_value(center_x + pad_size, 0, shape[1])
  grey_box = tf.fill([bottom - top, right - left, shape[2]], tf.constant(GREY, image.dtype))
  band = image[top:bottom]
  band = tf.concat([band[:, :left], grey_box, band[:, right:]], axis=1)
  out = tf.concat([image[:top], band, image[bottom:]], axis=0)  # Copies: faster than a where.
  out.set_shape(image.shape)
  return out


def cutout_center(image: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """The (y, x) centre of a Cutout square, uniform over the pixels, drawn from `seed`."""
  shape = tf.shape(image)
  y_seed, x_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  y = tf.random.stateless_uniform([], y_seed, maxval=shape[0], dtype=tf.int32)
  x = tf.random.stateless_uniform([], x_seed, maxval=shape[1], dtype=tf.int32)
  return y, x


def cutout(image: tf.Tensor, pad_size: int, seed: tf.Tensor) -> tf.Tensor:
  """Greys a (2 pad_size)^2 square centred uniformly at random (Cutout, DeVries & Taylor)."""
  center_y, center_x = cutout_center(image, seed)
  return cutout_at(image, center_y, center_x, pad_size)


def randaug_branches(magnitude: float, translate_const: float = 100,
                     cutout_const: float = 40) -> dict[str, Callable]:
  """RANDAUG_OPS name -> fn(image, sign, seed) at `magnitude` (out of 10), as big_vision.

  `sign` (+-1.0) is the random sign of the signed ops; `seed` seeds Cutout's position.
  """
  level = magnitude / 10
  enhance = level * 1.8 + 0.1
  return {
      "AutoContrast": lambda im, sign, seed: autocontrast(im),
      "Equalize": lambda im, sign, seed: equalize(im),
      "Invert": lambda im, sign, seed: invert(im),
      "Rotate": lambda im, sign, seed: rotate(im, sign * (level * 30)),
      "Posterize": lambda im, sign, seed: posterize(im, min(int(level * 4), 8)),
      "Solarize": lambda im, sign, seed: solarize(im, int(level * 256)),
      "Color": lambda im, sign, seed: color(im, enhance),
      "Contrast": lambda im, sign, seed: contrast(im, enhance),
      "Brightness": lambda im, sign, seed: brightness(im, enhance),
      "Sharpness": lambda im, sign, seed: sharpness(im, enhance),
      "ShearX": lambda im, sign, seed: shear_x(im, sign * (level * 0.3)),
      "ShearY": lambda im, sign, seed: shear_y(im, sign * (level * 0.3)),
      "TranslateX": lambda im, sign, seed: translate_x(im, sign * (level * translate_const)),
      "TranslateY": lambda im, sign, seed: translate_y(im, sign * (level * translate_const)),
      "Cutout": lambda im, sign, seed: cutout(im, int(level * cutout_const), seed),
      "SolarizeAdd": lambda im, sign, seed: solarize_add(im, int(level * 110)),
  }


def randaug_draws(seed: tf.Tensor, layer: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """(op index into RANDAUG_OPS, sign +-1.0, Cutout seed) of RandAugment layer `layer`."""
  layer_seed = tf.random.experimental.stateless_fold_in(seed, layer)
  op_seed_, sign_seed, cutout_seed = tf.unstack(
      tf.random.experimental.stateless_split(layer_seed, 3))
  index = tf.random.stateless_uniform([], op_seed_, maxval=len(RANDAUG_OPS), dtype=tf.int32)
  sign = tf.where(tf.random.stateless_uniform([], sign_seed) < 0.5, -1.0, 1.0)
  return index, sign, cutout_seed


@register("randaug")
def randaug(num_layers: int = 2, magnitude: float = 10, key: str = "image",
            translate_const: float = 100, cutout_const: float = 40) -> ExampleFn:
  """RandAugment (Cubuk et al. 2019) of a uint8 [H, W, 3] image, as big_vision's `randaug`.

  Each of `num_layers` layers applies one op of RANDAUG_OPS chosen uniformly, at the fixed
  `magnitude` (0..30; 10 is the paper's maximum). With m = magnitude / 10:
    Rotate +-30m degrees, ShearX/Y +-0.3m, TranslateX/Y +-m * translate_const pixels
    (absolute pixels as big_vision: 100 suits 224-331 px images), each sign a coin flip;
    Color/Contrast/Brightness/Sharpness blend factor 0.1 + 1.8m (1 is the identity);
    Posterize keeps int(4m) bits (clipped to 8), Solarize threshold int(256m),
    SolarizeAdd adds int(110m) below 128, Cutout a grey square of side 2 int(m * cutout_const);
    AutoContrast, Equalize and Invert ignore the magnitude.
  As in big_vision, Posterize and Solarize get MILDER as the magnitude grows: from magnitude 10
  on Solarize is the identity, and below 2.5 Posterize keeps 0 bits (a black image).
  Empty pixels are GREY (128). All draws come from the op's stateless seed.
  """
  if not (isinstance(num_layers, int) and not isinstance(num_layers, bool) and num_layers >= 0):
    raise OpArgError(f"op 'randaug': num_layers must be an int >= 0, got {num_layers!r}")
  magnitude = _number_arg("randaug", "magnitude", magnitude, 0, 30)
  translate_const = _number_arg("randaug", "translate_const", translate_const, 0, 1e4)
  cutout_const = _number_arg("randaug", "cutout_const", cutout_const, 0, 1e4)
  branches = randaug_branches(magnitude, translate_const, cutout_const)
  branches = [branches[name] for name in RANDAUG_OPS]

  def fn(example):
    image = example[key]
    if image.dtype != tf.uint8:
      raise ValueError(f"op 'randaug' needs a uint8 image in example[{key!r}], got "
                       f"{image.dtype.name}; put it before value_range/normalize")
    if not image.shape.is_compatible_with([None, None, 3]):
      raise ValueError(f"op 'randaug' needs an RGB image [H, W, 3] in example[{key!r}], "
                       f"got shape {image.shape}")
    image = tf.ensure_shape(image, [None, None, 3])
    seed = op_seed(example, "randaug")
    for layer in range(num_layers):
      index, sign, cutout_seed = randaug_draws(seed, layer)
      out = tf.switch_case(index, [functools.partial(b, image, sign, cutout_seed)
                                   for b in branches])
      out.set_shape(image.shape)
      image = out
    return {**example, key: image}
  return fn


# ----------------------------------------------------------------------------- text ops


@register("tokenize", needs_tokenizer=True)
def tokenize(max_len: int, key: str = "caption", out_key: str = "text", lower: bool = True,
             *, tokenizer) -> ExampleFn:
  """Encodes a string (or a vector of strings) to int32 ids [.., max_len], EOS-terminated."""
  if not isinstance(max_len, int) or max_len < 1:
    raise OpArgError(f"op 'tokenize': max_len must be a positive int, got {max_len!r}")
  encode = functools.partial(tokenizer.encode_tf, max_len=max_len, lower=lower)

  def fn(example):
    text = example[key]
    if text.shape.rank == 0:
      ids = encode(text)
    else:  # Several captions per image (e.g. retrieval sets): one row each.
      ids = tf.map_fn(encode, text, fn_output_signature=tf.TensorSpec([max_len], tf.int32))
    return {**example, out_key: ids}
  return fn


@register("lower")
def lowercase(key: str = "caption") -> ExampleFn:
  """Lower-cases a string or a tensor of strings, UTF-8 aware ('ÉCOLE' -> 'école')."""
  _keys_arg("lower", (key,))
  return _on_key(lambda text: tf.strings.lower(text, encoding="utf-8"), key)


# Empty or whitespace-only text (Unicode spaces, a byte-order mark): no caption at all.
_BLANK = r"[\s\v\p{Z}\x{85}\x{feff}]*"


@register("choice")
def choice(key: str = "caption", out_key: str | None = None,
           also: str | tuple[str, ...] = ()) -> ExampleFn:
  """Picks one entry of a vector `example[key]` uniformly (seeded) into `out_key or key`.

  Blank strings (empty or whitespace only) are never picked: tokenized, a caption without
  text is a bare end-of-text token, never a useful training pair. With nothing to pick (an
  empty vector, only blank strings, a blank scalar string) it raises, so the training input
  drops the example and counts it in data/skipped. Other scalars pass through unchanged.

  `also` names features aligned with `key` along their first axis (e.g. 'teacher_ztxt',
  one stored embedding [C, D] per caption): each is replaced by its row at the index picked
  from `key`, so it keeps describing the chosen entry. A scalar `key` counts as one entry.
  """
  also = (also,) if isinstance(also, str) else also
  if not isinstance(also, (tuple, list)):
    raise OpArgError(f"op 'choice': also must be a key or a tuple of keys, got {also!r}")
  also = _keys_arg("choice", tuple(also))
  _keys_arg("choice", (key,) if out_key is None else (key, out_key))
  out_key = out_key or key
  if key in also or out_key in also or len(set(also)) != len(also):
    raise OpArgError(f"op 'choice': also={also!r} must name other keys than key={key!r} and "
                     f"out_key={out_key!r}, each once")
  message = f"op 'choice': nothing to pick in example[{key!r}] (empty, or only blank text)"

  def aligned(example: Example, count: tf.Tensor, static_count: int | None) -> dict:
    """The `also` features, checked to have `count` rows along their first axis."""
    out = {}
    for k in also:
      value = example[k]
      if value.shape.rank == 0:
        raise OpArgError(f"op 'choice': also key {k!r} must have a first axis aligned with "
                         f"example[{key!r}], got a scalar")
      rows = value.shape[0] if value.shape.rank is not None else None
      if rows is not None and static_count is not None and rows != static_count:
        raise OpArgError(f"op 'choice': example[{k!r}] has {rows} rows along its first axis "
                         f"but example[{key!r}] has {static_count} entries; also keys must be "
                         "aligned with it")
      check = tf.debugging.assert_equal(
          tf.shape(value, out_type=tf.int32)[0], count,
          message=f"op 'choice': example[{k!r}] must have as many rows along its first axis "
                  f"as example[{key!r}] has entries")
      with tf.control_dependencies([check]):
        out[k] = tf.identity(value)
    return out

  def fn(example):
    values = example[key]
    rank = values.shape.rank
    text = values.dtype == tf.string
    if rank == 0:
      if text:
        blank = tf.strings.regex_full_match(values, _BLANK)
        with tf.control_dependencies([tf.debugging.Assert(tf.logical_not(blank), [message])]):
          values = tf.identity(values)
      rows = {k: v[0] for k, v in aligned(example, tf.constant(1), 1).items()} if also else {}
      return {**example, out_key: values, **rows}
    if rank is not None and rank > 1:
      raise ValueError(f"op 'choice' needs a scalar or a vector in example[{key!r}], got "
                       f"shape {values.shape}")
    checks = [] if rank == 1 else [tf.debugging.assert_less_equal(
        tf.rank(values), 1, message=f"op 'choice': example[{key!r}] must be a scalar or vector")]
    with tf.control_dependencies(checks):
      flat = tf.reshape(values, [-1])  # A scalar of unknown rank becomes a 1-vector.
    entries = flat
    if text:
      keep = tf.logical_not(tf.strings.regex_full_match(flat, _BLANK))
      if also:  # Where each pickable entry sits in `entries`: the row of the `also` keys.
        positions = tf.where(keep)[:, 0]
      flat = tf.boolean_mask(flat, keep)
    with tf.control_dependencies([tf.debugging.assert_positive(tf.size(flat), message)]):
      index = tf.random.stateless_uniform([], op_seed(example, "choice"),
                                          maxval=tf.size(flat), dtype=tf.int32)
    out = {**example, out_key: tf.gather(flat, index)}
    if also:
      row = tf.gather(positions, index) if text else index
      static_count = entries.shape[0] if rank == 1 else None
      for k, value in aligned(example, tf.size(entries), static_count).items():
        out[k] = tf.gather(value, row)
    return out
  return fn


# ----------------------------------------------------------------------------- dict ops


@register("keep")
def keep(*keys: str) -> ExampleFn:
  """Keeps only `keys` (and the pipeline's `_seed`)."""
  keys = set(_keys_arg("keep", keys)) | {SEED_KEY}
  return lambda example: {k: v for k, v in example.items() if k in keys}


@register("drop")
def drop(*keys: str) -> ExampleFn:
  """Removes `keys` (never the pipeline's `_seed`)."""
  keys = set(_keys_arg("drop", keys)) - {SEED_KEY}
  return lambda example: {k: v for k, v in example.items() if k not in keys}


@register("copy")
def copy(src: str, dst: str) -> ExampleFn:
  """Sets example[dst] = example[src]."""
  _keys_arg("copy", (src, dst))
  return lambda example: {**example, dst: example[src]}
