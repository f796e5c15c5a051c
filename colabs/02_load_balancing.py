# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Load balancing: none vs auxiliary loss vs auxiliary-loss-free bias
#
# DeepSeek-V3 balances its experts without an auxiliary loss (report §2.1.2, after Wang et al. 2024): each MoE
# layer keeps a bias `b` that is added to the affinity scores **only to choose** the top-k experts, and after
# every step `b_i += gamma * sign(mean_load - load_i)`, with the load counted over the whole global batch.
# The bias is state, not a parameter: no gradient flows through it, so balancing does not fight the language
# modelling loss. The baseline is an auxiliary balance loss (alpha = 0.001).
#
# The study (`python -m dsv3.bench.studies.balance`, `dsv3/bench/studies/balance.py`) trains the same tiny MoE
# (configs/tiny.py: 3 MoE layers, 16 experts, 4 active) with no balancing, the auxiliary loss, and the bias at
# gamma = 1e-4, 1e-3 (the paper's) and 1e-2, with the same data, seed and schedule, through the real trainer,
# and compares **MaxVio** = (max load − mean load) / mean load: _global over the whole validation sample,
# _batch over each training batch, averaged over MoE layers.
#
# **Reference** (Wang et al. 2024, 1B MoE): MaxVio_global 0.72 with the auxiliary loss vs 0.04 loss-free, at
# equal or better perplexity.
#
# _The outputs shown come from a CI-size run (`DSV3_COLAB_FAST=1`: the shortened study runs 30 steps on a
# 512-token vocabulary and 30 files instead of 300 steps), which keeps the committed run to minutes on a shared
# 2-core CPU; without the variable the notebook runs the sizes in its settings cell._

# %%
# Install. Outside Colab this only makes the repository importable (run the notebook from colabs/). In Colab
# it finds the repository under /content (a folder, an uploaded .zip, Drive), `pip install`s its
# requirements.txt and runs from its colabs/. To get the repository there: upload its .zip in the Files pane
# (GitHub's "Download ZIP" works), or `!git clone URL` in a cell, or `%env DSV3_REPO=URL` (cloned below).
import glob
import os
import subprocess
import sys
import zipfile

try:
  import google.colab  # noqa: F401
  IN_COLAB = True
except ImportError:
  IN_COLAB = False


def find_repo():
  for root in ['.', '..', *glob.glob('*/'), *glob.glob('*/*/'), *glob.glob('drive/MyDrive/*/')]:
    if os.path.isfile(os.path.join(root, 'dsv3', '__init__.py')):
      return os.path.abspath(root)
  return None


if IN_COLAB:
  if find_repo() is None:
    for path in glob.glob('*.zip'):
      with zipfile.ZipFile(path) as z:
        if any(n.endswith('dsv3/__init__.py') for n in z.namelist()):
          z.extractall(os.path.splitext(path)[0])
    if find_repo() is None and os.environ.get('DSV3_REPO'):
      subprocess.run(['git', 'clone', '--depth=1', os.environ['DSV3_REPO'], 'dsv3-repo'], check=True)
  REPO = find_repo()
  if REPO is None:
    raise FileNotFoundError(f'no dsv3 repository under {os.getcwd()}: upload its .zip, `!git clone URL`, or '
                            '`%env DSV3_REPO=URL`, then rerun this cell')
  subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '-r', os.path.join(REPO, 'requirements.txt')],
                 check=True)
  os.chdir(os.path.join(REPO, 'colabs'))
  sys.path.insert(0, REPO)
elif not os.path.isdir('dsv3') and os.path.isdir(os.path.join('..', 'dsv3')):
  sys.path.insert(0, os.path.abspath('..'))   # run from colabs/: make the repository root importable

# %%
FAST = os.environ.get('DSV3_COLAB_FAST') == '1'  # CI: shrink every run further



# %%
# balance.figure draws without pyplot; this makes the notebook show matplotlib figures as PNG:
# %matplotlib inline
import tempfile
from pathlib import Path
from IPython.display import Image, Markdown, display
from dsv3.bench.studies import balance

# %% [markdown]
# ## The full study
#
# `python -m dsv3.bench.studies.balance --steps=1000` wrote the table and plots below (five runs of 1,000 steps,
# copied into colabs/studies/; the machine and date are in colabs/studies/README.md). The cell reads them from the
# repository; it trains nothing.

# %%
STUDIES = Path('studies')   # colabs/studies: the committed outputs of the three study commands
display(Markdown((STUDIES / 'balance.md').read_text()))
display(Image(filename=str(STUDIES / 'balance.png')))

# %% [markdown]
# ## Run it
#
# The cell below runs the study here, shortened (300 steps, three runs; in CI mode 30 steps on a smaller
# vocabulary and 30 files). The full study is `python -m dsv3.bench.studies.balance --steps=1000` (five runs; it
# writes balance.md, balance.json and balance.png).

# %%
STEPS = 30 if FAST else 300
OVERRIDES = ({'batch_size': 8, 'seq_len': 64, 'model.vocab_size': 512, 'data.max_files': 30, 'eval_batches': 2}
             if FAST else {})
MODES = ('aux_loss', 'aux_free', 'aux_free@0.01')
results = balance.run(STEPS, tempfile.mkdtemp(prefix='dsv3_balance_'), MODES, OVERRIDES)
display(Markdown(balance.table(results)))
print(balance.verdict(results))

# %%
display(balance.figure(results))   # validation loss, MaxVio_global, MaxVio per training batch
