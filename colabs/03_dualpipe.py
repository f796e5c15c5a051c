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
# # 03 · Pipeline schedules: 1F1B, ZB1P, DualPipe, DualPipeV
#
# DeepSeek-V3 trains with 16-way pipeline parallelism under **DualPipe**: micro-batches enter from both ends of
# the pipeline, so every rank holds two stages (twice the parameters), and a forward chunk of one direction is
# overlapped with a backward chunk of the other (the F&B cells), hiding the all-to-all communication of
# expert parallelism behind computation. `dsv3.pipeline.schedules` generates the per-rank op lists and
# `simulate` times them with per-cell costs F, B (full backward), W (weight-gradient part of B) and F&B.

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

# The last section runs a real pipeline on 8 CPU devices; XLA reads this before JAX starts.
if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
RANKS, CHUNKS = 4, 10        # the pictures: small enough to read
F, B, W = 1.0, 2.0, 1.0      # F = B - W, the regime of the paper's Figure 5 and Table 2


# %%
import tempfile
import jax
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, display
from dsv3 import model
from dsv3.bench import pipeline as pipeline_bench
from dsv3.config import ModelConfig
from dsv3.pipeline import executor
from dsv3.pipeline import schedules, timeline
from dsv3.training import losses

# %%
outdir = tempfile.mkdtemp(prefix='dsv3_pipeline_')
runs = {'1F1B': schedules.one_f_one_b(RANKS, CHUNKS), 'ZB1P': schedules.zb1p(RANKS, CHUNKS),
        'DualPipe': schedules.dualpipe(RANKS, CHUNKS), 'DualPipeV': schedules.dualpipev(RANKS, CHUNKS)}
sims = {}
for name, sched in runs.items():
  sims[name] = res = schedules.simulate(sched, F=F, B=B, W=W)
  path = timeline.plot_timeline(res, os.path.join(outdir, f'{name}.png'),
                                title=f'{name}: {RANKS} ranks, {CHUNKS} micro-batches, makespan {res.makespan:g}, '
                                      f'bubble {res.bubble:g}')
  display(Image(filename=path))

# %% [markdown]
# Reading the pictures: orange = forward, green = backward (hatched: backward for inputs only, whose
# weight-gradient work `W` (blue) is deferred into what would otherwise be a bubble); light shades are the
# second direction. DualPipe's middle section is made of F&B units (thick borders), where a forward of one
# direction and a backward of the other run together.
#
# ## The first ops of each DualPipe rank

# %%
for r, ops in enumerate(runs['DualPipe'].strings()):
  print(f'rank {r}: ' + ' '.join(ops[:12]) + (' ...' if len(ops) > 12 else ''))


# %% [markdown]
# ## Bubble table vs the paper (Table 2 of the DeepSeek-V3 report)
#
# 8 ranks, 20 micro-batches. Paper: 1F1B (PP−1)(F+B); ZB1P (PP−1)(F+B−2W); DualPipe (PP/2−1)(F&B+B−3W) with 2×
# parameters and PP+1 activations. DualPipeV folds DualPipe into a V over 2 × ranks stages on the same ranks.

# %%
def show(rows, FB):
  print(f"F={F} B={B} W={W} F&B={FB}")
  print(f"{'method':<10}{'PP':>4}{'bubble (sim)':>14}{'bubble (paper)':>16}{'params':>8}{'peak activations':>18}")
  for method, stages, measured, paper, params, acts, _ in rows:
    print(f"{method:<10}{stages:>4}{measured:>14g}{paper:>16g}{params:>8}{acts:>18}")
    assert abs(measured - paper) < 1e-9, (method, measured, paper)

show(schedules.bubble_table(8, 20, F=F, B=B, W=W), F + B)

# %% [markdown]
# With real overlap an F&B unit costs less than F + B (the communication and the second stream fill each other's
# gaps). The table with F&B = 2.5:

# %%
show(schedules.bubble_table(8, 20, F=F, B=B, W=W, FB=2.5), 2.5)

# %% [markdown]
# ## Running it: the executor
#
# `dsv3.pipeline.executor` turns a schedule into a training step. The model is cut into stages (embedding +
# layers, ..., layers + head + MTP); each pipeline rank is a sub-mesh of devices, and every stage's forward
# `F`, backward `B`, input-only backward `B*` and deferred weight-gradient `W` is its own program compiled for
# that sub-mesh. A Python driver walks the schedule and dispatches them asynchronously, moving activations and
# gradients between sub-meshes (across processes too: `launch/local.sh 2 ... --config.mesh.pipeline=4`).
#
# Below: a small MoE model on 4 ranks × 2 CPU devices. The check that matters is that a pipelined step is
# *exactly* the unpipelined `value_and_grad` (the gradients, summed over micro-batches and DualPipe's two
# parameter copies). The per-op times are measured one op at a time, then fed back to the simulator: on CPU
# the 8 "devices" share the same cores, so the simulated step on truly parallel ranks is the number to read.

# %%
cfg = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                  num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=32,
                  kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
                  n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, num_nextn_predict_layers=1,
                  max_position_embeddings=64, rope_scaling=None).validate()
variables = model.init(cfg, jax.random.key(0))
tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (16, 33)).astype(np.int32)
MTP_WEIGHT, ALPHA = 0.3, 1e-4

def objective(params):
  out = model.forward_train(cfg, {'params': params, 'routing': variables['routing']}, tokens[:, :-1])
  return losses.objective(cfg, out, tokens[:, 1:], MTP_WEIGHT, ALPHA)
(loss_ref, _), grads_ref = jax.jit(jax.value_and_grad(objective, has_aux=True))(variables['params'])

cpus = jax.devices('cpu')
print(f"{len(cpus)} CPU devices -> 4 ranks of {len(cpus) // 4}; unpipelined loss {float(loss_ref):.6f}")
print(f"{'schedule':<10}{'loss':>10}{'max |grad diff|':>17}   op costs (ms)                   idle per rank (sim)")
for name in ['1f1b', 'zb1p', 'dualpipe']:
  timings = []
  loss, metrics, grads, loads = executor.pipeline_value_and_grad(
      cfg, variables, tokens, schedule=name, num_stages=4, microbatches=8, mtp_weight=MTP_WEIGHT, alpha=ALPHA,
      devices=cpus, timings=timings)
  diff = max(float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())
             for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)))
  assert diff < 1e-4 and abs(float(loss) - float(loss_ref)) < 1e-4, (name, diff)
  costs = pipeline_bench.op_costs(timings)
  sim = pipeline_bench.simulated(executor.get_plan(cfg, name, 4, 8, devices=cpus).schedule, costs)
  idle = ' '.join(f'{b / sim.makespan:.2f}' for b in sim.bubble_per_rank)
  cost_str = ' '.join(f'{k}={v * 1e3:.1f}' for k, v in sorted(costs.items()))
  print(f"{name:<10}{float(loss):>10.6f}{diff:>17.2e}   {cost_str:<32}{idle}")

# %%
fig, ax = plt.subplots(figsize=(7, 3))
rows = schedules.bubble_table(8, 20, F=F, B=B, W=W)
ax.bar([r[0] for r in rows], [r[2] for r in rows], color=['#888', '#5b7fd1', '#f08c2e', '#3f9a4f'])
ax.set(ylabel='bubble (cell-cost units)', title='pipeline bubble, 8 ranks, 20 micro-batches')
plt.show()
