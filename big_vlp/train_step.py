"""Sharded train state creation and the jitted contrastive train step.

The state is a dict {'params', 'opt_state', 'step', 'rng', 'nonfinite'} (SILC adds 'ema', the
EMA teacher's image tower and DINO head, and 'center', DINO's teacher-logit centre) created
directly with its final shardings (jit with out_shardings), so no device ever holds a full
unsharded copy of parameters that the rules split.
"""

from typing import Any, Callable, NamedTuple

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from big_vlp import ema as ema_lib
from big_vlp import losses, losses_caption, losses_sharded, losses_silc, recipes, sharding
from big_vlp.models.decoder import sample_parallel
from big_vlp.tree_paths import leaf_paths, map_with_path

State = dict[str, Any]


def _init_params(model: nn.Module, rng: jax.Array,
                 batch_shapes: dict[str, jax.ShapeDtypeStruct]) -> Any:
  image, text = batch_shapes["image"], batch_shapes["text"]
  return model.init(rng, jnp.zeros(image.shape, image.dtype),
                    jnp.zeros(text.shape, text.dtype), method="init_all")["params"]


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
  out = {"params": param_sh, "opt_state": opt_sh, "step": rep, "rng": rep,
         "nonfinite": jax.tree.map(lambda _: rep, abstract_state["nonfinite"])}
  if "ema" in abstract_state:  # The EMA teacher is split exactly like the params it follows.
    out["ema"] = {k: param_sh[k] for k in abstract_state["ema"]}
    out["center"] = rep
  return out


def _no_nonfinite() -> dict[str, jax.Array]:
  """Counters of steps whose loss or gradients were not finite (their update is skipped)."""
  return {"count": jnp.zeros((), jnp.int32), "last_step": jnp.full((), -1, jnp.int32),
          "last_loss": jnp.zeros((), jnp.float32), "last_grad_norm": jnp.zeros((), jnp.float32)}


# Param sub-trees the SILC EMA teacher holds: the image tower and its DINO head.
EMA_SUBTREES = ("img", "dino_head")


def ema_teacher(params: Any) -> dict[str, Any]:
  """The EMA teacher's part of a param tree (SILC), a copy to start from."""
  return {k: jax.tree.map(jnp.copy, params[k]) for k in EMA_SUBTREES}


def _init_fn(model: nn.Module, tx: optax.GradientTransformation,
             batch_shapes: dict[str, jax.ShapeDtypeStruct]) -> Callable[[jax.Array], State]:
  def init(rng):
    init_rng, train_rng = jax.random.split(rng)
    params = _init_params(model, init_rng, batch_shapes)
    state = {"params": params, "opt_state": tx.init(params),
             "step": jnp.zeros((), jnp.int32), "rng": train_rng, "nonfinite": _no_nonfinite()}
    if getattr(model, "dino", None) is not None:  # SILC: teacher starts as the student.
      state["ema"] = ema_teacher(params)
      state["center"] = jnp.zeros(params["dino_head"]["prototypes"].shape[-1:], jnp.float32)
    return state
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


class StepOptions(NamedTuple):
  """Recipe options of one compiled step; big_vlp.recipes.step_options derives them."""
  phase: recipes.Phase = recipes.Phase()
  # bool per param (None: all). The step differentiates only w.r.t. the True ones; the
  # others get zero gradients that are never computed (LiT, config.freeze).
  trainable: Any = None
  similarity: str = "pooled"  # 'pooled' or 'filip' (token-wise, big_vlp.losses_filip).
  distill_source: str = "none"  # 'none', 'teacher' (run `teacher` in the step) or 'data'.
  distill_weight: float = 0.0
  teacher: nn.Module | None = None
  contrastive: bool = True  # False: no text tower, captioning only (CapPa).
  caption_weight: float = 0.0  # > 0: add the decoder's captioning loss (CoCa / CapPa).
  parallel_prob: float = 0.0  # CapPa: fraction of rows trained by parallel prediction.
  pad_id: int = 0  # Padding id of the captions (also the decoder's BOS).
  silc: "SilcOptions | None" = None


