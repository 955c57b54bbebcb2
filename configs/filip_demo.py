"""FILIP on the demo data (Yao et al. 2022, "FILIP: Fine-grained Interactive
Language-Image Pre-Training"): token-wise late interaction instead of pooled embeddings.

  python -m big_vlp.train --config configs/filip_demo.py --workdir /tmp/filip
  python -m big_vlp.train --config configs/filip_demo.py:loss=softmax --workdir ...

The similarity of an image and a text is the mean over text tokens of their best-matching
patch (text-to-image), and the mean over patches of their best-matching text token
(image-to-text); padding never takes part. Each direction's matrix enters the contrastive
loss (loss=softmax is FILIP's InfoNCE; the default sigmoid uses SigLIP's pairwise loss on
both). Evaluators score with the same token-wise similarity. With config.loss_impl='sharded'
the token similarities are computed in [b, b, N, L] blocks around a ring of devices.
Every argument is the demo's (configs/demo.py).
"""

import ml_collections

from big_vlp.config_common import sibling_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The demo recipe with FILIP's token-wise similarity."""
  c = sibling_config(__file__, "demo", arg or "")
  c.similarity = "filip"
  return c
