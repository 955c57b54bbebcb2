"""Where the PyTorch + open_clip environment of the side-by-side benchmarks lives.

`bash tools/install_open_clip.sh` makes it in .venv-open_clip; $BIG_VLP_OPEN_CLIP_PYTHON or
a tool's --open_clip_python points at another one. big_vlp itself never imports torch.
"""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPEN_CLIP_VENV = os.path.join(ROOT, ".venv-open_clip")
ENV_VAR = "BIG_VLP_OPEN_CLIP_PYTHON"


def open_clip_python(given: str | None = None) -> str | None:
  """The first python that exists of: `given`, $BIG_VLP_OPEN_CLIP_PYTHON, .venv-open_clip's."""
  for path in (given, os.environ.get(ENV_VAR), os.path.join(OPEN_CLIP_VENV, "bin", "python")):
    if path and os.path.exists(path):
      return path
  return None


def find_open_clip_python(given: str | None, asked_by: str) -> str:
  """open_clip_python(given), or exit with what was looked at and how to make one."""
  path = open_clip_python(given)
  if path is None:
    raise SystemExit(f"{asked_by}: no open_clip environment found (looked at "
                     f"--open_clip_python, ${ENV_VAR} and "
                     f"{os.path.relpath(OPEN_CLIP_VENV, os.getcwd())}). Make one with "
                     "`bash tools/install_open_clip.sh` (PyTorch CPU + open_clip in their own "
                     "venv; big_vlp itself does not depend on them).")
  return path
