"""Executes every notebook in colabs/ end to end (CI mode: DSV3_COLAB_FAST=1) and fails on any cell error.

Each notebook runs in its own Jupyter kernel, started from this interpreter (so from this venv), with
colabs/ as the working directory. The kernel gets a clean XLA_FLAGS: conftest.py asks for 8 simulated
devices in this process, but the notebooks train on the one real device (mesh 1x1x1). The tokenizer and
token-stream cache (DSV3_CACHE) is one temp dir for the whole session, so the BPE is trained once.
"""
import glob
import os
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = os.path.join(ROOT, "colabs")
NOTEBOOKS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(COLABS, "*.ipynb")))
TIMEOUT_S = 600


@pytest.fixture(scope="session")
def colab_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("dsv3_colab_cache"))


def kernel_env(cache_dir):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(DSV3_COLAB_FAST="1", DSV3_CACHE=cache_dir, JAX_PLATFORMS=env.get("JAX_PLATFORMS", "cpu"),
             MPLBACKEND="module://matplotlib_inline.backend_inline")
  # The repository root is found by the notebooks themselves (they run from colabs/); PYTHONPATH set by a
  # caller is kept, nothing is added, so the test checks exactly what a user sees.
  return env


def test_every_notebook_is_collected():
  assert NOTEBOOKS == ["01_model_tour.ipynb", "02_load_balancing.ipynb", "03_dualpipe.ipynb", "04_fp8.ipynb",
                       "05_generation.ipynb"]


def test_notebooks_are_committed_without_outputs():
  for name in NOTEBOOKS:
    nb = nbformat.read(os.path.join(COLABS, name), as_version=4)
    for cell in nb.cells:
      if cell.cell_type == "code":
        assert not cell.outputs and cell.execution_count is None, f"{name}: clear the outputs before committing"


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, colab_cache):
  nb = nbformat.read(os.path.join(COLABS, name), as_version=4)
  # 'python3' is ipykernel's own kernelspec; jupyter_client starts it with this interpreter (sys.executable).
  client = nbclient.NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": COLABS}})
  t0 = time.perf_counter()
  client.execute(cwd=COLABS, env=kernel_env(colab_cache))
  print(f"{name}: {time.perf_counter() - t0:.0f} s")
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
  assert not errors, f"{name}: {errors[0].ename}: {errors[0].evalue}"
