"""tools/teacher_embeddings.py: a dataset reinforced with a tiny trained teacher's embeddings,
read back by tfds and by the trainer's input, and its crash / rerun / overwrite behaviour."""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from big_vlp import pretrained
from big_vlp.config_common import img_pp
from big_vlp.data import build, ops, pipeline, tokenizers
from big_vlp.run_setup import make_input
from big_vlp.train import train
import corpus_fixtures as corpus
from data_fixtures import SMALL, shapes_dir  # noqa: F401  (pytest fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MULTI = "multi_caps"  # Built here: 1 to 3 captions per image.
TRAIN_PP = ("decode|resize(64)|value_range(-1,1)|choice(key='caption',also=('teacher_ztxt',))|"
            "tokenize(max_len=16,key='caption',out_key='text')|"
            "keep('image','text','teacher_zimg','teacher_ztxt','teacher_scale')")


def _load(name: str, path: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


tool = _load("teacher_embeddings", "tools/teacher_embeddings.py")
demo = _load("demo", "configs/demo.py")


def demo_config(data_dir: str, extra: str = ""):
  config = demo.get_config(f"runlocal=True,steps=2,batch=8,data={SMALL},eval_data={SMALL},"
                           f"data_dir={data_dir}" + extra)
  config.evals = {}
  config.peak_flops = 1e11  # MFU is not looked at: skips measuring the matmul peak.
  return config


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, shapes_dir):
  """A 2-step demo run with a trained SentencePiece tokenizer, restored."""
  workdir = str(tmp_path_factory.mktemp("teacher"))
  config = demo_config(shapes_dir)
  config.ckpt_every = 2  # One checkpoint, the final one.
  train(config, workdir)
  run = pretrained.load_run(workdir, mesh=None, field="--teacher")
  assert run.tokenizer_file is not None  # 'sp_train:256' saved WORKDIR/tokenizer.model.
  return run


@pytest.fixture(scope="module")
def multi_dir(tmp_path_factory) -> str:
  """A tfds data_dir with MULTI, built by tools/build_dataset.py's code from a jsonl."""
  source = tmp_path_factory.mktemp("multi_src")
  os.makedirs(source / "images")
  lines = []
  for i in range(21):
    image, caption = corpus.sample(i, size=40)
    image.save(source / "images" / f"{i:03d}.png")
    variants = [caption, f"{caption} on grey", f"there is {caption}"][:1 + i % 3]
    lines.append(json.dumps({"image": f"images/{i:03d}.png", "caption": variants}))
  (source / "captions.jsonl").write_text("\n".join(lines) + "\n")
  data_dir = str(tmp_path_factory.mktemp("multi_tfds"))
  build.build(build.BuildConfig(format="folder", inputs=[str(source)], name=MULTI,
                                data_dir=data_dir, workers=1), progress=False)
  return data_dir


def run_tool(teacher_run, data, data_dir, out_dir, out_name, *extra) -> int:
  return tool.main(["--teacher", teacher_run.workdir, "--data", data, "--data_dir", data_dir,
                    "--out_name", out_name, "--out_dir", str(out_dir), "--batch", "16",
                    *extra])


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory, teacher, shapes_dir, multi_dir) -> str:
  """Both datasets reinforced: shapes 'val' (scalar captions) and MULTI (caption lists)."""
  out = str(tmp_path_factory.mktemp("reinforced"))
  assert run_tool(teacher, SMALL, shapes_dir, out, "shapes_teacher", "--splits", "val",
                  "--examples_per_shard", "64") == 0
  assert run_tool(teacher, MULTI, multi_dir, out, "multi_teacher",
                  "--examples_per_shard", "8") == 0
  return out


def read_split(name: str, data_dir: str, split: str) -> list[dict]:
  """Every example in file order, images still encoded."""
  builder = pipeline.get_builder(name, data_dir)
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders=pipeline.image_decoders(builder.info.features),
                          read_config=tfds.ReadConfig(interleave_cycle_length=1))
  return list(tfds.as_numpy(ds))


def encoders(run):
  image = jax.jit(lambda x: run.model.apply({"params": run.params}, x, method="encode_image"))
  text = jax.jit(lambda t: run.model.apply({"params": run.params}, t, method="encode_text"))
  return image, text


