"""Builds a tfds dataset on disk from an image-text corpus (webdataset tars, a folder, classes).

The result lives in `DATA_DIR/NAME/1.0.0/` as tfds-named TFRecord shards plus tfds metadata,
so `tfds.builder(NAME, data_dir=DATA_DIR)` reads it in any process, with no builder class:

  DATA_DIR/NAME/1.0.0/NAME-train.tfrecord-00000-of-00012   (shards, in input order)
  DATA_DIR/NAME/1.0.0/dataset_info.json, features.json      (tfds metadata, all splits)
  DATA_DIR/NAME/1.0.0/build_summary_train.json              (counts, skips, throughput)
  DATA_DIR/NAME/1.0.0.incomplete-build/train/               (staging; gone once built)

Formats (`--format`):
  webdataset  tars as img2dataset writes them: KEY.jpg|jpeg|png|webp + KEY.txt [+ KEY.json].
  folder      captions.jsonl ({"image": path, "caption": str or [str]}) or an open_clip
              style .csv/.tsv (image path column + caption column).
  classes     ROOT/<class dir>/*.jpg (ImageNet style) -> ClassLabel `label`, for zero-shot eval.

Features: image-text datasets have `image` (JPEG/PNG bytes), `caption` (Text, or Sequence(Text)
when any record has a list of captions), `key` (unique source id) and `meta` (the webdataset
json, else ""); classes datasets have `image`, `label` and `key`.

Work is split into tasks (one per tar; chunks of `examples_per_shard` shuffled entries for
folder/classes) that run in a 'spawn' process pool. Workers only use PIL (plus this module):
they validate and re-encode images, serialize tf.train.Example protos themselves and write
length-prefixed record files; the parent frames those as TFRecords (TensorFlow computes the
CRC32C checksums) and writes a per-task stats file, each file renamed into place atomically.
A rerun of the same command skips the tasks whose outputs are complete, so an interrupted
build resumes and ends with exactly the examples of an uninterrupted one. Bad input (corrupt
or truncated images, empty captions, missing pairs, malformed records...) is skipped and
counted by reason: see `REASONS`. Local file systems only; run one build at a time per
dataset (builds of different splits rewrite the same metadata).
"""

import argparse
import csv
import dataclasses
import glob
import hashlib
import io
import json
import multiprocessing
import multiprocessing.pool
import os
import posixpath
import random
import re
import shutil
import struct
import sys
import tarfile
import time
from typing import Any, Iterator, Sequence
import zlib

from PIL import Image
from PIL import ImageFile

from big_vlp.config_errors import ConfigError

# This module is imported by TensorFlow-free worker processes: TensorFlow and tfds are only
# imported inside the functions that the parent process runs.

FORMATS = ("webdataset", "folder", "classes")
VERSION = "1.0.0"
STAGING_SUFFIX = ".incomplete-build"
WEBDATASET_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # In order of preference.
CLASS_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
IMAGE_COLUMNS = ("filepath", "image", "image_path", "file", "path")
CAPTION_COLUMNS = ("title", "caption", "text")
JPEG_QUALITY = 95
KEYS_PER_REASON = 5  # Example keys listed per skip reason in the summary.
# Test-only hook: seconds each task sleeps first, to give restart tests time to kill a build.
TASK_DELAY_ENV = "BIG_VLP_BUILD_TEST_TASK_DELAY_S"
REASONS = {
    "missing_image": "no image for the key / the image file does not exist",
    "missing_caption": "no caption (.txt) for the image / no caption in the record",
    "undecodable_caption": "caption is not valid UTF-8",
    "empty_caption": "caption empty or whitespace only (all of them, for caption lists)",
    "empty_image": "image file of zero bytes, or an image of zero width or height",
    "unreadable_image": "the image file exists but cannot be read (permissions, I/O error)",
    "undecodable_image": "PIL cannot fully decode the image (corrupt, truncated, unknown)",
    "bad_record": "malformed jsonl/csv line, or a field of the wrong type",
    "duplicate_key": "a tar holds the same key again after other keys",
    "bad_tar": "the tar is unreadable or truncated; the samples after the damage are lost",
}
_BUILD_FILES_VERSION = 1  # Bump when staging files change meaning: old staging is rejected.


class BuildError(RuntimeError):
  """The build cannot go on (command-line exit code 1)."""


class BuildArgError(ConfigError):
  """A flag holds a value the build cannot use (command-line exit code 2)."""


def _flag_error(flag: str, value: Any, why: str) -> None:
  raise BuildArgError(f"--{flag}={value!r}: {why}")


@dataclasses.dataclass(frozen=True)
class BuildConfig:
  """What to build; mirrors the command-line flags (see `parse_args`)."""
  format: str
  inputs: Sequence[str]
  name: str
  data_dir: str
  split: str | None = None  # Default: "test" for classes, else "train".
  workers: int | None = None  # Default: os.cpu_count().
  class_names: str | None = None
  image_key: str | None = None
  caption_key: str | None = None
  max_size: int | None = None
  examples_per_shard: int = 2048
  seed: int = 0
  overwrite: bool = False


# ----------------------------------------------------------------------------------------------
# Worker side: PIL only.


@dataclasses.dataclass(frozen=True)
class _Task:
  """One unit of work: a tar, or a chunk of (key, image path, caption or label) entries."""
  index: int
  staging: str
  examples_per_shard: int
  max_size: int | None
  kind: str  # "text" | "sequence" (caption feature) | "label".
  tar_path: str | None = None
  tar_label: str | None = None  # Key prefix of the tar's samples.
  entries: tuple = ()


def _varint(value: int) -> bytes:
  value &= (1 << 64) - 1
  out = bytearray()
  while True:
    bits, value = value & 0x7F, value >> 7
    if not value:
      out.append(bits)
      return bytes(out)
    out.append(bits | 0x80)


def _field(number: int, payload: bytes) -> bytes:
  """A length-delimited protobuf field."""
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _bytes_feature(values: Sequence[bytes]) -> bytes:
  return _field(1, b"".join(_field(1, v) for v in values))  # Feature.bytes_list.value


def _int64_feature(values: Sequence[int]) -> bytes:
  return _field(3, _field(1, b"".join(_varint(v) for v in values)))  # Packed int64_list.


