"""A finished big_vlp run as a model + params: for LiT (a locked tower initialised from a
checkpoint) and distillation (a frozen teacher).

`load_run` reads the run's recorded config.json, rebuilds its TwoTower and restores only
the params of one checkpoint (the optimizer state is never allocated); `merge_subtrees`
copies towers (or any subtree) into a new model's params; `check_tokenizer` refuses a
tokenizer whose ids would mean something else to the run's text tower. Every error names
the config field that pointed at the run.
"""

import json
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh

from big_vlp import checkpoint, sharding, train_step
from big_vlp.config_errors import ConfigError, fail
from big_vlp.model_factory import build_model
from big_vlp.tree_paths import path_str

_MAX_LINES = 12  # Mismatch lines shown in one error; the rest are counted.


class PretrainedRun(NamedTuple):
  """A checkpoint of a big_vlp run, restored as params, with the model that applies them."""
  workdir: str
  step: int
  config: ml_collections.ConfigDict  # The run's recorded WORKDIR/config.json.
  meta: dict  # The checkpoint's JSON meta (image_shape, text_len, vocab_size, ...).
  model: Any  # TwoTower built from `config` and meta['vocab_size'].
  params: Any  # The restored params tree (jax arrays).
  tokenizer_file: str | None  # WORKDIR/tokenizer.model if present, else None.


def _read_config(workdir: epath.Path, field: str, value: str) -> ml_collections.ConfigDict:
  path = workdir / "config.json"
  if not path.exists():
    fail(field, value, f"no config.json in {workdir}; not a big_vlp run directory (every "
         "run writes one before its first step)")
  try:
    raw = json.loads(path.read_text())
  except ValueError as e:
    fail(field, value, f"{path} is not valid JSON ({e})")
  if not isinstance(raw, dict):
    fail(field, value, f"{path} holds a JSON {type(raw).__name__}, not a config object")
  return ml_collections.ConfigDict(raw)


def _manager(directory: epath.Path) -> ocp.CheckpointManager:
  # Read-only: the run may still be training (or be another user's); nothing is created,
  # cleaned up or deleted there. save_interval_steps=0 spares orbax's note that read-only
  # turns it off. The 'state' item is read by the PyTree handler: only it takes
  # partial_restore (StandardRestore in orbax 0.12.8 has no such option), and it reads what
  # the Standard handler wrote.
  return ocp.CheckpointManager(
      str(directory),
      options=ocp.CheckpointManagerOptions(read_only=True, create=False,
                                           save_interval_steps=0),
      item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                     "meta": ocp.JsonCheckpointHandler()})


def _target_sharding(mesh: Mesh | None) -> jax.sharding.Sharding:
  if mesh is not None:
    return sharding.replicated(mesh)
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _restore_params(mgr: ocp.CheckpointManager, step: int, abstract: Any) -> Any:
  """Only the 'params' subtree of the checkpoint's 'state' item, placed as `abstract` says."""
  item = {"params": abstract}
  # Without explicit restore_args orbax ignores the ShapeDtypeStructs' shardings and places
  # arrays as they were saved (the training mesh), which fails or misplaces on another one.
  out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True)))
  return out["state"]["params"]


