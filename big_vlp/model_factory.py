"""Builds the two-tower model from config.model (and config.silc.head), filling per-loss
init defaults."""

from typing import Any

from big_vlp import losses, recipes
from big_vlp.config_errors import fail
from big_vlp.models import TwoTower


def model_kwargs(config: Any, vocab_size: int) -> dict[str, Any]:
  """Keyword arguments of TwoTower from the config and the tokenizer's vocabulary size."""
  mc = config.model
  text = None if mc.get("text") is None else _with_vocab(mc.text, vocab_size, "model.text")
  decoder = None
  if mc.get("decoder") is not None:
    decoder = _with_vocab(mc.decoder, vocab_size, "model.decoder")
    if decoder.get("max_len") is None and text is not None:
      decoder["max_len"] = text.get("max_len")
  dino = None
  if recipes.silc_on(config):
    dino = dict(config.silc.head)
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
      max_scale=mc.get("max_scale"), decoder=decoder, dino=dino)


def _with_vocab(tower: Any, vocab_size: int, field: str) -> dict[str, Any]:
  """A text tower's / decoder's kwargs with vocab_size filled in from the tokenizer."""
  kwargs = dict(tower)
  if kwargs.get("vocab_size") is None:
    kwargs["vocab_size"] = vocab_size
  elif kwargs["vocab_size"] < vocab_size:
    fail(f"{field}.vocab_size", kwargs["vocab_size"],
         f"smaller than the tokenizer's vocabulary ({vocab_size})")
  return kwargs


def build_model(config: Any, vocab_size: int) -> TwoTower:
  """The TwoTower module described by config.model."""
  return TwoTower(**model_kwargs(config, vocab_size))
