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
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

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


def state_shardings(abstract_state: State, rules: Any, mesh: Mesh,
                    logical_axes: Any = None) -> State:
  """Shardings of every state leaf: params by the rules, optimizer moments like their param.

  An optimizer-state leaf takes the sharding of the parameter whose path its own path ends
  with, if the shapes agree (Adam moments); anything else (counts, Adafactor's factored
  row/column statistics) is small and replicated.
  """
  param_sh = sharding.param_shardings(abstract_state["params"], rules, mesh, logical_axes)
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
  return {"params": param_sh, "opt_state": opt_sh, "step": rep, "rng": rep,
          "nonfinite": jax.tree.map(lambda _: rep, abstract_state["nonfinite"])}


def _no_nonfinite() -> dict[str, jax.Array]:
  """Counters of steps whose loss or gradients were not finite (their update is skipped)."""
  return {"count": jnp.zeros((), jnp.int32), "last_step": jnp.full((), -1, jnp.int32),
          "last_loss": jnp.zeros((), jnp.float32), "last_grad_norm": jnp.zeros((), jnp.float32)}


def _init_fn(model: nn.Module, tx: optax.GradientTransformation,
             batch_shapes: dict[str, jax.ShapeDtypeStruct]) -> Callable[[jax.Array], State]:
  def init(rng):
    init_rng, train_rng = jax.random.split(rng)
    params = _init_params(model, init_rng, batch_shapes)
    return {"params": params, "opt_state": tx.init(params),
            "step": jnp.zeros((), jnp.int32), "rng": train_rng, "nonfinite": _no_nonfinite()}
  return init


def abstract_state(model: nn.Module, tx: optax.GradientTransformation, rules: Any, mesh: Mesh,
                   batch_shapes: dict[str, jax.ShapeDtypeStruct],
                   logical_axes: Any = None) -> tuple[State, State]:
  """(shape/dtype/sharding tree of the state, its shardings), allocating nothing."""
  shapes = jax.eval_shape(_init_fn(model, tx, batch_shapes), jax.random.PRNGKey(0))
  shardings = state_shardings(shapes, rules, mesh, logical_axes)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          shapes, shardings)
  return abstract, shardings


def init_state(model: nn.Module, tx: optax.GradientTransformation, shardings: State,
               batch_shapes: dict[str, jax.ShapeDtypeStruct], seed: int) -> State:
  """Fresh state, created directly with its final shardings."""
  init = _init_fn(model, tx, batch_shapes)
  return jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(seed))


LOSS_IMPLS = ("global", "sharded")


def _contrastive(loss_name: str, loss_impl: str, mesh: Mesh) -> Callable:
  """loss(zimg, ztxt, scale, bias) over the global batch, by the chosen implementation."""
  if loss_impl not in LOSS_IMPLS:
    raise ValueError(f"loss_impl={loss_impl!r}; allowed: {LOSS_IMPLS}")
  if loss_impl == "sharded":
    return lambda zi, zt, s, b: losses_sharded.contrastive_loss_sharded(
        loss_name, zi, zt, s, b, mesh, sharding.BATCH_AXES)
  return lambda zi, zt, s, b: losses.contrastive_loss(loss_name, zi, zt, s, b)


