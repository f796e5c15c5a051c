"""Whether a run may resume from a checkpoint written under another config, and what changed.

The trainer saves its config flat ({'model.hidden_size': 64}) in each checkpoint's extras; on resume
`check_compatible` refuses a change to any field that shapes the state, and lists the allowed changes.
"""
from __future__ import annotations

import fnmatch
import json
from typing import Any, Iterable, Mapping

# Config fields that may change between a run and its resumption: schedule lengths, the global batch (the
# data iterator continues at the first example not yet read, dsv3.data.TrainIterator), logging cadence,
# paths, the mesh (checkpoints are topology-free), the pipeline schedule (a pipelined step computes the
# unpipelined step's gradients), the optimizer's hyper-parameters and learning-rate schedule, loss
# weights, evaluation, and the run guards. Shell-style patterns over dotted names; `check_compatible`
# reports those that did change.
DEFAULT_IGNORE = ("num_train_steps", "batch_size", "log_every_steps", "checkpoint_every_steps", "eval_every_steps",
                  "eval_batches", "data.eval_batches", "keep_checkpoints", "workdir", "*workdir*",
                  "mesh.*", "pipeline.*",
                  "learning_rate", "min_lr_ratio", "lr_schedule", "warmup_steps", "decay_start_frac",
                  "decay_end_frac", "grad_clip", "weight_decay", "b1", "b2", "mtp_weight*", "balance.gamma*",
                  "nan_guard.*", "profile.*", "keep_best_by", "keep_best", "model.scan_layers",
                  "data.vocab_size")   # retired: model.vocab_size (compared) sizes the trained BPE now


def flatten_config(config: Any, prefix: str = "") -> dict:
  """A (nested) dict or ml_collections ConfigDict as a flat {'a.b.c': value} dict of JSON values."""
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  flat = {}
  for k, v in config.items():
    name = f"{prefix}{k}"
    if hasattr(v, "to_dict") or isinstance(v, Mapping):
      flat.update(flatten_config(v, name + "."))
    else:
      flat[name] = _json_value(v)
  return flat


def _json_value(v: Any) -> Any:
  """The value as it reads back from JSON (tuples become lists), so saved and live configs compare."""
  try:
    return json.loads(json.dumps(v))
  except TypeError:
    return str(v)


_MISSING = object()  # a field present in one config only


def check_compatible(saved_config: Mapping[str, Any], new_config: Mapping[str, Any],
                     ignore: Iterable[str] = DEFAULT_IGNORE) -> list:
  """Raises ValueError naming every field (other than `ignore` patterns) that differs; else returns the
  [(name, saved value, new value)] of the allowed fields that did change (None for a field that one
  config lacks), for the resume log line (`format_changes`).

  Both configs may be flat ({'model.hidden_size': 64}) or nested; they are flattened first.
  """
  saved, new = flatten_config(saved_config), flatten_config(new_config)
  ignore = tuple(ignore)
  diffs, changes = [], []
  for name in sorted(set(saved) | set(new)):
    a, b = saved.get(name, _MISSING), new.get(name, _MISSING)
    if a == b:
      continue
    if any(fnmatch.fnmatchcase(name, pat) for pat in ignore):
      changes.append((name, None if a is _MISSING else a, None if b is _MISSING else b))
    else:
      diffs.append((name, a, b))
  if diffs:
    show = lambda v: "no value" if v is _MISSING else repr(v)
    lines = "\n".join(f"  {n}: checkpoint has {show(a)}, current config has {show(b)}"
                      for n, a, b in diffs)
    fixes = " ".join(f"--config.{n}={a}" for n, a, _ in diffs if a is not _MISSING)
    raise ValueError(
        f"The checkpoint was written with a different config in {len(diffs)} field(s) that cannot "
        f"change on resume:\n{lines}\nFix: restore the saved value(s)"
        + (f" (e.g. {fixes})" if fixes else "")
        + ", or start a fresh run with a new --workdir.")
  return changes


def format_changes(changes: Iterable) -> str:
  """'learning_rate 1e-06 -> 0.001, warmup_steps 20 -> 0' for `check_compatible`'s result."""
  return ", ".join(f"{name} {old!r} -> {new!r}" for name, old, new in changes)