@pytest.mark.parametrize("source,split", [(SMALL, "val"), (MULTI, "train")])
def test_reinforced_dataset_adds_the_teachers_embeddings(teacher, shapes_dir, multi_dir,
                                                         out_dir, source, split):
  out_name = "shapes_teacher" if source == SMALL else "multi_teacher"
  original = read_split(source, shapes_dir if source == SMALL else multi_dir, split)
  reinforced = read_split(out_name, out_dir, split)
  assert len(reinforced) == len(original) > 0
  for before, after in zip(original, reinforced):
    assert set(after) == set(before) | set(tool.TEACHER_FEATURES)
    for key, value in before.items():
      np.testing.assert_array_equal(after[key], value)  # Image bytes, captions, labels.

  # Recomputed directly: the teacher's evaluation pp of each image, each caption tokenized.
  tokenizer = tokenizers.build_tokenizer(f"sp:{teacher.tokenizer_file}")
  encode_image, encode_text = encoders(teacher)
  image_pp = ops.get_preprocess_fn(img_pp(teacher.meta["image_shape"][0]))  # Evaluation's.
  images = np.stack([image_pp({"image": tf.constant(ex["image"])})["image"]
                     for ex in reinforced])
  np.testing.assert_allclose(np.stack([ex["teacher_zimg"] for ex in reinforced]),
                             encode_image(images), atol=1e-5)
  scale = teacher.model.apply({"params": teacher.params}, method="scale_bias")["scale"]
  for ex in reinforced:
    captions = np.atleast_1d(ex["caption"])
    assert ex["teacher_ztxt"].shape == (len(captions), 128) and ex["teacher_zimg"].shape == (128,)
    assert ex["teacher_ztxt"].dtype == ex["teacher_zimg"].dtype == np.float32
    tokens = tokenizer.encode([c.decode() for c in captions], teacher.meta["text_len"])
    np.testing.assert_allclose(ex["teacher_ztxt"], encode_text(tokens), atol=1e-5)
    np.testing.assert_allclose(ex["teacher_scale"], scale, rtol=1e-6)
  if source == MULTI:
    assert {len(np.atleast_1d(ex["caption"])) for ex in reinforced} == {1, 2, 3}

  with open(os.path.join(out_dir, out_name, build.VERSION, tool.METADATA_FILE)) as f:
    meta = json.load(f)
  assert meta["teacher_workdir"] == os.path.abspath(teacher.workdir)
  assert meta["teacher_step"] == teacher.step == 2
  assert meta["embed_dim"] == 128 and meta["tool_version"] == tool.TOOL_VERSION
  assert meta["examples"] == {split: len(original)}


def test_trainer_input_pairs_the_chosen_caption_with_its_embedding(teacher, out_dir):
  config = demo_config(out_dir)
  config.data.name, config.data.pp = "multi_teacher", TRAIN_PP
  tokenizer = tokenizers.build_tokenizer(f"sp:{teacher.tokenizer_file}")
  examples = read_split("multi_teacher", out_dir, "train")
  stored = np.concatenate([ex["teacher_ztxt"] for ex in examples])
  # Rows of `stored` that hold an example's first caption.
  first_rows = set(np.cumsum([0] + [len(ex["teacher_ztxt"]) for ex in examples[:-1]]).tolist())
  encode_image, encode_text = encoders(teacher)
  batches = make_input(config, tokenizer, 0)
  chosen = []
  try:
    for _ in range(2):
      batch = next(batches)
      shapes = {k: (v.shape, v.dtype.name) for k, v in batch.items() if not k.startswith("_")}
      assert shapes == {"image": ((8, 64, 64, 3), "float32"), "text": ((8, 16), "int32"),
                        "teacher_zimg": ((8, 128), "float32"),
                        "teacher_ztxt": ((8, 128), "float32"),
                        "teacher_scale": ((8,), "float32")}
      # The stored embedding of exactly the caption that was tokenized into 'text'.
      np.testing.assert_allclose(batch["teacher_ztxt"], encode_text(batch["text"]), atol=1e-5)
      np.testing.assert_allclose(batch["teacher_zimg"], encode_image(batch["image"]), atol=1e-5)
      for z in batch["teacher_ztxt"]:  # A stored row, bit for bit (captions repeat).
        rows = set(np.flatnonzero((stored == z).all(axis=1)).tolist())
        assert rows
        chosen.append(rows)
  finally:
    batches.close()
  assert any(not rows & first_rows for rows in chosen)  # Not only first captions picked.