def load_run(workdir: str, step: int | None = None, *, mesh: Mesh | None = None,
             field: str = "workdir") -> PretrainedRun:
  """Params (only) of a big_vlp run's checkpoint (latest or `step`), with its model."""
  base = epath.Path(workdir)
  if not base.exists():
    fail(field, workdir, "no such directory")
  if not base.is_dir():
    fail(field, workdir, "not a directory")
  config = _read_config(base, field, workdir)
  directory = base / "checkpoints"
  if not directory.exists():
    fail(field, workdir, f"no checkpoint in {directory}; train the run first")
  mgr = _manager(directory)
  try:
    steps = sorted(mgr.all_steps())
    if not steps:
      fail(field, workdir, f"no checkpoint in {directory}; train the run first")
    if step is None:
      step = steps[-1]
    elif step not in steps:
      fail(field, workdir, f"there is no checkpoint of step {step}; available steps: {steps}")
    where = f"checkpoint {step} in {directory}"
    try:
      meta = dict(mgr.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))["meta"])
      image_shape, text_len = tuple(meta["image_shape"]), int(meta["text_len"])
      vocab_size = int(meta["vocab_size"])
    except Exception as e:  # pylint: disable=broad-except
      fail(field, workdir, f"{where} has no readable meta "
           f"({checkpoint._short(e)})")  # pylint: disable=protected-access
    # Params do not depend on the batch size: one example keeps eval_shape trivial.
    shapes = {"image": jax.ShapeDtypeStruct((1, *image_shape), "float32"),
              "text": jax.ShapeDtypeStruct((1, text_len), "int32")}
    try:
      model = build_model(config, vocab_size)
      abstract = train_step.abstract_params(model, shapes)
    except Exception as e:  # pylint: disable=broad-except
      # Its own ConfigError would name a field of that run's config as if it were ours.
      fail(field, workdir, "this code cannot build the model that the run's config.json "
           f"describes ({checkpoint._short(e)})")  # pylint: disable=protected-access
    target = _target_sharding(mesh)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=target),
                            abstract)
    try:
      stored = mgr.item_metadata(step)["state"]
      stored_params = {"params": stored["params"]}
    except Exception as e:  # pylint: disable=broad-except
      fail(field, workdir, f"{where} has no readable train state "
           f"({checkpoint._short(e)})")  # pylint: disable=protected-access
    # A model that no longer fits its own checkpoint means the code changed since; say
    # which params differ instead of orbax's tree dump.
    diff = checkpoint.state_mismatch({"params": abstract}, stored_params, limit=_MAX_LINES)
    if diff:
      fail(field, workdir, f"{where} does not fit the model that its config.json describes "
           "(model code changed since the run?):\n  " + "\n  ".join(diff))
    try:
      params = _restore_params(mgr, step, abstract)
    except Exception as e:  # pylint: disable=broad-except
      fail(field, workdir, f"{where} cannot be restored "
           f"({checkpoint._short(e)})")  # pylint: disable=protected-access
  finally:
    mgr.close()
  tok = base / "tokenizer.model"
  return PretrainedRun(workdir=workdir, step=step, config=config, meta=meta, model=model,
                       params=params, tokenizer_file=str(tok) if tok.exists() else None)


# ---- merging subtrees ------------------------------------------------------------------

def _parts(subtree: str) -> list[str]:
  return [p for p in subtree.strip("/").split("/") if p]


def _lookup(tree: Any, parts: Sequence[str]) -> tuple[Any, str | None]:
  """(node at `parts`, None) or (None, the path prefix where the tree has no such key)."""
  node = tree
  for i, key in enumerate(parts):
    if not isinstance(node, Mapping) or key not in node:
      return None, "/".join(parts[:i + 1])
    node = node[key]
  return node, None


def _replace(tree: Any, parts: Sequence[str], value: Any) -> Any:
  """`tree` with the node at `parts` replaced; containers along the path are copied."""
  if not parts:
    return value
  new = dict(tree)
  new[parts[0]] = _replace(tree[parts[0]], parts[1:], value)
  return new if type(tree) is dict else type(tree)(new)


def _leaves(node: Any, prefix: str) -> dict[str, Any]:
  flat = jax.tree_util.tree_flatten_with_path(node)[0]
  return {"/".join(filter(None, (prefix, path_str(p)))): leaf for p, leaf in flat}


def _describe(leaf: Any) -> str:
  return f"{tuple(leaf.shape)} {np.dtype(leaf.dtype).name}"


def _subtree_problems(subtree: str, src: Any, dst: Any) -> list[str]:
  have, want = _leaves(src, subtree), _leaves(dst, subtree)
  lines = []
  for p in sorted(set(have) | set(want)):
    if p not in have:
      lines.append(f"{p}: in the model {_describe(want[p])}, not in the checkpoint")
    elif p not in want:
      lines.append(f"{p}: in the checkpoint {_describe(have[p])}, not in the model")
    elif (tuple(have[p].shape) != tuple(want[p].shape)
          or np.dtype(have[p].dtype) != np.dtype(want[p].dtype)):
      lines.append(f"{p}: checkpoint {_describe(have[p])} vs model {_describe(want[p])}")
  return lines