class SilcOptions(NamedTuple):
  """SILC self-distillation settings (config.silc) of the step."""
  weight: float
  total_steps: int
  student_temp: float = 0.1
  teacher_temp: float = 0.04
  teacher_temp_end: float = 0.04
  teacher_temp_warmup_steps: int = 0
  center_momentum: float = 0.9
  ema_momentum: float = 0.996
  ema_momentum_end: float = 0.996

  def teacher_temp_at(self, step: jax.Array) -> jax.Array:
    """The teacher temperature at (0-based) step `step`."""
    return losses_silc.teacher_temperature(step, self.teacher_temp_warmup_steps,
                                           self.teacher_temp, self.teacher_temp_end)

  def momentum_at(self, step: jax.Array) -> jax.Array:
    """The EMA momentum at (0-based) step `step`."""
    return ema_lib.ema_momentum(step, self.total_steps, self.ema_momentum,
                                self.ema_momentum_end)


def silc_options(config: Any) -> SilcOptions | None:
  """SilcOptions from config.silc, or None when SILC is off."""
  if not recipes.silc_on(config):
    return None
  c = config.silc
  return SilcOptions(
      weight=float(c.weight), total_steps=int(config.total_steps),
      student_temp=float(c.student_temp), teacher_temp=float(c.teacher_temp),
      teacher_temp_end=float(c.teacher_temp_end),
      teacher_temp_warmup_steps=int(c.teacher_temp_warmup_steps),
      center_momentum=float(c.center_momentum), ema_momentum=float(c.ema_momentum),
      ema_momentum_end=float(c.ema_momentum_end))


def _views(x: jax.Array) -> tuple[jax.Array, int]:
  """[B, V, H, W, C] crops -> ([B * V, H, W, C] example-major, V)."""
  return x.reshape((-1,) + x.shape[2:]), x.shape[1]


def _per_view(logits: jax.Array, views: int) -> jax.Array:
  """[B * V, K] example-major -> [V, B, K], the layout of losses_silc.dino_loss."""
  return jnp.swapaxes(logits.reshape((-1, views) + logits.shape[1:]), 0, 1)


def _split(params: Any, trainable: Any) -> tuple[dict[str, Any], dict[str, Any]]:
  """Flat {path: leaf} dicts of the trainable and the other params."""
  flat = traverse_util.flatten_dict(params, sep="/")
  mask = traverse_util.flatten_dict(trainable, sep="/")
  return ({k: v for k, v in flat.items() if mask[k]},
          {k: v for k, v in flat.items() if not mask[k]})


def _merge(*parts: dict[str, Any]) -> Any:
  return traverse_util.unflatten_dict({k: v for p in parts for k, v in p.items()}, sep="/")


def value_and_grad(f: Callable, params: Any, trainable: Any, has_aux: bool = False) -> Any:
  """jax.value_and_grad(f)(params) taken w.r.t. the trainable params only; the others'
  gradients are zeros (constants: nothing flows back into them, so XLA computes nothing)."""
  if trainable is None:
    return jax.value_and_grad(f, has_aux=has_aux)(params)
  train, fixed = _split(params, trainable)
  value, g = jax.value_and_grad(lambda t: f(_merge(t, fixed)), has_aux=has_aux)(train)
  return value, _merge(g, {k: jnp.zeros_like(v) for k, v in fixed.items()})


def teacher_logits(opts: StepOptions, teacher_params: Any, batch: dict[str, jax.Array],
                   mesh: Mesh) -> jax.Array | None:
  """[B, B] logits of the distillation teacher (its own learned scale), or None."""
  if opts.distill_source == "teacher":
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      zimg, ztxt, out = opts.teacher.apply({"params": teacher_params}, batch["image"],
                                           batch["text"])
    return jax.lax.stop_gradient(losses.pair_logits(zimg, ztxt, out["scale"]))
  if opts.distill_source == "data":
    scale = jnp.mean(batch["teacher_scale"].astype(jnp.float32))
    return losses.pair_logits(batch["teacher_zimg"], batch["teacher_ztxt"], scale)
  return None


