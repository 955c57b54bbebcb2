"""Default job: a small SigLIP/CLIP two-tower on the embedded shapes dataset (CPU minutes).

  python -m big_vlp.train --config configs/demo.py --workdir /tmp/demo
  python -m big_vlp.train --config configs/demo.py:loss=softmax,steps=500 --workdir ...

Arguments: loss=sigmoid|softmax, steps, batch, seed, data / data_dir (a tfds image-caption
dataset, default the embedded 'big_vlp_shapes'; a weighted mixture is written
`data=NAME:3+OTHER:1`), eval_data / eval_data_dir / eval_split (a labelled tfds dataset for
zero-shot; 'none' for no zero-shot), retrieval_data / retrieval_split (default: `data`'s
'val' split; 'none' for no retrieval), eval_every (steps between evaluations; default a
quarter of the run, 0 = only at the end), text_key, tokenizer, res (image size), runlocal
(tiny and fast, for debugging).
"""

import ml_collections

from big_vlp.config_args import parse_arg
from big_vlp.config_common import (data_config, opt_float, run_fields, standard_evals,
                                   text_pp)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Builds the demo config from 'k=v,...' arguments."""
  a = parse_arg(arg, loss="sigmoid", steps=500, batch=128, seed=0,
                data="big_vlp_shapes", data_dir="", text_key="caption",
                eval_data="big_vlp_shapes", eval_data_dir="", eval_split="test",
                retrieval_data="", retrieval_split="val", tokenizer="sp_train:256",
                res=64, eval_every=-1, runlocal=False)
  if a.runlocal:
    a.steps, a.batch = min(a.steps, 20), min(a.batch, 32)
  text_len = 16
  c = ml_collections.ConfigDict()
  c.seed = a.seed
  c.total_steps = a.steps
  c.batch_size = a.batch
  c.loss = a.loss
  c.tokenizer = a.tokenizer

  c.data = data_config(
      a.data, data_dir=a.data_dir, text_key=a.text_key, shuffle_buffer=50_000,
      pp=(f"decode|resize({a.res})|value_range(-1,1)|choice(key={a.text_key!r})|"
          f"{text_pp(text_len, a.text_key)}"
          "|keep('image','text')"))

  # Width 128 with 8-pixel patches (64 tokens) costs about what width 192 with 16-pixel
  # patches does and learns positions and sizes much better (retrieval R@10 0.39 vs 0.12).
  width = 64 if a.runlocal else 128
  depth = 1 if a.runlocal else 4
  heads = 2 if a.runlocal else 4
  c.model = ml_collections.ConfigDict({
      "image": {"variant": "Ti/8", "width": width, "depth": depth, "mlp_dim": 4 * width,
                "num_heads": heads, "pool_type": "map", "posemb": "learn",
                "dtype": "float32", "matmul_dtype": "float32", "remat": "none",
                "scan": False},
      "text": {"variant": "Ti", "width": width, "depth": depth, "mlp_dim": 4 * width,
               "num_heads": heads, "max_len": text_len, "pool_type": "last",
               "causal": False, "dtype": "float32", "matmul_dtype": "float32",
               "remat": "none", "scan": False},
      "embed_dim": 128,
      # None = the standard init of the loss (REFERENCE: SigLIP t=log 10, b=-10; CLIP 1/0.07).
      "temperature_init": opt_float(), "bias_init": opt_float(),
      "max_scale": 100.0 if a.loss == "softmax" else opt_float(),
  })

  c.optim = ml_collections.ConfigDict({
      "name": "adamw", "lr": 1e-3, "wd": 1e-4, "b1": 0.9, "b2": 0.95, "eps": 1e-8,
      "grad_clip_norm": 1.0, "wd_rules": (".*/kernel",), "mu_dtype": "float32",
      "schedule": {"name": "cosine", "warmup_steps": min(100, a.steps // 10),
                   "end_factor": 0.0}})

  every = max(a.steps // 4, 1)
  run_fields(c, log_every=max(1, min(50, a.steps // 20)), ckpt_every=every)
  c.evals = standard_evals(
      res=a.res, text_len=text_len, zeroshot_data=a.eval_data, zeroshot_split=a.eval_split,
      zeroshot_data_dir=a.eval_data_dir or a.data_dir,
      retrieval_data=a.retrieval_data or c.data.name,
      retrieval_split=a.retrieval_split, data_dir=a.data_dir, text_key=a.text_key,
      every=every if a.eval_every < 0 else a.eval_every, batch_size=256)
  return c
