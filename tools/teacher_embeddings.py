"""Reinforces an image-caption dataset with a teacher's embeddings (MobileCLIP's dataset
reinforcement): the teacher runs once here, and distillation then reads its outputs.

  python tools/teacher_embeddings.py --teacher TEACHER_WORKDIR [--step N] \
      --data NAME --data_dir DIR [--splits train,val] --out_name NAME_teacher \
      --out_dir DIR [--batch 256] [--text_key caption] [--res R] [--overwrite]

Reads the tfds dataset NAME (the embedded big_vlp_shapes[/config], or one that
tools/build_dataset.py wrote) and writes OUT_DIR/OUT_NAME/1.0.0/, a tfds dataset read like
any other (config.data.name=OUT_NAME, config.data.data_dir=OUT_DIR) whose examples hold
every feature of the source, unchanged and in the source's file order, plus:

  teacher_zimg   float32 [D]     the teacher's L2-normalised image embedding of the image
                                 pre-processed as its evaluation does:
                                 decode|resize(R)|value_range(-1,1), R = --res or the
                                 teacher's image size
  teacher_ztxt   float32 [C, D]  the teacher's L2-normalised embedding of each of the
                                 example's C captions (in the caption feature's order; C = 1
                                 for a single-string caption), tokenized with the teacher's
                                 tokenizer at its text length
  teacher_scale  float32 []      the teacher's logit scale (exp(t), clamped as the model does)

A training pp picks a caption and its stored embedding together with `choice(also=...)`:

  decode|resize(64)|value_range(-1,1)|choice(key='caption',also=('teacher_ztxt',))|
  tokenize(max_len=16,key='caption',out_key='text')|
  keep('image','text','teacher_zimg','teacher_ztxt','teacher_scale')

gives batches with teacher_zimg [B, D], teacher_ztxt [B, D] and teacher_scale [B].

OUT_DIR/OUT_NAME/1.0.0/teacher_embeddings.json records the teacher (workdir, step), the
embedding size D, this tool's version, the source and the settings. The dataset is written into
OUT_DIR/OUT_NAME/1.0.0.incomplete-build/ and moved into place when complete; an interrupted
run resumes at its last complete shard when rerun with the same flags. Rerunning a finished
command does nothing; a dataset made otherwise (other teacher, step, source, settings) is
only replaced with --overwrite. Exit codes: 0 done, 1 failed, 2 bad flags.
"""

import argparse
import json
import math
import os
import shutil
import sys
import time
from typing import Any, Iterator, Sequence

# Runnable as `python tools/teacher_embeddings.py` from a checkout without installing big_vlp.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TOOL_VERSION = 1  # Bump when the stored features change meaning.
METADATA_FILE = "teacher_embeddings.json"
TEACHER_FEATURES = ("teacher_zimg", "teacher_ztxt", "teacher_scale")
TOKENS_KEY = "_teacher_tokens"