def serialize_example(features: dict[str, bytes]) -> bytes:
  """A serialized tf.train.Example of {name: serialized tf.train.Feature}, without TF.

  What tfds' `features.serialize_example(features.encode_example(ex))` gives for the
  features of this module (same parse; map entries are written sorted, so deterministic).
  """
  entries = b"".join(_field(1, _field(1, k.encode()) + _field(2, v))
                     for k, v in sorted(features.items()))
  return _field(1, entries)  # Example.features.feature


def _text(value: str) -> bytes:
  """UTF-8 bytes of an id-like string; undecodable file-name bytes become escapes."""
  return value.encode("utf-8", "backslashreplace")


def _resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
  if width <= height:
    return short_side, max(1, round(height * short_side / width))
  return max(1, round(width * short_side / height)), short_side


def _keep_bytes(image: Image.Image, raw: bytes) -> bool:
  """Whether the original bytes are a JPEG/PNG that tfds decodes to the same 8-bit pixels."""
  if image.mode not in ("RGB", "L"):
    return False
  if image.format in ("JPEG", "MPO"):  # MPO: a camera JPEG with extra frames appended.
    return True
  # PNG: PIL shows 16-bit RGB as 8-bit 'RGB'; the IHDR bit depth (byte 24) tells.
  return image.format == "PNG" and len(raw) > 24 and raw[24] == 8


def _to_rgb(image: Image.Image) -> Image.Image:
  """An 8-bit RGB version; transparency is composited onto white, 16-bit scaled down."""
  if image.mode.startswith("I") or image.mode == "F":
    import numpy as np  # pylint: disable=import-outside-toplevel
    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16") or values.max() > 255:
      values = values / 257.0
    image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
  if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
    rgba = image.convert("RGBA")
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background
  return image.convert("RGB")


def prepare_image(raw: bytes, max_size: int | None = None) -> tuple[bytes | None, str]:
  """Validates encoded image bytes: (bytes to store, action) or (None, skip reason).

  Action is "kept" (original JPEG/PNG bytes), "reencoded" (another format or mode, stored as
  JPEG quality 95) or "resized" (shorter side above `max_size`, scaled to it, JPEG q95).
  """
  if not raw:
    return None, "empty_image"
  try:
    with Image.open(io.BytesIO(raw)) as image:
      image.load()  # Decodes every pixel: truncated data fails here.
      width, height = image.size
      if width == 0 or height == 0:
        return None, "empty_image"
      resize = max_size is not None and min(width, height) > max_size
      if not resize and _keep_bytes(image, raw):
        return raw, "kept"
      rgb = _to_rgb(image)
      if resize:
        rgb = rgb.resize(_resized_size(width, height, max_size), Image.Resampling.BICUBIC)
      out = io.BytesIO()
      rgb.save(out, "JPEG", quality=JPEG_QUALITY)
      return out.getvalue(), "resized" if resize else "reencoded"
  except Exception:  # pylint: disable=broad-except  # PIL raises many types on bad data.
    return None, "undecodable_image"


def _clean_captions(value: Any) -> tuple[list[str] | None, str | None]:
  """Stripped non-empty captions of a str / bytes / list, or (None, skip reason)."""
  if value is None:
    return None, "missing_caption"
  values = value if isinstance(value, list) else [value]
  captions = []
  for v in values:
    if isinstance(v, bytes):
      try:
        v = v.decode("utf-8")
      except UnicodeDecodeError:
        return None, "undecodable_caption"
    if not isinstance(v, str):
      return None, "bad_record"
    try:
      v.encode("utf-8")  # Lone surrogates: bytes that were not UTF-8 in a csv / jsonl file.
    except UnicodeEncodeError:
      return None, "undecodable_caption"
    v = v.strip().lstrip("\ufeff").strip()
    if v:
      captions.append(v)
  if not captions:
    return None, "empty_caption"
  return captions, None


class _TaskStats:
  """Counts of one task (or of the parent's record parsing)."""

  def __init__(self):
    self.written = 0
    self.skipped: dict[str, int] = {}
    self.skipped_keys: dict[str, list[str]] = {}
    self.images: dict[str, int] = {}

  def skip(self, reason: str, key: str) -> None:
    self.skipped[reason] = self.skipped.get(reason, 0) + 1
    keys = self.skipped_keys.setdefault(reason, [])
    if len(keys) < KEYS_PER_REASON:
      keys.append(key)

  def as_dict(self) -> dict:
    return {"written": self.written, "skipped": self.skipped,
            "skipped_keys": self.skipped_keys, "images": self.images}


class _PartWriter:
  """Writes a task's records into parts of at most `per_part` (length-prefixed files)."""

  def __init__(self, staging: str, task_index: int, per_part: int):
    self._staging, self._task, self._per_part = staging, task_index, per_part
    self._file = None
    self._count = 0
    self.parts: list[list] = []  # [stem, examples]

  def add(self, record: bytes) -> None:
    if self._file is None or self._count == self._per_part:
      self._finish()
      stem = _part_stem(self._task, len(self.parts))
      self._file = open(os.path.join(self._staging, stem + ".records.tmp"), "wb")
      self.parts.append([stem, 0])
      self._count = 0
    self._file.write(struct.pack("<Q", len(record)))
    self._file.write(record)
    self._count += 1
    self.parts[-1][1] = self._count

  def _finish(self) -> None:
    if self._file is not None:
      self._file.close()
      path = os.path.join(self._staging, self.parts[-1][0] + ".records")
      os.replace(path + ".tmp", path)
      self._file = None

  def close(self) -> None:
    self._finish()


def _part_stem(task_index: int, part: int) -> str:
  return f"t{task_index:06d}-{part:04d}"


