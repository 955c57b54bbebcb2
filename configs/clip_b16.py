"""CLIP ViT-B/16 at 224px, batch 32k, softmax loss (Radford et al. 2021), as on a pod.

  python -m big_vlp.train --config configs/clip_b16.py:data=NAME,data_dir=DIR --workdir DIR
  python -m big_vlp.train --config configs/clip_b16.py:runlocal --workdir /tmp/x   # CPU

Paper settings: ViT-B/16 with a class token, text transformer width 512 / 12 layers /
8 heads (the 'M' size) with a causal mask and end-of-text pooling, 77 tokens, 49,408-token
vocabulary, joint embedding 512, learned temperature initialised to 1/0.07 and clamped at
100 (open_clip), AdamW lr 5e-4, wd 0.2, betas (0.9, 0.98), eps 1e-6, 2,000 warmup steps,
cosine decay, batch 32,768, 32 epochs of 400M pairs (12.8B examples).
"""

import ml_collections

from big_vlp.config_args import parse_arg
from big_vlp.config_common import opt_float, opt_str, run_fields, standard_evals, text_pp


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """CLIP B/16 recipe; see the module docstring for arguments."""
  a = parse_arg(arg, data="laion400m", data_dir="", text_key="caption",
                eval_data="imagenet2012", eval_split="validation", eval_data_dir="",
                retrieval_data="coco_captions", retrieval_split="val",
                tokenizer="sp_train:49408", examples=12_800_000_000, batch=32_768, seed=0,
                fsdp=-1, runlocal=False)
  res, text_len = 224, 77
  if a.runlocal:
    a.update(data="big_vlp_shapes/small", eval_data="big_vlp_shapes/small", eval_split="test",
             retrieval_data="big_vlp_shapes/small", tokenizer="bytes", batch=16,
             examples=16 * 3)
    res, text_len = 64, 16
  c = ml_collections.ConfigDict()
  c.seed = a.seed
  c.batch_size = a.batch
  c.total_steps = max(1, a.examples // a.batch)
  c.loss = "softmax"
  c.tokenizer = a.tokenizer
  c.data = ml_collections.ConfigDict({
      "name": a.data, "split": "train", "data_dir": opt_str(a.data_dir),
      "text_key": a.text_key, "shuffle_buffer": 250_000 if not a.runlocal else 1000,
      "pp": (f"decode|resize({res})|value_range(-1,1)|{text_pp(text_len, a.text_key)}"
             "|keep('image','text')")})
  image = {"variant": "B/16", "pool_type": "tok", "posemb": "learn", "dtype": "bfloat16"}
  text = {"variant": "M", "max_len": text_len, "pool_type": "last", "causal": True,
          "dtype": "bfloat16"}
  if a.runlocal:
    image.update(variant="mu/16", dtype="float32")
    text.update(variant="mu", dtype="float32")
  c.model = ml_collections.ConfigDict({
      "image": image, "text": text, "embed_dim": 512 if not a.runlocal else 32,
      "temperature_init": opt_float(), "bias_init": opt_float(), "max_scale": 100.0})
  c.optim = ml_collections.ConfigDict({
      "name": "adamw", "lr": 5e-4, "wd": 0.2, "b1": 0.9, "b2": 0.98, "eps": 1e-6,
      "grad_clip_norm": opt_float(), "wd_rules": (".*/kernel",),
      "schedule": {"name": "cosine", "warmup_steps": min(2000, c.total_steps // 10),
                   "end_factor": 0.0}})
  run_fields(c, log_every=50 if not a.runlocal else 1,
             ckpt_every=1000 if not a.runlocal else c.total_steps, fsdp=1)
  c.mesh.data = 1
  c.mesh.fsdp = a.fsdp
  c.evals = standard_evals(
      res=res, text_len=text_len, zeroshot_data=a.eval_data, zeroshot_split=a.eval_split,
      zeroshot_data_dir=a.eval_data_dir or a.data_dir, retrieval_data=a.retrieval_data,
      retrieval_split=a.retrieval_split, data_dir=a.data_dir, text_key=a.text_key,
      every=5000 if not a.runlocal else c.total_steps, batch_size=1024 if not a.runlocal else 64)
  return c