class ReinforceError(RuntimeError):
  """The dataset cannot be written (exit code 1)."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """The flags of tools/teacher_embeddings.py."""
  parser = argparse.ArgumentParser(
      prog="teacher_embeddings.py",
      description="Writes a copy of a tfds image-caption dataset with a teacher run's image "
      "and caption embeddings added (teacher_zimg, teacher_ztxt, teacher_scale).")
  parser.add_argument("--teacher", required=True, help="workdir of a finished big_vlp run")
  parser.add_argument("--step", type=int, default=None,
                      help="checkpoint step of the teacher (default: its latest)")
  parser.add_argument("--data", required=True, help="source tfds dataset name")
  parser.add_argument("--data_dir", default=None, help="tfds data dir of the source")
  parser.add_argument("--splits", default=None,
                      help="comma-separated splits to write (default: all of the source's)")
  parser.add_argument("--out_name", required=True, help="name of the new dataset (snake_case)")
  parser.add_argument("--out_dir", required=True, help="tfds data dir to write it into")
  parser.add_argument("--batch", type=int, default=256, help="examples per teacher batch")
  parser.add_argument("--text_key", default="caption",
                      help="caption feature (a string or a sequence of strings)")
  parser.add_argument("--image_key", default="image", help="image feature")
  parser.add_argument("--res", type=int, default=None,
                      help="image size fed to the teacher (default: its training size)")
  parser.add_argument("--examples_per_shard", type=int, default=2048)
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing dataset (or interrupted run) of other settings")
  return parser.parse_args(argv)


def _flag_error(flag: str, value: Any, why: str) -> None:
  from big_vlp.config_errors import ConfigError  # pylint: disable=import-outside-toplevel
  raise ConfigError(f"--{flag}={value!r}: {why}")


# ----------------------------------------------------------------------------------------------
# The teacher.


class Teacher:
  """A restored run with jitted encoders, its tokenizer and pre-processing settings."""

  def __init__(self, workdir: str, step: int | None, res: int | None, batch: int):
    import jax  # pylint: disable=import-outside-toplevel
    from big_vlp import pretrained  # pylint: disable=import-outside-toplevel
    from big_vlp.data import tokenizers  # pylint: disable=import-outside-toplevel
    run = pretrained.load_run(workdir, step, mesh=None, field="--teacher")
    self.workdir, self.step, self.batch = os.path.abspath(workdir), int(run.step), batch
    self.text_len = int(run.meta["text_len"])
    self.res = res or int(run.meta["image_shape"][0])
    self.tokenizer_spec = self._tokenizer_spec(run)
    self.tokenizer = tokenizers.build_tokenizer(self.tokenizer_spec, field="--teacher")
    if self.tokenizer.vocab_size != int(run.meta["vocab_size"]):
      _flag_error("teacher", workdir, f"its tokenizer {self.tokenizer_spec!r} has "
                  f"{self.tokenizer.vocab_size} ids but its text tower was trained with "
                  f"{run.meta['vocab_size']}")
    model, self._params = run.model, run.params
    self._image = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_image"))
    self._text = jax.jit(lambda p, t: model.apply({"params": p}, t, method="encode_text"))
    scale = model.apply({"params": self._params}, method="scale_bias")["scale"]
    self.scale = float(jax.device_get(scale))
    trained = tuple(run.meta["image_shape"][:2])
    if trained != (self.res, self.res):
      # The ViT would resize a learned position embedding to another grid, but embeddings
      # of images at a size the teacher never saw are not the teacher's (as load_teacher
      # refuses for distillation in the step).
      _flag_error("res", res, f"the teacher's image tower cannot take {self.res}x{self.res} "
                  f"images (it was trained on {list(trained)}); use --res {trained[0]}")
    try:
      self.embed_dim = int(jax.eval_shape(
          self._image, self._params,
          jax.ShapeDtypeStruct((1, self.res, self.res, 3), "float32")).shape[-1])
    except Exception as e:  # pylint: disable=broad-except  # Flax raises several types.
      # E.g. learned position embeddings fit only the number of patches of training.
      _flag_error("res", res, f"the teacher's image tower cannot take {self.res}x{self.res} "
                  f"images (it was trained on {run.meta['image_shape'][:2]}): "
                  f"{type(e).__name__}: {str(e).splitlines()[0]}")

  @staticmethod
  def _tokenizer_spec(run: Any) -> str:
    """The spec that rebuilds the run's tokenizer: its trained model file, else its config."""
    if run.tokenizer_file is not None:  # 'sp_train:N' saved WORKDIR/tokenizer.model.
      return f"sp:{run.tokenizer_file}"
    spec = str(run.config.get("tokenizer") or "")
    if spec == "bytes" or spec.startswith("sp:"):
      return spec
    _flag_error("teacher", run.workdir, f"its tokenizer {spec!r} cannot be rebuilt: no "
                "tokenizer.model in the workdir")

  def _padded(self, fn, x):
    """`fn(params, x)` on rows padded to a multiple of the batch (one compiled shape)."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    n = len(x)
    out = []
    for start in range(0, n, self.batch):
      chunk = x[start:start + self.batch]
      if len(chunk) < self.batch:
        chunk = np.concatenate([chunk, np.zeros((self.batch - len(chunk),) + chunk.shape[1:],
                                                chunk.dtype)])
      out.append(np.asarray(fn(self._params, chunk)))
    if not out:
      return np.zeros([0, self.embed_dim], np.float32)
    return np.concatenate(out)[:n].astype(np.float32)

  def encode_images(self, images) -> Any:
    """float32 [B, R, R, 3] in [-1, 1] -> float32 [B, D]."""
    return self._padded(self._image, images)

  def encode_texts(self, tokens) -> Any:
    """int32 [T, L] -> float32 [T, D]."""
    return self._padded(self._text, tokens)


# ----------------------------------------------------------------------------------------------
# Reading the source.


def _source(name: str, data_dir: str | None, splits: str | None, text_key: str,
            image_key: str) -> tuple[Any, list[str]]:
  """The source's tfds builder and the splits to write, checked."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from big_vlp.data import pipeline  # pylint: disable=import-outside-toplevel
  builder = pipeline.get_builder(name, data_dir, field="--data")
  features = builder.info.features
  present = list(builder.info.splits.keys())
  wanted = [s.strip() for s in splits.split(",") if s.strip()] if splits else present
  for split in wanted:
    if split not in present:
      _flag_error("splits", splits, f"dataset {name!r} has no split {split!r}; splits there: "
                  + ", ".join(sorted(present)))
  if not wanted:
    _flag_error("splits", splits, "names no split")
  text = features[text_key] if text_key in features.keys() else None
  if not (isinstance(text, tfds.features.Text) or (
      isinstance(text, tfds.features.Sequence) and isinstance(text.feature, tfds.features.Text))):
    _flag_error("text_key", text_key, f"dataset {name!r} has no Text or Sequence(Text) "
                "feature of that name; features: " + ", ".join(features.keys()))
  if not isinstance(features[image_key] if image_key in features.keys() else None,
                    tfds.features.Image):
    _flag_error("image_key", image_key, f"dataset {name!r} has no Image feature of that name; "
                "features: " + ", ".join(features.keys()))
  taken = sorted(set(TEACHER_FEATURES) & set(features.keys()))
  if taken:
    _flag_error("data", name, f"already has teacher features {taken}; reinforce the dataset "
                "it was made from instead")
  return builder, wanted


