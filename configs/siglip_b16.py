"""SigLIP B/16 at 224px, batch 32k, sigmoid loss (Zhai et al. 2023), as launched on a pod.

  python -m big_vlp.train --config configs/siglip_b16.py:data=NAME,data_dir=DIR --workdir DIR
  python -m big_vlp.train --config configs/siglip_b16.py:runlocal --workdir /tmp/x   # CPU

Paper settings: ViT-B/16 image tower with MAP pooling, B-sized text tower (16 tokens in the
paper for English WebLI; 64 here, as the released B/16 checkpoints use), 32k English
SentencePiece vocabulary, sigmoid loss with t=log 10 and b=-10, AdamW lr 1e-3, wd 1e-4,
beta2 0.95 (the paper's fix for instability at large batch), batch 32,768, 9B examples seen.
`tokenizer` may point at a published SentencePiece model: tokenizer=sp:/path/to/c4_en.model.
Other arguments: see big_vlp.config_common.pod_config.
"""

import ml_collections

from big_vlp.config_common import pod_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """SigLIP B/16 recipe."""
  return pod_config(
      arg, loss="sigmoid", tokenizer="sp_train:32000", examples=9_000_000_000, text_len=64,
      image={"variant": "B/16", "pool_type": "map", "posemb": "learn", "dtype": "bfloat16"},
      text={"variant": "B", "pool_type": "last", "causal": False, "dtype": "bfloat16"},
      embed_dim=768, max_scale=None,
      optim={"name": "adamw", "lr": 1e-3, "wd": 1e-4, "b1": 0.9, "b2": 0.95, "eps": 1e-8,
             "grad_clip_norm": 1.0, "wd_rules": (".*/kernel",),
             "schedule": {"name": "cosine", "warmup_steps": 5000, "end_factor": 0.0}})