def merge_subtrees(params: Any, source: Any, subtrees: Sequence[str], *,
                   field: str = "init.subtrees") -> Any:
  """`params` with each subtree path ('img', 'txt', 'img/Transformer', ...) taken from `source`."""
  if isinstance(subtrees, str):  # 'img' would otherwise read as ['i', 'm', 'g'].
    subtrees = [subtrees]
  subtrees = list(subtrees)
  problems = []
  for subtree in subtrees:
    parts = _parts(subtree)
    if not parts:
      problems.append(f"{subtree!r} is not a parameter path (use e.g. 'img' or 'txt')")
      continue
    found = True
    for tree, name in ((source, "the checkpoint"), (params, "the model")):
      _, missing = _lookup(tree, parts)
      if missing is not None:
        found = False
        top = ", ".join(sorted(tree)) if isinstance(tree, Mapping) else "none"
        problems.append(f"{subtree}: {name} has no {missing!r} (its top-level keys: {top})")
    if found:
      problems += _subtree_problems("/".join(parts), _lookup(source, parts)[0],
                                    _lookup(params, parts)[0])
  if problems:
    shown = problems[:_MAX_LINES] + (
        [f"... and {len(problems) - _MAX_LINES} more"] if len(problems) > _MAX_LINES else [])
    fail(field, subtrees, "cannot take these subtrees from the checkpoint:\n  "
         + "\n  ".join(shown))
  merged = params
  for subtree in subtrees:
    parts = _parts(subtree)
    src_node, dst_node = _lookup(source, parts)[0], _lookup(merged, parts)[0]
    src_leaves = _leaves(src_node, "")
    # The model's tree structure and placement (its sharding rules) are kept; only values
    # come from the checkpoint.
    new_node = jax.tree_util.tree_map_with_path(
        lambda p, leaf: jax.device_put(src_leaves[path_str(p)],
                                       getattr(leaf, "sharding", None)), dst_node)
    merged = _replace(merged, parts, new_node)
  return merged


# ---- tokenizer -------------------------------------------------------------------------

def _run_tokenizer(run: PretrainedRun) -> tuple[str, str | None]:
  """(spec the run's tokenizer can be given by, its SentencePiece model file or None)."""
  spec = str(run.config.get("tokenizer") or "")
  kind, _, arg = spec.partition(":")
  if run.tokenizer_file is not None:  # 'sp_train:N' saved it there.
    return f"sp:{run.tokenizer_file}", run.tokenizer_file
  if kind == "sp" and arg:
    return spec, arg
  return spec, None


def check_tokenizer(run: PretrainedRun, tokenizer: Any, *, field: str) -> None:
  """Refuses a tokenizer whose ids would not mean the same to `run`'s text tower."""
  from big_vlp.data import tokenizers  # pylint: disable=import-outside-toplevel
  spec, run_file = _run_tokenizer(run)
  fix = (f"set config.tokenizer={spec!r} so that token ids mean the same to both models"
         if spec else "use the tokenizer that run was trained with")
  want = int(run.meta["vocab_size"])
  if tokenizer.vocab_size != want:
    fail(field, run.workdir, f"its text tower was trained with a {want}-token vocabulary but "
         f"this run's tokenizer has {tokenizer.vocab_size}; {fix}")
  given_file = getattr(tokenizer, "model_path", None)
  # Equal sizes can still be different vocabularies: bytes (258 ids) vs a 258-piece model.
  run_kind = "bytes" if spec == "bytes" else "sentencepiece" if run_file else None
  given_kind = ("bytes" if isinstance(tokenizer, tokenizers.ByteTokenizer)
                else "sentencepiece" if given_file else None)
  if None not in (run_kind, given_kind) and run_kind != given_kind:
    fail(field, run.workdir, f"its text tower was trained with {run_kind} tokens "
         f"({spec!r}) but this run's tokenizer is a {type(tokenizer).__name__}; {fix}")
  if run_file is None or given_file is None:
    return
  try:
    same = epath.Path(run_file).read_bytes() == epath.Path(given_file).read_bytes()
  except OSError as e:
    raise ConfigError(f"config.{field}={run.workdir!r}: cannot compare SentencePiece models "
                      f"{run_file} and {given_file} ({e}); {fix}") from e
  if not same:
    fail(field, run.workdir, f"its text tower was trained with the SentencePiece model "
         f"{run_file}, which differs from this run's {given_file} (same vocabulary size, "
         f"other pieces); {fix}")
