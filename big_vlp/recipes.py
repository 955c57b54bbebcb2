"""Recipe switches of the one trainer: LiT locking, FLIP masking, FILIP, distillation.

Every recipe is a config field read here; the train step (big_vlp.train_step) and the
optimizer (big_vlp.optim) take what this module derives from them:

  init.workdir / .step / .subtrees   initialise params (sub-trees) from a big_vlp run
  locking.towers / .unlock_at_step   LiT: towers frozen (no gradient, no optimizer state
                                     until unlocked), run in inference mode
  masking.image / .text / .unmasked_steps   FLIP: fraction of tokens dropped in training;
                                     the last `unmasked_steps` steps run unmasked
  similarity                         'pooled' (CLIP / SigLIP) or 'filip' (token-wise)
  distill.source / .teacher / .step / .weight   distillation from a teacher run ('teacher')
                                     or from embeddings stored in the data ('data')

A run is a sequence of phases (what is locked, what is masked); the trainer compiles one
step per phase and switches at the boundaries.
"""

import math
import re
from typing import Any, NamedTuple

import jax
import ml_collections
from ml_collections import config_dict

from big_vlp.config_errors import check_choice, fail
from big_vlp.tree_paths import map_with_path

TOWERS = ("img", "txt")
SIMILARITIES = ("pooled", "filip")
DISTILL_SOURCES = ("none", "teacher", "data")
# Batch features of a dataset written by tools/teacher_embeddings.py (distill.source='data').
TEACHER_KEYS = ("teacher_zimg", "teacher_ztxt", "teacher_scale")


def recipe_fields(config: ml_collections.ConfigDict) -> None:
  """Adds every recipe field with its 'off' default (configs/ override what they use)."""
  config.similarity = "pooled"
  config.init = ml_collections.ConfigDict({
      "workdir": config_dict.placeholder(str), "step": config_dict.placeholder(int),
      # Param sub-trees taken from the run ('img', 'txt', 'img/Transformer', ...); empty
      # means every param.
      "subtrees": ()})
  config.locking = ml_collections.ConfigDict({
      "towers": (), "unlock_at_step": config_dict.placeholder(int)})
  config.masking = ml_collections.ConfigDict({"image": 0.0, "text": 0.0, "unmasked_steps": 0})
  config.distill = ml_collections.ConfigDict({
      "source": "none", "teacher": config_dict.placeholder(str),
      "step": config_dict.placeholder(int), "weight": 1.0})


class Phase(NamedTuple):
  """What one stretch of training runs with: locked towers and token-drop fractions."""
  locked: tuple[str, ...] = ()
  image_mask: float = 0.0
  text_mask: float = 0.0


def setting(config: Any, group: str, field: str, default: Any) -> Any:
  """config.<group>.<field>, or `default` when the config predates the recipe fields."""
  node = config.get(group)
  return default if node is None else node.get(field, default)


def locked_towers(config: Any) -> tuple[str, ...]:
  """Towers named in config.locking.towers, checked."""
  towers = tuple(setting(config, "locking", "towers", ()) or ())
  for t in towers:
    check_choice("locking.towers", t, TOWERS)
  return towers


def phase_at(config: Any, step: int) -> Phase:
  """The phase that training step `step` (1-based) runs in."""
  locked = locked_towers(config)
  unlock = setting(config, "locking", "unlock_at_step", None)
  if unlock is not None and step > unlock:
    locked = ()
  image = float(setting(config, "masking", "image", 0.0))
  text = float(setting(config, "masking", "text", 0.0))
  unmasked = int(setting(config, "masking", "unmasked_steps", 0))
  if step > config.total_steps - unmasked:
    image = text = 0.0
  return Phase(locked, image, text)


def param_labels(config: Any, params: Any) -> Any:
  """Per param: 'frozen' (config.freeze regexes, or a locked tower never unlocked),
  'staged' (a locked tower that config.locking.unlock_at_step unlocks) or 'train'."""
  frozen = [re.compile(r) for r in (config.get("freeze", ()) or ())]
  locked = locked_towers(config)
  staged = setting(config, "locking", "unlock_at_step", None) is not None

  def label(path: str, _: Any) -> str:
    if any(rx.fullmatch(path) for rx in frozen):
      return "frozen"
    if path.split("/")[0] in locked:
      return "staged" if staged else "frozen"
    return "train"
  return map_with_path(label, params)


def trainable(labels: Any, phase: Phase) -> Any:
  """Per param: whether the step of `phase` computes its gradient."""
  return jax.tree.map(lambda l: l == "train" or (l == "staged" and not phase.locked), labels)


def _ratio(config: Any, field: str) -> None:
  value = setting(config, "masking", field, 0.0)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
    fail(f"masking.{field}", value, "must be a fraction of tokens to drop in [0, 1) "
         "(FLIP uses 0.5 or 0.75)")


def validate(config: Any) -> None:
  """Raises ConfigError for the first invalid recipe field (called by config_validation)."""
  total = config.total_steps
  similarity = check_choice("similarity", config.get("similarity", "pooled"), SIMILARITIES)
  towers = locked_towers(config)
  if len(set(towers)) != len(towers) or len(towers) == len(TOWERS):
    fail("locking.towers", tuple(towers), "must name each tower at most once and leave one "
         "unlocked; allowed: " + ", ".join(TOWERS))
  unlock = setting(config, "locking", "unlock_at_step", None)
  if unlock is not None:
    if not towers:
      fail("locking.unlock_at_step", unlock, "needs locking.towers (nothing is locked)")
    if isinstance(unlock, bool) or not isinstance(unlock, int) or not 0 < unlock < total:
      fail("locking.unlock_at_step", unlock, f"must be a step in [1, total_steps={total})")
  for field in ("image", "text"):
    _ratio(config, field)
  unmasked = setting(config, "masking", "unmasked_steps", 0)
  if isinstance(unmasked, bool) or not isinstance(unmasked, int) or not 0 <= unmasked <= total:
    fail("masking.unmasked_steps", unmasked, f"must be an integer in [0, total_steps={total}]")
  init_dir = setting(config, "init", "workdir", None)
  subtrees = setting(config, "init", "subtrees", ()) or ()
  if isinstance(subtrees, str) or not all(isinstance(s, str) and s for s in subtrees):
    fail("init.subtrees", subtrees, "must be a list of param paths like ('img',) or "
         "('txt/Transformer',); empty means every param")
  if init_dir is None and setting(config, "init", "step", None) is not None:
    fail("init.step", config.init.step, "needs init.workdir")
  source = check_choice("distill.source", setting(config, "distill", "source", "none"),
                        DISTILL_SOURCES)
  if source != "none":
    weight = setting(config, "distill", "weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
        0 <= weight < math.inf):
      fail("distill.weight", weight, "must be a non-negative number")
    if source == "teacher" and not setting(config, "distill", "teacher", None):
      fail("distill.teacher", None, "distill.source='teacher' needs the teacher run's workdir")
    if similarity != "pooled":
      fail("distill.source", source, "distillation matches pooled-embedding similarities; "
           "use similarity='pooled'")
  if config.get("accum_steps", 1) > 1 and (similarity != "pooled" or source != "none"):
    fail("accum_steps", config.accum_steps, "gradient accumulation covers the pooled "
         "contrastive loss only; use accum_steps=1 with similarity='filip' or distillation")