def _iter_tar(path: str, label: str, stats: _TaskStats) -> Iterator[tuple[str, dict]]:
  """Yields (key, {extension: bytes}) per sample of a webdataset tar, streaming.

  Files are grouped by key (the name up to the first dot of its base name, directory kept);
  a sample's files must be consecutive, as webdataset writers store them.
  """
  wanted = set(WEBDATASET_IMAGE_EXTENSIONS) | {"txt", "json"}
  seen: set[str] = set()
  current = None  # Key of the latest member; `key` is None while skipping a duplicate.
  key, files = None, {}
  try:
    # Stream mode; "r|" skips the compression sniffing of "r|*" (~30% of tarfile's time).
    mode = "r|" if path.lower().endswith(".tar") else "r|*"
    with tarfile.open(path, mode) as tar:
      for member in tar:
        if not member.isfile():
          continue
        directory, base = posixpath.split(member.name)
        stem, dot, extension = base.partition(".")
        extension = extension.lower()
        if not dot or extension not in wanted:
          continue
        member_key = posixpath.join(directory, stem)
        if member_key != current:
          if key is not None:
            yield key, files  # Complete: the next key has begun.
          current, key, files = member_key, member_key, {}
          if member_key in seen:
            stats.skip("duplicate_key", f"{label}/{member_key}")
            key = None
          seen.add(member_key)
        if key is not None and extension not in files:  # The first file of a kind wins.
          files[extension] = tar.extractfile(member).read()
      if key is not None:
        yield key, files
  except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
    stats.skip("bad_tar", f"{label}/{current}" if current else label)
    print(f"warning: {path}: {type(e).__name__}: {e}; samples after this point skipped",
          file=sys.stderr)


def _webdataset_examples(task: _Task, stats: _TaskStats) -> Iterator[tuple[str, dict]]:
  for sample_key, files in _iter_tar(task.tar_path, task.tar_label, stats):
    key = f"{task.tar_label}/{sample_key}"
    image_ext = next((e for e in WEBDATASET_IMAGE_EXTENSIONS if e in files), None)
    if image_ext is None:
      stats.skip("missing_image", key)
      continue
    if "txt" not in files:
      stats.skip("missing_caption", key)
      continue
    captions, reason = _clean_captions(files["txt"])
    if reason:
      stats.skip(reason, key)
      continue
    meta = files.get("json", b"").decode("utf-8", "replace")
    yield key, {"raw": files[image_ext], "caption": captions[0], "meta": meta}


def _entry_examples(task: _Task, stats: _TaskStats) -> Iterator[tuple[str, dict]]:
  for key, path, target in task.entries:
    if task.kind != "label":
      captions, reason = _clean_captions(target)
      if reason:
        stats.skip(reason, key)
        continue
      target = captions if task.kind == "sequence" else captions[0]
    try:
      with open(path, "rb") as f:
        raw = f.read()
    except FileNotFoundError:
      stats.skip("missing_image", key)
      continue
    except (OSError, ValueError):  # ValueError: a NUL byte in the path.
      stats.skip("unreadable_image", key)
      continue
    if task.kind == "label":
      yield key, {"raw": raw, "label": target}
    else:
      yield key, {"raw": raw, "caption": target, "meta": ""}


def run_task(task: _Task) -> dict:
  """Processes one task into `*.records` part files in the staging dir; returns its stats."""
  start = time.time()
  delay = float(os.environ.get(TASK_DELAY_ENV) or 0)
  if delay:
    time.sleep(delay)
  truncated_setting = ImageFile.LOAD_TRUNCATED_IMAGES
  ImageFile.LOAD_TRUNCATED_IMAGES = False  # Truncated images must fail validation.
  stats = _TaskStats()
  writer = _PartWriter(task.staging, task.index, task.examples_per_shard)
  try:
    examples = (_webdataset_examples(task, stats) if task.tar_path is not None
                else _entry_examples(task, stats))
    for key, example in examples:
      image, action = prepare_image(example.pop("raw"), task.max_size)
      if image is None:
        stats.skip(action, key)
        continue
      stats.images[action] = stats.images.get(action, 0) + 1
      features = {"image": _bytes_feature([image]), "key": _bytes_feature([_text(key)])}
      if task.kind == "label":
        features["label"] = _int64_feature([example["label"]])
      else:
        captions = example["caption"]
        captions = captions if isinstance(captions, list) else [captions]
        features["caption"] = _bytes_feature([c.encode("utf-8") for c in captions])
        features["meta"] = _bytes_feature([example["meta"].encode("utf-8")])
      writer.add(serialize_example(features))
      stats.written += 1
  finally:
    writer.close()
    ImageFile.LOAD_TRUNCATED_IMAGES = truncated_setting
  result = stats.as_dict()
  result.update(index=task.index, parts=writer.parts, seconds=round(time.time() - start, 3))
  return result


# ----------------------------------------------------------------------------------------------
# Parent side: planning.


@dataclasses.dataclass
class _Plan:
  inputs: list[str]
  tasks: list[_Task]
  kind: str  # "text" | "sequence" | "label".
  class_names: list[str] | None
  parse_stats: _TaskStats  # Records skipped while parsing jsonl/csv files.
  digest: str  # Of everything the tasks depend on: a resumed build must see the same.


def _split_top_level(value: str) -> list[str]:
  """Splits on commas outside braces ('a.tar,{b,c}.tar' -> ['a.tar', '{b,c}.tar'])."""
  parts, depth, current = [], 0, ""
  for char in value:
    depth += {"{": 1, "}": -1}.get(char, 0)
    if char == "," and depth == 0:
      parts.append(current)
      current = ""
    else:
      current += char
  parts.append(current)
  return [p.strip() for p in parts if p.strip()]


def expand_braces(pattern: str) -> list[str]:
  """Expands '{00000..00009}' ranges (zero-padded like the first bound) and '{a,b}' lists."""
  match = re.search(r"\{([^{}]*)\}", pattern)
  if match is None:
    return [pattern]
  head, body, tail = pattern[:match.start()], match.group(1), pattern[match.end():]
  bounds = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
  if bounds:
    lo, hi = bounds.groups()
    width = len(lo) if lo.startswith("0") or lo.startswith("-0") else 0
    step = 1 if int(hi) >= int(lo) else -1
    options = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
  elif "," in body:
    options = body.split(",")
  else:  # Not an expansion: keep the braces literally.
    return [head + "{" + body + "}" + t for t in expand_braces(tail)]
  return [e for o in options for e in expand_braces(head + o + tail)]


