"""Captioning pretraining on the demo data (CapPa; Tschannen et al. 2023, "Image Captioners
Are Scalable Vision Learners Too"): an image tower and a text decoder, no text tower and no
contrastive loss. With probability parallel_prob an example is trained by parallel
prediction (all-mask decoder inputs, every token predicted at once, no causal mask).

  python -m big_vlp.train --config configs/cappa_demo.py --workdir /tmp/cappa
  python -m big_vlp.train --config configs/cappa_demo.py:parallel_prob=0 ...   # plain Cap

parallel_prob (default 0.75, CapPa's) and dec_depth (decoder blocks, default half the image
tower's depth). The image tower pools nothing the loss uses, so it is set to 'gap' (no
parameters). Evaluators: zero-shot classification by likelihood (the class whose prompts
are most likely given the image, as the CapPa paper scores it) and 'captioning' (greedy
captions of the held-out split: exact match, BLEU-4, CIDEr); there is no retrieval without
a text tower. Every other argument is the demo's (configs/demo.py).
"""

import ml_collections

from big_vlp.config_args import parse_arg, split_arg
from big_vlp.config_common import sibling_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The demo data and image tower, trained by captioning only."""
  own, rest = split_arg(arg, ("parallel_prob", "dec_depth"))
  a = parse_arg(own, parallel_prob=0.75, dec_depth=-1)
  c = sibling_config(__file__, "demo", rest)
  coca = sibling_config(__file__, "coca_demo", f"dec_depth={a.dec_depth}," + (rest or ""))
  c.model.decoder = coca.model.decoder
  c.evals.captioning = coca.evals.captioning
  c.model.text = None
  c.model.embed_dim = None  # No joint embedding space: no `head` projection.
  c.model.image.pool_type = "gap"
  c.caption.parallel_prob = a.parallel_prob
  if "retrieval" in c.evals:
    del c.evals["retrieval"]
  if "zeroshot" in c.evals:
    c.evals.zeroshot.scoring = "likelihood"
  return c
