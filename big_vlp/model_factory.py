"""Builds the two-tower model from config.model, filling per-loss init defaults."""

from typing import Any

from big_vlp import losses
from big_vlp.config_errors import fail
from big_vlp.models import TwoTower


def model_kwargs(config: Any, vocab_size: int) -> dict[str, Any]:
  """Keyword arguments of TwoTower from the config and the tokenizer's vocabulary size."""
  mc = config.model
  text = dict(mc.text)
  if text.get("vocab_size") is None:
    text["vocab_size"] = vocab_size
  elif text["vocab_size"] < vocab_size:
    fail("model.text.vocab_size", text["vocab_size"],
         f"smaller than the tokenizer's vocabulary ({vocab_size})")
  defaults = losses.INIT_VALUES[config.loss]
  # None in the config means "the standard init of the chosen loss".
  t_init = mc.get("temperature_init")
  b_init = mc.get("bias_init")
  if b_init is None:
    b_init = defaults["bias_init"]
  return dict(
      image=dict(mc.image), text=text, embed_dim=mc.get("embed_dim"),
      temperature_init=defaults["temperature_init"] if t_init is None else float(t_init),
      bias_init=None if b_init is None else float(b_init),
      max_scale=mc.get("max_scale"))


def build_model(config: Any, vocab_size: int) -> TwoTower:
  """The TwoTower module described by config.model."""
  return TwoTower(**model_kwargs(config, vocab_size))
