"""Model towers (ViT, text transformer) and the two-tower wrapper."""

from big_vlp.models.common import SIZES, decode_variant
from big_vlp.models.text import TextTransformer
from big_vlp.models.two_towers import TwoTower, l2_normalize
from big_vlp.models.vit import ViT

__all__ = ["SIZES", "TextTransformer", "TwoTower", "ViT", "decode_variant", "l2_normalize"]
