"""Input headroom: images/s the training stream delivers next to what the train step consumes.

  python tools/benchmark_input.py [--seconds 30] [--recipes 64,224] [--workdir DIR]

Both figures of a recipe are measured in this one run, one after the other (never both at
once, so they do not share the cores), on the machine at hand:

  64   the default job: configs/demo.py (big_vlp_shapes 64x64 PNGs, its pp and
       SentencePiece tokenizer) against the demo's train step at its batch size.
  224  img2dataset-style tars of 256x256 JPEGs converted with tools/build_dataset.py, read
       with `decode|inception_crop(224)|flip_lr|value_range(-1,1)|tokenize(64)`, against the
       train step of a ViT-S/16 two-tower at 224 px (S text tower, 64 tokens, batch 32).

The pipeline figure is steady state: images/s over --seconds after the first batch (whose
latency, which includes filling the first shuffle window, is printed separately).
"""

import argparse
import io
import os
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# pylint: disable=wrong-import-position
import jax
import numpy as np

from big_vlp.run_setup import make_input, make_tokenizer

import benchmark  # tools/benchmark.py, next to this file.


def write_jpeg_tars(out_dir: str, shards: int, per_shard: int, size: int = 256) -> None:
  """img2dataset-like tars: KEY.jpg (a coloured shape on noise) + KEY.txt (its caption)."""
  from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  colours = {"red": (220, 35, 35), "green": (40, 175, 55), "blue": (35, 65, 225),
             "yellow": (240, 220, 35), "purple": (140, 45, 205)}
  os.makedirs(out_dir, exist_ok=True)
  for shard in range(shards):
    path = os.path.join(out_dir, f"{shard:05d}.tar")
    if os.path.exists(path):
      continue
    with tarfile.open(path + ".tmp", "w") as tar:
      for i in range(per_shard):
        name = list(colours)[rng.integers(len(colours))]
        shape = ("circle", "square")[rng.integers(2)]
        pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8) // 3 + 60
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        x, y, r = rng.integers(40, size - 40, 2).tolist() + [int(rng.integers(15, 40))]
        box = (x - r, y - r, x + r, y + r)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colours[name])
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        key = f"{shard:05d}{i:04d}"
        for ext, data in (("jpg", buf.getvalue()),
                          ("txt", f"a {name} {shape} on a grey background".encode())):
          info = tarfile.TarInfo(f"{key}.{ext}")
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
    os.replace(path + ".tmp", path)


def s16_config(data_dir: str):
  """A ViT-S/16 two-tower at 224 px (S text tower, 64 tokens) on the built JPEG dataset."""
  c = benchmark.load_config(
      f"configs/demo.py:data=bench_jpeg,data_dir={data_dir},res=224,batch=32")
  c.tokenizer = "bytes"
  c.data.pp = ("decode|inception_crop(224)|flip_lr|value_range(-1,1)"
               "|tokenize(max_len=64,key='caption',out_key='text')|keep('image','text')")
  return benchmark.vit_s16(c)  # The model of `tools/benchmark.py --config vit_s16`.


def pipeline_rate(config, workdir: str, seconds: float) -> tuple[float, float, dict]:
  """(steady img/s, first-batch latency s, first batch) of the config's training input."""
  tokenizer = make_tokenizer(config, workdir)
  t0 = time.perf_counter()
  batches = make_input(config, tokenizer, 0)
  first = next(batches)
  latency = time.perf_counter() - t0
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    n += len(next(batches)["image"])
  rate = n / (time.perf_counter() - t0)
  batches.close()
  return rate, latency, (first, tokenizer.vocab_size)


def step_rate(config, first: dict, vocab_size: int, steps: int) -> tuple[float, float]:
  """(img/s of the jitted train step, compile + first step s) on the config's model."""
  config.mesh = {"data": -1, "fsdp": 1}
  step = benchmark.BigVlpStep(config, first, vocab_size)
  return len(first["image"]) / step.run(steps), step.compile_s + step.first_step_s


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seconds", type=float, default=30.0, help="pipeline timing window")
  parser.add_argument("--steps", type=int, default=5, help="timed train steps per recipe")
  parser.add_argument("--recipes", default="64,224")
  parser.add_argument("--workdir", default="/tmp/big_vlp_benchmark_input")
  parser.add_argument("--data_dir", default=None, help="tfds data_dir for big_vlp_shapes")
  args = parser.parse_args()
  os.makedirs(args.workdir, exist_ok=True)
  rows = []
  for recipe in args.recipes.split(","):
    if recipe == "64":
      config = benchmark.load_config(
          "configs/demo.py" + (f":data_dir={args.data_dir}" if args.data_dir else ""))
      label = "64px PNG, demo config"
    elif recipe == "224":
      data_dir = os.path.join(args.workdir, "tfds")
      tars = os.path.join(args.workdir, "tars")
      write_jpeg_tars(tars, shards=8, per_shard=500)
      subprocess.run([sys.executable, os.path.join(ROOT, "tools", "build_dataset.py"),
                      "--format", "webdataset", "--input", os.path.join(tars, "*.tar"),
                      "--name", "bench_jpeg", "--data_dir", data_dir], check=True,
                     stdout=subprocess.DEVNULL)
      config = s16_config(data_dir)
      label = "224px JPEG, ViT-S/16 two-tower"
    else:
      raise SystemExit(f"--recipes: unknown recipe {recipe!r}; allowed: 64, 224")
    work = os.path.join(args.workdir, f"run_{recipe}")
    os.makedirs(work, exist_ok=True)
    rate, latency, (first, vocab) = pipeline_rate(config, work, args.seconds)
    print(f"[{label}] pipeline {rate:,.0f} img/s (first batch after {latency:.1f}s)",
          flush=True)
    consumed, compile_s = step_rate(config, first, vocab, args.steps)
    print(f"[{label}] train step {consumed:,.1f} img/s at batch {config.batch_size} "
          f"(compile {compile_s:.1f}s)", flush=True)
    rows.append((label, config.batch_size, rate, consumed))
  print(f"\n{jax.devices()[0].platform} x{jax.device_count()}, {os.cpu_count()} CPU cores")
  print(f"{'recipe':34s} {'batch':>5s} {'pipeline img/s':>15s} {'step img/s':>11s} "
        f"{'headroom':>9s}")
  for label, batch, rate, consumed in rows:
    print(f"{label:34s} {batch:5d} {rate:15,.0f} {consumed:11,.1f} {rate / consumed:8.1f}x")


if __name__ == "__main__":
  main()
