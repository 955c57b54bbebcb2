"""Fixtures shared by the data tests: the `small` shapes dataset, built once per session."""

import pytest

from big_vlp.data import shapes

SMALL = "big_vlp_shapes/small"
_BUILT: dict[str, str] = {}


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> str:
  """A tfds data_dir holding big_vlp_shapes/small (train 2000 / val 200 / test 480)."""
  # Several test modules import this fixture; the cache makes them share one build.
  if "dir" not in _BUILT:
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    shapes.ensure_built(data_dir, "small")
    _BUILT["dir"] = data_dir
  return _BUILT["dir"]
