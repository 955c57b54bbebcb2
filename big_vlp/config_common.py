"""Pieces shared by the configs in configs/: evaluators, optional fields, pod recipes."""

import importlib.util
import os
import re
from typing import Any

import ml_collections
from ml_collections import config_dict

from big_vlp import recipes, sharding
from big_vlp.config_args import parse_arg
from big_vlp.evaluators.zeroshot import DEFAULT_TEMPLATES


def sibling_config(path: str, name: str, arg: str) -> ml_collections.ConfigDict:
  """get_config(arg) of configs/<name>.py next to the config file `path` (a recipe config
  builds on another one without the configs directory being a package)."""
  file = os.path.join(os.path.dirname(os.path.abspath(path)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"big_vlp_config_{name}", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


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
  """The 'zeroshot' and 'retrieval' evaluators on the given datasets ('none' leaves one out)."""
  evals = ml_collections.ConfigDict({
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
  for name, data in (("zeroshot", zeroshot_data), ("retrieval", retrieval_data)):
    if data.lower() == "none":
      del evals[name]
  return evals


def captioning_eval(*, data: str, split: str, data_dir: str | None, res: int, every: int,
                    batch_size: int = 256, text_key: str = "caption"
                    ) -> ml_collections.ConfigDict:
  """The 'captioning' evaluator: greedy captions of a held-out split scored against its
  reference captions (exact match, BLEU-4, CIDEr)."""
  return ml_collections.ConfigDict({
      "type": "captioning", "data": data, "split": split, "data_dir": opt_str(data_dir),
      "pp": img_pp(res) + f"|keep('image',{text_key!r})", "caption_key": text_key,
      "decode": "greedy", "every": every, "batch_size": batch_size})


def decoder_config(width: int, depth: int, num_heads: int, max_len: int,
                   dtype: str = "float32") -> ml_collections.ConfigDict:
  """`config.model.decoder`: a captioning decoder (pad_id 0 = the tokenizers' padding,
  which is also its BOS)."""
  return ml_collections.ConfigDict({
      "width": width, "depth": depth, "mlp_dim": 4 * width, "num_heads": num_heads,
      "max_len": max_len, "pad_id": 0, "dtype": dtype, "dropout": 0.0, "remat": "none"})


def data_config(data: str, *, data_dir: str | None, text_key: str, pp: str,
                shuffle_buffer: int, split: str = "train") -> ml_collections.ConfigDict:
  """`config.data` for one dataset or a mixture written `NAME[:WEIGHT]+NAME[:WEIGHT]...`.

  A mixture becomes `data.mixture.<label>` entries (name, weight; split and data_dir are
  inherited from `data`), which can then be edited one by one from the command line.
  """
  c = ml_collections.ConfigDict({
      "name": data, "split": split, "data_dir": opt_str(data_dir), "text_key": text_key,
      "shuffle_buffer": shuffle_buffer, "pp": pp, "max_skip_fraction": 0.5,
      # Input stream shards (default: one per process). Fixing it makes the global batches,
      # and so the numbers, the same on any process count that divides it.
      "shards": config_dict.placeholder(int)})
  parts = [p.strip() for p in data.split("+")]
  if len(parts) > 1 or ":" in data:
    mixture = {}
    for part in parts:
      name, _, weight = part.partition(":")
      label = re.sub(r"\W+", "_", name).strip("_")
      while label in mixture:
        label += "_"
      mixture[label] = {"name": name, "weight": float(weight) if weight else 1.0}
    c.name = parts[0].partition(":")[0]  # For the record; the mixture is what is read.
    c.mixture = mixture
  return c


def opt_str(value: str | None) -> Any:
  """A string field that may be None and still be overridden from the command line."""
  return config_dict.placeholder(str) if not value else value


def opt_float(value: float | None = None) -> Any:
  """A float field that may be None and still be overridden from the command line."""
  return config_dict.placeholder(float) if value is None else float(value)


def run_fields(config: ml_collections.ConfigDict, *, log_every: int, ckpt_every: int,
               keep_ckpts: int = 3, fsdp: int = 1) -> None:
  """Mesh, sharding rules, logging and checkpoint cadence."""
  # Degrees within a slice (ICI) and across slices (DCN); -1 = the rest of the devices.
  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": fsdp, "tensor": 1})
  config.mesh_dcn = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})
  # Transformer weights split by logical axis (width over 'fsdp', heads and MLP units over
  # 'tensor'); with fsdp = tensor = 1 everything is replicated.
  config.sharding_rules = list(sharding.TRANSFORMER_RULES)
  config.logical_axes = ml_collections.ConfigDict(
      {k: opt_str(v) for k, v in sharding.DEFAULT_LOGICAL_AXES.items()})
  config.freeze = ()
  recipes.recipe_fields(config)  # LiT, FLIP, FILIP, distillation: all off by default.
  config.loss_impl = "global"
  # A step whose loss or gradients are not finite never updates the state; 'skip' counts it
  # (train/nonfinite_steps) and goes on, 'stop' ends the run with a report.
  config.nan_policy = "skip"
  # Resuming a workdir whose run had another model / loss / tokenizer / optimizer is refused
  # with a diff; True lets an intentional, shape-compatible change through.
  config.allow_config_change = False
  # Peak FLOP/s of one device, for train/mfu. Unset: big_vlp.perf's table for TPUs and
  # GPUs; on CPU a matmul measured at start-up (simulated devices share the host's peak).
  config.peak_flops = opt_float()
  config.accum_steps = 1  # Micro-batches per step; the gradient stays the full-batch one.
  # Multi-process runs: unset fields come from BIG_VLP_COORDINATOR / _NUM_PROCESSES /
  # _PROCESS_ID, or are detected on Cloud TPU pods (see big_vlp.distributed).
  config.distributed = ml_collections.ConfigDict({
      "mode": "auto", "coordinator_address": opt_str(None),
      "num_processes": config_dict.placeholder(int),
      "process_id": config_dict.placeholder(int), "timeout_s": 300})
  config.log_every = log_every
  config.ckpt_every = ckpt_every
  config.keep_ckpts = keep_ckpts


def pod_config(arg: str | None, *, loss: str, tokenizer: str, examples: int, text_len: int,
               image: dict, text: dict, embed_dim: int, max_scale: float | None,
               optim: dict) -> ml_collections.ConfigDict:
  """A full-size recipe (batch 32k, FSDP over every device) with a `runlocal` CPU variant.

  Arguments: data, data_dir, text_key, eval_data, eval_split, eval_data_dir, retrieval_data,
  retrieval_split, tokenizer, examples, batch, seed, fsdp, runlocal. `runlocal` keeps the
  recipe's structure with mu-sized float32 towers, batch 16, 3 steps on the embedded data.
  """
  a = parse_arg(arg, data="laion400m", data_dir="", text_key="caption",
                eval_data="imagenet2012", eval_split="validation", eval_data_dir="",
                retrieval_data="coco_captions", retrieval_split="val", tokenizer=tokenizer,
                examples=examples, batch=32_768, seed=0, fsdp=-1, runlocal=False)
  res = 224
  # A 32k batch on 16 GiB chips (v5e) needs the blocks rematerialised; scanning the layers
  # makes XLA free each layer's activations (tools/plan.py: 3.9 vs 37.9 GiB temporaries
  # per device for B/16 on 256 chips). Override with e.g. --config.model.image.remat=none.
  image = {"remat": "full", "scan": True, "matmul_dtype": "float32", **image}
  text = {"remat": "full", "scan": True, "matmul_dtype": "float32", **text, "max_len": text_len}
  if a.runlocal:
    a.update(data="big_vlp_shapes/small", eval_data="big_vlp_shapes/small", eval_split="test",
             retrieval_data="big_vlp_shapes/small", tokenizer="bytes", batch=16,
             examples=16 * 3)
    res, text_len, embed_dim = 64, 16, 32
    image.update(variant="mu/16", dtype="float32")
    text.update(variant="mu", dtype="float32", max_len=text_len)
  c = ml_collections.ConfigDict()
  c.seed = a.seed
  c.batch_size = a.batch
  c.total_steps = max(1, a.examples // a.batch)
  c.loss = loss
  c.tokenizer = a.tokenizer
  c.data = data_config(
      a.data, data_dir=a.data_dir, text_key=a.text_key,
      shuffle_buffer=1000 if a.runlocal else 250_000,
      pp=(f"decode|resize({res})|value_range(-1,1)|choice(key={a.text_key!r})|"
          f"{text_pp(text_len, a.text_key)}"
          "|keep('image','text')"))
  c.model = ml_collections.ConfigDict({
      "image": image, "text": text, "embed_dim": embed_dim,
      "temperature_init": opt_float(), "bias_init": opt_float(),
      "max_scale": opt_float(max_scale)})
  optim = dict(optim, grad_clip_norm=opt_float(optim.get("grad_clip_norm")),
               mu_dtype=optim.get("mu_dtype", "float32"))
  optim["schedule"] = dict(optim["schedule"], warmup_steps=min(
      optim["schedule"]["warmup_steps"], c.total_steps // 10))
  c.optim = ml_collections.ConfigDict(optim)
  run_fields(c, log_every=1 if a.runlocal else 50,
             ckpt_every=c.total_steps if a.runlocal else 1000)
  c.mesh.data = 1
  c.mesh.fsdp = a.fsdp  # Fully sharded over every device: a 32k batch of B/16 needs it.
  # Ring SigLIP / ring CLIP: per-device loss memory stays flat as the pod grows.
  c.loss_impl = "sharded"
  c.evals = standard_evals(
      res=res, text_len=text_len, zeroshot_data=a.eval_data, zeroshot_split=a.eval_split,
      zeroshot_data_dir=a.eval_data_dir or a.data_dir, retrieval_data=a.retrieval_data,
      retrieval_split=a.retrieval_split, data_dir=a.data_dir, text_key=a.text_key,
      every=c.total_steps if a.runlocal else 5000, batch_size=64 if a.runlocal else 1024)
  return c
