"""Runs a run's evaluators on its latest (or a given) checkpoint and writes a JSON file.

  python -m big_vlp.evaluate --config configs/demo.py --workdir DIR [--step N] [--output F]

The result file (default DIR/eval_results.json) holds {"step", "checkpoint", "results":
{evaluator: {metric: value}}, "metrics": {"evaluator/metric": value}}.
"""

import json
import os

if __name__ == "__main__":  # Before the heavy imports: the process may restart once.
  from big_vlp import allocator
  allocator.restart_with_allocator()

from typing import Any

from absl import app, flags
from ml_collections import config_flags

import jax

from big_vlp import checkpoint, distributed, sharding
from big_vlp.config_errors import ConfigError
from big_vlp.evaluators import build_evaluators
from big_vlp.metric_writer import MetricWriter
from big_vlp.run_setup import cli_workdir, make_run_spec, make_tokenizer, run_evaluators

def evaluate(config: Any, workdir: str, step: int | None = None,
             output: str | None = None) -> dict[str, Any]:
  """Restores the checkpoint's params and runs every evaluator in config.evals."""
  ckpt = checkpoint.Checkpointer(workdir, every=0, keep=config.keep_ckpts)
  steps = ckpt.all_steps()
  if not steps:
    raise ConfigError(f"no checkpoint in {ckpt.directory}; train first")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise ConfigError(f"--step={step}: no such checkpoint; available steps: {steps}")
  meta = ckpt.restore_meta(step)
  tokenizer = make_tokenizer(config, workdir)
  if tokenizer.vocab_size != meta["vocab_size"]:
    raise ConfigError(f"config.tokenizer={config.tokenizer!r} has {tokenizer.vocab_size} "
                      f"tokens but the checkpoint was trained with {meta['vocab_size']}")
  mesh = sharding.mesh_from_config(config)
  batch_shapes = {
      "image": jax.ShapeDtypeStruct((config.batch_size, *meta["image_shape"]), "float32"),
      "text": jax.ShapeDtypeStruct((config.batch_size, meta["text_len"]), "int32")}
  spec = make_run_spec(config, mesh, tokenizer.vocab_size, batch_shapes)
  state, _ = ckpt.restore(step, spec.abstract_state)
  ckpt.close()

  evaluators = build_evaluators(config, spec.model, tokenizer, mesh)
  writer = MetricWriter(workdir, is_main=False)  # The file below is the record; no jsonl.
  flat = run_evaluators(evaluators, state["params"], step, writer, final=True)
  nested: dict[str, dict[str, float]] = {}
  for key, value in flat.items():
    name, metric = key.split("/", 1)
    nested.setdefault(name, {})[metric] = value
  result = {"step": step, "checkpoint": os.path.join(ckpt.directory, str(step)),
            "results": nested, "metrics": flat}
  output = output or os.path.join(workdir, "eval_results.json")
  if jax.process_index() == 0:
    with open(output, "w") as f:
      json.dump(result, f, indent=2)
    print(f"wrote {output}")
  return result


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  workdir = cli_workdir()
  distributed.initialize(f.config)  # Before anything touches the devices.
  evaluate(f.config, workdir, f.step, f.output)


if __name__ == "__main__":
  # Flags live here so that importing this module defines none.
  config_flags.DEFINE_config_file("config", None, "The run's config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "The run's directory.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_string("output", None, "Result file (default WORKDIR/eval_results.json).")
  app.run(main)
