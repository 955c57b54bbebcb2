"""tools/build_dataset.py / big_vlp.data.build: formats, bad input, resume, determinism, errors."""

import glob
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from big_vlp.data import build
from big_vlp.data import pipeline
import corpus_fixtures as corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "build_dataset.py")
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
CLASSES = ["n02_cat", "n01_dog", "n03_bird"]  # Sorted: dog, cat, bird.
CLASS_NAMES = {"n01_dog": "dog", "n02_cat": "cat", "n03_bird": "bird"}

# Reads datasets back in a fresh interpreter that never imported big_vlp or a builder class.
READBACK = r"""
import json, sys
import tensorflow_datasets as tfds
out = {}
for name, split in json.loads(sys.argv[2]):
  builder = tfds.builder(name, data_dir=sys.argv[1])
  read_config = tfds.ReadConfig(interleave_cycle_length=1)  # File order.
  examples = []
  for ex in tfds.as_numpy(builder.as_dataset(split=split, read_config=read_config)):
    item = {"key": ex["key"].decode(), "shape": list(ex["image"].shape)}
    if "caption" in ex:
      c = ex["caption"]
      item["caption"] = c.decode() if isinstance(c, bytes) else [x.decode() for x in c]
    if "meta" in ex:
      item["meta"] = ex["meta"].decode()
    if "label" in ex:
      item["label"] = int(ex["label"])
    examples.append(item)
  features = builder.info.features
  out[name + "/" + split] = {
      "examples": examples, "splits": sorted(builder.info.splits.keys()),
      "num_examples": builder.info.splits[split].num_examples,
      "features": {k: type(f).__name__ for k, f in features.items()},
      "names": list(features["label"].names) if "label" in features else None}
print("READBACK" + json.dumps(out))
"""


def run_build(data_dir, fmt, inputs, name, **kwargs) -> dict:
  kwargs.setdefault("workers", 2)
  cfg = build.BuildConfig(format=fmt, inputs=inputs if isinstance(inputs, list) else [inputs],
                          name=name, data_dir=str(data_dir), **kwargs)
  return build.build(cfg, progress=False)


