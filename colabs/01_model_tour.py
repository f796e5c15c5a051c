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
# # 01 · A tour of the model: configs, parameter counts, a forward pass, router choices
#
# DeepSeek-V3 is a Transformer whose attention is **Multi-head Latent Attention** (MLA: keys and values
# come from a small shared latent, which is all the KV cache has to keep) and whose feed-forward layers are
# **DeepSeekMoE** (1 shared expert + 256 fine-grained routed experts, 8 active per token). This notebook reads
# the numbers off the real model definition with the planner (`dsv3.plan`, which uses `jax.eval_shape`, so
# even the 671B model costs nothing to "build"), runs a forward pass of the tiny config, and looks at what the
# router does.

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

B, T = (2, 64) if FAST else (4, 128)


# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from dsv3 import cli, plan
from dsv3 import model
from dsv3.config import ModelConfig, deepseek_v3_671b
from dsv3.nn import moe
from dsv3.nn.layers import rope_cos_sin

# %% [markdown]
# ## Configs and parameter counts from the planner

# %%
configs = {'tiny': ModelConfig.from_config_dict(cli.load_config('tiny')),
           'small': ModelConfig.from_config_dict(cli.load_config('small')),
           '671B': deepseek_v3_671b()}
print(f"{'config':<7}{'layers':>7}{'hidden':>8}{'experts':>9}{'active':>7}{'total params':>20}"
      f"{'activated / token':>20}{'MTP params':>17}{'KV bytes/token':>16}")
counts = {}
for name, cfg in configs.items():
  c = plan.param_counts(cfg)
  kv = plan.kv_cache(cfg)['kv_cache_bytes_per_token']
  counts[name] = dict(c, kv=kv)
  print(f"{name:<7}{cfg.num_hidden_layers:>7}{cfg.hidden_size:>8}{cfg.n_routed_experts:>9}"
        f"{cfg.num_experts_per_tok:>7}{c['total_params']:>20,}{c['activated_params']:>20,}"
        f"{c['mtp_params']:>17,}{kv:>16,}")

# %%
# The published numbers, reproduced from the model definition (not from a formula).
big = counts['671B']
assert big['total_params'] == 671_026_404_352, big['total_params']
assert big['mtp_params'] == 11_610_067_968, big['mtp_params']
assert 37e9 <= big['activated_params'] < 38e9, big['activated_params']   # the paper's '37B'
assert big['kv'] == 70_272, big['kv']
print(f"671B: total {big['total_params']:,} (paper 671B), activated {big['activated_params'] / 1e9:.1f}B "
      f"(paper 37B), MTP {big['mtp_params']:,}, KV cache {big['kv']:,} bytes/token (BF16)")

# %% [markdown]
# ## MLA vs GQA: KV cache per token
#
# MLA caches, per layer, the 512-wide latent plus the 64-wide decoupled RoPE key: (512 + 64) × 61 layers ×
# 2 bytes = 70,272 bytes per token. GQA models keep K and V of every KV head.

# %%
print(plan.format_kv_table(plan.kv_comparison()))

# %% [markdown]
# ## A forward pass of the tiny config

# %%
cfg = configs['tiny']
variables = model.init(cfg, jax.random.key(0))
tokens = jnp.asarray(np.random.default_rng(0).integers(2, cfg.vocab_size, (B, T)), jnp.int32)
logits = model.forward(cfg, variables, tokens)
out = model.forward_train(cfg, variables, tokens)
print('logits', logits.shape, logits.dtype, '| MTP logits', out['mtp_logits'].shape,
      '| per-layer expert load', out['aux']['load'].shape)
print('loss at init:', float(-jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]),
                                                             tokens[:, 1:, None], -1))),
      f'(uniform would be ln {cfg.vocab_size} = {np.log(cfg.vocab_size):.3f})')

