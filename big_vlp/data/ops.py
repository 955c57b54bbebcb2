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


@register("resize_small")
def resize_small(size: int, key: str = "image", method: str = "bilinear") -> ExampleFn:
  """Resizes so that the shorter side is `size`, keeping the aspect ratio and dtype."""
  size = _size_arg("resize_small", size)[0]
  method = _method_arg("resize_small", method)

  def fn(image):
    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
    scale = size / tf.minimum(h, w)
    new = tf.cast(tf.round(tf.stack([h * scale, w * scale])), tf.int32)
    return _resize_like_input(image, tf.maximum(new, size), method)
  return _on_key(fn, key)


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
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), tf.zeros([0, 0, 4], tf.float32), seed=op_seed(example, "inception_crop"),
        area_range=(area_min / 100, area_max / 100), aspect_ratio_range=(3 / 4, 4 / 3),
        use_image_if_no_bounding_boxes=True)
    crop = tf.slice(image, begin, crop_size)
    crop.set_shape([None, None, image.shape[-1]])
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