def readback(data_dir, datasets) -> dict:
  result = subprocess.run([sys.executable, "-c", READBACK, str(data_dir), json.dumps(datasets)],
                          capture_output=True, text=True, env=ENV, cwd=os.path.dirname(
                              str(data_dir)), timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  line = [x for x in result.stdout.splitlines() if x.startswith("READBACK")][-1]
  return json.loads(line[len("READBACK"):])


def shard_files(data_dir, name) -> dict[str, bytes]:
  """{file name: bytes} of a dataset's shards."""
  files = sorted(glob.glob(os.path.join(str(data_dir), name, build.VERSION, "*.tfrecord-*")))
  out = {}
  for path in files:
    with open(path, "rb") as f:
      out[os.path.basename(path)] = f.read()
  return out


def raw_images(data_dir, name, split) -> dict[str, bytes]:
  """{key: stored image bytes}."""
  builder = tfds.builder(name, data_dir=str(data_dir))
  ds = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
  return {ex["key"].decode(): ex["image"] for ex in tfds.as_numpy(ds)}


def counts(summary: dict) -> tuple:
  return summary["examples_written"], summary["skipped"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """Corpora of every format, built into one data_dir and read back in a fresh process."""
  root = tmp_path_factory.mktemp("build")
  data_dir = root / "tfds"
  out = {"data_dir": data_dir, "root": root, "expected": {}, "summary": {}}

  def add(name, expected, summary):
    out["expected"][name], out["summary"][name] = expected, summary

  wds = corpus.write_webdataset(str(root / "wds"), 3, 10, corrupt=(1, 4), empty_captions=(7,),
                                missing_txt=(12,), missing_image=(21,))
  add("wds", wds, run_build(data_dir, "webdataset", str(root / "wds" / "{00000..00002}.tar"),
                            "wds", examples_per_shard=4))
  jsonl = corpus.write_folder(str(root / "jsonl"), 12, "jsonl", corrupt=(2,), empty_captions=(5,),
                              missing_images=(8,), bad_lines=2)
  add("jsonl", jsonl, run_build(data_dir, "folder", str(root / "jsonl"), "jsonl",
                                examples_per_shard=5))
  csv_ = corpus.write_folder(str(root / "csv"), 10, "csv", corrupt=(3,), bad_lines=1)
  add("csv", csv_, run_build(data_dir, "folder", csv_["path"], "csv", workers=1))
  tsv = corpus.write_folder(str(root / "tsv"), 10, "tsv", empty_captions=(0,),
                            image_column="image", caption_column="caption")
  add("tsv", tsv, run_build(data_dir, "folder", str(root / "tsv"), "tsv", workers=1))
  multi = corpus.write_folder(str(root / "multi"), 8, "jsonl", empty_captions=(1,),
                              multi_caption=True)
  add("multi", multi, run_build(data_dir, "folder", multi["path"], "multi", workers=1))
  classes = corpus.write_classes(str(root / "classes"), CLASSES, 4, corrupt=(5,))
  names_file = root / "names.json"
  names_file.write_text(json.dumps(CLASS_NAMES))
  add("classes", classes, run_build(data_dir, "classes", str(root / "classes"), "classes",
                                    class_names=str(names_file), examples_per_shard=5))
  out["read"] = readback(data_dir, [[n, "test" if n == "classes" else "train"]
                                    for n in out["expected"]])
  return out


def test_webdataset_counts_are_exact_per_reason(built):
  expected, summary = built["expected"]["wds"], built["summary"]["wds"]
  assert counts(summary) == (expected["written"], expected["skipped"])
  assert expected["skipped"] == {"empty_caption": 1, "missing_caption": 1, "missing_image": 1,
                                 "undecodable_image": 2}  # Truncated JPEG and garbage.
  assert summary["skipped_examples"]["undecodable_image"] == ["00000/000000001",
                                                              "00000/000000004"]
  assert summary["skipped_examples"]["missing_image"] == ["00002/000020001"]
  assert summary["num_shards"] == 8  # 3 tars of <= 10 valid samples, 4 per shard.
  path = os.path.join(built["data_dir"], "wds", "1.0.0", "build_summary_train.json")
  with open(path, encoding="utf-8") as f:
    assert json.load(f)["skipped"] == expected["skipped"]
  assert summary["examples_per_s"] > 0 and summary["tasks"] == 3


def test_webdataset_reads_back_in_a_fresh_process(built):
  expected, read = built["expected"]["wds"], built["read"]["wds/train"]
  assert read["features"] == {"image": "Image", "caption": "Text", "key": "Text",
                              "meta": "Text"}
  assert [e["key"] for e in read["examples"]] == expected["keys"]
  assert read["num_examples"] == expected["written"]
  for example in read["examples"]:
    assert example["caption"] == expected["captions"][example["key"]]
    assert example["shape"] == [32, 32, 3]
    index = int(example["key"][-4:]) + 10 * int(example["key"][:5])
    meta = example["meta"]
    assert (json.loads(meta)["index"] == index) if index % 4 != 3 else meta == ""


def test_webdataset_images_are_kept_or_reencoded(built):
  expected = built["expected"]["wds"]
  stored = raw_images(built["data_dir"], "wds", "train")
  originals = {}
  for tar_path in expected["tars"]:
    with tarfile.open(tar_path) as tar:
      for member in tar:
        stem, ext = member.name.split(".", 1)
        if ext in ("jpg", "png", "webp"):
          originals[f"{os.path.basename(tar_path)[:5]}/{stem}"] = tar.extractfile(member).read()
  by_format = {}
  for key, data in stored.items():
    ext = expected["formats"][key]
    by_format[ext] = by_format.get(ext, 0) + 1
    if ext == "webp":
      assert data[:3] == b"\xff\xd8\xff"  # Re-encoded as JPEG...
      assert tf.io.decode_image(data, channels=3).shape == (32, 32, 3)  # ...and decodes.
    else:
      assert data == originals[key]  # Valid RGB JPEG / PNG: the original bytes.
  assert set(by_format) == {"jpg", "png", "webp"}
  assert built["summary"]["wds"]["images"] == {"kept": by_format["jpg"] + by_format["png"],
                                               "reencoded": by_format["webp"]}


@pytest.mark.parametrize("name", ["jsonl", "csv", "tsv"])
def test_folder_formats(built, name):
  expected, summary = built["expected"][name], built["summary"][name]
  read = built["read"][f"{name}/train"]
  assert counts(summary) == (expected["written"], expected["skipped"])
  assert read["features"]["caption"] == "Text"
  keys = [e["key"] for e in read["examples"]]
  assert sorted(keys) == expected["keys"] and keys != expected["keys"]  # Shuffled.
  for example in read["examples"]:
    assert example["caption"] == expected["captions"][example["key"]]
    assert example["meta"] == ""


def test_folder_skips_are_listed(built):
  summary = built["summary"]["jsonl"]
  assert summary["skipped"] == {"bad_record": 2, "empty_caption": 1, "missing_image": 1,
                                "undecodable_image": 1}
  assert summary["skipped_examples"]["bad_record"] == ["captions.jsonl:13",
                                                       "captions.jsonl:14"]
  assert summary["skipped_examples"]["missing_image"] == ["images/00008.jpg"]
  assert summary["tasks"] == 3  # 12 records in chunks of 5.


def test_multi_caption_jsonl_gives_a_sequence_feature(built):
  expected, read = built["expected"]["multi"], built["read"]["multi/train"]
  assert read["features"]["caption"] == "Sequence"
  assert built["summary"]["multi"]["skipped"] == {"empty_caption": 1}
  assert len(read["examples"]) == expected["written"] == 7
  for example in read["examples"]:
    assert example["caption"] == expected["captions"][example["key"]]
    assert len(example["caption"]) == 2  # The empty third caption is dropped.


def test_classes_labels_and_names(built):
  expected, summary = built["expected"]["classes"], built["summary"]["classes"]
  read = built["read"]["classes/test"]
  data_dir = str(built["data_dir"])
  assert counts(summary) == (expected["written"], expected["skipped"])
  assert read["features"] == {"image": "Image", "label": "ClassLabel", "key": "Text"}
  assert read["names"] == ["dog", "cat", "bird"]  # Names of the sorted dirs.
  assert {e["key"]: e["label"] for e in read["examples"]} == expected["labels"]
  keys = [e["key"] for e in read["examples"]]
  assert keys != sorted(keys)  # Not stored in class order.
  assert pipeline.class_names("classes", data_dir) == ["dog", "cat", "bird"]
  it = pipeline.eval_iterator(name="classes", split="test", data_dir=data_dir,
                              pp="decode|resize(32)|value_range(-1,1)|keep('image','label')",
                              tokenizer=None, batch_size=8)
  batches = list(it)
  images = np.concatenate([b["image"] for b in batches])
  mask = np.concatenate([b["_mask"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])[mask]
  assert images.shape[1:] == (32, 32, 3) and mask.sum() == expected["written"]
  assert sorted(labels.tolist()) == sorted(expected["labels"].values())


def test_class_names_file_formats(tmp_path):
  dirs = ["a_dir", "b_dir"]
  for text in ("alpha\nbeta\n", '["alpha", "beta"]', '{"b_dir": "beta", "a_dir": "alpha"}'):
    path = tmp_path / "names.txt"
    path.write_text(text)
    assert build.load_class_names(str(path), dirs) == ["alpha", "beta"]
  for text, message in (("alpha\n", "has 1 names"), ('{"a_dir": "x"}', "no name for 1"),
                        ("same\nsame\n", "unique")):
    path.write_text(text)
    with pytest.raises(build.BuildArgError, match=f"--class_names=.*{message}"):
      build.load_class_names(str(path), dirs)


def test_workers_do_not_change_the_output(tmp_path):
  corpus.write_webdataset(str(tmp_path / "wds"), 4, 6, corrupt=(2,), size=24)
  corpus.write_classes(str(tmp_path / "classes"), CLASSES, 5, size=24)
  for workers in (1, 2):
    data_dir = tmp_path / f"w{workers}"
    run_build(data_dir, "webdataset", str(tmp_path / "wds" / "*.tar"), "det",
              workers=workers, examples_per_shard=4)
    run_build(data_dir, "classes", str(tmp_path / "classes"), "det_classes", workers=workers,
              examples_per_shard=4, seed=3)
  for name in ("det", "det_classes"):
    one, two = shard_files(tmp_path / "w1", name), shard_files(tmp_path / "w2", name)
    assert len(one) >= 3 and one == two  # Same names, byte-identical records.


def _staged_tasks(staging: str) -> list[str]:
  return glob.glob(os.path.join(staging, "t*.json"))


def test_killed_build_resumes_to_the_clean_result(tmp_path, capsys):
  expected = corpus.write_webdataset(str(tmp_path / "wds"), 8, 6, corrupt=(3,),
                                     empty_captions=(10,), size=24)
  data_dir = str(tmp_path / "killed")
  flags = ["--format", "webdataset", "--input", str(tmp_path / "wds" / "*.tar"),
           "--name", "resumed", "--data_dir", data_dir, "--workers", "2",
           "--examples_per_shard", "4"]
  staging = os.path.join(data_dir, "resumed", "1.0.0.incomplete-build", "train")
  with open(tmp_path / "log", "w", encoding="utf-8") as log:
    # Slowed tasks (a test-only hook) leave time to kill the build part-way.
    proc = subprocess.Popen([sys.executable, TOOL] + flags, stdout=log, stderr=log,
                            env=dict(ENV, **{build.TASK_DELAY_ENV: "1.5"}),
                            start_new_session=True)
    try:
      deadline = time.time() + 180
      while len(_staged_tasks(staging)) < 2:
        assert proc.poll() is None, (tmp_path / "log").read_text()[-2000:]
        assert time.time() < deadline, "no task finished in time"
        time.sleep(0.02)
    finally:
      os.killpg(proc.pid, signal.SIGKILL)  # The build, its workers and helpers.
      proc.wait()
  completed = len(_staged_tasks(staging))
  assert 2 <= completed < 8
  assert not os.path.exists(os.path.join(data_dir, "resumed", "1.0.0", "dataset_info.json"))

  rerun = subprocess.run([sys.executable, TOOL] + flags, capture_output=True, text=True,
                         env=ENV, timeout=300, check=False)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  with open(os.path.join(data_dir, "resumed", "1.0.0", "build_summary_train.json"),
            encoding="utf-8") as f:
    summary = json.load(f)
  assert summary["tasks_resumed"] == completed
  assert counts(summary) == (expected["written"], expected["skipped"])
  assert not os.path.exists(os.path.dirname(staging))  # Staging removed.

  clean = run_build(tmp_path / "clean", "webdataset", str(tmp_path / "wds" / "*.tar"),
                    "resumed", workers=1, examples_per_shard=4)
  assert counts(clean) == counts(summary)
  assert shard_files(data_dir, "resumed") == shard_files(tmp_path / "clean", "resumed")
  keys = list(raw_images(data_dir, "resumed", "train"))
  assert sorted(keys) == sorted(expected["keys"])

  # Rerunning a finished build does nothing.
  capsys.readouterr()
  before = shard_files(data_dir, "resumed")
  assert build.main(flags + ["--no_progress"]) == 0
  assert "already built" in capsys.readouterr().out
  assert shard_files(data_dir, "resumed") == before


def test_interrupted_finalize_resumes(tmp_path, monkeypatch):
  corpus.write_webdataset(str(tmp_path / "wds"), 2, 5, size=24)
  args = ("webdataset", str(tmp_path / "wds" / "*.tar"), "fin")

  def crash(**kwargs):
    raise RuntimeError("killed")  # As if killed after the shards moved, before the metadata.

  with monkeypatch.context() as patch:
    patch.setattr(tfds.folder_dataset, "write_metadata", crash)
    with pytest.raises(RuntimeError, match="killed"):
      run_build(tmp_path / "a", *args, workers=1, examples_per_shard=3)
  assert os.path.exists(tmp_path / "a" / "fin" / "1.0.0.incomplete-build" / "train" /
                        "finalize.json")
  resumed = run_build(tmp_path / "a", *args, workers=1, examples_per_shard=3)
  clean = run_build(tmp_path / "b", *args, workers=1, examples_per_shard=3)
  assert counts(resumed) == counts(clean) and resumed["tasks_resumed"] == 2
  assert shard_files(tmp_path / "a", "fin") == shard_files(tmp_path / "b", "fin")


def test_overwrite_rebuilds(tmp_path):
  corpus.write_webdataset(str(tmp_path / "wds"), 2, 5, size=24)
  args = (tmp_path / "tfds", "webdataset", str(tmp_path / "wds" / "*.tar"), "over")
  first = run_build(*args, workers=1, examples_per_shard=2)
  assert run_build(*args, workers=1)["already_built"]
  second = run_build(*args, workers=1, examples_per_shard=4, overwrite=True)
  assert first["num_shards"] == 6 and second["num_shards"] == 4
  assert len(shard_files(tmp_path / "tfds", "over")) == 4  # Old shards removed.
  assert pipeline.num_examples("over", "train", str(tmp_path / "tfds")) == 10


def test_second_split_keeps_the_first(tmp_path):
  corpus.write_classes(str(tmp_path / "classes"), CLASSES, 3, size=24)
  data_dir = str(tmp_path / "tfds")
  run_build(data_dir, "classes", str(tmp_path / "classes"), "two", workers=1)
  run_build(data_dir, "classes", str(tmp_path / "classes"), "two", workers=1,
            split="validation", seed=1)
  builder = tfds.builder("two", data_dir=data_dir)
  assert {s: builder.info.splits[s].num_examples for s in builder.info.splits} == {
      "test": 9, "validation": 9}
  assert pipeline.class_names("two", data_dir) == sorted(CLASSES)
  # Other class names: features differ from the existing splits'.
  names = tmp_path / "names.txt"
  names.write_text("a\nb\nc\n")
  with pytest.raises(build.BuildArgError, match="--split=.*features differ"):
    run_build(data_dir, "classes", str(tmp_path / "classes"), "two", workers=1,
              split="train", class_names=str(names))


def test_truncated_tar_keeps_the_samples_before_the_damage(tmp_path):
  expected = corpus.write_webdataset(str(tmp_path / "wds"), 1, 8, size=24)
  with open(expected["tars"][0], "rb") as f:
    data = f.read()
  with open(tmp_path / "wds" / "00001.tar", "wb") as f:
    f.write(data[:len(data) // 2 + 100])
  summary = run_build(tmp_path / "tfds", "webdataset", str(tmp_path / "wds" / "*.tar"), "cut",
                      workers=1)
  assert summary["skipped"] == {"bad_tar": 1}
  assert 8 < summary["examples_written"] < 16


def test_odd_webdataset_samples(tmp_path):
  jpeg = _encoded(corpus.draw("green", "circle", 16), "JPEG")
  members = [
      ("sub/a.JPG", jpeg), ("sub/a.txt", b"upper-case extension, in a folder"),
      ("b.jpg", jpeg), ("b.txt", b"\xff\xfe not utf-8"),  # undecodable_caption
      ("c.jpg", b""), ("c.txt", b"zero bytes"),  # empty_image
      ("d.json", b"{}"),  # missing_image
      ("e.x.jpg", jpeg), ("e.x.txt", b"key 'e', extensions 'x.jpg', 'x.txt': ignored"),
      ("f.png", jpeg), ("f.txt", b"first image of the key wins"), ("f.webp", b"junk"),
      ("b.jpg", jpeg),  # The key 'b' again: duplicate_key.
  ]
  os.makedirs(tmp_path / "wds")
  with tarfile.open(tmp_path / "wds" / "odd.tar", "w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  summary = run_build(tmp_path / "tfds", "webdataset", str(tmp_path / "wds"), "odd", workers=1)
  assert summary["skipped"] == {"duplicate_key": 1, "empty_image": 1, "missing_image": 1,
                                "undecodable_caption": 1}
  assert summary["skipped_examples"]["missing_image"] == ["odd/d"]
  assert sorted(raw_images(tmp_path / "tfds", "odd", "train")) == ["odd/f", "odd/sub/a"]


def test_csv_with_bad_utf8_and_absolute_paths(tmp_path):
  image = tmp_path / "img.png"
  image.write_bytes(_encoded(corpus.draw("red", "square", 16), "PNG"))
  lines = [b"filepath,title", f"{image},a red square".encode(), b"missing.png,nothing here",
           f"{image},".encode() + b"caf\xe9 latin-1", f"{image},too,many".encode()]
  (tmp_path / "pairs.csv").write_bytes(b"\n".join(lines) + b"\n")
  summary = run_build(tmp_path / "tfds", "folder", str(tmp_path / "pairs.csv"), "pairs",
                      workers=1)
  assert summary["examples_written"] == 1
  assert summary["skipped"] == {"bad_record": 1, "missing_image": 1, "undecodable_caption": 1}


def test_workers_do_not_import_tensorflow(tmp_path):
  corpus.write_webdataset(str(tmp_path / "wds"), 1, 3, size=16)
  os.makedirs(tmp_path / "staging")
  task = build._Task(  # pylint: disable=protected-access
      index=0, staging=str(tmp_path / "staging"), examples_per_shard=10, max_size=None,
      kind="text", tar_path=str(tmp_path / "wds" / "00000.tar"), tar_label="00000")
  with build.worker_pool(1) as pool:
    assert pool.apply(build.run_task, (task,))["written"] == 3
    assert not pool.apply(eval, ("'tensorflow' in __import__('sys').modules",))


def test_max_size_resizes_the_shorter_side(tmp_path):
  os.makedirs(tmp_path / "pairs" / "images")
  lines = []
  for i, size in enumerate([(64, 48), (20, 30), (40, 100)]):
    Image.new("RGB", size, (10 * i, 90, 200)).save(tmp_path / "pairs" / "images" / f"{i}.png")
    lines.append(json.dumps({"image": f"images/{i}.png", "caption": f"image {i}"}))
  (tmp_path / "pairs" / "captions.jsonl").write_text("\n".join(lines))
  summary = run_build(tmp_path / "tfds", "folder", str(tmp_path / "pairs"), "small",
                      workers=1, max_size=32)
  assert summary["images"] == {"kept": 1, "resized": 2}
  stored = raw_images(tmp_path / "tfds", "small", "train")
  shapes = {k: tuple(tf.io.decode_image(v, channels=3).shape) for k, v in stored.items()}
  assert shapes == {"images/0.png": (32, 43, 3), "images/1.png": (30, 20, 3),
                    "images/2.png": (80, 32, 3)}
  assert stored["images/0.png"][:3] == b"\xff\xd8\xff"


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
  out = io.BytesIO()
  image.save(out, fmt, **kwargs)
  return out.getvalue()


def test_prepare_image_keeps_or_reencodes():
  rgb = corpus.draw("red", "circle", 16)
  for kept in (_encoded(rgb, "JPEG"), _encoded(rgb, "PNG"), _encoded(rgb.convert("L"), "JPEG"),
               _encoded(rgb.convert("L"), "PNG")):
    assert build.prepare_image(kept) == (kept, "kept")
  rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # Fully transparent red.
  grey16 = Image.fromarray(np.full((8, 8), 65535, np.uint16))
  cases = {"cmyk": _encoded(rgb.convert("CMYK"), "JPEG"), "palette": _encoded(
      rgb.convert("P"), "PNG"), "rgba": _encoded(rgba, "PNG"), "16bit": _encoded(grey16, "PNG"),
           "webp": _encoded(rgb, "WEBP"), "gif": _encoded(rgb, "GIF"),
           "bmp": _encoded(rgb, "BMP")}
  for case, raw in cases.items():
    data, action = build.prepare_image(raw)
    assert action == "reencoded" and data[:3] == b"\xff\xd8\xff", case
    pixels = tf.io.decode_image(data, channels=3).numpy()
    if case in ("rgba", "16bit"):
      assert pixels.min() >= 250, case  # Transparent -> white; 16-bit max -> 255.
  assert build.prepare_image(corpus.truncated_jpeg(rgb)) == (None, "undecodable_image")
  assert build.prepare_image(corpus.garbage(0)) == (None, "undecodable_image")
  assert build.prepare_image(b"") == (None, "empty_image")


@pytest.mark.parametrize("kind", ["text", "sequence", "label"])
def test_serialized_examples_parse_like_tfds(kind):
  features = build._features(kind, ["x", "y"])  # pylint: disable=protected-access
  image = _encoded(corpus.draw("blue", "square", 8), "PNG")
  example = {"image": image, "key": "k/é"}
  mine = {"image": build._bytes_feature([image]),  # pylint: disable=protected-access
          "key": build._bytes_feature(["k/é".encode()])}  # pylint: disable=protected-access
  if kind == "label":
    example["label"] = 1
    mine["label"] = build._int64_feature([1])  # pylint: disable=protected-access
  else:
    captions = ["a blue square", "ünïcode"] if kind == "sequence" else "a blue square"
    example.update(caption=captions, meta='{"a": 1}')
    mine["caption"] = build._bytes_feature(  # pylint: disable=protected-access
        [c.encode() for c in (captions if kind == "sequence" else [captions])])
    mine["meta"] = build._bytes_feature([b'{"a": 1}'])  # pylint: disable=protected-access
  reference = features.serialize_example(features.encode_example(example))
  assert (tf.train.Example.FromString(build.serialize_example(mine))
          == tf.train.Example.FromString(reference))


def test_input_expansion(tmp_path):
  assert build.expand_braces("s/{00008..00011}.tar") == [
      "s/00008.tar", "s/00009.tar", "s/00010.tar", "s/00011.tar"]
  assert build.expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
  for i in range(4):
    (tmp_path / f"{i:05d}.tar").write_bytes(b"")
  (tmp_path / "00000_stats.json").write_text("{}")
  tars = [str(tmp_path / f"{i:05d}.tar") for i in range(4)]
  assert build.resolve_inputs([str(tmp_path / "*")], tar_dirs=True) == tars
  assert build.resolve_inputs([str(tmp_path)], tar_dirs=True) == tars
  assert build.resolve_inputs([f"{tars[3]},{tmp_path}/{{00000..00001}}.tar", tars[0]],
                              tar_dirs=True) == [tars[3], tars[0], tars[1]]


def _cli_error(capsys, flags) -> str:
  capsys.readouterr()
  assert build.main(flags + ["--no_progress"]) == 2
  return capsys.readouterr().err


def test_cli_errors_name_the_flag(tmp_path, capsys):
  base = ["--name", "errs", "--data_dir", str(tmp_path / "tfds")]
  err = _cli_error(capsys, ["--format", "webdataset", "--input", str(tmp_path / "*.tar")] + base)
  assert "--input=" in err and "matches no .tar files" in err
  corpus.write_folder(str(tmp_path / "csv"), 2, "csv", caption_column="words")
  err = _cli_error(capsys, ["--format", "folder", "--input", str(tmp_path / "csv")] + base)
  assert "--caption_key" in err and "'words'" in err and "'filepath'" in err
  os.makedirs(tmp_path / "empty")
  err = _cli_error(capsys, ["--format", "folder", "--input", str(tmp_path / "empty")] + base)
  assert "--input=" in err and "neither captions.jsonl nor" in err
  err = _cli_error(capsys, ["--format", "classes", "--input", str(tmp_path / "empty")] + base)
  assert "--input=" in err and "no class dirs" in err
  err = _cli_error(capsys, ["--format", "webdataset", "--input", "x.tar", "--name", "mnist",
                            "--data_dir", str(tmp_path)])
  assert "--name='mnist'" in err and "registered" in err
  with pytest.raises(build.BuildArgError, match="--format='tar'.*webdataset, folder, classes"):
    build.build(build.BuildConfig(format="tar", inputs=["x"], name="x", data_dir="d"))
  assert not os.path.exists(tmp_path / "tfds")  # Nothing written on bad flags.


def test_cli_bad_format_exits_2():
  result = subprocess.run([sys.executable, TOOL, "--format", "parquet", "--input", "x",
                           "--name", "x", "--data_dir", "d"], capture_output=True, text=True,
                          env=ENV, timeout=120, check=False)
  assert result.returncode == 2
  assert "--format" in result.stderr and "webdataset" in result.stderr