def make_grad_fn(model: nn.Module, loss_name: str, mesh: Mesh, loss_impl: str = "global",
                 accum_steps: int = 1, options: StepOptions = StepOptions()) -> Callable:
  """fn(params, batch, rng, teacher_params, silc_state) -> (loss, grads,
  (zimg, ztxt, out, stats)), to run in jit. `stats` are extra metrics (logit means, loss
  terms); with SILC, out['silc_teacher'] holds the EMA teacher's logits [G, B, K] (for the
  centre update).

  The objective is the contrastive loss on pooled embeddings (or FILIP's token-wise one;
  none without a text tower), plus `distill_weight` times the distillation KL when a
  teacher is configured, plus `caption_weight` times the decoder's next-token
  cross-entropy (CoCa / CapPa), plus the SILC weight times the DINO loss of the student's
  local crops against the EMA teacher's global crops. `silc_state` is (ema params, centre,
  step) from the train state.

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
  opts = options
  filip = opts.similarity == "filip"
  phase = opts.phase
  caption = opts.caption_weight > 0 or not opts.contrastive

  def apply(params, *args, **kwargs):
    # The mesh in context lets the towers pin activations to the batch axes
    # (models.common.constrain).
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return model.apply({"params": params}, *args, **kwargs)

  def embed(params, batch, rng, parallel=None):
    return apply(params, batch["image"], batch["text"], train=True,
                 locked=phase.locked, image_mask=phase.image_mask,
                 text_mask=phase.text_mask, token_outputs=filip, caption=caption,
                 parallel=parallel, rngs={"dropout": rng, "mask": jax.random.fold_in(rng, 1)})

  def objective(zimg, ztxt, out, t_logits):
    scale, bias = out["scale"], out["bias"]
    if not opts.contrastive:
      loss, stats = jnp.zeros((), jnp.float32), {}
    elif filip:
      from big_vlp import losses_filip  # pylint: disable=import-outside-toplevel
      args = (loss_name, out["img_tokens"], out["txt_tokens"], out["txt_mask"], scale, bias)
      loss, stats = (losses_filip.filip_loss_sharded(*args, mesh, sharding.BATCH_AXES)
                     if loss_impl == "sharded" else losses_filip.filip_loss(*args))
      stats = dict(stats)
    else:
      loss = contrastive(zimg, ztxt, scale, bias)
      stats = losses.logit_stats(zimg, ztxt, scale, bias)
    if t_logits is not None:
      kl = losses.distillation_loss(losses.pair_logits(zimg, ztxt, scale), t_logits)
      stats.update(contrastive_loss=loss, distill_loss=kl)
      loss = loss + opts.distill_weight * kl
    return loss, stats

  def caption_term(batch, out):
    cap, cap_stats = losses_caption.caption_loss(out.pop("caption_logits"), batch["text"],
                                                 opts.pad_id)
    weight = opts.caption_weight if opts.contrastive else 1.0
    return weight * cap, {"caption_loss": cap, "caption_token_accuracy":
                          cap_stats["token_accuracy"]}

  def silc_teacher(params, batch, silc_state):
    """The EMA teacher's DINO logits [G, B, K] on the global crops (no gradient)."""
    ema, _, _ = silc_state
    crops = batch.get(recipes.SILC_GLOBAL)
    crops = batch["image"][:, None] if crops is None else crops
    images, views = _views(crops)
    teacher = {**jax.lax.stop_gradient(params), **ema}
    return jax.lax.stop_gradient(_per_view(
        apply(teacher, images, train=False, method="dino_logits"), views))

  def silc_term(params, batch, rng, teacher, silc_state):
    _, center, step = silc_state
    images, views = _views(batch[recipes.SILC_LOCAL])
    student = _per_view(apply(params, images, train=True, method="dino_logits",
                              rngs={"dropout": jax.random.fold_in(rng, 3)}), views)
    dino = losses_silc.dino_loss(student, teacher, center, opts.silc.student_temp,
                                 opts.silc.teacher_temp_at(step), student_has_globals=False)
    return opts.silc.weight * dino, {"silc_loss": dino}

  def full_batch(params, batch, rng, teacher_params=None, silc_state=None):
    t_logits = teacher_logits(opts, teacher_params, batch, mesh)
    parallel = None
    if caption and opts.parallel_prob > 0:
      parallel = sample_parallel(jax.random.fold_in(rng, 2), batch["text"].shape[0],
                                 opts.parallel_prob)
    silc_t = None if opts.silc is None else silc_teacher(params, batch, silc_state)

    def loss_fn(p):
      zimg, ztxt, out = embed(p, batch, rng, parallel)
      loss, stats = objective(zimg, ztxt, out, t_logits)
      extra = []
      if caption:
        extra.append(caption_term(batch, out))
      if silc_t is not None:
        extra.append(silc_term(p, batch, rng, silc_t, silc_state))
      if extra and opts.contrastive:
        stats["contrastive_loss"] = loss
      for term, term_stats in extra:
        loss = loss + term
        stats.update(term_stats)
      if silc_t is not None:
        out["silc_teacher"] = silc_t
      return loss, (zimg, ztxt, out, stats)
    (loss, aux), grads = value_and_grad(loss_fn, params, opts.trainable, has_aux=True)
    return loss, grads, aux

  if accum_steps == 1:
    return full_batch
  if filip or opts.distill_source != "none" or caption or opts.silc is not None:
    raise ValueError("accum_steps > 1 covers the pooled contrastive loss only")
  k = accum_steps
  micro_sh = NamedSharding(mesh, P(None, sharding.BATCH_AXES))

  def accumulated(params, batch, rng, teacher_params=None, silc_state=None):
    del teacher_params, silc_state
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
    loss, grads = value_and_grad(scalar_loss, params, opts.trainable)
    out = scalars(params)
    scale, bias = jax.lax.stop_gradient(out["scale"]), jax.lax.stop_gradient(out["bias"])

    def micro_grad(acc, xs):
      j, mb, r = xs
      def loss_fn(p):
        zimg, ztxt, _ = embed(p, mb, r)
        zi = jax.lax.dynamic_update_index_in_dim(zimg_c, zimg, j, 0)
        zt = jax.lax.dynamic_update_index_in_dim(ztxt_c, ztxt, j, 0)
        return contrastive(whole(zi), whole(zt), scale, bias)
      _, g = value_and_grad(loss_fn, params, opts.trainable)
      return jax.tree.map(jnp.add, acc, g), None
    grads, _ = jax.lax.scan(micro_grad, grads, (jnp.arange(k), micro, rngs))
    zimg, ztxt = whole(zimg_c), whole(ztxt_c)
    return loss, grads, (zimg, ztxt, out, losses.logit_stats(zimg, ztxt, scale, bias))

  return accumulated


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, loss_name: str,
                    schedule: Callable, shardings: State, mesh: Mesh,
                    batch_keys: tuple[str, ...] = ("image", "text"),
                    loss_impl: str = "global", accum_steps: int = 1,
                    options: StepOptions = StepOptions(),
                    teacher_params: Any = None) -> Callable:
  """One jitted step: forward both towers, loss, gradients, optimizer update, metrics.

  `loss_impl` 'global' writes the loss over the whole batch and lets XLA partition it;
  'sharded' computes it per device with shard_map (ring SigLIP and ring CLIP,
  `big_vlp.losses_sharded`): b x b logits blocks per device, flat as the device count grows.
  `accum_steps` > 1 computes the exact full-batch gradient in micro-batches (make_grad_fn).
  `options` carries the recipe switches (locking, masking, FILIP, distillation); a teacher
  run's params (`teacher_params`, replicated) are an argument of the compiled step, not a
  constant baked into it.
  """
  grad_fn = make_grad_fn(model, loss_name, mesh, loss_impl, accum_steps, options)
  silc = options.silc

  def step(state: State, batch: dict[str, jax.Array], teacher: Any
           ) -> tuple[State, dict[str, jax.Array]]:
    rng, dropout_rng = jax.random.split(state["rng"])
    silc_state = None
    if silc is not None:
      silc_state = (state["ema"], state["center"], state["step"])
    loss, grads, (zimg, ztxt, out, stats) = grad_fn(state["params"], batch, dropout_rng,
                                                    teacher, silc_state)
    # A non-finite loss or gradient (any NaN / inf makes the norm non-finite) must not reach
    # the params or the optimizer moments: that step's update is skipped and counted; the
    # trainer then goes on or stops according to config.nan_policy. The update runs under
    # lax.cond rather than being computed and then discarded with a select: the select
    # keeps the old params and moments alive next to the new ones, so XLA copies every
    # donated state buffer and reads it twice (the whole optimizer step took about 2x as
    # long at ViT-S size on CPU).
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep_old = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    def apply_update(operands: tuple[Any, Any, Any]) -> tuple[Any, Any]:
      params, opt_state, grads = operands
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    params, opt_state = jax.lax.cond(finite, apply_update, lambda operands: operands[:2],
                                     (state["params"], state["opt_state"], grads))
    nf = state["nonfinite"]
    nonfinite = keep_old(nf, {"count": nf["count"] + 1, "last_step": state["step"] + 1,
                              "last_loss": loss.astype(jnp.float32),
                              "last_grad_norm": grad_norm.astype(jnp.float32)})
    bias = out["bias"]
    metrics = {
        "loss": loss,
        "lr": schedule(state["step"]),
        "grad_norm": grad_norm,
        "nonfinite_steps": nonfinite["count"],
        "param_norm": optax.tree.norm(params),
        **stats,
    }
    if options.contrastive:  # A captioner (CapPa) has no use for the learned scalars.
      metrics.update(scale=out["scale"], temperature=1.0 / out["scale"],
                     bias=bias if bias is not None else jnp.zeros((), jnp.float32))
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
                 "rng": rng, "nonfinite": nonfinite}
    if silc is not None:  # The EMA teacher follows the updated student (not on skipped steps).
      momentum = silc.momentum_at(state["step"])
      def follow(operands: tuple[Any, Any, Any, Any]) -> tuple[Any, Any]:
        ema, center, student, teacher_out = operands
        return (ema_lib.ema_update(ema, student, momentum),
                losses_silc.update_center(center, teacher_out, silc.center_momentum))

      new_state["ema"], new_state["center"] = jax.lax.cond(
          finite, follow, lambda operands: operands[:2],
          (state["ema"], state["center"], {k: params[k] for k in state["ema"]},
           out["silc_teacher"]))
      metrics.update(ema_momentum=momentum, silc_teacher_temp=silc.teacher_temp_at(state["step"]))
    return new_state, metrics

  data_sh = sharding.batch_sharding(mesh)
  rep = sharding.replicated(mesh)
  teacher_sh = None if teacher_params is None else jax.tree.map(lambda _: rep, teacher_params)
  jitted = jax.jit(step, in_shardings=(shardings, {k: data_sh for k in batch_keys},
                                       teacher_sh),
                   out_shardings=(shardings, rep), donate_argnums=(0,))
  return _BoundStep(jitted, teacher_params)


class _BoundStep:
  """The jitted step with the teacher's params bound: called (and lowered) as fn(state, batch)."""

  def __init__(self, jitted: Callable, teacher_params: Any):
    self._jitted, self._teacher = jitted, teacher_params

  def __call__(self, state: State, batch: dict[str, jax.Array]) -> Any:
    return self._jitted(state, batch, self._teacher)

  def lower(self, state: Any, batch: Any) -> Any:
    """jax.jit's lower(), for compiling ahead (benchmark, plan)."""
    return self._jitted.lower(state, batch, self._teacher)

  def compile(self, state: Any, batch: Any) -> None:
    """Compiles for these arguments now; later calls run the compiled executable."""
    compiled = self.lower(state, batch).compile()
    self._jitted = lambda *args: compiled(*args)


def global_batch(local: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles this process's slice of the batch into global arrays split over the mesh."""
  sh = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sh, v) for k, v in local.items()}
