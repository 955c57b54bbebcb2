"""Start-up checks of a training config: each failure names the field and what is allowed."""

import math
from typing import Any

from big_vlp import distributed, losses, optim, recipes, sharding
from big_vlp.config_errors import ConfigError, check_choice, fail
from big_vlp.evaluators import EVALUATORS
from big_vlp.models.common import (check_matmul_dtype, check_scan, decode_variant,
                                   resolve_remat)

IMAGE_POOLS = ("gap", "map", "tok")
TEXT_POOLS = ("last", "first", "gap", "map")
POSEMBS = ("learn", "sincos2d")
DTYPES = ("float32", "bfloat16")
REQUIRED = ("seed", "total_steps", "batch_size", "loss", "tokenizer", "data", "model",
            "optim", "mesh", "sharding_rules", "log_every", "ckpt_every", "keep_ckpts")


def _positive_int(config: Any, field: str) -> int:
  value = config
  for part in field.split("."):
    value = value[part]
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    fail(field, value, "must be a positive integer")
  return value


def _check_tower(cfg: Any, field: str, pools: tuple[str, ...]) -> None:
  decode_variant(cfg.get("variant"), field=f"{field}.variant")
  check_choice(f"{field}.pool_type", cfg.get("pool_type", pools[0]), pools)
  check_choice(f"{field}.dtype", cfg.get("dtype", "float32"), DTYPES)
  check_matmul_dtype(cfg.get("matmul_dtype", "float32"), f"{field}.matmul_dtype")
  resolve_remat(cfg.get("remat", "none"), f"{field}.remat")
  check_scan(cfg.get("scan", False), f"{field}.scan")


MIXTURE_FIELDS = ("name", "split", "data_dir", "weight", "pp")


def _check_data(config: Any) -> None:
  """`config.data`: one dataset (name) or a mixture, and the stream's knobs."""
  dc = config.data
  mixture = dc.get("mixture")
  if not mixture and not dc.get("name"):
    fail("data.name", dc.get("name"), "must name a tfds dataset (or give data.mixture)")
  for label, m in (mixture or {}).items():
    if not hasattr(m, "keys"):
      fail(f"data.mixture.{label}", m, "must be a dict with fields " + ", ".join(MIXTURE_FIELDS))
    unknown = sorted(set(m.keys()) - set(MIXTURE_FIELDS))
    if unknown:
      fail(f"data.mixture.{label}", dict(m), f"unknown field(s) {', '.join(unknown)}; "
           "allowed: " + ", ".join(MIXTURE_FIELDS))
    if not m.get("name"):
      fail(f"data.mixture.{label}.name", m.get("name"), "must name a tfds dataset")
    weight = m.get("weight", 1.0)
    if (isinstance(weight, bool) or not isinstance(weight, (int, float))
        or not (0 < weight < math.inf)):
      fail(f"data.mixture.{label}.weight", weight, "must be a positive number")
  for field in ("shuffle_buffer", "block_size", "shards"):
    if dc.get(field) is not None:
      _positive_int(config, f"data.{field}")
  skip = dc.get("max_skip_fraction", 0.5)
  if isinstance(skip, bool) or not isinstance(skip, (int, float)) or not 0 <= skip <= 1:
    fail("data.max_skip_fraction", skip, "must be a number in [0, 1]")


def validate_config(config: Any, num_devices: int, process_count: int = 1) -> None:
  """Raises ConfigError for the first invalid field of a training config."""
  missing = [f for f in REQUIRED if f not in config]
  if missing:
    raise ConfigError(f"config is missing required fields: {', '.join(missing)}")
  total = _positive_int(config, "total_steps")
  batch = _positive_int(config, "batch_size")
  for field in ("log_every", "ckpt_every", "keep_ckpts"):
    _positive_int(config, field)
  check_choice("loss", config.loss, losses.LOSSES)
  check_choice("loss_impl", config.get("loss_impl", "global"), ("global", "sharded"))
  recipes.validate(config)
  check_choice("nan_policy", config.get("nan_policy", "skip"), ("skip", "stop"))
  peak = config.get("peak_flops")
  if peak is not None and (isinstance(peak, bool) or not isinstance(peak, (int, float))
                           or not 0 < peak < math.inf):
    fail("peak_flops", peak, "must be a positive number (FLOP/s of one device) or None "
         "(the device table, or a matmul measured at start-up on CPU)")
  _check_data(config)
  check_choice("optim.name", config.optim.name, optim.OPTIMIZERS)
  check_choice("optim.mu_dtype", config.optim.get("mu_dtype", "float32"), optim.MU_DTYPES)
  check_choice("optim.schedule.name", config.optim.schedule.name, optim.SCHEDULES)
  warmup = config.optim.schedule.get("warmup_steps", 0)
  if not 0 <= warmup <= total:
    fail("optim.schedule.warmup_steps", warmup, f"must be in [0, total_steps={total}]")

  _check_tower(config.model.image, "model.image", IMAGE_POOLS)
  check_choice("model.image.posemb", config.model.image.get("posemb", "learn"), POSEMBS)
  if config.model.get("text") is not None:  # None: a captioner without text tower (CapPa).
    _check_tower(config.model.text, "model.text", TEXT_POOLS)
    _positive_int(config, "model.text.max_len")
  if config.model.get("decoder") is not None:
    dec = config.model.decoder
    decode_variant(dec.get("variant"), field="model.decoder.variant")
    check_choice("model.decoder.dtype", dec.get("dtype", "float32"), DTYPES)
    resolve_remat(dec.get("remat", "none"), "model.decoder.remat")
    if dec.get("max_len") is not None:
      _positive_int(config, "model.decoder.max_len")

  shape = sharding.mesh_shape(config.mesh, num_devices, config.get("mesh_dcn"),
                              slices=process_count)
  dp = math.prod(s for a, s in zip(sharding.MESH_AXES, shape) if a in sharding.BATCH_AXES)
  accum = config.get("accum_steps", 1)
  if isinstance(accum, bool) or not isinstance(accum, int) or accum <= 0:
    fail("accum_steps", accum, "must be a positive integer (micro-batches per step)")
  if batch % (dp * accum):
    unit = dp * accum
    fail("batch_size", batch, f"must be divisible by the data-parallel size {dp} times "
         f"accum_steps={accum} (mesh {dict(zip(sharding.MESH_AXES, shape))}); e.g. "
         f"{batch - batch % unit or unit}")
  if batch % process_count:
    fail("batch_size", batch, f"must be divisible by the process count {process_count}")
  shards = config.data.get("shards") or process_count
  if shards % process_count:
    fail("data.shards", shards, f"must be a multiple of the process count {process_count}")
  if batch % shards:
    fail("batch_size", batch, f"must be divisible by data.shards={shards}")
  distributed.settings(config)
  for i, item in enumerate(config.sharding_rules):
    if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
      fail(f"sharding_rules[{i}]", item, "each rule must be a (regex, rule) pair")
    if isinstance(item[1], str):
      check_choice(f"sharding_rules[{i}]", item[1], sharding.RULE_NAMES)
  for name, ev in (config.get("evals") or {}).items():
    check_choice(f"evals.{name}.type", ev.get("type", name), EVALUATORS)
    for field in ("data", "split", "pp", "batch_size", "every"):
      if field not in ev:
        fail(f"evals.{name}", dict(ev), f"is missing field {field!r}")
