"""Contrastive + captioning on the demo data (CoCa-style; Yu et al. 2022, "CoCa:
Contrastive Captioners are Image-Text Foundation Models"): the demo two-tower plus a text
decoder that cross-attends to the image tower's tokens, both losses in one step.

  python -m big_vlp.train --config configs/coca_demo.py --workdir /tmp/coca
  python -m big_vlp.train --config configs/coca_demo.py:caption_weight=1,dec_depth=4 ...

caption_weight (default 2.0, CoCa's weight of the captioning loss against 1.0 for the
contrastive one) and dec_depth (decoder blocks, default half the towers' depth). The decoder
has the towers' width and heads. Evaluators: the demo's zero-shot and retrieval plus
'captioning' (greedy captions of the held-out split: exact match, BLEU-4, CIDEr). Every other
argument is the demo's (configs/demo.py).
"""

import ml_collections

from big_vlp.config_args import parse_arg, split_arg
from big_vlp.config_common import captioning_eval, decoder_config, sibling_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The demo recipe with a captioning decoder."""
  own, rest = split_arg(arg, ("caption_weight", "dec_depth"))
  a = parse_arg(own, caption_weight=2.0, dec_depth=-1)
  c = sibling_config(__file__, "demo", rest)
  add_decoder(c, a.dec_depth)
  c.caption.weight = a.caption_weight
  return c


def add_decoder(c: ml_collections.ConfigDict, depth: int) -> None:
  """A decoder of the towers' width and heads, and the captioning evaluator (shared with
  configs/cappa_demo.py)."""
  img = c.model.image
  c.model.decoder = decoder_config(img.width, depth if depth > 0 else max(1, img.depth // 2),
                                   img.num_heads, c.model.text.max_len, img.dtype)
  ret = c.evals.get("retrieval")
  c.evals.captioning = captioning_eval(
      data=ret.data if ret else c.data.name, split=ret.split if ret else "val",
      data_dir=ret.data_dir if ret else c.data.data_dir,
      res=int(c.data.pp.split("resize(")[1].split(")")[0]), every=c.evals.zeroshot.every,
      batch_size=c.evals.zeroshot.batch_size, text_key=c.data.text_key)
