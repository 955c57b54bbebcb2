"""Config files build and validate; `get_config(arg)` parsing."""

import importlib.util
import os

import pytest

from big_vlp.config_args import parse_arg
from big_vlp.config_errors import ConfigError
from big_vlp.config_validation import validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name, arg=""):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_parse_arg_types_and_flags():
  a = parse_arg("steps=7,loss=softmax,runlocal,lr=0.5", steps=1, loss="sigmoid",
                runlocal=False, lr=1.0)
  assert (a.steps, a.loss, a.runlocal, a.lr) == (7, "softmax", True, 0.5)
  with pytest.raises(ConfigError, match="unknown config argument 'stpes'; allowed: steps"):
    parse_arg("stpes=3", steps=1)
  with pytest.raises(ConfigError, match="steps='x' must be of type int"):
    parse_arg("steps=x", steps=1)


@pytest.mark.parametrize("name,arg,devices", [
    ("demo", "", 1), ("demo", "loss=softmax,batch=64,steps=10", 8), ("demo", "runlocal", 8),
    ("siglip_b16", "", 256), ("clip_b16", "", 256), ("siglip_b16", "runlocal", 8),
    ("clip_b16", "runlocal", 8)])
def test_configs_validate(name, arg, devices):
  validate_config(load(name, arg), num_devices=devices)


def test_demo_arguments_reach_the_config():
  c = load("demo", "loss=softmax,steps=300,batch=64,data=mine,data_dir=/d,eval_data=lbl")
  assert (c.loss, c.total_steps, c.batch_size, c.data.name, c.data.data_dir) == (
      "softmax", 300, 64, "mine", "/d")
  assert c.evals.zeroshot.data == "lbl" and c.evals.retrieval.data == "mine"
  assert c.model.max_scale == 100.0  # open_clip's clamp comes with the softmax loss.


def test_pod_recipes_are_the_paper_settings():
  s, c = load("siglip_b16"), load("clip_b16")
  assert s.batch_size == c.batch_size == 32_768
  assert (s.loss, s.optim.lr, s.optim.wd, s.optim.b2) == ("sigmoid", 1e-3, 1e-4, 0.95)
  assert (c.loss, c.optim.lr, c.optim.wd, c.optim.b2, c.optim.eps) == (
      "softmax", 5e-4, 0.2, 0.98, 1e-6)
  assert c.model.text.causal and c.model.text.max_len == 77 and c.model.image.pool_type == "tok"
  assert s.model.image.pool_type == "map" and s.mesh.fsdp == -1
