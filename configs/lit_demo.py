"""LiT on the demo data (Zhai et al. 2022, "LiT: Zero-Shot Transfer with Locked-image
text Tuning"): one tower initialised from a finished big_vlp run and locked.

  python -m big_vlp.train --config configs/demo.py --workdir /tmp/base
  python -m big_vlp.train --config configs/lit_demo.py:init=/tmp/base --workdir /tmp/lit
  python -m big_vlp.train --config configs/lit_demo.py:init=/tmp/base,unlock_at=300 ...

The locked tower (tower=img, LiT's choice; or txt) is loaded from the run in `init` (its
latest checkpoint, or init_step), gets no gradient and no optimizer state, and runs in
inference mode (no dropout); the other tower trains from scratch. `unlock_at=N` unlocks it
after step N with a fresh optimizer for it (Chinese CLIP's two stages: locked-image tuning,
then both towers). Without `init` the locked tower keeps its random init (LiT's
random-features control). Every other argument is the demo's (configs/demo.py); the locked
tower must have the shape the init run's has.
"""

import ml_collections

from big_vlp.config_args import parse_arg, split_arg
from big_vlp.config_common import sibling_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The demo recipe with a pretrained, locked tower."""
  own, rest = split_arg(arg, ("init", "init_step", "tower", "unlock_at"))
  a = parse_arg(own, init="", init_step=-1, tower="img", unlock_at=0)
  c = sibling_config(__file__, "demo", rest)
  if a.init:
    c.init.workdir = a.init
  if a.init_step >= 0:
    c.init.step = a.init_step
  c.init.subtrees = (a.tower,)
  c.locking.towers = (a.tower,)
  if a.unlock_at > 0:
    c.locking.unlock_at_step = a.unlock_at
  return c