def _expand_input(value: str, tar_dirs: bool) -> list[str]:
  """Paths named by one --input item: brace expansion, globs, directories of tars."""
  paths = []
  for item in expand_braces(value):
    item = os.path.expanduser(item)
    if glob.has_magic(item):
      found = sorted(glob.glob(item, recursive=True))
      if tar_dirs:
        found = [p for p in found if p.endswith(TAR_SUFFIXES) and os.path.isfile(p)]
      paths.extend(found)
    elif tar_dirs and os.path.isdir(item):
      paths.extend(sorted(p for p in glob.glob(os.path.join(glob.escape(item), "*"))
                          if p.endswith(TAR_SUFFIXES)))
    elif os.path.exists(item):
      paths.append(item)
  return paths


def resolve_inputs(values: Sequence[str], tar_dirs: bool = False) -> list[str]:
  """The input paths, in order and deduplicated; errors name each item matching nothing."""
  if not values:
    _flag_error("input", list(values), "no input given")
  resolved: dict[str, None] = {}
  for value in values:
    for item in _split_top_level(value):
      paths = _expand_input(item, tar_dirs)
      if not paths:
        what = "no .tar files" if tar_dirs else "no files"
        _flag_error("input", item, f"matches {what}")
      resolved.update((os.path.abspath(p), None) for p in paths)
  return list(resolved)


def _common_dir(paths: Sequence[str]) -> str:
  return os.path.commonpath([os.path.dirname(p) for p in paths])


def _key_from_path(path: str, root: str) -> str:
  rel = os.path.relpath(path, root)
  outside = rel == os.pardir or rel.startswith(os.pardir + os.sep)
  return path if outside else rel.replace(os.sep, "/")


def _records_file(path: str) -> str:
  """The jsonl/csv/tsv file of one folder --input (a file, or a dir holding one)."""
  if os.path.isdir(path):
    jsonl = os.path.join(path, "captions.jsonl")
    if os.path.isfile(jsonl):
      return jsonl
    tables = sorted(glob.glob(os.path.join(glob.escape(path), "*.csv"))
                    + glob.glob(os.path.join(glob.escape(path), "*.tsv")))
    if len(tables) == 1:
      return tables[0]
    if not tables:
      _flag_error("input", path, "the folder has neither captions.jsonl nor a .csv/.tsv file; "
                  "found: " + (", ".join(sorted(os.listdir(path))[:10]) or "(empty folder)"))
    _flag_error("input", path, "the folder has several .csv/.tsv files, pass one: "
                + ", ".join(os.path.basename(t) for t in tables))
  if not path.lower().endswith((".jsonl", ".csv", ".tsv")):
    _flag_error("input", path, "for --format folder, expected a folder with captions.jsonl, "
                "or a .jsonl, .csv or .tsv file")
  return path


def _caption_value(text: str) -> Any:
  """A csv caption cell; a JSON list of strings in it means several captions."""
  stripped = text.strip()
  if stripped.startswith("[") and stripped.endswith("]"):
    try:
      value = json.loads(stripped)
    except ValueError:
      return text
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
      return value
  return text


def _pick_column(header: list[str], given: str | None, candidates: Sequence[str],
                 flag: str, path: str) -> int:
  if given is not None:
    if given in header:
      return header.index(given)
    _flag_error(flag, given, f"{path} has no such column; columns: {header}")
  lowered = [h.strip().lower() for h in header]
  for candidate in candidates:
    if candidate in lowered:
      return lowered.index(candidate)
  _flag_error(flag, None, f"{path} has none of the columns {list(candidates)}; columns "
              f"present: {header}; name the column with --{flag}")


def _read_table(path: str, image_key: str | None, caption_key: str | None,
                stats: _TaskStats) -> Iterator[tuple[str, Any]]:
  """Yields (image path, caption value) per row of an open_clip style csv / tsv file."""
  name = os.path.basename(path)
  delimiter = "\t" if path.lower().endswith(".tsv") else ","
  # surrogateescape: bad UTF-8 becomes lone surrogates, which the workers report per caption.
  with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
    reader = csv.reader(f, delimiter=delimiter)
    try:
      header = next(reader, None)
    except csv.Error as e:
      _flag_error("input", path, f"cannot read the header row: {e}")
    if not header:
      _flag_error("input", path, "the file is empty (no header row)")
    header[0] = header[0].lstrip("\ufeff")
    image_col = _pick_column(header, image_key, IMAGE_COLUMNS, "image_key", path)
    caption_col = _pick_column(header, caption_key, CAPTION_COLUMNS, "caption_key", path)
    while True:
      try:
        row = next(reader)
      except StopIteration:
        break
      except csv.Error:
        stats.skip("bad_record", f"{name}:{reader.line_num}")
        continue
      if not row:
        continue
      if len(row) != len(header) or not row[image_col].strip():
        stats.skip("bad_record", f"{name}:{reader.line_num}")
        continue
      yield row[image_col].strip(), _caption_value(row[caption_col])


def _read_jsonl(path: str, image_key: str | None, caption_key: str | None,
                stats: _TaskStats) -> Iterator[tuple[str, Any]]:
  """Yields (image path, caption value) per line of a jsonl file."""
  name = os.path.basename(path)
  image_key, caption_key = image_key or "image", caption_key or "caption"
  with open(path, "rb") as f:
    for number, line in enumerate(f, 1):
      text = line.decode("utf-8", "surrogateescape").strip().lstrip("\ufeff")
      if not text:
        continue
      try:
        record = json.loads(text)
      except ValueError:
        stats.skip("bad_record", f"{name}:{number}")
        continue
      image = record.get(image_key) if isinstance(record, dict) else None
      caption = record.get(caption_key) if isinstance(record, dict) else None
      if (not isinstance(image, str) or not image.strip()
          or not (caption is None or isinstance(caption, str)
                  or (isinstance(caption, list) and all(isinstance(c, str) for c in caption)))):
        stats.skip("bad_record", f"{name}:{number}")
        continue
      yield image.strip(), caption


def _shuffled_chunks(entries: list[tuple], seed: int, size: int) -> list[tuple]:
  """Entries sorted by key, shuffled with `seed`, cut into chunks of `size`."""
  entries = sorted(entries, key=lambda e: e[0])
  random.Random(seed).shuffle(entries)
  return [tuple(entries[i:i + size]) for i in range(0, len(entries), size)]


