"""Device mesh from the config and parameter sharding by (regex, rule) lists.

Mesh axes are ('data', 'fsdp', 'tensor'), MaxText-style: `config.mesh` gives each axis's
degree within a slice (ICI) and `config.mesh_dcn` its degree across slices (multi-slice /
DCN); an axis's size is the product of the two, and one -1 per level means "the rest".
The batch is split over 'data' x 'fsdp' and replicated over 'tensor'.

A sharding rule is one of:
  'replicate'        a full copy on every device,
  'fsdp'             split the largest dimension divisible by the fsdp size over 'fsdp',
  (ax0, ax1, ...)    one entry per trailing dimension of the parameter: None, a mesh axis
                     ('data', 'fsdp', 'tensor'), a logical axis name ('embed', 'mlp',
                     'heads', 'kv', 'vocab', 'joint', ...) mapped to mesh axes by
                     `config.logical_axes`, or a tuple of those. Leading dimensions the
                     rule does not name (the layer axis of scanned blocks) are not split.
The first rule whose regex fully matches a parameter's path wins; every parameter must be
covered by some rule. A logical or mesh axis that does not divide its dimension, or that an
earlier dimension already uses, is dropped for that parameter (the printed table shows the
spec actually used).
"""

import math
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from big_vlp.config_errors import ConfigError, check_choice
from big_vlp.tree_paths import map_with_path, path_str

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
RULE_NAMES = ("replicate", "fsdp")

# Logical parameter dimensions -> mesh axes: FSDP over the model width, tensor parallelism
# (Megatron-style) over attention heads and the MLP hidden dimension.
DEFAULT_LOGICAL_AXES: dict[str, Any] = {
    "embed": "fsdp",    # model width
    "mlp": "tensor",    # MLP hidden units
    "heads": "tensor",  # attention heads
    "kv": None,         # per-head features
    "vocab": "tensor",  # token embedding rows
    "joint": None,      # width of the joint image-text embedding
    "patch": None,      # patch-embedding kernel's spatial / colour dimensions
    "pos": None,        # positions of a position embedding
}

# Rules for the two-tower transformers (also with scanned layers: rules name trailing dims).
# Attention Q/K/V are split by heads and their output projection by heads on the input
# side, the MLP by hidden units on both matmuls, so each block needs one all-reduce per
# sub-layer under tensor parallelism; norms, biases of width D and scalars are replicated.
TRANSFORMER_RULES: list[tuple[str, Any]] = [
    (r".*/(query|key|value)/kernel", ("embed", "heads", "kv")),
    (r".*/(query|key|value)/bias", ("heads", "kv")),
    (r".*/out/kernel", ("heads", "kv", "embed")),
    (r".*/MlpBlock_0/Dense_0/kernel", ("embed", "mlp")),
    (r".*/MlpBlock_0/Dense_0/bias", ("mlp",)),
    (r".*/MlpBlock_0/Dense_1/kernel", ("mlp", "embed")),
    (r".*/Embed_0/embedding", ("vocab", "embed")),
    (r".*/head/kernel", ("embed", "joint")),
    (r".*/embedding/kernel", ("patch", "patch", "patch", "embed")),
    (r".*/(pos_embedding|probe|cls)", ("pos", "embed")),
    (r".*", "replicate"),
]


