"""SILC on the demo data (Naeem et al. 2023, "SILC: Improving Vision Language Pretraining
with Self-Distillation"): the demo's SigLIP loss plus DINO-style self-distillation of local
crops (student) towards global crops seen by an EMA teacher of the image tower.

  python -m big_vlp.train --config configs/silc_demo.py --workdir /tmp/silc
  python -m big_vlp.train --config configs/silc_demo.py:silc_weight=0.5,local_crops=6 ...

The input pipeline makes `global_crops` crops (40-100% of the image) at the image size and
`local_crops` crops (5-40%) at half of it with multi_crop; the contrastive loss sees the
whole image, as in the demo (its captions name positions, which crops would cut). The
teacher (state 'ema': image tower + DINO head) follows the student with momentum
`ema_momentum`; it is sharded like the params and checkpointed with them. Arguments:
silc_weight (1.0), global_crops (2), local_crops (4), prototypes (DINO head outputs, 1024),
ema_momentum (0.99). Every other argument is the demo's (configs/demo.py).
"""

import ml_collections

from big_vlp.config_args import parse_arg, split_arg
from big_vlp.config_common import sibling_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The demo recipe with SILC self-distillation."""
  own, rest = split_arg(arg, ("silc_weight", "global_crops", "local_crops", "prototypes",
                              "ema_momentum"))
  a = parse_arg(own, silc_weight=1.0, global_crops=2, local_crops=4, prototypes=1024,
                ema_momentum=0.99)
  c = sibling_config(__file__, "demo", rest)
  res = int(c.data.pp.split("resize(")[1].split(")")[0])
  crops = (f"multi_crop(global_size={res},local_size={res // 2},"
           f"global_crops={a.global_crops},local_crops={a.local_crops},keep_image=True)|"
           "value_range(-1,1,key='image_global')|value_range(-1,1,key='image_local')|")
  # The crops are taken from the resized uint8 image, before value_range maps it to [-1, 1].
  head, sep, tail = c.data.pp.partition(f"resize({res})|")
  c.data.pp = (head + sep + crops + tail).replace(
      "keep('image','text')", "keep('image','image_global','image_local','text')")
  width = c.model.image.width
  c.silc.weight = a.silc_weight
  c.silc.head = {"num_prototypes": a.prototypes, "hidden_dim": 4 * width,
                 "bottleneck_dim": width // 2, "num_layers": 3}
  c.silc.ema_momentum = c.silc.ema_momentum_end = a.ema_momentum
  c.silc.teacher_temp, c.silc.teacher_temp_end = 0.04, 0.07  # DINO's warm-up, 1/5 of the run.
  c.silc.teacher_temp_warmup_steps = c.total_steps // 5
  return c
