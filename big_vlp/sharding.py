"""Device mesh from the config and parameter sharding by (regex, rule) lists.

Mesh axes are ('data', 'fsdp'); the batch is split over both, parameters over 'fsdp'
by the rules. A rule is one of:
  'replicate'        a full copy on every device,
  'fsdp'             split the largest dimension divisible by the fsdp size over 'fsdp',
  (ax0, ax1, ...)    an explicit PartitionSpec (mesh axis names or None per dimension).
The first rule whose regex fully matches a parameter's path wins; every parameter must be
covered by some rule.
"""

import math
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from big_vlp.config_errors import ConfigError, check_choice
from big_vlp.tree_paths import map_with_path, path_str

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
RULE_NAMES = ("replicate", "fsdp")


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Per-axis sizes with a single -1 resolved to 'the rest of the devices'."""
  unknown = set(mesh_cfg) - set(MESH_AXES)
  if unknown:
    raise ConfigError(f"config.mesh has unknown axes {sorted(unknown)}; allowed axes: "
                      f"{', '.join(MESH_AXES)}")
  sizes = [int(mesh_cfg.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ConfigError(f"config.mesh={dict(mesh_cfg)}: at most one axis may be -1")
  for axis, s in zip(MESH_AXES, sizes):
    if s == 0 or s < -1:
      raise ConfigError(f"config.mesh.{axis}={s}: must be a positive degree or -1 (the rest)")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f"config.mesh={dict(mesh_cfg)}: fixed axes use {known} devices, "
                        f"which does not divide the {num_devices} available")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(f"config.mesh={dict(mesh_cfg)} needs {math.prod(sizes)} devices but "
                      f"{num_devices} are available; set one axis to -1")
  return tuple(sizes)


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """Builds an Auto-sharded (GSPMD) mesh with axes MESH_AXES from the config degrees."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  try:  # Topology-aware device order on TPU/GPU; plain order elsewhere.
    from jax.experimental import mesh_utils
    arr = mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # pylint: disable=broad-except
    arr = np.asarray(devices).reshape(shape)
  return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every data-parallel axis."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device."""
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
  """Number of batch shards."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def _spec_for(rule: Any, shape: tuple[int, ...], mesh: Mesh, path: str) -> P:
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
  if len(rule) != len(shape):
    raise ConfigError(f"sharding rule {rule} for {path!r} has {len(rule)} entries but the "
                      f"parameter has shape {shape}")
  for ax in rule:
    names = ax if isinstance(ax, (tuple, list)) else (ax,)
    for a in names:
      if a is not None and a not in MESH_AXES:
        raise ConfigError(f"sharding rule {rule} for {path!r}: unknown mesh axis {a!r}; "
                          f"allowed: {', '.join(MESH_AXES)} or None")
  return P(*rule)


def param_specs(params: Any, rules: Sequence[tuple[str, Any]], mesh: Mesh) -> Any:
  """PartitionSpec per parameter from the first matching (regex, rule); all must match."""
  compiled = [(re.compile(rx), rule) for rx, rule in rules]
  missing = []

  def spec(path: str, leaf: Any) -> P:
    for rx, rule in compiled:
      if rx.fullmatch(path):
        return _spec_for(rule, tuple(leaf.shape), mesh, path)
    missing.append(path)
    return P()

  specs = map_with_path(spec, params)
  if missing:
    raise ConfigError("config.sharding_rules cover no rule for these parameters: "
                      + ", ".join(missing[:20]) + ("..." if len(missing) > 20 else "")
                      + "; add a catch-all such as ('.*', 'replicate')")
  return specs


def param_shardings(params: Any, rules: Sequence[tuple[str, Any]], mesh: Mesh) -> Any:
  """NamedSharding per parameter (see param_specs)."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params, rules, mesh),
                      is_leaf=lambda x: isinstance(x, P))


def sharding_table(params: Any, shardings: Any) -> str:
  """One line per parameter: path, shape, dtype, partition spec."""
  lines = []
  total = 0
  flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_s = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  width = max((len(path_str(p)) for p, _ in flat_p), default=10)
  for (path, leaf), sh in zip(flat_p, flat_s):
    total += math.prod(leaf.shape)
    lines.append(f"  {path_str(path):<{width}}  {str(tuple(leaf.shape)):<20} "
                 f"{str(leaf.dtype):<9} {sh.spec}")
  lines.append(f"  total parameters: {total:,}")
  return "\n".join(lines)