def _file_stamp(path: str) -> list[int]:
  """Size and modification time: a resumed build refuses inputs rewritten in between."""
  stat = os.stat(path)
  return [stat.st_size, stat.st_mtime_ns]


def _digest(*parts: Any) -> str:
  hasher = hashlib.sha256()
  for part in parts:
    hasher.update(json.dumps(part, sort_keys=True, ensure_ascii=True).encode())
  return hasher.hexdigest()


def _plan_webdataset(cfg: BuildConfig, staging: str) -> _Plan:
  tars = resolve_inputs(cfg.inputs, tar_dirs=True)
  root = _common_dir(tars)
  tasks = []
  for index, path in enumerate(tars):
    label = _key_from_path(path, root)
    for suffix in TAR_SUFFIXES:
      if label.endswith(suffix):
        label = label[:-len(suffix)]
        break
    tasks.append(_Task(index=index, staging=staging, examples_per_shard=cfg.examples_per_shard,
                       max_size=cfg.max_size, kind="text", tar_path=path, tar_label=label))
  return _Plan(tars, tasks, "text", None, _TaskStats(),
               _digest([(t.tar_path, t.tar_label, _file_stamp(t.tar_path)) for t in tasks]))


def _plan_folder(cfg: BuildConfig, staging: str) -> _Plan:
  files = [_records_file(p) for p in resolve_inputs(cfg.inputs)]
  files = list(dict.fromkeys(files))
  root = _common_dir(files)
  stats = _TaskStats()
  records, occurrences = [], {}
  for path in files:
    read = _read_jsonl if path.lower().endswith(".jsonl") else _read_table
    base_dir = os.path.dirname(path)
    for image, caption in read(path, cfg.image_key, cfg.caption_key, stats):
      image_path = os.path.normpath(os.path.join(base_dir, os.path.expanduser(image)))
      key = _key_from_path(image_path, root)
      seen = occurrences.get(key, 0)
      occurrences[key] = seen + 1
      records.append((key if not seen else f"{key}#{seen}", image_path, caption))
  kind = "sequence" if any(isinstance(r[2], list) for r in records) else "text"
  chunks = _shuffled_chunks(records, cfg.seed, cfg.examples_per_shard)
  tasks = [_Task(index=i, staging=staging, examples_per_shard=cfg.examples_per_shard,
                 max_size=cfg.max_size, kind=kind, entries=chunk)
           for i, chunk in enumerate(chunks)]
  return _Plan(files, tasks, kind, None, stats,
               _digest(kind, chunks, stats.as_dict(), [_file_stamp(f) for f in files]))


def load_class_names(path: str, class_dirs: Sequence[str]) -> list[str]:
  """Names for the sorted class dirs from a names file: lines, a JSON list or a JSON dict."""
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except (OSError, UnicodeDecodeError) as e:
    _flag_error("class_names", path, f"cannot be read: {e}")
  stripped = text.strip()
  if stripped.startswith(("{", "[")):
    try:
      value = json.loads(stripped)
    except ValueError as e:
      _flag_error("class_names", path, f"invalid JSON: {e}")
  else:
    value = [line.strip() for line in stripped.splitlines()]
  if isinstance(value, dict):
    missing = [d for d in class_dirs if d not in value]
    if missing:
      _flag_error("class_names", path, f"no name for {len(missing)} class dirs, e.g. "
                  f"{missing[:5]}")
    value = [value[d] for d in class_dirs]
  if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
    _flag_error("class_names", path, "expected one name per line, a JSON list of names or a "
                "JSON dict class dir -> name; names must be non-empty strings")
  if len(value) != len(class_dirs):
    _flag_error("class_names", path, f"has {len(value)} names but --input has "
                f"{len(class_dirs)} class dirs (names go in the order of the sorted dirs: "
                f"{list(class_dirs[:3])}...)")
  names = [v.strip() for v in value]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    _flag_error("class_names", path, f"names must be unique (tfds ClassLabel); duplicated: "
                f"{duplicates[:10]}")
  return names


def _plan_classes(cfg: BuildConfig, staging: str) -> _Plan:
  roots = resolve_inputs(cfg.inputs)
  if len(roots) != 1 or not os.path.isdir(roots[0]):
    _flag_error("input", list(cfg.inputs), "--format classes takes one root folder "
                "(ROOT/<class dir>/*.jpg)")
  root = roots[0]
  class_dirs = sorted(d for d in os.listdir(root)
                      if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
  if not class_dirs:
    _flag_error("input", root, "has no class dirs (expected ROOT/<class dir>/*.jpg); found: "
                + (", ".join(sorted(os.listdir(root))[:10]) or "(empty folder)"))
  names = load_class_names(cfg.class_names, class_dirs) if cfg.class_names else class_dirs
  entries = []
  for label, class_dir in enumerate(class_dirs):
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, class_dir)):
      dirnames.sort()
      for filename in sorted(filenames):
        if filename.lower().endswith(CLASS_IMAGE_EXTENSIONS) and not filename.startswith("."):
          path = os.path.join(dirpath, filename)
          entries.append((_key_from_path(path, root), path, label))
  chunks = _shuffled_chunks(entries, cfg.seed, cfg.examples_per_shard)
  tasks = [_Task(index=i, staging=staging, examples_per_shard=cfg.examples_per_shard,
                 max_size=cfg.max_size, kind="label", entries=chunk)
           for i, chunk in enumerate(chunks)]
  return _Plan([root], tasks, "label", names, _TaskStats(), _digest(names, chunks))


# ----------------------------------------------------------------------------------------------
# Parent side: running, staging files, metadata.


def _features(kind: str, class_names: list[str] | None):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  if kind == "label":
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(),
        "label": tfds.features.ClassLabel(names=class_names),
        "key": tfds.features.Text(),
    })
  caption = tfds.features.Text()
  if kind == "sequence":
    caption = tfds.features.Sequence(tfds.features.Text())
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(),
      "caption": caption,
      "key": tfds.features.Text(),
      "meta": tfds.features.Text(),
  })


def _feature_signature(features) -> dict:
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  labels = {k: list(f.names) for k, f in features.items()
            if isinstance(f, tfds.features.ClassLabel)}
  return {"features": features.to_json(), "labels": labels}


