"""The benchmarks' shared matplotlib setup: a figure of panels on the Agg backend, and saving it.

Each benchmark that draws (`--set png='"docs/images/NAME.png"'`) has its own `write_png(path,
results)` on top of these; matplotlib is imported only when a plot is written.
"""

import os


def subplots(ncols: int, title: str, width: float = 4.5, height: float = 3.4):
  """(figure, axes) of `ncols` panels side by side under a suptitle, drawn off-screen (Agg)."""
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, axes = plt.subplots(
    1, ncols, figsize=(width * ncols, height), squeeze=False, layout="constrained"
  )  # constrained: room for titles and for legends placed "outside ..." of the axes
  fig.suptitle(title)
  return fig, list(axes[0])


def save(fig, path: str) -> str:
  """Writes `fig` to `path` (creating its directory) and closes it; returns the path."""
  import matplotlib.pyplot as plt  # noqa: PLC0415

  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
