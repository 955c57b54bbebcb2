"""SigLIP B/16 at 224px, batch 32k, sigmoid loss (Zhai et al. 2023), as launched on a pod.

  python -m big_vlp.train --config configs/siglip_b16.py:data=NAME,data_dir=DIR --workdir DIR
  python -m big_vlp.train --config configs/siglip_b16.py:runlocal --workdir /tmp/x   # CPU

Paper settings: ViT-B/16 image tower with MAP pooling, B-sized text tower (16 tokens in the
paper for English WebLI; 64 is used here, as the released B/16 checkpoints do), 32k English
SentencePiece vocabulary, sigmoid loss with t=log 10 and b=-10, AdamW lr 1e-3, wd 1e-4,
beta2 0.95 (the paper's fix for instability at large batch), batch 32,768, 9B examples seen.
`tokenizer` may point at a published SentencePiece model: tokenizer=sp:/path/to/c4_en.model.
`runlocal` keeps the recipe's structure but uses mu-sized towers, batch 16 and the embedded
dataset so that it runs a few steps on a laptop CPU.
"""

import ml_collections

from big_vlp.config_args import parse_arg
from big_vlp.config_common import opt_float, opt_str, run_fields, standard_evals, text_pp


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """SigLIP B/16 recipe; see the module docstring for arguments."""
  a = parse_arg(arg, data="laion400m", data_dir="", text_key="caption",
                eval_data="imagenet2012", eval_split="validation", eval_data_dir="",
                retrieval_data="coco_captions", retrieval_split="val",
                tokenizer="sp_train:32000", examples=9_000_000_000, batch=32_768, seed=0,
                fsdp=-1, runlocal=False)
  res, text_len = 224, 64
  if a.runlocal:
    a.update(data="big_vlp_shapes/small", eval_data="big_vlp_shapes/small", eval_split="test",
             retrieval_data="big_vlp_shapes/small", tokenizer="bytes", batch=16,
             examples=16 * 3)
    res, text_len = 64, 16
  c = ml_collections.ConfigDict()
  c.seed = a.seed
  c.batch_size = a.batch
  c.total_steps = max(1, a.examples // a.batch)
  c.loss = "sigmoid"
  c.tokenizer = a.tokenizer
  c.data = ml_collections.ConfigDict({
      "name": a.data, "split": "train", "data_dir": opt_str(a.data_dir),
      "text_key": a.text_key, "shuffle_buffer": 250_000 if not a.runlocal else 1000,
      "pp": (f"decode|resize({res})|value_range(-1,1)|{text_pp(text_len, a.text_key)}"
             "|keep('image','text')")})
  image = {"variant": "B/16", "pool_type": "map", "posemb": "learn", "dtype": "bfloat16"}
  text = {"variant": "B", "max_len": text_len, "pool_type": "last", "causal": False,
          "dtype": "bfloat16"}
  if a.runlocal:
    image.update(variant="mu/16", dtype="float32")
    text.update(variant="mu", dtype="float32")
  c.model = ml_collections.ConfigDict({
      "image": image, "text": text, "embed_dim": 768 if not a.runlocal else 32,
      "temperature_init": opt_float(), "bias_init": opt_float(), "max_scale": opt_float()})
  c.optim = ml_collections.ConfigDict({
      "name": "adamw", "lr": 1e-3, "wd": 1e-4, "b1": 0.9, "b2": 0.95, "eps": 1e-8,
      "grad_clip_norm": 1.0, "wd_rules": (".*/kernel",),
      "schedule": {"name": "cosine", "warmup_steps": min(5000, c.total_steps // 10),
                   "end_factor": 0.0}})
  run_fields(c, log_every=50 if not a.runlocal else 1,
             ckpt_every=1000 if not a.runlocal else c.total_steps, fsdp=1)
  c.mesh.data = 1
  c.mesh.fsdp = a.fsdp  # Fully sharded over every device: 32k batch of B/16 needs it.
  c.evals = standard_evals(
      res=res, text_len=text_len, zeroshot_data=a.eval_data, zeroshot_split=a.eval_split,
      zeroshot_data_dir=a.eval_data_dir or a.data_dir, retrieval_data=a.retrieval_data,
      retrieval_split=a.retrieval_split, data_dir=a.data_dir, text_key=a.text_key,
      every=5000 if not a.runlocal else c.total_steps, batch_size=1024 if not a.runlocal else 64)
  return c