def _describe(features) -> str:
  return ", ".join(f"{k}: {type(f).__name__}" + (
      f"({type(f.feature).__name__})" if hasattr(f, "feature") else "")
                   for k, f in features.items())


def write_json(path: str, value: Any) -> None:
  """Writes JSON to a temporary name, then renames it into place (atomic)."""
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(value, f, indent=1, sort_keys=True)
  os.replace(path + ".tmp", path)


def read_json(path: str) -> Any:
  """The JSON value in `path`, or None if it is missing or unreadable."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _existing_splits(version_dir: str) -> dict[str, dict] | None:
  """{split: {shard_lengths, num_bytes}} from dataset_info.json; None if there is none."""
  path = os.path.join(version_dir, "dataset_info.json")
  if not os.path.exists(path):
    return None
  info = read_json(path)
  if not isinstance(info, dict):
    raise BuildError(f"{path} is unreadable; rebuild the dataset (or its splits) with "
                     "--overwrite")
  return {s["name"]: {"shard_lengths": [int(n) for n in s.get("shardLengths", [])],
                      "num_bytes": int(s.get("numBytes", 0))}
          for s in info.get("splits", [])}


def _check_features(version_dir: str, split: str, features, other_splits: Sequence[str]) -> None:
  """Raises unless the dataset's existing splits were built with the same features."""
  if not other_splits:
    return
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  existing = tfds.features.FeaturesDict.from_config(version_dir)
  if _feature_signature(existing) != _feature_signature(features):
    _flag_error("split", split, f"the dataset already has splits {sorted(other_splits)} whose "
                f"features differ from this build's: existing {_describe(existing)}; new "
                f"{_describe(features)} (or different class names). Build into another "
                "--name, or rebuild those splits the same way")


def _task_done(staging: str, index: int, check_shards: bool = True) -> dict | None:
  """The stats of a task whose outputs are all complete, else None."""
  stats = read_json(os.path.join(staging, f"t{index:06d}.json"))
  if not isinstance(stats, dict):
    return None
  for part in stats.get("shards", []) if check_shards else []:
    path = os.path.join(staging, part["file"])
    if not os.path.exists(path) or os.path.getsize(path) != part["bytes"]:
      return None
  return stats


def _finish_task(staging: str, result: dict) -> dict:
  """Frames a worker's record parts as TFRecord shards, then marks the task complete."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  shards = []
  for stem, count in result.pop("parts"):
    source = os.path.join(staging, stem + ".records")
    target = os.path.join(staging, stem + ".tfrecord")
    with open(source, "rb") as f, tf.io.TFRecordWriter(target + ".tmp") as writer:
      while header := f.read(8):
        writer.write(f.read(struct.unpack("<Q", header)[0]))
    os.replace(target + ".tmp", target)
    os.remove(source)
    shards.append({"file": os.path.basename(target), "examples": count,
                   "bytes": os.path.getsize(target)})
  result["shards"] = shards
  write_json(os.path.join(staging, f"t{result['index']:06d}.json"), result)
  return result


def worker_pool(processes: int) -> multiprocessing.pool.Pool:
  """A 'spawn' pool whose workers can run `run_task` without importing TensorFlow."""
  # big_vlp.data imports TensorFlow lazily, so workers load only PIL and this module.
  return multiprocessing.get_context("spawn").Pool(processes)


def _run_tasks(tasks: list[_Task], workers: int, on_done) -> None:
  """Runs tasks in a worker pool (in this process for one worker), reporting each result."""
  if workers <= 1 or len(tasks) <= 1:
    for task in tasks:
      on_done(run_task(task))
    return
  # The parent writes each finished task's TFRecords with TensorFlow: import it before the
  # workers start, so the first result is not held up (with all the others queued behind it).
  import tensorflow  # pylint: disable=import-outside-toplevel,unused-import
  with worker_pool(min(workers, len(tasks))) as pool:
    for result in pool.imap_unordered(run_task, tasks, chunksize=1):
      on_done(result)


def _merge_stats(all_stats: Sequence[dict]) -> dict:
  skipped, keys, images = {}, {}, {}
  for stats in all_stats:
    for reason, count in stats["skipped"].items():
      skipped[reason] = skipped.get(reason, 0) + count
      room = KEYS_PER_REASON - len(keys.setdefault(reason, []))
      keys[reason].extend(stats["skipped_keys"].get(reason, [])[:max(room, 0)])
    for action, count in stats.get("images", {}).items():
      images[action] = images.get(action, 0) + count
  return {"skipped": dict(sorted(skipped.items())), "skipped_keys": dict(sorted(keys.items())),
          "images": dict(sorted(images.items()))}


def shard_name(name: str, split: str, index: int, count: int) -> str:
  """The tfds file name of shard `index` of `count` of a split."""
  return f"{name}-{split}.tfrecord-{index:05d}-of-{count:05d}"


def write_metadata(version_dir: str, features, splits: dict[str, dict],
                   description: str) -> None:
  """Writes the tfds metadata of `splits` ({name: {shard_lengths, num_bytes}}, in that order)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  split_infos = [tfds.core.SplitInfo(name=name, shard_lengths=list(info["shard_lengths"]),
                                     num_bytes=info["num_bytes"])
                 for name, info in splits.items()]
  tfds.folder_dataset.write_metadata(data_dir=version_dir, features=features,
                                     split_infos=split_infos, check_data=False,
                                     description=description)


