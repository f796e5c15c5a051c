"""The MTP ablation (report §2.2, Table 4): the same tiny model trained with and without one multi-token
prediction module, on the same data and steps; then the trained MTP module drafts for self-speculative decoding.

  python -m dsv3.bench.studies.mtp --steps=1000 --out=/tmp/dsv3_studies

MTP only adds a training signal: both runs' main models have the same size and inference cost, and both are
scored on the main model's next-token cross-entropy over the same validation sample. Acceptance is measured
on prompts cut from validation windows (never trained on): greedy decoding of `--new_tokens` tokens drafted
by the MTP module and verified by the main model (`generate.speculative_generate`, exactly greedy).
"""
from __future__ import annotations

import itertools

import numpy as np
from absl import flags
from matplotlib.figure import Figure   # no pyplot: any backend, notebook or headless

from dsv3 import convert, generate
from dsv3 import data as data_lib

from dsv3.bench.studies import common

REFERENCE_ACCEPTANCE = (0.85, 0.90)     # report §5.4.3: the second token's acceptance, 671B


def acceptance(workdir: str, config, prompts: int, prompt_len: int, new_tokens: int) -> dict:
  """Self-speculative decoding with the trained MTP module on validation prompts: mean acceptance rate and
  tokens per verify step over `prompts` prompts of `prompt_len` tokens."""
  cfg = convert.config_of(workdir)
  variables = convert.load_orbax_variables(workdir)
  batches = data_lib.make_datasets(config).eval_batches()
  windows = np.concatenate(list(itertools.islice(batches, max(1, -(-prompts // config.batch_size)))))[:prompts]
  rates, per_step = [], []
  for w in windows:
    ids, stats = generate.speculative_generate(cfg, variables, w[:prompt_len], max_new_tokens=new_tokens)
    rates.append(stats["acceptance_rate"])
    per_step.append(stats["tokens_per_step"])
  return {"acceptance_rate": float(np.mean(rates)), "acceptance_std": float(np.std(rates)),
          "tokens_per_step": float(np.mean(per_step)), "prompts": len(rates), "prompt_len": prompt_len,
          "new_tokens": new_tokens}


def run(steps: int, out: str, prompts: int = 32, prompt_len: int = 64, new_tokens: int = 32,
        overrides: dict | None = None) -> dict:
  """Trains the with-MTP and without-MTP runs under out/runs/ and measures the draft acceptance."""
  results, config = {"steps": steps, "runs": {}}, None
  for name, depth in (("with MTP (D=1)", 1), ("without MTP", 0)):
    config = common.study_config(steps, evaluations=10,
                                 overrides={"model.num_nextn_predict_layers": depth, **(overrides or {})})
    r = common.train_run(config, out)
    workdir = r["workdir"]
    summary = dict(depth=depth, val_loss=r["last"]["val_loss"], val_perplexity=r["last"]["val_perplexity"],
                   evals=[dict(step=e["step"], val_loss=e["val_loss"]) for e in r["evals"]],
                   train=[dict(step=t["step"], ce=t["ce"], mtp_loss=t.get("mtp_loss")) for t in r["train"]])
    if depth:
      summary["acceptance"] = acceptance(workdir, config, prompts, prompt_len, new_tokens)
    results["runs"][name] = summary
  return results


def table(results: dict) -> str:
  runs = results["runs"]
  with_mtp, without = runs["with MTP (D=1)"], runs["without MTP"]
  acc = with_mtp["acceptance"]
  lines = [f"tiny (configs/tiny.py), {results['steps']} steps per run, main-model validation CE",
           "",
           "| run | main-model val loss | val perplexity | MTP draft acceptance | tokens / verify step |",
           "|---|---|---|---|---|"]
  for name, r in runs.items():
    a = r.get("acceptance")
    rate = "-" if a is None else f"{a['acceptance_rate']:.3f} ± {a['acceptance_std']:.3f}"
    per_step = "-" if a is None else f"{a['tokens_per_step']:.2f}"
    lines.append(f"| {name} | {r['val_loss']:.4f} | {r['val_perplexity']:.2f} | {rate} | {per_step} |")
  delta = with_mtp["val_loss"] - without["val_loss"]
  lines += ["", f"MTP changes the main model's validation loss by {delta:+.4f} "
                f"({'better' if delta < 0 else 'worse'} with MTP); acceptance over {acc['prompts']} validation "
                f"prompts of {acc['prompt_len']} tokens, {acc['new_tokens']} new tokens each "
                f"(report, 671B: {REFERENCE_ACCEPTANCE[0]:.0%}-{REFERENCE_ACCEPTANCE[1]:.0%})."]
  return "\n".join(lines)


def figure(results: dict):
  fig = Figure(figsize=(12, 4.2))
  axes = fig.subplots(1, 2)
  for name, r in results["runs"].items():
    axes[0].plot([e["step"] for e in r["evals"]], [e["val_loss"] for e in r["evals"]], marker="o", ms=3, label=name)
    ts = [t["step"] for t in r["train"]]
    axes[1].plot(ts, common.smooth([t["ce"] for t in r["train"]], 5), label=f"{name}: main CE")
    if r["depth"]:
      axes[1].plot(ts, common.smooth([t["mtp_loss"] for t in r["train"]], 5), "--", label=f"{name}: MTP CE")
  axes[0].set(xlabel="step", ylabel="main-model validation CE", title="validation loss (same data, same steps)")
  axes[0].set_ylim(top=min(axes[0].get_ylim()[1], 6.0))
  axes[1].set(xlabel="step", ylabel="training CE (moving mean of 5 logs)", title="training losses")
  axes[1].set_ylim(top=min(axes[1].get_ylim()[1], 6.0))
  for ax in axes:
    ax.legend(fontsize=8)
  fig.tight_layout()
  return fig


def _study(f, overrides):
  results = run(f.steps, f.out, f.prompts, f.prompt_len, f.new_tokens, overrides)
  return results, table(results), figure(results)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The study's flags, defined only by `python -m dsv3.bench.studies.mtp`."""
  fv = dict(flag_values=flag_values)
  common.define_flags("mtp", flag_values)
  flags.DEFINE_integer("prompts", 32, "Validation prompts for the acceptance measurement.", **fv)
  flags.DEFINE_integer("prompt_len", 64, "Tokens per prompt.", **fv)
  flags.DEFINE_integer("new_tokens", 32, "Tokens generated per prompt.", **fv)


if __name__ == "__main__":
  define_flags()
  common.main("mtp", _study)
