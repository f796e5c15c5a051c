"""The colab notebooks: their .py sources are linted and equal the committed .ipynb, which carry outputs;
executing them (CI mode, DSV3_COLAB_FAST=1) raises no error.

Each notebook runs in its own Jupyter kernel, started from this interpreter (so from this venv), with
colabs/ as the working directory and a clean XLA_FLAGS (conftest.py asks for 8 simulated devices in this
process; the notebooks train on the one real device). The tokenizer and token-stream cache (DSV3_CACHE) is
one temp dir for the whole session, so the BPE is trained once.
"""
import glob
import os
import re
import subprocess
import sys
import tempfile
import time

import pytest

jupytext = pytest.importorskip("jupytext")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = os.path.join(ROOT, "colabs")
sys.path.insert(0, COLABS)
import run_notebooks  # noqa: E402  (colabs/ is not a package)

NAMES = run_notebooks.NAMES
# In the default run: the one notebook whose CI-mode execution is cheap (01: planner, forward pass, router,
# plots). The others compile training steps or pipeline programs for minutes of CPU each; they run with
# `-m slow`.
DEFAULT_RUN = ("01_model_tour",)


def cells(path):
  return [(c.cell_type, c.source) for c in jupytext.read(path).cells]


def test_every_notebook_is_collected():
  notebooks = sorted(os.path.basename(p)[:-6] for p in glob.glob(os.path.join(COLABS, "*.ipynb")))
  sources = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(COLABS, "0*.py")))
  assert notebooks == sources == list(NAMES)


def test_sources_pass_pyflakes_checks():
  # ruff's F rules are pyflakes': undefined names, unused imports and variables, redefinitions.
  files = [os.path.join(COLABS, n + ".py") for n in NAMES] + [run_notebooks.__file__]
  proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--isolated", "--no-cache", "--select", "F",
                         *files], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", NAMES)
def test_notebook_equals_its_source(name):
  assert cells(os.path.join(COLABS, name + ".ipynb")) == cells(os.path.join(COLABS, name + ".py")), (
      f"{name}: .ipynb and .py differ; `jupytext --to ipynb --update colabs/{name}.py`, then rerun it "
      f"(`python colabs/run_notebooks.py --notebooks={name}`)")


def test_every_notebook_opens_with_the_same_install_cell():
  first = {name: next(s for t, s in cells(os.path.join(COLABS, name + ".py")) if t == "code") for name in NAMES}
  assert all(s.startswith("# Install.") for s in first.values())
  assert len(set(first.values())) == 1, "the install cells differ: keep one text in all five"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_committed_with_outputs(name):
  nb = jupytext.read(os.path.join(COLABS, name + ".ipynb"))
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), (
      f"{name}: run it top to bottom: python colabs/run_notebooks.py --notebooks={name}")
  assert not [o for c in code for o in c.outputs if o.output_type == "error"], f"{name}: a cell failed"
  assert not [c for c in code if "execution" in c.metadata], f"{name}: execution timings left in"
  # The install, settings and import cells print nothing; every cell after them shows a result.
  assert all(c.outputs for c in code[3:]), f"{name}: a cell without outputs"
  drawing = [c for c in code if any(s in c.source for s in ("plt.show()", "Image(", ".figure("))]
  assert all(any("image/png" in o.get("data", {}) for o in c.outputs) for c in drawing), f"{name}: a plot is missing"


# Absolute paths of a machine: temporary folders, home folders (Linux, macOS), a pyenv Python.
MACHINE_PATH = re.compile(r"(?<![\w.$<>~-])(/tmp/|/var/folders/|/private/|/root/|/home/|/Users/|\S*\.pyenv/)")


def output_texts(nb):
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      yield out.get("text", "")
      yield from out.get("traceback", [])
      yield from (v for mime, v in out.get("data", {}).items() if mime in run_notebooks.TEXT_MIMES)


@pytest.mark.parametrize("name", NAMES)
def test_committed_outputs_show_no_machine_path(name):
  nb = jupytext.read(os.path.join(COLABS, name + ".ipynb"))
  here = [pattern for pattern, _ in run_notebooks.machine_paths(tempfile.gettempdir())]
  found = [line for text in output_texts(nb) for line in str(text).splitlines()
           if MACHINE_PATH.search(line) or any(p.search(line) for p in here)]
  assert not found, (f"{name}: outputs name this machine's paths (rerun it with colabs/run_notebooks.py, which "
                     f"replaces them): {found[:3]}")


@pytest.fixture(scope="session")
def colab_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("dsv3_colab_cache"))


@pytest.mark.parametrize("name", [n if n in DEFAULT_RUN else pytest.param(n, marks=pytest.mark.slow)
                                  for n in NAMES])
def test_notebook_runs(name, colab_cache):
  t0 = time.perf_counter()
  # A failing cell raises nbclient's CellExecutionError, which names the cell and the error.
  run_notebooks.execute(name, run_notebooks.kernel_env(fast=True, cache_dir=colab_cache))
  print(f"{name}: {time.perf_counter() - t0:.0f} s")
