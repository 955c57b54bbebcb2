"""Pieces shared by the configs in configs/: evaluators and optional fields."""

from typing import Any

import ml_collections
from ml_collections import config_dict

from big_vlp.evaluators.zeroshot import DEFAULT_TEMPLATES


def img_pp(res: int) -> str:
  """Image pre-processing for evaluation: decode, resize, scale to [-1, 1]."""
  return f"decode|resize({res})|value_range(-1,1)"


def text_pp(max_len: int, key: str = "caption") -> str:
  """Caption tokenization into the 'text' key."""
  return f"tokenize(max_len={max_len},key={key!r},out_key='text')"


def standard_evals(*, res: int, text_len: int, zeroshot_data: str, zeroshot_split: str,
                   retrieval_data: str, retrieval_split: str, data_dir: str | None,
                   zeroshot_data_dir: str | None = None, text_key: str = "caption",
                   every: int = 1000, batch_size: int = 256) -> ml_collections.ConfigDict:
  """The 'zeroshot' and 'retrieval' evaluators on the given datasets."""
  return ml_collections.ConfigDict({
      "zeroshot": {
          "type": "zeroshot", "data": zeroshot_data, "split": zeroshot_split,
          "data_dir": opt_str(zeroshot_data_dir if zeroshot_data_dir else data_dir),
          "pp": img_pp(res) + "|keep('image','label')", "label_key": "label",
          "templates": DEFAULT_TEMPLATES, "every": every, "batch_size": batch_size},
      "retrieval": {
          "type": "retrieval", "data": retrieval_data, "split": retrieval_split,
          "data_dir": opt_str(data_dir),
          "pp": img_pp(res) + "|" + text_pp(text_len, text_key) + "|keep('image','text')",
          "every": every, "batch_size": batch_size},
  })


def opt_str(value: str | None) -> Any:
  """A string field that may be None and still be overridden from the command line."""
  return config_dict.placeholder(str) if not value else value


def opt_float(value: float | None = None) -> Any:
  """A float field that may be None and still be overridden from the command line."""
  return config_dict.placeholder(float) if value is None else float(value)


def run_fields(config: ml_collections.ConfigDict, *, log_every: int, ckpt_every: int,
               keep_ckpts: int = 3, fsdp: int = 1) -> None:
  """Mesh, sharding rules, logging and checkpoint cadence."""
  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": fsdp})
  # 'fsdp' splits each parameter's largest divisible dimension; with fsdp=1 it replicates.
  config.sharding_rules = [(".*", "fsdp")]
  config.freeze = ()
  config.log_every = log_every
  config.ckpt_every = ckpt_every
  config.keep_ckpts = keep_ckpts
