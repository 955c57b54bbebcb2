"""CLIP ViT-B/16 at 224px, batch 32k, softmax loss (Radford et al. 2021), as on a pod.

  python -m big_vlp.train --config configs/clip_b16.py:data=NAME,data_dir=DIR --workdir DIR
  python -m big_vlp.train --config configs/clip_b16.py:runlocal --workdir /tmp/x   # CPU

Paper settings: ViT-B/16 with a class token, text transformer width 512 / 12 layers /
8 heads (the 'M' size) with a causal mask and end-of-text pooling, 77 tokens, 49,408-token
vocabulary, joint embedding 512, learned temperature initialised to 1/0.07 and clamped at
100 (open_clip), AdamW lr 5e-4, wd 0.2, betas (0.9, 0.98), eps 1e-6, no gradient clipping,
2,000 warmup steps, cosine decay, batch 32,768, 32 epochs of 400M pairs (12.8B examples).
Other arguments: see big_vlp.config_common.pod_config.
"""

import ml_collections

from big_vlp.config_common import pod_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """CLIP B/16 recipe."""
  return pod_config(
      arg, loss="softmax", tokenizer="sp_train:49408", examples=12_800_000_000, text_len=77,
      image={"variant": "B/16", "pool_type": "tok", "posemb": "learn", "dtype": "bfloat16"},
      text={"variant": "M", "pool_type": "last", "causal": True, "dtype": "bfloat16"},
      embed_dim=512, max_scale=100.0,
      optim={"name": "adamw", "lr": 5e-4, "wd": 0.2, "b1": 0.9, "b2": 0.98, "eps": 1e-6,
             "grad_clip_norm": None, "wd_rules": (".*/kernel",),
             "schedule": {"name": "cosine", "warmup_steps": 2000, "end_factor": 0.0}})
