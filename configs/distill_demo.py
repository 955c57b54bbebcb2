"""Distillation on the demo data: a smaller student matches a frozen teacher's image-text
similarities (as in TinyCLIP / CLIP-KD), or the teacher's embeddings stored in the data once
(MobileCLIP's reinforced dataset, Vasu et al. 2024).

  python -m big_vlp.train --config configs/demo.py --workdir /tmp/teacher
  python -m big_vlp.train --config configs/distill_demo.py:teacher=/tmp/teacher --workdir /tmp/kd

  python tools/teacher_embeddings.py --teacher /tmp/teacher --data big_vlp_shapes \
      --data_dir DIR --splits train --out_name shapes_teacher --out_dir DIR2
  python -m big_vlp.train --config \
      configs/distill_demo.py:source=data,data=shapes_teacher,data_dir=DIR2 --workdir ...

The loss is the student's contrastive loss plus `weight` times the KL divergence from the
teacher's softmax over each row (image->text) and column (text->image) of the batch's
similarity matrix, each at its own learned temperature. source=teacher runs the teacher
(`teacher`: a big_vlp workdir, its latest checkpoint or teacher_step) in the same step;
the student then tokenizes as the teacher did (default tokenizer: the teacher's). source=data
reads teacher_zimg / teacher_ztxt / teacher_scale from the batches. The student is the demo
model at width `width` and depth `depth` (default 64 x 2, a quarter of the demo's FLOPs).
Every other argument is the demo's (configs/demo.py).
"""

import json
import os

import ml_collections

from big_vlp.config_args import parse_arg, split_arg
from big_vlp.config_common import sibling_config


def _teacher_tokenizer(workdir: str) -> str | None:
  """The tokenizer spec that gives the teacher's ids: its trained model, or its spec."""
  model = os.path.join(workdir, "tokenizer.model")
  if os.path.exists(model):
    return f"sp:{model}"
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      return json.load(f).get("tokenizer")
  except (OSError, ValueError):
    return None  # The trainer reports the missing run with the field that names it.


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """A small demo student distilled from a teacher run or from stored embeddings."""
  own, rest = split_arg(arg, ("teacher", "teacher_step", "weight", "source", "width",
                              "depth"))
  a = parse_arg(own, teacher="", teacher_step=-1, weight=1.0, source="teacher", width=64,
                depth=2)
  if a.source == "teacher" and a.teacher and "tokenizer=" not in rest:
    spec = _teacher_tokenizer(a.teacher)
    if spec:
      rest = ",".join(filter(None, [rest, f"tokenizer={spec}"]))
  c = sibling_config(__file__, "demo", rest)
  for tower in (c.model.image, c.model.text):
    tower.width, tower.depth, tower.mlp_dim = a.width, a.depth, 4 * a.width
    tower.num_heads = max(1, a.width // 32)
  c.distill.source = a.source
  c.distill.weight = a.weight
  if a.teacher:
    c.distill.teacher = a.teacher
  if a.teacher_step >= 0:
    c.distill.step = a.teacher_step
  if a.source == "data":
    # The stored text embedding of the caption `choice` picks, and the teacher's features.
    c.data.pp = c.data.pp.replace(
        f"choice(key={c.data.text_key!r})",
        f"choice(key={c.data.text_key!r},also=('teacher_ztxt',))").replace(
        "keep('image','text')",
        "keep('image','text','teacher_zimg','teacher_ztxt','teacher_scale')")
  return c
