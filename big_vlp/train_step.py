"""Sharded train state creation and the jitted contrastive train step.

The state is a dict {'params', 'opt_state', 'step', 'rng'} created directly with its
final shardings (jit with out_shardings), so no device ever holds a full unsharded copy
of parameters that the rules split.
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from big_vlp import losses, losses_sharded, sharding
from big_vlp.tree_paths import leaf_paths, map_with_path

State = dict[str, Any]


def _init_params(model: nn.Module, rng: jax.Array,
                 batch_shapes: dict[str, jax.ShapeDtypeStruct]) -> Any:
  image, text = batch_shapes["image"], batch_shapes["text"]
  return model.init(rng, jnp.zeros(image.shape, image.dtype),
                    jnp.zeros(text.shape, text.dtype))["params"]


def abstract_params(model: nn.Module, batch_shapes: dict[str, jax.ShapeDtypeStruct]) -> Any:
  """Parameter shapes/dtypes without allocating them."""
  return jax.eval_shape(lambda rng: _init_params(model, rng, batch_shapes),
                        jax.random.PRNGKey(0))


def state_shardings(abstract_state: State, rules: Any, mesh: Mesh) -> State:
  """Shardings of every state leaf: params by the rules, optimizer moments like their param.

  An optimizer-state leaf takes the sharding of the parameter whose path its own path ends
  with, if the shapes agree (Adam moments); anything else (counts, Adafactor's factored
  row/column statistics) is small and replicated.
  """
  param_sh = sharding.param_shardings(abstract_state["params"], rules, mesh)
  by_path = {path: (leaf.shape, sh) for path, leaf, sh in zip(
      leaf_paths(abstract_state["params"]), jax.tree.leaves(abstract_state["params"]),
      jax.tree.leaves(param_sh, is_leaf=lambda x: isinstance(x, NamedSharding)))}
  rep = sharding.replicated(mesh)

  def opt_leaf(path: str, leaf: Any) -> NamedSharding:
    parts = path.split("/")
    for k in range(len(parts)):
      hit = by_path.get("/".join(parts[k:]))
      if hit is not None:
        return hit[1] if tuple(hit[0]) == tuple(leaf.shape) else rep
    return rep

  opt_sh = map_with_path(opt_leaf, abstract_state["opt_state"])
  return {"params": param_sh, "opt_state": opt_sh, "step": rep, "rng": rep}


def _init_fn(model: nn.Module, tx: optax.GradientTransformation,
             batch_shapes: dict[str, jax.ShapeDtypeStruct]) -> Callable[[jax.Array], State]:
  def init(rng):
    init_rng, train_rng = jax.random.split(rng)
    params = _init_params(model, init_rng, batch_shapes)
    return {"params": params, "opt_state": tx.init(params),
            "step": jnp.zeros((), jnp.int32), "rng": train_rng}
  return init


def abstract_state(model: nn.Module, tx: optax.GradientTransformation, rules: Any, mesh: Mesh,
                   batch_shapes: dict[str, jax.ShapeDtypeStruct]) -> tuple[State, State]:
  """(shape/dtype/sharding tree of the state, its shardings), allocating nothing."""
  shapes = jax.eval_shape(_init_fn(model, tx, batch_shapes), jax.random.PRNGKey(0))
  shardings = state_shardings(shapes, rules, mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          shapes, shardings)
  return abstract, shardings


def init_state(model: nn.Module, tx: optax.GradientTransformation, shardings: State,
               batch_shapes: dict[str, jax.ShapeDtypeStruct], seed: int) -> State:
  """Fresh state, created directly with its final shardings."""
  init = _init_fn(model, tx, batch_shapes)
  return jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(seed))


LOSS_IMPLS = ("global", "sharded")


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, loss_name: str,
                    schedule: Callable, shardings: State, mesh: Mesh,
                    batch_keys: tuple[str, ...] = ("image", "text"),
                    loss_impl: str = "global") -> Callable:
  """One jitted step: forward both towers, loss, gradients, optimizer update, metrics.

  `loss_impl` 'global' writes the loss over the whole batch and lets XLA partition it;
  'sharded' computes it per device with shard_map (ring SigLIP, gather-with-grad CLIP,
  `big_vlp.losses_sharded`), whose logits blocks grow linearly with the batch.
  """
  if loss_impl not in LOSS_IMPLS:
    raise ValueError(f"loss_impl={loss_impl!r}; allowed: {LOSS_IMPLS}")
  def step(state: State, batch: dict[str, jax.Array]) -> tuple[State, dict[str, jax.Array]]:
    rng, dropout_rng = jax.random.split(state["rng"])

    def loss_fn(params):
      zimg, ztxt, out = model.apply({"params": params}, batch["image"], batch["text"],
                                    train=True, rngs={"dropout": dropout_rng})
      if loss_impl == "sharded":
        loss = losses_sharded.contrastive_loss_sharded(
            loss_name, zimg, ztxt, out["scale"], out["bias"], mesh, sharding.BATCH_AXES)
      else:
        loss = losses.contrastive_loss(loss_name, zimg, ztxt, out["scale"], out["bias"])
      return loss, (zimg, ztxt, out)

    (loss, (zimg, ztxt, out)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    bias = out["bias"]
    metrics = {
        "loss": loss,
        "lr": schedule(state["step"]),
        "scale": out["scale"],
        "temperature": 1.0 / out["scale"],
        "bias": bias if bias is not None else jnp.zeros((), jnp.float32),
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
        **losses.logit_stats(zimg, ztxt, out["scale"], bias),
    }
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
                 "rng": rng}
    return new_state, metrics

  data_sh = sharding.batch_sharding(mesh)
  return jax.jit(step, in_shardings=(shardings, {k: data_sh for k in batch_keys}),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))


def global_batch(local: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles this process's slice of the batch into global arrays split over the mesh."""
  sh = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sh, v) for k, v in local.items()}
