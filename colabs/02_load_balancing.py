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
# Install. Does nothing where dsv3 is installed (`pip install -e .` in the repository). Otherwise pip installs
# it with its dependencies, editable: from this checkout when the notebook runs from its colabs/, else (Colab)
# from git, cloned into ./src/dsv3: set DSV3_GIT to the repository's URL.
import importlib.util
import os
import subprocess
import sys

DSV3_GIT = 'https://github.com/YOUR_ACCOUNT/dsv3.git'
if importlib.util.find_spec('dsv3') is None:
  LOCAL = os.path.isfile(os.path.join('..', 'pyproject.toml'))
  subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--src', 'src', '-e',
                  '..' if LOCAL else f'git+{DSV3_GIT}#egg=dsv3'], check=True)
  sys.path.insert(0, os.path.abspath('..' if LOCAL else 'src/dsv3'))   # pip's path entry is read at start-up

# %%
FAST = os.environ.get('DSV3_COLAB_FAST') == '1'  # CI: shrink every run further



# %%
# balance.figure draws without pyplot; this makes the notebook show matplotlib figures as PNG:
# %matplotlib inline
import tempfile
from pathlib import Path
from IPython.display import Image, Markdown, display
import dsv3
from dsv3.bench.studies import balance

# %% [markdown]
# ## The full study
#
# `python -m dsv3.bench.studies.balance --steps=1000` wrote the table and plots below (five runs of 1,000 steps,
# copied into colabs/studies/; the machine and date are in colabs/studies/README.md). The cell reads them from the
# repository; it trains nothing.

# %%
# colabs/studies: the committed outputs of the three study commands, found from the installed repository
STUDIES = Path(dsv3.__file__).resolve().parent.parent / 'colabs' / 'studies'
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
