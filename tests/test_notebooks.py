"""The notebooks in notebooks/: committed without outputs, and run top to bottom without errors.

Each notebook runs in a fresh `python3` kernel of this environment (ipykernel) at tiny settings,
on one CPU device (the suite's 8 simulated devices are taken out of the kernel's XLA_FLAGS: the
notebooks are written for a laptop or Colab), with the session's bundled data.
"""

import os
import re
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ("quickstart", "packing_explorer", "capabilities")
CELL_TIMEOUT = 600  # seconds; a whole notebook takes ~1-2 minutes here

# What each notebook must show once executed (an inline GIF, a matplotlib figure, ...).
EXPECTED_OUTPUTS = {
  "quickstart": ("text/html", "data:image/gif;base64,"),
  "packing_explorer": ("image/png", ""),
  "capabilities": ("text/html", "data:image/gif;base64,"),
}


def _outputs(nb, mime: str) -> list[str]:
  found = []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      data = out.get("data", {})
      if mime in data:
        found.append(data[mime] if isinstance(data[mime], str) else "".join(data[mime]))
  return found


def test_every_notebook_is_tested():
  assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_has_no_outputs(name):
  nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
  nbformat.validate(nb)
  assert nb.cells[0].cell_type == "markdown"
  setup = next(c for c in nb.cells if c.cell_type == "code")
  assert "google.colab" in setup.source, "the first code cell must install the repo in Colab"
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, f"{name} cell {i} has output"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, data_dir, monkeypatch):
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
  monkeypatch.setenv("XLA_FLAGS", flags.strip())
  monkeypatch.setenv("VDIT_DATA_DIR", data_dir)
  nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
  client = nbclient.NotebookClient(
    nb,
    kernel_name="python3",
    timeout=CELL_TIMEOUT,
    resources={"metadata": {"path": str(NOTEBOOKS)}},
  )
  start = time.perf_counter()
  client.execute()  # raises CellExecutionError (with the traceback) if a cell fails
  seconds = time.perf_counter() - start
  print(f"{name}: {seconds:.0f} s")
  errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
  assert not errors
  mime, needle = EXPECTED_OUTPUTS[name]
  assert any(needle in text for text in _outputs(nb, mime)), f"{name} shows no {mime} output"