def test_rerun_refuses_other_settings_and_overwrite_replaces(teacher, multi_dir, tmp_path,
                                                             capsys):
  assert run_tool(teacher, MULTI, multi_dir, tmp_path, "again") == 0
  version_dir = tmp_path / "again" / build.VERSION
  before = {p.name: p.read_bytes() for p in version_dir.iterdir()}
  assert run_tool(teacher, MULTI, multi_dir, tmp_path, "again") == 0
  assert "already written" in capsys.readouterr().out
  assert run_tool(teacher, MULTI, multi_dir, tmp_path, "again", "--examples_per_shard",
                  "5") == 2
  error = capsys.readouterr().err
  assert "--overwrite" in error and "examples_per_shard" in error
  assert {p.name: p.read_bytes() for p in version_dir.iterdir()} == before
  assert run_tool(teacher, MULTI, multi_dir, tmp_path, "again", "--examples_per_shard", "5",
                  "--overwrite") == 0
  meta = json.loads((version_dir / tool.METADATA_FILE).read_text())
  assert meta["settings"]["examples_per_shard"] == 5
  assert len(list(version_dir.glob("again-train.tfrecord-*"))) == 5  # 21 examples.
  assert not [p for p in (tmp_path / "again").iterdir() if p.name != build.VERSION]


def test_interrupted_run_is_invisible_then_resumes(teacher, multi_dir, out_dir, tmp_path,
                                                   monkeypatch):
  real_add, calls = tool._ShardWriter.add, []

  def crash_after_12(self, record):
    if len(calls) == 12:
      raise RuntimeError("killed")
    calls.append(1)
    real_add(self, record)
  monkeypatch.setattr(tool._ShardWriter, "add", crash_after_12)
  with pytest.raises(RuntimeError, match="killed"):
    run_tool(teacher, MULTI, multi_dir, tmp_path, "resumed", "--examples_per_shard", "8")
  assert not (tmp_path / "resumed" / build.VERSION).exists()  # Nothing half-written to read.
  with pytest.raises(Exception, match="resumed"):
    pipeline.get_builder("resumed", str(tmp_path))
  monkeypatch.setattr(tool._ShardWriter, "add", real_add)
  assert run_tool(teacher, MULTI, multi_dir, tmp_path, "resumed",
                  "--examples_per_shard", "8") == 0
  meta = json.loads((tmp_path / "resumed" / build.VERSION / tool.METADATA_FILE).read_text())
  assert meta["examples"] == {"train": 21}
  for a, b in zip(read_split("resumed", str(tmp_path), "train"),
                  read_split("multi_teacher", out_dir, "train"), strict=True):
    for key in a:
      if key.startswith("teacher_"):  # Batched differently after the resume.
        np.testing.assert_allclose(a[key], b[key], atol=1e-6)
      else:
        np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("extra,words", [
    (["--splits", "nope"], ["--splits", "no split 'nope'", "train"]),
    (["--text_key", "label"], ["--text_key", "Text"]),
    (["--out_name", "Bad-Name"], ["--out_name", "snake_case"]),
    (["--step", "7"], ["--teacher", "no checkpoint of step 7"]),
    (["--res", "32"], ["--res", "cannot take 32x32 images"]),
])
def test_bad_flags_exit_2_with_the_flag_named(teacher, multi_dir, tmp_path, capsys, extra,
                                              words):
  args = dict(zip(extra[::2], extra[1::2]))
  name = args.pop("--out_name", "bad")
  rest = [x for kv in args.items() for x in kv]
  assert run_tool(teacher, MULTI, multi_dir, tmp_path, name, *rest) == 2
  error = capsys.readouterr().err
  assert all(w in error for w in words), error


def test_tokenizer_spec_of_a_run_without_a_trained_model():
  run = pretrained.PretrainedRun("wd", 1, {"tokenizer": "bytes"}, {}, None, None, None)
  assert tool.Teacher._tokenizer_spec(run) == "bytes"
  run = run._replace(config={"tokenizer": "sp_train:256"})
  with pytest.raises(ValueError, match="--teacher.*no tokenizer.model"):
    tool.Teacher._tokenizer_spec(run)
  assert tool.Teacher._tokenizer_spec(run._replace(tokenizer_file="/t.model")) == "sp:/t.model"
