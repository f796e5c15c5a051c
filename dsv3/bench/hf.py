"""dsv3 against HF transformers on the same CPU, and where dsv3's step spends its time.

  python -m dsv3.bench --what=hf,profile            # both sections, tiny and the 16M config (~2 min)
  python -m dsv3.bench --what=hf --hf_configs=16m   # one config

`hf`: per-phase ms (forward, backward, optimizer), tokens/s and the ratio, and one MoE block's forward +
backward, on the same weights (dsv3.hf.save_checkpoint, then AutoModelForCausalLM.from_pretrained).
`profile`: the dsv3 step through dsv3.bench.step_profile, by op class, by phase and model part, the slowest ops.
dsv3's side is the trainer's step (dsv3.training.steps) with HF's training settings (`hf_train_config`).
torch and transformers are the test extras' heavy references, imported only here.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv3 import cli, plan
from dsv3 import hf as hf_io
from dsv3.bench import common, step_profile
from dsv3.config import ModelConfig
from dsv3.nn import moe


def hf_comparison_configs():
  """{name: (ModelConfig, batch, seq_len)} that `--what=hf` runs: the tiny config, and a 16M-parameter MoE
  (hidden 256, 4 layers with 1 dense, 16 experts top-4 in 4 groups, vocab 8192) at 8 x 256. No MTP: HF has none."""
  tiny = ModelConfig.from_config_dict(cli.load_config("tiny")).replace(num_nextn_predict_layers=0)
  m16 = tiny.replace(vocab_size=8192, hidden_size=256, intermediate_size=1024, moe_intermediate_size=256,
                     q_lora_rank=128, kv_lora_rank=64, max_position_embeddings=256)
  return {"tiny": (tiny, 8, 128), "16m": (m16, 8, 256)}


def hf_train_config():
  """The training settings both sides run: configs/tiny.py's, with torch's AdamW as the HF side sets it up
  (lr 1e-4, betas 0.9/0.95, weight decay 0.1, no clipping, float32 moments) and no load balancing (HF's
  model has neither a balance loss nor a routing bias)."""
  c = cli.load_config("tiny")
  c.learning_rate, c.b1, c.b2, c.weight_decay, c.grad_clip = 1e-4, 0.9, 0.95, 0.1, 0.0
  c.precision, c.adam_moments_dtype, c.balance.mode = "fp32", "float32", "none"
  return c


def _chosen(args) -> dict:
  """The hf_comparison_configs named by --hf_configs (default all), with an error naming the choices."""
  configs = hf_comparison_configs()
  names = [n.strip() for n in (args.hf_configs or configs) if n.strip()]
  unknown = sorted(set(names) - set(configs))
  if unknown:
    raise SystemExit(f"--hf_configs: unknown {unknown}; choose from {','.join(configs)}")
  return {n: configs[n] for n in names}


def _jax_phases(trainer, train_args, steps: int) -> dict:
  """Seconds per call of the trainer's step (`trainer`: dsv3.training.steps.Steps; train_args: its arguments) and of
  its phases, each a separately compiled program: forward (eval: logits and cross entropy), backward (grads:
  forward + backward, minus forward) and the update (update: AdamW, norms and the guard)."""
  state, tokens, mtp_weight, gamma = train_args
  params, routing = state["params"], state["routing"]
  fwd, grads, update = jax.jit(trainer.eval), jax.jit(trainer.grads), jax.jit(trainer.update)
  step = jax.jit(trainer.train)                       # not donated: every call starts from the same state
  metrics, g, loads = grads(params, routing, tokens, mtp_weight)
  t_fwd = common.timeit(lambda: jax.block_until_ready(fwd(params, routing, tokens)), steps, warmup=2)
  t_fb = common.timeit(lambda: jax.block_until_ready(grads(params, routing, tokens, mtp_weight)), steps, warmup=2)
  t_opt = common.timeit(lambda: jax.block_until_ready(update(state, metrics, g, loads, gamma)), steps, warmup=2)
  t_step = common.timeit(lambda: jax.block_until_ready(step(*train_args)), steps, warmup=2)
  return {"forward": t_fwd, "backward": t_fb - t_fwd, "optimizer": t_opt, "step": t_step}


def _torch_phases(ref, t_tokens, steps: int) -> dict:
  """The same split for HF on PyTorch (eager on CPU, so each phase is timed where it runs)."""
  import torch
  opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
  times = {"forward": [], "backward": [], "optimizer": [], "step": []}
  for i in range(steps + 2):
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    logits = ref(input_ids=t_tokens[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), t_tokens[:, 1:].reshape(-1))
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    opt.step()
    t3 = time.perf_counter()
    if i >= 2:                                   # two warm-up steps, as for JAX
      for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
        times[k].append(v)
  return {k: statistics.median(v) for k, v in times.items()}


def _moe_block_times(cfg: ModelConfig, variables, hf_block, batch: int, seq: int, steps: int):
  """(dsv3, HF) seconds of one MoE block's forward + backward (router, routed and shared experts; input and
  weight gradients) on the same weights and input."""
  import torch
  rng = np.random.default_rng(1)
  x = rng.normal(size=(batch, seq, cfg.hidden_size)).astype(np.float32)
  ct = rng.normal(size=x.shape).astype(np.float32)
  layer = lambda tree: jax.tree.map(lambda a: a[0], tree["moe_layers"]["mlp"])
  block_vars = {"params": layer(variables["params"]), "routing": layer(variables["routing"])}

  def loss(params, x):
    y, _ = moe.MoE(cfg).apply({"params": params, "routing": block_vars["routing"]}, x)
    return jnp.sum(y * ct)
  vg = jax.jit(jax.grad(loss, argnums=(0, 1)))
  jx = jnp.asarray(x)
  t_jax = common.timeit(lambda: jax.block_until_ready(vg(block_vars["params"], jx)), steps * 4, warmup=2)
  tx, tct = torch.from_numpy(x).requires_grad_(True), torch.from_numpy(ct)

  def run_torch():
    hf_block.zero_grad(set_to_none=True)
    tx.grad = None
    (hf_block(tx) * tct).sum().backward()
  return t_jax, common.timeit(run_torch, steps * 4, warmup=2)


def hf(args):
  import torch
  import transformers
  transformers.logging.set_verbosity_error()
  print(f"== dsv3 vs HF transformers {transformers.__version__} (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {common.device_line()}): fp32, forward + backward + AdamW of the "
        f"next-token loss, the same weights, median of {args.steps} steps")
  summary = []
  for name, (cfg, batch, seq) in _chosen(args).items():
    batch, seq = args.batch or batch, args.seq or seq
    cfg = cfg.replace(max_position_embeddings=max(cfg.max_position_embeddings, seq))
    config = hf_train_config()
    trainer = common.one_device_steps(config, cfg)
    train_args = common.train_args(config, trainer, common.tokens(cfg, batch, seq))
    variables = {k: train_args[0][k] for k in ("params", "routing")}     # HF loads these same weights
    tokens = train_args[1]
    n = batch * seq
    mine = _jax_phases(trainer, train_args, args.steps)
    t_tokens = torch.from_numpy(np.array(tokens)).long()
    theirs = {}
    with tempfile.TemporaryDirectory() as tmp:
      hf_io.save_checkpoint(cfg, variables, os.path.join(tmp, "ckpt"))
      # HF's default experts implementation and its per-expert loop: the comparison uses HF's faster one.
      for impl in (None, "eager"):
        kwargs = {} if impl is None else {"experts_implementation": impl}
        try:
          ref = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "ckpt"), dtype=torch.float32,
                                                                  **kwargs)
        except (TypeError, ValueError) as e:          # older transformers: no experts_implementation switch
          print(f"(HF experts_implementation={impl!r} unavailable: {e})")
          continue
        ref.train()
        used = getattr(ref.config, "_experts_implementation", None) or impl or "default"
        theirs[used] = (_torch_phases(ref, t_tokens, args.steps), ref)
    best = min(theirs, key=lambda k: theirs[k][0]["step"])
    hf_block = theirs[best][1].model.layers[cfg.first_k_dense_replace].mlp
    moe_jax, moe_torch = _moe_block_times(cfg, variables, hf_block, batch, seq, args.steps)
    rows = [["dsv3 (JAX, jit)", "-"] + [f"{mine[k] * 1e3:.1f}" for k in ("forward", "backward", "optimizer", "step")]
            + [f"{n / mine['step']:,.0f}"]]
    for used, (t, _) in theirs.items():
      rows.append(["HF (PyTorch eager)", used] + [f"{t[k] * 1e3:.1f}" for k in ("forward", "backward", "optimizer",
                                                                              "step")] + [f"{n / t['step']:,.0f}"])
    params = plan.param_counts(cfg)["total_params"]
    print(f"\n-- {name}: {params / 1e6:.1f}M params, batch {batch}x{seq}")
    print(common.fmt_table(["implementation", "HF experts", "fwd ms", "bwd ms", "opt ms", "step ms", "tokens/s"], rows))
    ratio = theirs[best][0]["step"] / mine["step"]
    print(f"dsv3 / HF tokens/s: {ratio:.2f}x (HF's faster experts implementation, {best}); one MoE block "
          f"forward + backward: dsv3 {moe_jax * 1e3:.2f} ms, HF {moe_torch * 1e3:.2f} ms, {moe_torch / moe_jax:.2f}x")
    summary.append((name, ratio, moe_torch / moe_jax))
  return summary


def profile(args):
  """dsv3's step on the hf comparison configs, profiled per op class, per phase and model part."""
  for name, (cfg, batch, seq) in _chosen(args).items():
    tokens = common.tokens(cfg, args.batch or batch, args.seq or seq)
    config = hf_train_config()
    trainer = common.one_device_steps(config, cfg)
    step = jax.jit(trainer.train)                                      # called repeatedly on the same arrays
    prof = step_profile.profile(step, *common.train_args(config, trainer, tokens), calls=args.steps)
    print(f"== profile of the dsv3 trainer's step (fwd + bwd + AdamW, main-model loss), {name}, batch "
          f"{tokens.shape[0]}x{tokens.shape[1] - 1} ({common.device_line()}): {prof.step_ms:.1f} ms per step, "
          f"{prof.op_ms:.1f} ms in traced ops")
    for key in ("kind", "phase/part"):
      print(common.fmt_table([key, "ms", "share", "in GEMMs", "GEMM GFLOP/s"], prof.table(key)))
      print()
    print(common.fmt_table(["slowest ops", "kind", "where", "ms", "GFLOP/s"], prof.top_ops(args.top)))
    print()
