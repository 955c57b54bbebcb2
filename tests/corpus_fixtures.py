"""Small image-text corpora on disk, for tests of dataset building (and any other test).

Images are coloured shapes drawn with PIL on a plain background, the caption naming them
("a red circle"). Every writer takes the indices of samples to damage and returns what a
correct build must report: the expected example keys, captions and skip counts per reason
(the reasons of big_vlp.data.build).
"""

import io
import json
import os
import random
import tarfile
from typing import Sequence

from PIL import Image
from PIL import ImageDraw

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220),
    "yellow": (235, 215, 40), "purple": (140, 50, 200), "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
# Formats cycled over the samples: (file extension, PIL format).
WEBDATASET_FORMATS = (("jpg", "JPEG"), ("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP"))
CLASS_FORMATS = (("jpg", "JPEG"), ("JPEG", "JPEG"), ("png", "PNG"), ("bmp", "BMP"),
                 ("gif", "GIF"), ("webp", "WEBP"))


def draw(colour: str, shape: str, size: int = 32, seed: int = 0) -> Image.Image:
  """An RGB image of one shape of `colour` on a random light-grey background."""
  rng = random.Random(seed)
  grey = rng.randint(150, 230)
  image = Image.new("RGB", (size, size), (grey, grey, grey))
  canvas = ImageDraw.Draw(image)
  margin = rng.randint(2, max(2, size // 6))
  box = (margin, margin, size - 1 - margin, size - 1 - margin)
  fill = COLOURS[colour]
  if shape == "circle":
    canvas.ellipse(box, fill=fill)
  elif shape == "square":
    canvas.rectangle(box, fill=fill)
  else:
    canvas.polygon([(size / 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
  return image


def encode(image: Image.Image, pil_format: str) -> bytes:
  out = io.BytesIO()
  image.save(out, pil_format)
  return out.getvalue()


def sample(index: int, seed: int = 0, size: int = 32) -> tuple[Image.Image, str]:
  """(image, caption) of sample `index`."""
  rng = random.Random(seed * 1_000_003 + index)
  colour = rng.choice(sorted(COLOURS))
  shape = rng.choice(SHAPES)
  return draw(colour, shape, size, seed=rng.randint(0, 1 << 30)), f"a {colour} {shape}"


def truncated_jpeg(image: Image.Image) -> bytes:
  """JPEG bytes cut inside the entropy-coded data: PIL opens them, then fails to load."""
  raw = encode(image, "JPEG")
  return raw[:len(raw) - max(40, len(raw) // 5)]


def garbage(index: int) -> bytes:
  return random.Random(-1 - index).randbytes(300)


def corrupted(index: int, image: Image.Image, nth: int) -> bytes:
  """Alternately a truncated JPEG (even nth) and pure garbage (odd nth)."""
  return truncated_jpeg(image) if nth % 2 == 0 else garbage(index)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  info.mtime = 0
  tar.addfile(info, io.BytesIO(data))


def _expected(keys: list[str], captions: dict, skipped: dict) -> dict:
  return {"written": len(keys), "keys": keys, "captions": captions,
          "skipped": {r: n for r, n in sorted(skipped.items()) if n},
          "skipped_total": sum(skipped.values())}


def write_webdataset(directory: str, num_shards: int, per_shard: int, *,
                     corrupt: Sequence[int] = (), empty_captions: Sequence[int] = (),
                     missing_txt: Sequence[int] = (), missing_image: Sequence[int] = (),
                     size: int = 32, seed: int = 0) -> dict:
  """img2dataset-style tars `{shard:05d}.tar` with keys `{shard:05d}{i:04d}`.

  Sample indices (in the damage arguments) count across shards: shard * per_shard + i.
  Each sample is KEY.jpg|png|webp + KEY.txt + KEY.json (the json left out of every 4th);
  every 5th also has an ignored KEY.cls. Returns expected `written`, `keys` (in build order,
  as '{shard:05d}/{key}'), `captions` {key: caption}, `formats` {key: ext}, `skipped` {reason:
  count}, `skipped_total` and `tars`.
  """
  os.makedirs(directory, exist_ok=True)
  corrupt, empty = list(corrupt), set(empty_captions)
  keys, captions, formats, tars = [], {}, {}, []
  skipped = {"undecodable_image": 0, "empty_caption": 0, "missing_caption": 0,
             "missing_image": 0}
  for shard in range(num_shards):
    path = os.path.join(directory, f"{shard:05d}.tar")
    tars.append(path)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
      for i in range(per_shard):
        index = shard * per_shard + i
        key = f"{shard:05d}{i:04d}"
        image, caption = sample(index, seed, size)
        ext, pil_format = WEBDATASET_FORMATS[index % len(WEBDATASET_FORMATS)]
        if index in corrupt:
          ext, data = "jpg", corrupted(index, image, corrupt.index(index))
        else:
          data = encode(image, pil_format)
        text = "  \n " if index in empty else caption + "\n"
        if index not in missing_image:
          _add(tar, f"{key}.{ext}", data)
        if index not in missing_txt:
          _add(tar, f"{key}.txt", text.encode())
        if index % 4 != 3:
          _add(tar, f"{key}.json", json.dumps({"key": key, "index": index}).encode())
        if index % 5 == 0:
          _add(tar, f"{key}.cls", str(index).encode())
        if index in missing_image:
          skipped["missing_image"] += 1
        elif index in missing_txt:
          skipped["missing_caption"] += 1
        elif index in empty:
          skipped["empty_caption"] += 1
        elif index in corrupt:
          skipped["undecodable_image"] += 1
        else:
          full_key = f"{shard:05d}/{key}"
          keys.append(full_key)
          captions[full_key] = caption
          formats[full_key] = ext
  result = _expected(keys, captions, skipped)
  result.update(formats=formats, tars=tars)
  return result


def write_folder(directory: str, n: int, fmt: str = "jsonl", *, corrupt: Sequence[int] = (),
                 empty_captions: Sequence[int] = (), missing_images: Sequence[int] = (),
                 bad_lines: int = 0, multi_caption: bool = False,
                 image_column: str = "filepath", caption_column: str = "title",
                 size: int = 32, seed: int = 0) -> dict:
  """`n` images in directory/images/ and a captions.jsonl | captions.csv | captions.tsv.

  jsonl records are {"image": "images/00000.jpg", "caption": ...}; csv/tsv files have the
  columns `image_column` and `caption_column` (open_clip's filepath/title by default) plus
  an extra 'id' column. With `multi_caption`, captions are lists (a JSON list in csv cells)
  holding the caption, a variant and an empty string. `bad_lines` malformed lines are
  appended. Returns `path` (the records file), `written`, `keys` (sorted: the build shuffles
  them), `captions` {key: caption or list}, `skipped`, `skipped_total`.
  """
  os.makedirs(os.path.join(directory, "images"), exist_ok=True)
  corrupt, empty = list(corrupt), set(empty_captions)
  records, keys, captions = [], [], {}
  skipped = {"undecodable_image": 0, "empty_caption": 0, "missing_image": 0,
             "bad_record": bad_lines}
  for index in range(n):
    image, caption = sample(index, seed, size)
    ext, pil_format = WEBDATASET_FORMATS[index % len(WEBDATASET_FORMATS)]
    rel = f"images/{index:05d}.{ext}"
    if index in corrupt:
      data = corrupted(index, image, corrupt.index(index))
    else:
      data = encode(image, pil_format)
    if index not in missing_images:
      with open(os.path.join(directory, rel), "wb") as f:
        f.write(data)
    value = "   " if index in empty else caption
    if multi_caption:
      value = ["", " "] if index in empty else [caption, f"{caption} in a picture", ""]
    records.append((rel, value))
    if index in empty:
      skipped["empty_caption"] += 1
    elif index in missing_images:
      skipped["missing_image"] += 1
    elif index in corrupt:
      skipped["undecodable_image"] += 1
    else:
      keys.append(rel)
      captions[rel] = [c for c in value if c] if multi_caption else caption
  if fmt == "jsonl":
    path = os.path.join(directory, "captions.jsonl")
    lines = [json.dumps({"image": rel, "caption": value}) for rel, value in records]
    lines += ['{"image": "images/broken.jpg", "caption": '] * bad_lines
    with open(path, "w", encoding="utf-8") as f:
      f.write("\n".join(lines) + "\n")
  elif fmt in ("csv", "tsv"):
    import csv  # pylint: disable=import-outside-toplevel
    path = os.path.join(directory, f"captions.{fmt}")
    with open(path, "w", newline="", encoding="utf-8") as f:
      writer = csv.writer(f, delimiter="," if fmt == "csv" else "\t")
      writer.writerow(["id", image_column, caption_column])
      for index, (rel, value) in enumerate(records):
        writer.writerow([index, rel, json.dumps(value) if multi_caption else value])
      for _ in range(bad_lines):
        writer.writerow(["only", "two"])
  else:
    raise ValueError(f"fmt must be jsonl, csv or tsv, got {fmt!r}")
  result = _expected(sorted(keys), captions, skipped)
  result["path"] = path
  return result


def write_classes(directory: str, classes: Sequence[str], per_class: int, *,
                  corrupt: Sequence[int] = (), size: int = 32, seed: int = 0) -> dict:
  """ImageNet-style directory/<class>/<i>.<ext> images (formats cycled, '.JPEG' included).

  Class c draws shapes of colour sorted(COLOURS)[c % 6]. `corrupt` indexes the images
  across classes (c * per_class + i). A README.txt at the root and a notes.txt per class are
  ignored. Returns `written`, `keys` (sorted), `labels` {key: index of the class in
  sorted(classes)}, `skipped`, `skipped_total`.
  """
  corrupt = list(corrupt)
  sorted_classes = sorted(classes)
  colours = sorted(COLOURS)
  keys, labels = [], {}
  skipped = {"undecodable_image": 0}
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "README.txt"), "w", encoding="utf-8") as f:
    f.write("not a class\n")
  for c, name in enumerate(classes):
    os.makedirs(os.path.join(directory, name), exist_ok=True)
    with open(os.path.join(directory, name, "notes.txt"), "w", encoding="utf-8") as f:
      f.write("ignored\n")
    for i in range(per_class):
      index = c * per_class + i
      image = draw(colours[c % len(colours)], SHAPES[i % len(SHAPES)], size, seed + index)
      ext, pil_format = CLASS_FORMATS[index % len(CLASS_FORMATS)]
      rel = f"{name}/{i:04d}.{ext}"
      data = (corrupted(index, image, corrupt.index(index)) if index in corrupt
              else encode(image, pil_format))
      with open(os.path.join(directory, rel), "wb") as f:
        f.write(data)
      if index in corrupt:
        skipped["undecodable_image"] += 1
      else:
        keys.append(rel)
        labels[rel] = sorted_classes.index(name)
  result = _expected(sorted(keys), {}, skipped)
  result["labels"] = labels
  return result
