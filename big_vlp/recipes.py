"""Recipe switches of the one trainer: LiT locking, FLIP masking, FILIP, distillation,
captioning (CapPa / CoCa) and SILC self-distillation.

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
  caption.weight / .parallel_prob    with config.model.decoder set: the captioning loss's
                                     weight (CoCa) and CapPa's parallel-prediction fraction;
                                     config.model.text=None leaves only captioning (CapPa)
  silc.weight / .head / ...          SILC: DINO self-distillation of local crops towards an
                                     EMA teacher's global crops, added with this weight

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
# Batch features SILC reads: local crops [B, L, h, w, C] for the student; global crops
# [B, G, H, W, C] for the teacher ('image' alone serves as one global crop when absent).
SILC_LOCAL, SILC_GLOBAL = "image_local", "image_global"


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
  # Active when config.model.decoder is set (CoCa weights captioning 2:1 vs contrastive).
  config.caption = ml_collections.ConfigDict({"weight": 1.0, "parallel_prob": 0.0})
  config.silc = ml_collections.ConfigDict({
      "weight": 0.0,  # 0: off. SILC adds the self-distillation loss with weight 1.
      # DINO head on the image tower's pooled features (DINO: 65536 / 2048 / 256 / 3).
      "head": {"num_prototypes": 65536, "hidden_dim": 2048, "bottleneck_dim": 256,
               "num_layers": 3},
      "student_temp": 0.1,
      # Teacher temperature: linear from teacher_temp to teacher_temp_end over the warm-up
      # steps, then teacher_temp_end (DINO: 0.04 -> 0.07 over its first 30 epochs).
      "teacher_temp": 0.04, "teacher_temp_end": 0.04, "teacher_temp_warmup_steps": 0,
      "center_momentum": 0.9,
      # EMA teacher momentum, cosine from ema_momentum to ema_momentum_end (equal: fixed).
      "ema_momentum": 0.996, "ema_momentum_end": 0.996})


class Phase(NamedTuple):
  """What one stretch of training runs with: locked towers and token-drop fractions."""
  locked: tuple[str, ...] = ()
  image_mask: float = 0.0
  text_mask: float = 0.0


def setting(config: Any, group: str, field: str, default: Any) -> Any:
  """config.<group>.<field>, or `default` when the config predates the recipe fields."""
  node = config.get(group)
  return default if node is None else node.get(field, default)


def caption_on(config: Any) -> bool:
  """Whether the run trains a captioning decoder (config.model.decoder set)."""
  return config.model.get("decoder") is not None


def contrastive_on(config: Any) -> bool:
  """Whether the run has a text tower and so a contrastive loss (not CapPa)."""
  return config.model.get("text") is not None


def silc_on(config: Any) -> bool:
  """Whether SILC self-distillation is on (config.silc.weight > 0)."""
  return float(setting(config, "silc", "weight", 0.0) or 0.0) > 0


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
  if config.get("accum_steps", 1) > 1 and (similarity != "pooled" or source != "none"
                                           or caption_on(config) or silc_on(config)):
    fail("accum_steps", config.accum_steps, "gradient accumulation covers the pooled "
         "contrastive loss only; use accum_steps=1 with similarity='filip', distillation, "
         "captioning or SILC")
  _validate_caption(config, towers, similarity, source)
  _validate_silc(config)


def _number(config: Any, group: str, field: str, default: float, low: float, high: float,
            what: str) -> float:
  value = setting(config, group, field, default)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
    fail(f"{group}.{field}", value, what)
  return float(value)


def _validate_caption(config: Any, towers: tuple[str, ...], similarity: str,
                      source: str) -> None:
  if not contrastive_on(config):
    if not caption_on(config):
      fail("model.text", None, "a model without a text tower is a captioner (CapPa) and "
           "needs model.decoder")
    for field, bad, value in (("similarity", similarity != "pooled", similarity),
                              ("distill.source", source != "none", source)):
      if bad:
        fail(field, value, "needs a text tower; this model (model.text=None) only captions")
    if "txt" in towers:
      fail("locking.towers", towers, "this model has no text tower to lock")
    if float(setting(config, "masking", "text", 0.0)):
      fail("masking.text", config.masking.text, "this model has no text tower to mask")
  if not caption_on(config):
    return
  _number(config, "caption", "weight", 1.0, 0.0, math.inf, "must be a non-negative number")
  prob = setting(config, "caption", "parallel_prob", 0.0)
  if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0 <= prob <= 1:
    fail("caption.parallel_prob", prob, "must be a probability in [0, 1] (CapPa: 0.75)")
  dec = config.model.decoder
  if dec.get("max_len") is None and not contrastive_on(config):
    fail("model.decoder.max_len", None, "must be set (no text tower to take it from); use "
         "the tokenized caption length")


def _validate_silc(config: Any) -> None:
  weight = setting(config, "silc", "weight", 0.0)
  if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
      0 <= weight < math.inf):
    fail("silc.weight", weight, "must be a non-negative number (0 turns SILC off)")
  if not silc_on(config):
    return
  if not contrastive_on(config):
    fail("silc.weight", weight, "SILC adds to the contrastive loss; this model has no text "
         "tower")
  if "img" in locked_towers(config):
    fail("locking.towers", tuple(config.locking.towers), "SILC trains the image tower; it "
         "cannot be locked")
  for field in ("student_temp", "teacher_temp", "teacher_temp_end"):
    _number(config, "silc", field, 0.1, 1e-6, math.inf, "must be a positive temperature")
  for field in ("center_momentum", "ema_momentum", "ema_momentum_end"):
    _number(config, "silc", field, 0.9, 0.0, 1.0, "must be a momentum in [0, 1]")
  warm = setting(config, "silc", "teacher_temp_warmup_steps", 0)
  if isinstance(warm, bool) or not isinstance(warm, int) or warm < 0:
    fail("silc.teacher_temp_warmup_steps", warm, "must be an integer >= 0")
  head = dict(setting(config, "silc", "head", {}) or {})
  allowed = ("num_prototypes", "hidden_dim", "bottleneck_dim", "num_layers", "dtype")
  for key, value in head.items():
    if key not in allowed:
      fail(f"silc.head.{key}", value, "unknown option; allowed: " + ", ".join(allowed))
    if key != "dtype" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
      fail(f"silc.head.{key}", value, "must be a positive integer")