def _finalize(cfg: BuildConfig, split: str, plan: _Plan, version_dir: str, staging: str,
              task_stats: list[dict], other_splits: dict) -> dict:
  """Moves the staged shards to their tfds names and writes the metadata (resumable)."""
  manifest_path = os.path.join(staging, "finalize.json")
  manifest = read_json(manifest_path)
  if manifest is None:
    staged = [s for stats in task_stats for s in stats["shards"] if s["examples"]]
    if not staged:
      raise BuildError(f"no valid examples in {plan.inputs[:3]}...; skipped: "
                       f"{_merge_stats([plan.parse_stats.as_dict()] + task_stats)['skipped']}")
    manifest = {"other_splits": other_splits, "shards": [
        dict(s, target=shard_name(cfg.name, split, i, len(staged)))
        for i, s in enumerate(staged)]}
    write_json(manifest_path, manifest)
  os.makedirs(version_dir, exist_ok=True)
  targets = set()
  for shard in manifest["shards"]:
    source = os.path.join(staging, shard["file"])
    target = os.path.join(version_dir, shard["target"])
    if os.path.exists(source):
      os.replace(source, target)
    elif not os.path.exists(target):
      raise BuildError(f"staged shard {source} is missing; rerun with --overwrite")
    targets.add(shard["target"])
  for old in glob.glob(os.path.join(glob.escape(version_dir),
                                    f"{glob.escape(cfg.name)}-{glob.escape(split)}.tfrecord-*")):
    if os.path.basename(old) not in targets:  # Shards of an overwritten build of the split.
      os.remove(old)
  splits = {split: {"shard_lengths": [s["examples"] for s in manifest["shards"]],
                   "num_bytes": sum(s["bytes"] for s in manifest["shards"])}}
  splits.update(sorted(manifest["other_splits"].items()))
  features = _features(plan.kind, plan.class_names)
  try:
    write_metadata(version_dir, features, splits,
                   f"Built by big_vlp tools/build_dataset.py (--format {cfg.format}).")
  except ValueError as e:
    raise BuildError(f"cannot write the metadata of {version_dir}: {e}. Shards of a split "
                     "without metadata are left from another interrupted build: rerun its "
                     "command, or delete them") from e
  shards = manifest["shards"]
  return {"num_shards": len(shards), "num_bytes": sum(s["bytes"] for s in shards),
          "examples_written": sum(s["examples"] for s in shards),
          "features": _describe(features)}


def check_dataset_name(name: str, flag: str = "name") -> None:
  """Raises BuildArgError unless `name` can name a dataset that tfds reads without a class."""
  if not re.fullmatch(r"[a-z][a-z0-9_]*", name or ""):
    _flag_error(flag, name, "must be snake_case: a lowercase letter, then lowercase "
                "letters, digits or '_'")
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  if name in tfds.list_builders(with_community_datasets=False):
    _flag_error(flag, name, "is the name of a registered tfds dataset (its builder "
                "class would be used to read it); choose another name")


def _check_config(cfg: BuildConfig) -> str:
  """Validates the flags; returns the split name."""
  if cfg.format not in FORMATS:
    _flag_error("format", cfg.format, "allowed values: " + ", ".join(FORMATS))
  check_dataset_name(cfg.name)
  split = cfg.split or ("test" if cfg.format == "classes" else "train")
  if not re.fullmatch(r"[A-Za-z0-9_]+", split):
    _flag_error("split", split, "must consist of letters, digits and '_'")
  if not cfg.data_dir:
    _flag_error("data_dir", cfg.data_dir, "required")
  if cfg.examples_per_shard < 1:
    _flag_error("examples_per_shard", cfg.examples_per_shard, "must be >= 1")
  if cfg.workers is not None and cfg.workers < 1:
    _flag_error("workers", cfg.workers, "must be >= 1")
  if cfg.max_size is not None and cfg.max_size < 1:
    _flag_error("max_size", cfg.max_size, "must be >= 1")
  if cfg.class_names is not None and cfg.format != "classes":
    _flag_error("class_names", cfg.class_names, "only applies to --format classes")
  for flag in ("image_key", "caption_key"):
    if getattr(cfg, flag) is not None and cfg.format != "folder":
      _flag_error(flag, getattr(cfg, flag), "only applies to --format folder")
  return split


def _open_staging(staging: str, settings: dict, plan: _Plan, finalizing: bool
                  ) -> list[dict | None]:
  """Creates or checks the staging dir; returns the stats of its complete tasks (else None)."""
  os.makedirs(staging, exist_ok=True)
  settings_path = os.path.join(staging, "settings.json")
  previous = read_json(settings_path)
  if previous is not None and previous != settings:
    differ = sorted(k for k in settings if previous.get(k) != settings[k])
    _flag_error("overwrite", False, f"{staging} holds an interrupted build with other settings "
                f"or inputs (differing: {differ}); rerun that command to finish it, or pass "
                "--overwrite to start this one afresh")
  write_json(settings_path, settings)
  for stale in os.listdir(staging):  # Left by a killed process; their tasks are redone.
    if stale.endswith((".tmp", ".records")):
      os.remove(os.path.join(staging, stale))
  # Once finalizing has begun, the shards have moved out of staging: the stats suffice.
  task_stats = [_task_done(staging, t.index, check_shards=not finalizing) for t in plan.tasks]
  if finalizing and None in task_stats:
    raise BuildError(f"{staging} is incomplete (task stats missing); rerun with --overwrite")
  return task_stats


def _progress(total: int, done: int, desc: str, enabled: bool):
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, initial=done, desc=desc, unit="task", disable=not enabled,
              file=sys.stderr, mininterval=0.5, dynamic_ncols=True)