def _records(builder: Any, split: str) -> Any:
  """The split's serialized records in file order (tf.data), failing on unreadable ones."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  spans = [(fi.filename, fi.skip, fi.take if fi.take >= 0 else fi.examples_in_shard - fi.skip)
           for fi in builder.info.splits[split].file_instructions]
  file_format = str(builder.info.file_format.value)
  if file_format == "tfrecord":
    parts = [tf.data.TFRecordDataset(f).skip(skip).take(take) for f, skip, take in spans]
    ds = parts[0]
    for part in parts[1:]:
      ds = ds.concatenate(part)
    return ds
  if file_format != "array_record":
    raise ReinforceError(f"{builder.info.full_name}: file format {file_format!r} is not "
                         "supported; supported: tfrecord, array_record")

  def array_records() -> Iterator[bytes]:
    from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
    for filename, skip, take in spans:
      reader = array_record_module.ArrayRecordReader(filename)
      try:
        for start in range(skip, skip + take, 1024):
          yield from reader.read(list(range(start, min(start + 1024, skip + take))))
      finally:
        reader.close()
  return tf.data.Dataset.from_generator(array_records,
                                        output_signature=tf.TensorSpec([], tf.string))


def _teacher_inputs(builder: Any, split: str, start: int, teacher: Teacher, text_key: str,
                    image_key: str) -> Iterator[tuple[Any, Any, Any, Any]]:
  """(records [b], images [b, R, R, 3], caption tokens [b, C, L], captions per example [b])
  in batches of teacher.batch, from example `start` of the split on."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from big_vlp.data import ops, pipeline  # pylint: disable=import-outside-toplevel
  features = builder.info.features
  decoders = pipeline.image_decoders(features)
  # The evaluation pre-processing of the teacher's images (config_common.image_pp).
  preprocess = ops.get_preprocess_fn(
      f"decode(key={image_key!r})|resize({teacher.res}, key={image_key!r})|"
      f"value_range(-1, 1, key={image_key!r})|"
      f"tokenize(max_len={teacher.text_len}, key={text_key!r}, out_key={TOKENS_KEY!r})",
      teacher.tokenizer, field="teacher pre-processing")

  def prepare(record):
    example = preprocess(dict(features.deserialize_example(record, decoders=decoders)))
    tokens = tf.reshape(example[TOKENS_KEY], [-1, teacher.text_len])  # One row per caption.
    return record, example[image_key], tokens, tf.shape(tokens)[0]

  ds = _records(builder, split).skip(start)
  ds = ds.map(pipeline.plain(prepare), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.padded_batch(teacher.batch).prefetch(2)
  return ds.as_numpy_iterator()


# ----------------------------------------------------------------------------------------------
# Writing.


def teacher_features(embed_dim: int) -> dict[str, Any]:
  """The tfds features added to every example."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  return {"teacher_zimg": tfds.features.Tensor(shape=(embed_dim,), dtype=np.float32),
          "teacher_ztxt": tfds.features.Tensor(shape=(None, embed_dim), dtype=np.float32),
          "teacher_scale": tfds.features.Tensor(shape=(), dtype=np.float32)}


class _ShardWriter:
  """Writes a split's records into the staging dir, each shard renamed into place when full."""

  def __init__(self, staging: str, name: str, split: str, lengths: list[int], first: int):
    self._staging, self._name, self._split, self._lengths = staging, name, split, lengths
    self._shard, self._count, self._writer = first, 0, None

  def _path(self, shard: int) -> str:
    from big_vlp.data import build  # pylint: disable=import-outside-toplevel
    return os.path.join(self._staging, build.shard_name(self._name, self._split, shard,
                                                        len(self._lengths)))

  def add(self, record: bytes) -> None:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    if self._writer is None:
      self._writer = tf.io.TFRecordWriter(self._path(self._shard) + ".tmp")
    self._writer.write(record)
    self._count += 1
    if self._count == self._lengths[self._shard]:
      self._writer.close()
      os.replace(self._path(self._shard) + ".tmp", self._path(self._shard))
      self._shard, self._count, self._writer = self._shard + 1, 0, None

  def close(self) -> None:
    if self._writer is not None:  # Interrupted inside a shard: it is redone on resume.
      self._writer.close()

  @property
  def complete(self) -> bool:
    return self._shard == len(self._lengths)


def _shard_lengths(examples: int, per_shard: int) -> list[int]:
  count = max(1, math.ceil(examples / per_shard))
  return [min(per_shard, examples - i * per_shard) for i in range(count)]


def _done_shards(staging: str, name: str, split: str, lengths: list[int]) -> int:
  """How many leading shards of the split an earlier run completed."""
  from big_vlp.data import build  # pylint: disable=import-outside-toplevel
  done = 0
  while done < len(lengths) and os.path.exists(os.path.join(
      staging, build.shard_name(name, split, done, len(lengths)))):
    done += 1
  return done


def _with_teacher(record: bytes, values: dict[str, Any], extra: Any) -> bytes:
  """The serialized record with the teacher features added."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  example = tf.train.Example.FromString(record)
  added = tf.train.Example.FromString(extra.serialize_example(extra.encode_example(values)))
  example.features.MergeFrom(added.features)
  return example.SerializeToString(deterministic=True)


def _write_split(builder: Any, split: str, teacher: Teacher, staging: str, out_name: str,
                 per_shard: int, text_key: str, image_key: str) -> dict:
  """Writes (or finishes) one split in the staging dir; returns its counts."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  examples = builder.info.splits[split].num_examples
  if examples == 0:
    raise ReinforceError(f"split {split!r} of {builder.info.full_name} has no examples")
  lengths = _shard_lengths(examples, per_shard)
  done = _done_shards(staging, out_name, split, lengths)
  start = sum(lengths[:done])
  extra = tfds.features.FeaturesDict(teacher_features(teacher.embed_dim))
  scale = np.float32(teacher.scale)
  writer = _ShardWriter(staging, out_name, split, lengths, done)
  written = 0
  try:
    if start < examples:
      for records, images, tokens, counts in _teacher_inputs(builder, split, start, teacher,
                                                             text_key, image_key):
        zimg = teacher.encode_images(images)
        rows = np.concatenate([t[:c] for t, c in zip(tokens, counts)])
        ztxt = np.split(teacher.encode_texts(rows), np.cumsum(counts)[:-1])
        for i, record in enumerate(records):
          writer.add(_with_teacher(record, {"teacher_zimg": zimg[i], "teacher_ztxt": ztxt[i],
                                            "teacher_scale": scale}, extra))
        written += len(records)
  finally:
    writer.close()
  if not writer.complete:
    raise ReinforceError(f"split {split!r}: read {start + written} examples, but the dataset "
                         f"info says {examples}; is the source dataset complete?")
  from big_vlp.data import build  # pylint: disable=import-outside-toplevel
  num_bytes = sum(os.path.getsize(os.path.join(
      staging, build.shard_name(out_name, split, i, len(lengths)))) for i in range(len(lengths)))
  return {"examples": examples, "examples_run": written, "shard_lengths": lengths,
          "num_bytes": num_bytes}


def _publish(staging: str, version_dir: str) -> None:
  """Moves the complete staging dir to `version_dir`, replacing what is there."""
  aside = None
  if os.path.exists(version_dir):
    aside = f"{version_dir}.replaced-{os.getpid()}"
    os.rename(version_dir, aside)
  os.rename(staging, version_dir)
  if aside is not None:
    shutil.rmtree(aside)


def reinforce(args: argparse.Namespace) -> dict:
  """Writes (or resumes, or finds already written) the dataset; returns the summary."""
  from big_vlp.data import build  # pylint: disable=import-outside-toplevel
  started = time.time()
  build.check_dataset_name(args.out_name, "out_name")
  for flag in ("batch", "examples_per_shard", "res"):
    value = getattr(args, flag)
    if value is not None and value < 1:
      _flag_error(flag, value, "must be >= 1")
  out_dir = os.path.abspath(os.path.expanduser(args.out_dir))
  data_dir = os.path.abspath(os.path.expanduser(args.data_dir)) if args.data_dir else None
  version_dir = os.path.join(out_dir, args.out_name, build.VERSION)
  staging = version_dir + build.STAGING_SUFFIX
  if args.out_name == args.data.partition("/")[0] and out_dir == data_dir:
    _flag_error("out_name", args.out_name, "is the source dataset in the same --out_dir; "
                "choose another name")
  builder, splits = _source(args.data, data_dir, args.splits, args.text_key, args.image_key)
  teacher = Teacher(args.teacher, args.step, args.res, args.batch)
  settings = {
      "tool_version": TOOL_VERSION,
      "source": {"name": args.data, "data_dir": data_dir, "splits": splits,
                 "version": str(builder.info.version),
                 "examples": {s: builder.info.splits[s].num_examples for s in splits}},
      "teacher": {"workdir": teacher.workdir, "step": teacher.step,
                  "tokenizer": teacher.tokenizer_spec},
      "embed_dim": teacher.embed_dim, "res": teacher.res, "text_len": teacher.text_len,
      "text_key": args.text_key, "image_key": args.image_key,
      "examples_per_shard": args.examples_per_shard}

  existing = build.read_json(os.path.join(version_dir, METADATA_FILE))
  if isinstance(existing, dict) and existing.get("settings") == settings and not args.overwrite:
    print(f"{args.out_name} is already written in {version_dir} with these settings; nothing "
          "to do (pass --overwrite to write it again)")
    return dict(existing, already_built=True)
  if os.path.exists(version_dir) and not args.overwrite:
    what = ("a dataset made with other settings: " + _differences(existing["settings"], settings)
            if isinstance(existing, dict) and "settings" in existing
            else "a dataset this tool did not write")
    _flag_error("out_name", args.out_name, f"{version_dir} already holds {what}; pass "
                "--overwrite to replace it, or choose another --out_name")
  previous = build.read_json(os.path.join(staging, "settings.json"))
  if os.path.exists(staging) and (args.overwrite or previous != settings):
    if not args.overwrite:
      _flag_error("overwrite", False, f"{staging} holds an interrupted run with other "
                  f"settings ({_differences(previous or {}, settings)}); rerun that command "
                  "to finish it, or pass --overwrite to start this one afresh")
    shutil.rmtree(staging)
  os.makedirs(staging, exist_ok=True)
  build.write_json(os.path.join(staging, "settings.json"), settings)

  counts = {}
  for split in splits:
    split_start = time.time()
    counts[split] = _write_split(builder, split, teacher, staging, args.out_name,
                                 args.examples_per_shard, args.text_key, args.image_key)
    counts[split]["seconds"] = round(time.time() - split_start, 3)
    print(f"{args.out_name}/{split}: {counts[split]['examples']} examples "
          f"({counts[split]['examples_run']} through the teacher in this run, "
          f"{counts[split]['seconds']} s)", flush=True)

  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  features = tfds.features.FeaturesDict(
      {**dict(builder.info.features.items()), **teacher_features(teacher.embed_dim)})
  build.write_metadata(staging, features, {s: counts[s] for s in splits},
                       f"{builder.info.full_name} with the embeddings of big_vlp teacher run "
                       f"{teacher.workdir} (step {teacher.step}), by "
                       "tools/teacher_embeddings.py.")
  wall = time.time() - started
  ran = sum(c["examples_run"] for c in counts.values())
  summary = {
      "name": args.out_name, "data_dir": out_dir, "version": build.VERSION,
      "tool_version": TOOL_VERSION, "teacher_workdir": teacher.workdir,
      "teacher_step": teacher.step,
      "embed_dim": teacher.embed_dim, "teacher_scale": teacher.scale,
      "examples": {s: c["examples"] for s, c in counts.items()},
      "num_bytes": sum(c["num_bytes"] for c in counts.values()),
      "wall_time_s": round(wall, 3),
      "examples_per_s": round(ran / wall, 1) if wall > 0 else None}
  build.write_json(os.path.join(staging, METADATA_FILE), dict(summary, settings=settings))
  _publish(staging, version_dir)
  os.remove(os.path.join(version_dir, "settings.json"))  # Only a staging dir needs it.
  return summary


def _differences(old: dict, new: dict) -> str:
  keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
  return "differing: " + ", ".join(keys) if keys else "same settings"


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line; returns the exit code (2: bad flags, 1: failed)."""
  args = parse_args(argv)
  from big_vlp.config_errors import ConfigError  # pylint: disable=import-outside-toplevel
  try:
    summary = reinforce(args)
  except ConfigError as e:  # Includes build.BuildArgError.
    print(f"teacher_embeddings.py: error: {str(e).removeprefix('config.')}", file=sys.stderr)
    return 2
  except ReinforceError as e:
    print(f"teacher_embeddings.py: error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("teacher_embeddings.py: interrupted; rerun the same command to resume",
          file=sys.stderr)
    return 130
  if not summary.get("already_built"):
    print(json.dumps(summary, indent=1))
    print(f"wrote {summary['name']}: " + ", ".join(
        f"{s} {n}" for s, n in summary["examples"].items())
          + f" examples with teacher embeddings of D={summary['embed_dim']} in "
          f"{summary['wall_time_s']} s -> "
          f"{os.path.join(summary['data_dir'], summary['name'], summary['version'])}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
