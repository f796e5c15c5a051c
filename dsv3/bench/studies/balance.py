"""The load-balancing study: one tiny MoE trained with no balancing, an auxiliary loss, and the
auxiliary-loss-free bias at several gammas; MaxVio_global and MaxVio_batch over training (Wang et al. 2024;
report §2.1.2).

  python -m dsv3.bench.studies.balance --steps=1000 --out=/tmp/dsv3_studies     # the table and balance.png
  python -m dsv3.bench.studies.balance --steps=200 --modes=aux_loss,aux_free@0.01

Every run is configs/tiny.py through the trainer with the same seed, data and schedule; only `balance.mode`
(and, with MODE@X, its strength: gamma for aux_free, alpha for aux_loss) differs. MaxVio = (max_i load_i -
mean load) / mean load per MoE layer, averaged over layers: _global over the whole validation sample of an
evaluation, _batch over one training batch. The noise floor is the MaxVio that a router picking k of E
experts uniformly at random would show on the same number of tokens: no balancer can beat it on average.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
from absl import app, flags
from matplotlib.figure import Figure   # no pyplot: any backend, notebook or headless

from dsv3.bench.studies import common

MODES = ("none", "aux_loss", "aux_free@0.0001", "aux_free", "aux_free@0.01")
_KINDS = ("none", "aux_loss", "aux_free")
# Wang et al. 2024 ("Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts"), 1B MoE.
REFERENCE = {"aux_loss": 0.72, "aux_free": 0.04}
LATE = 0.2        # "late in the run": the last 20% of the logged steps


def parse_mode(spec: str) -> tuple[str, dict]:
  """'aux_free' -> ('aux_free', {'balance.mode': 'aux_free'}); 'aux_free@0.01' also sets balance.gamma."""
  mode, _, strength = spec.partition("@")
  if mode not in _KINDS:
    raise ValueError(f"mode {spec!r}: must be one of {_KINDS}, optionally with '@STRENGTH' (e.g. aux_free@0.01)")
  overrides = {"balance.mode": mode}
  if strength:
    if mode == "none":
      raise ValueError(f"mode {spec!r}: 'none' has no strength to set")
    overrides["balance.gamma" if mode == "aux_free" else "balance.aux_loss_alpha"] = float(strength)
  return mode, overrides


def noise_floor(tokens: int, experts: int, k: int, draws: int = 200, seed: int = 0) -> float:
  """Mean MaxVio of `tokens` tokens each routed to k distinct experts of `experts` uniformly at random."""
  rng = np.random.default_rng(seed)
  vios = []
  for _ in range(draws):
    # k distinct experts per token: the first k of a random permutation, drawn as argsort of noise.
    picks = np.argpartition(rng.random((tokens, experts), np.float32), k - 1, axis=1)[:, :k]
    load = np.bincount(picks.ravel(), minlength=experts)
    vios.append((load.max() - load.mean()) / load.mean())
  return float(np.mean(vios))


def run(steps: int, out: str, modes: Iterable[str] = MODES, overrides: dict | None = None) -> dict:
  """Trains one run per mode under out/runs/ and returns {'steps', 'floors', 'runs': {spec: summary}}."""
  modes = list(modes)
  parsed = {spec: parse_mode(spec)[1] for spec in modes}    # every spec checked before any run starts
  runs, config = {}, None
  for spec, mode_overrides in parsed.items():
    config = common.study_config(steps, evaluations=10, overrides={**mode_overrides, **(overrides or {})})
    r = common.train_run(config, out)
    batch_vio = [row["maxvio_batch_mean"] for row in r["train"]]
    late = batch_vio[-max(1, int(len(batch_vio) * LATE)):]
    runs[spec] = dict(
        mode=spec.partition("@")[0], gamma=float(config.balance.gamma),
        alpha=float(config.balance.aux_loss_alpha) if spec.startswith("aux_loss") else None,
        val_loss=r["last"]["val_loss"], val_perplexity=r["last"]["val_perplexity"],
        maxvio_global=r["last"]["maxvio_global_mean"], maxvio_global_max=r["last"]["maxvio_global_max"],
        maxvio_batch_late=float(np.mean(late)), maxvio_batch_late_std=float(np.std(late)),
        evals=[dict(step=e["step"], val_loss=e["val_loss"], maxvio_global=e["maxvio_global_mean"])
               for e in r["evals"]],
        train=[dict(step=t["step"], ce=t["ce"], maxvio_batch=t["maxvio_batch_mean"]) for t in r["train"]])
  m = config.model
  batch_tokens = config.batch_size * config.seq_len
  floors = {"batch": noise_floor(batch_tokens, m.n_routed_experts, m.num_experts_per_tok),
            "global": noise_floor(batch_tokens * config.eval_batches, m.n_routed_experts, m.num_experts_per_tok,
                                  draws=20)}
  return {"steps": steps, "floors": floors, "batch_tokens": batch_tokens,
          "eval_tokens": batch_tokens * config.eval_batches, "runs": runs}


def describe(spec: str, r: dict) -> str:
  if r["mode"] == "none":
    return "no balancing"
  if r["mode"] == "aux_loss":
    return f"aux loss (alpha={r['alpha']:g})"
  return f"aux-loss-free (gamma={r['gamma']:g})"


def table(results: dict) -> str:
  """The markdown table: one row per run, the paper's figure where it gives one, the noise floors."""
  lines = [f"tiny MoE (configs/tiny.py), {results['steps']} steps per run; MaxVio averaged over the MoE layers",
           "",
           "| balancing | val loss | MaxVio_global (val) | MaxVio_batch, last 20% (mean ± std) | paper MaxVio_global |",
           "|---|---|---|---|---|"]
  for spec, r in results["runs"].items():
    ref = REFERENCE.get(r["mode"])
    lines.append(f"| {describe(spec, r)} | {r['val_loss']:.4f} | {r['maxvio_global']:.3f} | "
                 f"{r['maxvio_batch_late']:.3f} ± {r['maxvio_batch_late_std']:.3f} | "
                 f"{'-' if ref is None else f'{ref:.2f}'} |")
  f = results["floors"]
  lines.append(f"| noise floor (uniform random top-k) | - | {f['global']:.3f} ({results['eval_tokens']} tokens) | "
               f"{f['batch']:.3f} ({results['batch_tokens']} tokens) | - |")
  return "\n".join(lines)