def build(cfg: BuildConfig, *, progress: bool = True) -> dict:
  """Builds (or resumes, or finds already built) split `cfg.split`; returns the summary."""
  start = time.time()
  split = _check_config(cfg)
  data_dir = os.path.abspath(os.path.expanduser(cfg.data_dir))
  version_dir = os.path.join(data_dir, cfg.name, VERSION)
  staging_root = os.path.join(data_dir, cfg.name, VERSION + STAGING_SUFFIX)
  staging = os.path.join(staging_root, split)
  summary_path = os.path.join(version_dir, f"build_summary_{split}.json")

  if cfg.overwrite and os.path.isdir(staging):
    shutil.rmtree(staging)
  resuming = os.path.isdir(staging)
  manifest = read_json(os.path.join(staging, "finalize.json")) if resuming else None
  if manifest is not None:  # Interrupted while finalizing: dataset_info.json may be partial.
    other_splits = manifest["other_splits"]
  else:
    existing = _existing_splits(version_dir) or {}
    if split in existing and not resuming and not cfg.overwrite:
      summary = read_json(summary_path) or {}
      print(f"{cfg.name}/{split} is already built in {version_dir} "
            f"({sum(existing[split]['shard_lengths'])} examples); nothing to do "
            "(pass --overwrite to rebuild it)")
      return dict(summary, already_built=True)
    other_splits = {s: info for s, info in existing.items() if s != split}

  plan = {"webdataset": _plan_webdataset, "folder": _plan_folder,
          "classes": _plan_classes}[cfg.format](cfg, staging)
  features = _features(plan.kind, plan.class_names)
  if manifest is None:  # Else checked before finalizing began.
    _check_features(version_dir, split, features, list(other_splits))

  settings = {"files_version": _BUILD_FILES_VERSION, "format": cfg.format, "split": split,
              "inputs": plan.inputs, "examples_per_shard": cfg.examples_per_shard,
              "seed": cfg.seed, "max_size": cfg.max_size, "image_key": cfg.image_key,
              "caption_key": cfg.caption_key, "kind": plan.kind,
              "class_names": plan.class_names, "tasks": len(plan.tasks),
              "digest": plan.digest}
  task_stats = _open_staging(staging, settings, plan, finalizing=manifest is not None)
  resumed = sum(s is not None for s in task_stats)
  pending = [t for t, s in zip(plan.tasks, task_stats) if s is None]
  workers = cfg.workers or os.cpu_count() or 1
  written_now = 0
  totals = {"written": sum(s["written"] for s in task_stats if s),
            "skipped": sum(sum(s["skipped"].values()) for s in task_stats if s)
                       + sum(plan.parse_stats.skipped.values())}
  bar = _progress(len(plan.tasks), resumed, f"{cfg.name}/{split}", progress)
  bar.set_postfix_str(f"written={totals['written']} skipped={totals['skipped']}", refresh=False)

  def on_done(result: dict) -> None:
    nonlocal written_now
    result = _finish_task(staging, result)
    task_stats[result["index"]] = result
    written_now += result["written"]
    totals["written"] += result["written"]
    totals["skipped"] += sum(result["skipped"].values())
    bar.set_postfix_str(f"written={totals['written']} skipped={totals['skipped']}",
                        refresh=False)
    bar.update(1)

  try:
    _run_tasks(pending, workers, on_done)
  finally:
    bar.close()
  done = _finalize(cfg, split, plan, version_dir, staging, task_stats, other_splits)

  merged = _merge_stats([plan.parse_stats.as_dict()] + task_stats)
  wall = time.time() - start
  summary = {
      "name": cfg.name, "split": split, "format": cfg.format, "version": VERSION,
      "data_dir": data_dir, "inputs": plan.inputs,
      "examples_written": done["examples_written"],
      "skipped_total": sum(merged["skipped"].values()), "skipped": merged["skipped"],
      "skipped_examples": merged["skipped_keys"], "images": merged["images"],
      "num_shards": done["num_shards"], "num_bytes": done["num_bytes"],
      "features": done["features"], "tasks": len(plan.tasks), "tasks_resumed": resumed,
      "workers": workers, "wall_time_s": round(wall, 3),
      # Throughput of this run: examples of the tasks it ran (not of resumed ones) per second.
      "examples_per_s": round(written_now / wall, 1) if wall > 0 else None,
      "settings": {k: settings[k] for k in ("examples_per_shard", "seed", "max_size",
                                            "image_key", "caption_key")},
  }
  if plan.class_names is not None:
    summary["num_classes"] = len(plan.class_names)
  write_json(summary_path, summary)
  shutil.rmtree(staging)
  if os.path.isdir(staging_root) and not os.listdir(staging_root):
    os.rmdir(staging_root)
  return summary


# ----------------------------------------------------------------------------------------------
# Command line (tools/build_dataset.py).


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """The flags of tools/build_dataset.py."""
  parser = argparse.ArgumentParser(
      prog="build_dataset.py",
      description="Converts an image-text corpus into a tfds dataset in DATA_DIR/NAME/1.0.0, "
      "readable with tfds.builder(NAME, data_dir=DATA_DIR). Interrupted builds resume when "
      "rerun with the same flags.")
  parser.add_argument("--format", required=True, choices=FORMATS,
                      help="webdataset: img2dataset tars; folder: captions.jsonl or a "
                      ".csv/.tsv; classes: ROOT/<class dir>/*.jpg")
  parser.add_argument("--input", action="append", required=True, dest="inputs",
                      metavar="PATH_OR_GLOB", help="repeatable; globs, comma-separated lists "
                      "and brace ranges like shards/{00000..00009}.tar are expanded")
  parser.add_argument("--name", required=True, help="dataset name (snake_case)")
  parser.add_argument("--data_dir", required=True, help="tfds data dir")
  parser.add_argument("--split", default=None,
                      help="split to build (default: test for classes, else train)")
  parser.add_argument("--workers", type=int, default=None,
                      help="worker processes (default: the number of CPUs)")
  parser.add_argument("--class_names", default=None, help="classes: names file (one per "
                      "line in sorted dir order, a JSON list, or a JSON dict dir -> name)")
  parser.add_argument("--image_key", default=None, help="folder: image path field/column")
  parser.add_argument("--caption_key", default=None, help="folder: caption field/column")
  parser.add_argument("--max_size", type=int, default=None,
                      help="resize images whose shorter side exceeds this (JPEG q95)")
  parser.add_argument("--examples_per_shard", type=int, default=2048)
  parser.add_argument("--seed", type=int, default=0,
                      help="shuffles folder/classes entries before sharding")
  parser.add_argument("--overwrite", action="store_true",
                      help="rebuild the split even if built (discards an interrupted build)")
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")
  return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> BuildConfig:
  return BuildConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BuildConfig)})


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line; returns the exit code (2: bad flags, 1: build failed)."""
  args = parse_args(argv)
  try:
    summary = build(config_from_args(args), progress=not args.no_progress)
  except BuildArgError as e:
    print(f"build_dataset.py: error: {e}", file=sys.stderr)
    return 2
  except BuildError as e:
    print(f"build_dataset.py: error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("build_dataset.py: interrupted; rerun the same command to resume", file=sys.stderr)
    return 130
  if not summary.get("already_built"):
    print(json.dumps(summary, indent=1))
    print(f"built {summary['name']}/{summary['split']}: {summary['examples_written']} examples "
          f"in {summary['num_shards']} shards, {summary['skipped_total']} skipped "
          f"{summary['skipped']}, {summary['examples_per_s']} examples/s -> "
          f"{os.path.join(summary['data_dir'], summary['name'], VERSION)}")
  return 0