# %% [markdown]
# ## Router choices, layer by layer
#
# The layers are stacked with `nn.scan`, so to look inside we run the same `Block`s one at a time on slices
# of the stacked parameters, capture each MoE layer's input (the post-attention RMSNorm output) and call
# `moe.route` on it: top-k on sigmoid score + correction bias, within the best `topk_group` groups. The
# per-layer loads we count from those choices equal the `aux['load']` the model reports.

# %%
positions = jnp.broadcast_to(jnp.arange(T), (B, T))
cos, sin = rope_cos_sin(cfg, positions)
x = model.Transformer(cfg).apply(variables, tokens, method=lambda m, t: m.embed(t))
choices, weights = [], []
for stack, is_moe, n in (('dense_layers', False, cfg.num_dense_layers), ('moe_layers', True, cfg.num_moe_layers)):
  for layer in range(n):
    lv = {'params': jax.tree.map(lambda a: a[layer], variables['params'][stack])}
    if is_moe:
      lv['routing'] = jax.tree.map(lambda a: a[layer], variables['routing'][stack])
    (x, _), captured = model.Block(cfg, is_moe).apply(
        lv, x, None, cos, sin, 0, mutable=['intermediates'],
        capture_intermediates=lambda m, _: m.name == 'post_attention_layernorm')
    if is_moe:
      h = captured['intermediates']['post_attention_layernorm']['__call__'][0].reshape(-1, cfg.hidden_size)
      idx, w, _ = moe.route(cfg, h, lv['params']['mlp']['gate'], lv['routing']['mlp']['e_score_correction_bias'])
      choices.append(np.asarray(idx))
      weights.append(np.asarray(w))
print('layer-by-layer hidden == scanned forward:', float(jnp.max(jnp.abs(x - out['hidden']))) < 1e-4)
load = np.asarray(out['aux']['load'])
for l, idx in enumerate(choices):
  assert np.array_equal(np.bincount(idx.ravel(), minlength=cfg.n_routed_experts), load[l])
print('loads counted from the router choices == aux["load"] for every MoE layer')

# %%
E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
fig, axes = plt.subplots(1, 2, figsize=(13, 4))
shown = min(48, B * T)
grid = np.zeros((shown, E))
for t in range(shown):
  grid[t, choices[0][t]] = weights[0][t]
im = axes[0].imshow(grid.T, aspect='auto', cmap='viridis')
axes[0].set(xlabel='token', ylabel='routed expert',
            title=f'first MoE layer: the {k} experts each token picks (colour = gate weight)')
for g in range(1, cfg.n_group):
  axes[0].axhline(g * E // cfg.n_group - 0.5, color='white', lw=0.8)   # expert groups
fig.colorbar(im, ax=axes[0])
im = axes[1].imshow(load / load.mean(1, keepdims=True), aspect='auto', cmap='magma')
axes[1].set(xlabel='routed expert', ylabel='MoE layer', yticks=range(len(load)),
            title='expert load / mean load, per layer (at init)')
fig.colorbar(im, ax=axes[1])
plt.tight_layout()
plt.show()
vio = (load.max(1) - load.mean(1)) / load.mean(1)
print('MaxVio per MoE layer at init:', np.round(vio, 3))

# %%
fig, ax = plt.subplots(figsize=(10, 3))
width = 0.8 / len(load)
for l in range(len(load)):
  ax.bar(np.arange(E) + l * width, load[l], width, label=f'MoE layer {l}')
ax.axhline(load.mean(), color='k', ls='--', lw=1, label='mean (perfect balance)')
ax.set(xlabel='routed expert', ylabel='tokens routed', title=f'expert load per layer ({B}x{T} tokens, top-{k})')
ax.legend(fontsize=8, ncol=4)
plt.show()

# %% [markdown]
# The router at initialisation is already uneven (sigmoid scores of random projections), and training makes
# it worse without balancing; `02_load_balancing.ipynb` measures how the auxiliary loss and the
# auxiliary-loss-free bias correct it.