def make_grad_fn(model: nn.Module, loss_name: str, mesh: Mesh, loss_impl: str = "global",
                 accum_steps: int = 1) -> Callable:
  """fn(params, batch, dropout_rng) -> (loss, grads, (zimg, ztxt, scalars)), to run in jit.

  With accum_steps = k > 1 the batch is processed as k micro-batches whose gradient is the
  full-batch gradient, not an average of k small-batch gradients (a contrastive loss couples
  every pair in the batch): a first pass embeds every micro-batch without gradients; then
  each micro-batch is embedded again with gradients and the loss of the whole batch is taken
  with the cached embeddings standing in for the other micro-batches (open_clip's
  accum-freq scheme). The temperature and bias get their gradient once, from the cached
  embeddings. Activations of only one micro-batch are alive at a time; the loss itself still
  sees the whole batch (use loss_impl='sharded' to keep its memory flat too).
  """
  contrastive = _contrastive(loss_name, loss_impl, mesh)

  def embed(params, batch, rng):
    # The mesh in context lets the towers pin activations to the batch axes
    # (models.common.constrain).
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return model.apply({"params": params}, batch["image"], batch["text"], train=True,
                         rngs={"dropout": rng})

  def full_batch(params, batch, rng):
    def loss_fn(p):
      zimg, ztxt, out = embed(p, batch, rng)
      return contrastive(zimg, ztxt, out["scale"], out["bias"]), (zimg, ztxt, out)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, grads, aux

  if accum_steps == 1:
    return full_batch
  k = accum_steps
  micro_sh = NamedSharding(mesh, P(None, sharding.BATCH_AXES))

  def accumulated(params, batch, rng):
    # Micro-batch j holds rows j, j + k, j + 2k, ...: every device keeps its own rows, and
    # putting micro-batches back with swapaxes restores the original row order.
    micro = {key: jax.lax.with_sharding_constraint(
        jnp.swapaxes(v.reshape((v.shape[0] // k, k) + v.shape[1:]), 0, 1), micro_sh)
             for key, v in batch.items()}
    rngs = jax.random.split(rng, k)
    frozen = jax.lax.stop_gradient(params)

    def cache(_, xs):
      mb, r = xs
      zimg, ztxt, _ = embed(frozen, mb, r)
      return None, (zimg, ztxt)
    _, (zimg_c, ztxt_c) = jax.lax.scan(cache, None, (micro, rngs))  # [k, B/k, D]

    def whole(z):  # [k, B/k, D] -> [B, D] in the batch's own row order.
      return jnp.swapaxes(z, 0, 1).reshape((-1,) + z.shape[2:])

    def scalars(p):
      return model.apply({"params": p}, method="scale_bias")

    # Temperature / bias: their gradient with every embedding held fixed.
    def scalar_loss(p):
      out = scalars(p)
      return contrastive(whole(zimg_c), whole(ztxt_c), out["scale"], out["bias"])
    loss, grads = jax.value_and_grad(scalar_loss)(params)
    out = scalars(params)
    scale, bias = jax.lax.stop_gradient(out["scale"]), jax.lax.stop_gradient(out["bias"])

    def micro_grad(acc, xs):
      j, mb, r = xs
      def loss_fn(p):
        zimg, ztxt, _ = embed(p, mb, r)
        zi = jax.lax.dynamic_update_index_in_dim(zimg_c, zimg, j, 0)
        zt = jax.lax.dynamic_update_index_in_dim(ztxt_c, ztxt, j, 0)
        return contrastive(whole(zi), whole(zt), scale, bias)
      g = jax.grad(loss_fn)(params)
      return jax.tree.map(jnp.add, acc, g), None
    grads, _ = jax.lax.scan(micro_grad, grads, (jnp.arange(k), micro, rngs))
    return loss, grads, (whole(zimg_c), whole(ztxt_c), out)

  return accumulated


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, loss_name: str,
                    schedule: Callable, shardings: State, mesh: Mesh,
                    batch_keys: tuple[str, ...] = ("image", "text"),
                    loss_impl: str = "global", accum_steps: int = 1) -> Callable:
  """One jitted step: forward both towers, loss, gradients, optimizer update, metrics.

  `loss_impl` 'global' writes the loss over the whole batch and lets XLA partition it;
  'sharded' computes it per device with shard_map (ring SigLIP and ring CLIP,
  `big_vlp.losses_sharded`): b x b logits blocks per device, flat as the device count grows.
  `accum_steps` > 1 computes the exact full-batch gradient in micro-batches (make_grad_fn).
  """
  grad_fn = make_grad_fn(model, loss_name, mesh, loss_impl, accum_steps)

  def step(state: State, batch: dict[str, jax.Array]) -> tuple[State, dict[str, jax.Array]]:
    rng, dropout_rng = jax.random.split(state["rng"])
    loss, grads, (zimg, ztxt, out) = grad_fn(state["params"], batch, dropout_rng)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # A non-finite loss or gradient (any NaN / inf makes the norm non-finite) must not reach
    # the params or the optimizer moments: that step's update is skipped and counted; the
    # trainer then goes on or stops according to config.nan_policy.
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep_old = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params = keep_old(params, state["params"])
    opt_state = keep_old(opt_state, state["opt_state"])
    nf = state["nonfinite"]
    nonfinite = keep_old(nf, {"count": nf["count"] + 1, "last_step": state["step"] + 1,
                              "last_loss": loss.astype(jnp.float32),
                              "last_grad_norm": grad_norm.astype(jnp.float32)})
    bias = out["bias"]
    metrics = {
        "loss": loss,
        "lr": schedule(state["step"]),
        "scale": out["scale"],
        "temperature": 1.0 / out["scale"],
        "bias": bias if bias is not None else jnp.zeros((), jnp.float32),
        "grad_norm": grad_norm,
        "nonfinite_steps": nonfinite["count"],
        "param_norm": optax.tree.norm(params),
        **losses.logit_stats(zimg, ztxt, out["scale"], bias),
    }
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
                 "rng": rng, "nonfinite": nonfinite}
    return new_state, metrics

  data_sh = sharding.batch_sharding(mesh)
  return jax.jit(step, in_shardings=(shardings, {k: data_sh for k in batch_keys}),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))


def global_batch(local: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles this process's slice of the batch into global arrays split over the mesh."""
  sh = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sh, v) for k, v in local.items()}