def verdict(results: dict) -> str:
  """Against the goal (aux-free MaxVio_global <= 1/5 of the aux loss's at equal or better validation loss)."""
  runs = results["runs"]
  aux = next((r for s, r in runs.items() if r["mode"] == "aux_loss"), None)
  free = {s: r for s, r in runs.items() if r["mode"] == "aux_free"}
  if aux is None or not free:
    return "need an aux_loss and an aux_free run to compare"
  out = []
  for spec, r in free.items():
    ratio = aux["maxvio_global"] / max(r["maxvio_global"], 1e-9)
    dloss = r["val_loss"] - aux["val_loss"]
    ok = ratio >= 5 and dloss <= 0
    out.append(f"{describe(spec, r)}: MaxVio_global {r['maxvio_global']:.3f} vs aux loss {aux['maxvio_global']:.3f} "
               f"({ratio:.2f}x lower; goal >= 5x, paper 18x), val loss {dloss:+.4f} -> "
               f"{'goal met' if ok else 'goal not met'}")
  return "\n".join(out)


def figure(results: dict):
  fig = Figure(figsize=(17, 4.4))
  axes = fig.subplots(1, 3)
  for spec, r in results["runs"].items():
    label, style = describe(spec, r), {"none": ":", "aux_loss": "--"}.get(r["mode"], "-")
    es = [e["step"] for e in r["evals"]]
    axes[0].plot(es, [e["val_loss"] for e in r["evals"]], style, marker="o", ms=3, label=label)
    axes[1].plot(es, [e["maxvio_global"] for e in r["evals"]], style, marker="o", ms=3, label=label)
    ts = [t["step"] for t in r["train"]]
    axes[2].plot(ts, common.smooth([t["maxvio_batch"] for t in r["train"]], 5), style, label=label)
  axes[0].set(xlabel="step", ylabel="validation CE", title="validation loss")
  axes[0].set_ylim(top=min(axes[0].get_ylim()[1], 6.0))
  axes[1].set(xlabel="step", ylabel="MaxVio_global", title="MaxVio_global (validation sample)", yscale="log")
  axes[2].set(xlabel="step", ylabel="MaxVio_batch (moving mean of 5 logs)", title="MaxVio per training batch",
              yscale="log")
  for ax, floor in ((axes[1], results["floors"]["global"]), (axes[2], results["floors"]["batch"])):
    ax.axhline(floor, color="k", lw=0.8, ls="-.", label="noise floor (random top-k)")
  for ref, name in ((REFERENCE["aux_loss"], "paper: aux loss"), (REFERENCE["aux_free"], "paper: loss-free")):
    axes[1].axhline(ref, color="grey", lw=0.8, ls=":")
    axes[1].text(0, ref, " " + name, fontsize=7, va="bottom", color="grey")
  for ax in axes:
    ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def _study(f, overrides):
  modes = [m for m in f.modes if m]
  try:
    for m in modes:
      parse_mode(m)
  except ValueError as e:
    raise app.UsageError(f"--modes: {e}") from None
  results = run(f.steps, f.out, modes, overrides)
  return results, table(results) + "\n\n" + verdict(results), figure(results)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The study's flags, defined only by `python -m dsv3.bench.studies.balance`."""
  common.define_flags("balance", flag_values)
  flags.DEFINE_list("modes", list(MODES), "Runs: none, aux_loss, aux_free, each optionally MODE@STRENGTH.",
                    flag_values=flag_values)


if __name__ == "__main__":
  define_flags()
  common.main("balance", _study)
