"""Executes the colab notebooks from their paired .py sources and writes each .ipynb with its outputs.

  python colabs/run_notebooks.py                                  # all five, full size
  python colabs/run_notebooks.py --notebooks=01_model_tour --fast  # DSV3_COLAB_FAST=1, as CI runs them

Each notebook runs in a fresh kernel of this interpreter, from colabs/, on the CPU, with XLA_FLAGS cleared
(what a user sees) and a temporary folder of its own (TMPDIR, removed after). The written .ipynb keeps only
stable metadata (cell ids numbered, no execution timings) and shows no path of this machine: the outputs name
the kernel's temporary folder $TMPDIR, the home folder ~, the repository <repo> and the Python installation
<python>. A rerun changes only what the cells print. tests/test_colabs.py executes notebooks with `execute`.
"""
import os
import re
import resource
import sys
import tempfile
import time

import jupytext
import nbclient
import nbformat
from absl import app, flags

COLABS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(COLABS)
NAMES = ("01_model_tour", "02_load_balancing", "03_dualpipe", "04_fp8", "05_generation")
TIMEOUT_S = 1800   # per cell: the executor cell of 03 takes minutes on a busy 2-core machine

flags.DEFINE_list("notebooks", list(NAMES), "Notebooks to run (names without extension).")
flags.DEFINE_bool("fast", False, "Set DSV3_COLAB_FAST=1: every run shrunk, as in CI.")


def kernel_env(fast, cache_dir=None):
  """The kernel's environment: this one without XLA_FLAGS, on CPU unless JAX_PLATFORMS says otherwise."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS=env.get("JAX_PLATFORMS", "cpu"), MPLBACKEND="module://matplotlib_inline.backend_inline")
  if fast:
    env["DSV3_COLAB_FAST"] = "1"
  if cache_dir:
    env["DSV3_CACHE"] = cache_dir
  return env


def execute(name, env):
  """Runs colabs/{name}.py as a notebook; returns it with its outputs (machine paths replaced) and stable
  metadata."""
  nb = jupytext.read(os.path.join(COLABS, name + ".py"))
  # 'python3' is ipykernel's own kernelspec; jupyter_client starts it with this interpreter (sys.executable).
  client = nbclient.NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3", record_timing=False,
                                   resources={"metadata": {"path": COLABS}})
  with tempfile.TemporaryDirectory(prefix=f"dsv3_{name}_") as tmpdir:
    client.execute(cwd=COLABS, env=dict(env, TMPDIR=tmpdir))
    paths = machine_paths(tmpdir)
  for i, cell in enumerate(nb.cells):
    cell.id = f"cell-{i:02d}"
    if cell.cell_type == "code":
      cell.outputs = [without_paths(out, paths) for out in coalesce_streams(cell.outputs)]
  nb.metadata = {"jupytext": {"formats": "ipynb,py:percent"}, "kernelspec": nb.metadata["kernelspec"],
                 "language_info": {"name": "python"}}
  return nb


def machine_paths(tmpdir):
  """This machine's folders that outputs may name (a checkpoint, a cache, a warning's source file), each with
  the name the committed notebook shows instead; the longest first, so a folder inside another keeps its own."""
  names = {tmpdir: "$TMPDIR", tempfile.gettempdir(): "$TMPDIR", os.path.realpath(tempfile.gettempdir()): "$TMPDIR",
           REPO: "<repo>", sys.prefix: "<python>", sys.base_prefix: "<python>",
           os.path.realpath(sys.base_prefix): "<python>", os.path.expanduser("~"): "~"}
  return [(re.compile(re.escape(path.rstrip("/")) + r"(?![\w.-])"), names[path])
          for path in sorted(names, key=len, reverse=True) if path.rstrip("/")]


TEXT_MIMES = ("text/plain", "text/html", "text/markdown", "text/latex", "application/json")


def without_paths(out, paths):
  """`out` with each machine path in its text replaced by its name (images and other binary data untouched)."""
  def clean(text):
    for pattern, name in paths:
      text = pattern.sub(name, text)
    return text
  if out.output_type == "stream":
    out.text = clean(out.text)
  elif out.output_type == "error":
    out.evalue, out.traceback = clean(out.evalue), [clean(line) for line in out.traceback]
  else:
    for mime in TEXT_MIMES:
      if isinstance(out.get("data", {}).get(mime), str):
        out.data[mime] = clean(out.data[mime])
  return out


def coalesce_streams(outputs):
  """Joins consecutive stdout (stderr) outputs into one and keeps only the last state of each line that a
  progress bar rewrote with carriage returns, as a terminal would show it."""
  merged = []
  for out in outputs:
    if out.output_type == "stream" and merged and merged[-1].output_type == "stream" and merged[-1].name == out.name:
      merged[-1].text += out.text
    else:
      merged.append(out)
  for out in merged:
    if out.output_type == "stream":
      out.text = "\n".join(line.rstrip("\r").rsplit("\r", 1)[-1] for line in out.text.split("\n"))
  return merged


def main(argv):
  del argv
  for name in flags.FLAGS.notebooks:
    if name not in NAMES:
      raise app.UsageError(f"--notebooks: unknown notebook {name!r}; choose from {', '.join(NAMES)}")
  for name in flags.FLAGS.notebooks:
    t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    nb = execute(name, kernel_env(flags.FLAGS.fast))
    nbformat.write(nb, os.path.join(COLABS, name + ".ipynb"))
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"{name}.ipynb: {time.perf_counter() - t0:.0f} s, kernel CPU "
          f"{cpu.ru_utime + cpu.ru_stime - cpu0.ru_utime - cpu0.ru_stime:.0f} s")


if __name__ == "__main__":
  app.run(main)
