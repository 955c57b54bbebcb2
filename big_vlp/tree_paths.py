"""'/'-joined path names of pytree leaves, the keys that regex rules over params match."""

from typing import Any, Callable

import jax


def _key_name(k: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_str(path: tuple) -> str:
  """Joins a jax key path into 'a/b/c'."""
  return "/".join(_key_name(k) for k in path)


def leaf_paths(tree: Any) -> list[str]:
  """Path names of all leaves, in tree-flatten order."""
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def map_with_path(fn: Callable[[str, Any], Any], tree: Any) -> Any:
  """tree_map whose function also receives the leaf's path name."""
  return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_str(p), x), tree)