def _level_shape(cfg: Mapping[str, Any], devices: int, field: str) -> list[int]:
  """Per-axis degrees of one mesh level with a single -1 resolved against `devices`."""
  unknown = set(cfg) - set(MESH_AXES)
  if unknown:
    raise ConfigError(f"config.{field} has unknown axes {sorted(unknown)}; allowed axes: "
                      f"{', '.join(MESH_AXES)}")
  sizes = [int(cfg.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ConfigError(f"config.{field}={dict(cfg)}: at most one axis may be -1")
  for axis, s in zip(MESH_AXES, sizes):
    if s == 0 or s < -1:
      raise ConfigError(f"config.{field}.{axis}={s}: must be a positive degree or -1 "
                        "(the rest)")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if devices % known:
      raise ConfigError(f"config.{field}={dict(cfg)}: fixed axes use {known} devices, "
                        f"which does not divide the {devices} available")
    sizes[sizes.index(-1)] = devices // known
  if math.prod(sizes) != devices:
    raise ConfigError(f"config.{field}={dict(cfg)} needs {math.prod(sizes)} devices but "
                      f"{devices} are available; set one axis to -1")
  return sizes


def num_slices(devices: Sequence[Any]) -> int:
  """Slices (TPU pods joined over DCN) among `devices`; processes where slices are unknown."""
  if devices and hasattr(devices[0], "slice_index"):
    return len({d.slice_index for d in devices})
  return len({d.process_index for d in devices}) if devices else 1


def level_shapes(mesh_cfg: Mapping[str, Any], num_devices: int,
                 dcn_cfg: Mapping[str, Any] | None = None,
                 slices: int | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(within-slice degrees, across-slice degrees) per MESH_AXES."""
  dcn_cfg = dict(dcn_cfg or {})
  if any(int(v) == -1 for v in dcn_cfg.values()):
    dcn = _level_shape(dcn_cfg, slices or 1, "mesh_dcn")
  else:
    dcn = _level_shape(dcn_cfg, math.prod(int(v) for v in dcn_cfg.values()) or 1,
                       "mesh_dcn")
  n_slices = math.prod(dcn)
  if num_devices % n_slices:
    raise ConfigError(f"config.mesh_dcn={dcn_cfg} spans {n_slices} slices, which does not "
                      f"divide the {num_devices} devices")
  ici = _level_shape(mesh_cfg, num_devices // n_slices, "mesh")
  return tuple(ici), tuple(dcn)


def mesh_shape(mesh_cfg: Mapping[str, Any], num_devices: int,
               dcn_cfg: Mapping[str, Any] | None = None,
               slices: int | None = None) -> tuple[int, ...]:
  """Total per-axis sizes (within-slice x across-slice degrees)."""
  ici, dcn = level_shapes(mesh_cfg, num_devices, dcn_cfg, slices)
  return tuple(i * d for i, d in zip(ici, dcn))


def make_mesh(mesh_cfg: Mapping[str, Any], devices: Sequence[Any] | None = None,
              dcn_cfg: Mapping[str, Any] | None = None) -> Mesh:
  """Builds an Auto-sharded (GSPMD) mesh with axes MESH_AXES from the config degrees."""
  devices = list(jax.devices() if devices is None else devices)
  ici, dcn = level_shapes(mesh_cfg, len(devices), dcn_cfg, num_slices(devices))
  shape = tuple(i * d for i, d in zip(ici, dcn))
  from jax.experimental import mesh_utils
  arr = None
  try:  # Topology-aware device order on TPU/GPU; plain order elsewhere.
    if math.prod(dcn) > 1:
      arr = mesh_utils.create_hybrid_device_mesh(
          ici, dcn, devices, process_is_granule=not hasattr(devices[0], "slice_index"))
    else:
      arr = mesh_utils.create_device_mesh(ici, devices)
  except Exception:  # pylint: disable=broad-except
    arr = None
  if arr is None or tuple(arr.shape) != shape:
    # Slices (or processes) outermost, then within-slice order, axis by axis.
    k = len(MESH_AXES)
    arr = np.asarray(devices).reshape(dcn + ici)
    arr = arr.transpose([j for i in range(k) for j in (i, k + i)]).reshape(shape)
  return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def mesh_from_config(config: Any, devices: Sequence[Any] | None = None) -> Mesh:
  """The run's mesh: `config.mesh` within slices and `config.mesh_dcn` across them."""
  return make_mesh(config.mesh, devices, config.get("mesh_dcn"))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every data-parallel axis."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device."""
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
  """Number of batch shards."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def _mesh_axes_of(name: Any, logical: Mapping[str, Any], path: str) -> tuple[str, ...]:
  """Mesh axes that a rule entry (None, mesh axis, logical name or tuple) stands for."""
  if name is None:
    return ()
  if isinstance(name, (tuple, list)):
    return tuple(a for n in name for a in _mesh_axes_of(n, logical, path))
  if name in MESH_AXES:
    return (name,)
  if name in logical:
    target = logical[name]
    if isinstance(target, (tuple, list)):
      bad = [t for t in target if t is not None and t not in MESH_AXES]
    else:
      bad = [] if target is None or target in MESH_AXES else [target]
    if bad:
      raise ConfigError(f"config.logical_axes[{name!r}]={target!r}: {bad[0]!r} is not a "
                        f"mesh axis; allowed: {', '.join(MESH_AXES)} or None")
    return _mesh_axes_of(target, {}, path)
  raise ConfigError(f"sharding rule for {path!r}: unknown axis {name!r}; allowed: mesh "
                    f"axes {', '.join(MESH_AXES)}, logical axes {', '.join(logical)}, "
                    "or None")


def _spec_for(rule: Any, shape: tuple[int, ...], mesh: Mesh, path: str,
              logical: Mapping[str, Any]) -> P:
  if isinstance(rule, str):
    check_choice(f"sharding_rules[{path!r}]", rule, RULE_NAMES)
    if rule == "replicate":
      return P()
    n = mesh.shape["fsdp"]
    # Largest dimension first: it saves the most memory per device.
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
      if n > 1 and shape[dim] % n == 0:
        spec = [None] * len(shape)
        spec[dim] = "fsdp"
        return P(*spec)
    return P()
  rule = tuple(rule)
  if len(rule) > len(shape):
    raise ConfigError(f"sharding rule {rule} for {path!r} has {len(rule)} entries but the "
                      f"parameter has shape {shape}")
  rule = (None,) * (len(shape) - len(rule)) + rule  # Unnamed leading dims (layers) whole.
  used: set[str] = set()
  spec = []
  for dim, name in zip(shape, rule):
    axes = []
    for axis in _mesh_axes_of(name, logical, path):
      size = mesh.shape[axis] * math.prod(mesh.shape[a] for a in axes)
      if axis in used or mesh.shape[axis] == 1 or dim % size:
        continue
      axes.append(axis)
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def param_specs(params: Any, rules: Sequence[tuple[str, Any]], mesh: Mesh,
                logical_axes: Mapping[str, Any] | None = None) -> Any:
  """PartitionSpec per parameter from the first matching (regex, rule); all must match."""
  compiled = [(re.compile(rx), rule) for rx, rule in rules]
  logical = dict(DEFAULT_LOGICAL_AXES if logical_axes is None else logical_axes)
  missing = []

  def spec(path: str, leaf: Any) -> P:
    for rx, rule in compiled:
      if rx.fullmatch(path):
        return _spec_for(rule, tuple(leaf.shape), mesh, path, logical)
    missing.append(path)
    return P()

  specs = map_with_path(spec, params)
  if missing:
    raise ConfigError("config.sharding_rules cover no rule for these parameters: "
                      + ", ".join(missing[:20]) + ("..." if len(missing) > 20 else "")
                      + "; add a catch-all such as ('.*', 'replicate')")
  return specs


def param_shardings(params: Any, rules: Sequence[tuple[str, Any]], mesh: Mesh,
                    logical_axes: Mapping[str, Any] | None = None) -> Any:
  """NamedSharding per parameter (see param_specs)."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s),
                      param_specs(params, rules, mesh, logical_axes),
                      is_leaf=lambda x: isinstance(x, P))


def sharding_table(params: Any, shardings: Any) -> str:
  """One line per parameter: path, shape, dtype, partition spec, bytes per device."""
  lines = []
  total = per_device = 0
  flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_s = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  width = max((len(path_str(p)) for p, _ in flat_p), default=10)
  for (path, leaf), sh in zip(flat_p, flat_s):
    count = math.prod(leaf.shape)
    shard = math.prod(sh.shard_shape(tuple(leaf.shape)))
    total += count
    per_device += shard * np.dtype(leaf.dtype).itemsize
    lines.append(f"  {path_str(path):<{width}}  {str(tuple(leaf.shape)):<20} "
                 f"{str(leaf.dtype):<9} {str(sh.spec):<36} {str(sh.shard_shape(tuple(leaf.shape)))}")
  lines.append(f"  total parameters: {total:,}; parameter bytes per device: "
               f"{per_device / 2**20:,.1f} MiB")
  return "\n".join(lines)
