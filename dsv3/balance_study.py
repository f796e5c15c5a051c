"""The load-balancing ablation: one tiny MoE trained with no balancing, an auxiliary loss, and the
auxiliary-loss-free bias, compared on validation loss and MaxVio_global (Wang et al. 2024; report §2.1.2).

  python -m dsv3.balance_study --steps 200                       # the load-balancing table
  python -m dsv3.balance_study --steps 200 --modes none,aux_loss,aux_free,aux_free@0.01

Every run is `dsv3.train.train_and_evaluate` on configs/tiny.py with the same seed, data and schedule; only
`balance.mode` (and, for a labelled variant, its strength) differs. Modes:
  none          no balancing term at all (alpha = 0, the bias never moves)
  aux_loss      the sequence-wise balance loss with alpha = balance.aux_loss_alpha (0.001, the paper's baseline)
  aux_free      the correction bias, bias_i += gamma * sign(mean load - load_i) from the global-batch load,
                gamma = balance.gamma (0.001, the paper's default) plus the complementary alpha = 1e-4 loss
  MODE@X        the same mode with gamma (aux_free) or alpha (aux_loss) set to X, e.g. 'aux_free@0.01':
                a tiny run lasts a few hundred steps, and with gamma = 0.001 the bias moves at most
                0.001 * steps, too little to matter against sigmoid scores spread over ~0.1; a faster gamma
                shows where the method goes, and is labelled as such.

MaxVio_global = (max_i load_i - mean load) / mean load, with the loads counted over all validation batches of
an evaluation, per MoE layer; `maxvio_global` is its mean over layers (`maxvio_global_max` the worst layer).
Reference (Wang et al. 2024, 1B MoE): aux loss 0.72 vs loss-free 0.04 MaxVio_global, at equal or better
perplexity.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Iterable, Optional

MODES = ("none", "aux_loss", "aux_free")
# Wang et al. 2024 ("Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts"), 1B MoE, Table 2.
REFERENCE = {"aux_loss": {"maxvio_global": 0.72}, "aux_free": {"maxvio_global": 0.04}}


def tiny_config():
  """configs/tiny.py, importable whether or not configs/ is on sys.path."""
  import importlib.util
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")
  spec = importlib.util.spec_from_file_location("dsv3_tiny_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _set(config, key: str, value) -> None:
  """config['a.b.c'] = value; '__' works as '.' so that keyword arguments can name nested fields."""
  *parents, leaf = key.replace("__", ".").split(".")
  node = config
  for p in parents:
    node = node[p]
  if leaf not in node:
    raise KeyError(f"config.{key.replace('__', '.')}: no such field")
  node[leaf] = value


def parse_mode(spec: str) -> tuple[str, dict]:
  """'aux_free' -> ('aux_free', {}); 'aux_free@0.01' -> ('aux_free', {'balance.gamma': 0.01})."""
  mode, _, strength = spec.partition("@")
  if mode not in MODES:
    raise ValueError(f"mode {spec!r}: must be one of {MODES}, optionally with '@STRENGTH' (e.g. aux_free@0.01)")
  overrides = {"balance.mode": mode}
  if strength:
    if mode == "none":
      raise ValueError(f"mode {spec!r}: 'none' has no strength to set")
    overrides["balance.gamma" if mode == "aux_free" else "balance.aux_loss_alpha"] = float(strength)
  return mode, overrides


def study_config(steps: int, mode_spec: str, **overrides):
  """The tiny config for one run of the study: 1x1x1 mesh unless overridden, evaluations along the way."""
  import jax
  c = tiny_config()
  c.num_train_steps = int(steps)
  c.warmup_steps = max(1, min(c.warmup_steps, steps // 10))
  c.eval_every_steps = max(1, steps // 8)
  c.log_every_steps = max(1, min(c.log_every_steps, steps // 20))
  c.checkpoint_every_steps = int(steps)        # one checkpoint, at the end
  c.ema_decay = 0.0                            # the study compares raw parameters; the EMA would double eval
  # The mesh must use every device; a notebook or the CLI normally has one.
  c.mesh.data = jax.device_count()
  _, mode_overrides = parse_mode(mode_spec)
  for key, value in {**mode_overrides, **overrides}.items():
    _set(c, key, value)
  if "model.vocab_size" in overrides or "model__vocab_size" in overrides:
    c.data.vocab_size = c.model.vocab_size
  return c


def _read_metrics(workdir: str) -> list:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def run_study(steps: int, workdir_root: str, modes: Iterable[str] = MODES, fresh: bool = True,
              **overrides) -> dict:
  """Trains one tiny MoE per mode and returns {mode: {'val_loss', 'maxvio_global', 'curve', ...}}.

  steps: training steps per run. workdir_root/<mode> holds each run (cleared first when `fresh`, so that a
  changed setting never resumes an old run). overrides: config fields for every run, as keyword arguments
  with '__' for '.' (data__max_files=30) or as **{'data.max_files': 30}.
  Each result: val_loss, val_perplexity, maxvio_global (mean over MoE layers), maxvio_global_max (worst
  layer), train_loss (last logged), curve (one dict per evaluation: step, val_loss, maxvio_global,
  maxvio_global_max) and train_curve (one dict per logged step: step, loss, ce, maxvio_batch).
  """
  from dsv3 import train
  results = {}
  for spec in modes:
    workdir = os.path.join(workdir_root, spec.replace("@", "_"))
    if fresh:
      shutil.rmtree(workdir, ignore_errors=True)
    config = study_config(steps, spec, **overrides)
    last = train.train_and_evaluate(config, workdir)
    rows = _read_metrics(workdir)
    curve = [dict(step=r["step"], val_loss=r["val_loss"], maxvio_global=r.get("maxvio_global_mean"),
                  maxvio_global_max=r.get("maxvio_global_max")) for r in rows if "val_loss" in r]
    train_curve = [dict(step=r["step"], loss=r["loss"], ce=r.get("ce"), maxvio_batch=r.get("maxvio_batch_mean"))
                   for r in rows if "loss" in r]
    results[spec] = dict(val_loss=last["val_loss"], val_perplexity=last["val_perplexity"],
                         maxvio_global=last.get("maxvio_global_mean"), maxvio_global_max=last.get("maxvio_global_max"),
                         train_loss=last.get("loss"), curve=curve, train_curve=train_curve,
                         gamma=float(config.balance.gamma), aux_loss_alpha=float(config.balance.aux_loss_alpha))
  return results


def describe(spec: str, result: Optional[dict] = None) -> str:
  """A human label: 'aux-loss-free (gamma=0.001)' etc."""
  mode, _ = parse_mode(spec)
  if mode == "none":
    return "no balancing"
  if mode == "aux_loss":
    alpha = result["aux_loss_alpha"] if result else float(spec.partition("@")[2] or 0.001)
    return f"aux loss (alpha={alpha:g})"
  gamma = result["gamma"] if result else float(spec.partition("@")[2] or 0.001)
  return f"aux-loss-free (gamma={gamma:g})" + (" [faster gamma]" if "@" in spec else "")


def format_table(results: dict) -> str:
  """The load-balancing table: one row per mode, with the reference MaxVio where the paper gives one."""
  lines = [f"{'balancing':<44}{'val loss':>10}{'val ppl':>10}{'MaxVio_global':>15}{'(worst layer)':>15}"
           f"{'paper MaxVio':>14}"]
  for spec, r in results.items():
    mode, _ = parse_mode(spec)
    ref = REFERENCE.get(mode, {}).get("maxvio_global")
    lines.append(f"{describe(spec, r):<44}{r['val_loss']:>10.4f}{r['val_perplexity']:>10.2f}"
                 f"{r['maxvio_global']:>15.3f}{r['maxvio_global_max']:>15.3f}"
                 f"{(f'{ref:.2f}' if ref is not None else '-'):>14}")
  return "\n".join(lines)


def verdict(results: dict) -> str:
  """Whether the run reproduces the paper's direction (loss-free balances better than the aux loss at equal
  or better validation loss), and by how much."""
  aux = next((r for s, r in results.items() if s == "aux_loss"), None)
  free = [(s, r) for s, r in results.items() if parse_mode(s)[0] == "aux_free"]
  if aux is None or not free:
    return "need both an aux_loss and an aux_free run to compare"
  out = []
  for spec, r in free:
    ratio = aux["maxvio_global"] / max(r["maxvio_global"], 1e-9)
    dloss = r["val_loss"] - aux["val_loss"]
    same_direction = r["maxvio_global"] < aux["maxvio_global"] and dloss <= 0.01
    out.append(f"{describe(spec, r)}: MaxVio_global {r['maxvio_global']:.3f} vs aux loss {aux['maxvio_global']:.3f} "
               f"({ratio:.2f}x lower; paper 0.72/0.04 = 18x), val loss {dloss:+.4f} vs aux loss -> "
               f"{'same direction as the paper' if same_direction else 'does NOT reproduce the paper here'}")
  return "\n".join(out)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, e.g. none,aux_loss,aux_free@0.01")
  parser.add_argument("--workdir", default="/tmp/dsv3_balance_study")
  parser.add_argument("--json", action="store_true", help="also print the results (curves included) as JSON")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override for every run, e.g. --set data.max_files=60 (repeatable)")
  args = parser.parse_args(argv)
  overrides = {}
  for item in args.set:
    key, _, value = item.partition("=")
    try:
      overrides[key] = json.loads(value)
    except json.JSONDecodeError:
      overrides[key] = value                   # a bare string, e.g. --set data.source=/data/*.txt
  results = run_study(args.steps, args.workdir, [m for m in args.modes.split(",") if m], **overrides)
  print(f"tiny MoE (configs/tiny.py), {args.steps} steps per run")
  print(format_table(results))
  print(verdict(results))
  if args.json:
    print(json.dumps(results))


if __name__ == "__main__":
  sys.exit(main())
