"""FLIP on the demo data (Li et al. 2023, "Scaling Language-Image Pre-training via
Masking"): a random fraction of image patches (and optionally text tokens) is dropped in
training, then a short unmasked tuning phase.

  python -m big_vlp.train --config configs/flip_demo.py --workdir /tmp/flip
  python -m big_vlp.train --config configs/flip_demo.py:image_mask=0.75,unmasked_steps=0 ...

image_mask (default 0.5, FLIP's main setting; 0.75 is its fastest) and text_mask (0; FLIP
drops padding first, then random tokens) are the fractions dropped while training;
evaluation always sees every token. The last `unmasked_steps` steps (default a tenth of
the run) train unmasked. Every other argument is the demo's (configs/demo.py). The speed-up:
`python tools/benchmark.py --config demo --sweep masking.image=0,0.5,0.75`.
"""

import ml_collections

from big_vlp.config_args import parse_arg, split_arg
from big_vlp.config_common import sibling_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The demo recipe with token masking."""
  own, rest = split_arg(arg, ("image_mask", "text_mask", "unmasked_steps"))
  a = parse_arg(own, image_mask=0.5, text_mask=0.0, unmasked_steps=-1)
  c = sibling_config(__file__, "demo", rest)
  c.masking.image = a.image_mask
  c.masking.text = a.text_mask
  c.masking.unmasked_steps = c.total_steps // 10 if a.unmasked_steps < 0 else a.unmasked_steps
  return c
