"""The studies (dsv3/bench/studies/): each runs through the trainer, writes its table, numbers and plot, and its
analysis pieces are right. Shortened runs: a few steps on a small vocabulary and corpus."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dsv3 import train
from dsv3.bench.studies import balance, common, fp8, mtp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = {"batch_size": 8, "seq_len": 64, "model.vocab_size": 512, "data.max_files": 30, "eval_batches": 2}


def test_noise_floor_is_the_random_router_maxvio():
  # Each expert's load is ~ Binomial(tokens, k/E): sigma/mean = sqrt((1-p)/(tokens p)); the max of 16 is a
  # couple of sigmas above the mean, and the floor shrinks as 1/sqrt(tokens).
  small, large = balance.noise_floor(2048, 16, 4), balance.noise_floor(8192, 16, 4)
  sigma = np.sqrt(0.75 / (2048 * 0.25))
  assert 1.2 * sigma < small < 2.5 * sigma
  assert large / small == pytest.approx(0.5, abs=0.1)


def test_parse_mode_names_bad_specs():
  assert balance.parse_mode("aux_free@0.01") == ("aux_free", {"balance.mode": "aux_free", "balance.gamma": 0.01})
  assert balance.parse_mode("aux_loss@0.01")[1]["balance.aux_loss_alpha"] == 0.01
  with pytest.raises(ValueError, match="must be one of"):
    balance.parse_mode("aux_fre")
  with pytest.raises(ValueError, match="no strength"):
    balance.parse_mode("none@1")


def test_set_field_and_parse_sets():
  c = common.study_config(20, overrides={"model.vocab_size": 512, "balance.gamma": 0.01})
  assert (c.model.vocab_size, c.balance.gamma) == (512, 0.01)
  assert (c.num_train_steps, c.checkpoint_every_steps, c.ema_decay) == (20, 20, 0.0)
  with pytest.raises(KeyError, match="config.balance.gama: no such field"):
    common.set_field(c, "balance.gama", 1.0)
  assert common.parse_sets(["data.max_files=30", "data.source=/d/*.txt"]) == {"data.max_files": 30,
                                                                               "data.source": "/d/*.txt"}
  with pytest.raises(Exception, match="KEY=VALUE"):
    common.parse_sets(["data.max_files"])


def test_smooth_is_a_trailing_mean():
  np.testing.assert_allclose(common.smooth([1, 2, 3, 4], 2), [1, 1.5, 2.5, 3.5])


def test_runs_are_keyed_by_their_whole_config(tmp_path):
  # The MTP study's with-MTP run is the balance study's default aux-free run: one run serves both.
  free = common.study_config(100, evaluations=10, overrides={"balance.mode": "aux_free"})
  with_mtp = common.study_config(100, evaluations=10, overrides={"model.num_nextn_predict_layers": 1})
  fp8_run = common.study_config(100, evaluations=10, log_every=5, overrides={"precision": "fp8"})
  assert common.run_dir("o", free) == common.run_dir("o", with_mtp) != common.run_dir("o", fp8_run)
  assert common.run_dir("o", free) != common.run_dir("o", common.study_config(101, evaluations=10))


def _outputs(out, name, results, text, fig):
  paths = common.write_outputs(str(out), name, text, results, fig)
  assert json.load(open(paths["json"]))
  assert open(paths["md"]).read().startswith(text.splitlines()[0])
  assert os.path.getsize(paths["png"]) > 10_000
  return paths


@pytest.mark.slow
def test_balance_study_runs_and_reports(tmp_path, monkeypatch):
  results = balance.run(6, str(tmp_path), ("aux_loss", "aux_free@0.01"), SHORT)
  runs = results["runs"]
  assert set(runs) == {"aux_loss", "aux_free@0.01"}
  for r in runs.values():
    assert len(r["evals"]) >= 2 and r["maxvio_global"] >= 0 and np.isfinite(r["val_loss"])
  assert runs["aux_free@0.01"]["gamma"] == 0.01 and runs["aux_loss"]["alpha"] == 0.001
  text = balance.table(results) + "\n\n" + balance.verdict(results)
  assert "aux-loss-free (gamma=0.01)" in text and "noise floor" in text and "goal" in text
  _outputs(tmp_path, "balance", results, text, balance.figure(results))
  # Running again reads the finished runs back instead of training them again.
  monkeypatch.setattr(train, "train_and_evaluate", lambda *a: pytest.fail("a finished run was trained again"))
  again = balance.run(6, str(tmp_path), ("aux_loss",), SHORT)
  assert again["runs"]["aux_loss"] == runs["aux_loss"]


@pytest.mark.slow
def test_mtp_study_ablates_and_measures_acceptance(tmp_path):
  results = mtp.run(6, str(tmp_path), prompts=3, prompt_len=16, new_tokens=6, overrides=SHORT)
  with_mtp, without = results["runs"]["with MTP (D=1)"], results["runs"]["without MTP"]
  assert with_mtp["depth"] == 1 and without["depth"] == 0 and "acceptance" not in without
  acc = with_mtp["acceptance"]
  assert 0.0 <= acc["acceptance_rate"] <= 1.0 and 1.0 <= acc["tokens_per_step"] <= 2.0 and acc["prompts"] == 3
  assert all(t["mtp_loss"] is None for t in without["train"]) and all(t["mtp_loss"] > 0 for t in with_mtp["train"])
  _outputs(tmp_path, "mtp", results, mtp.table(results), mtp.figure(results))


@pytest.mark.slow
def test_fp8_study_compares_the_same_steps(tmp_path):
  results = fp8.run(6, str(tmp_path), log_every=2, window=2, overrides=SHORT)
  b, f = results["runs"]["bf16"], results["runs"]["fp8"]
  assert b["steps"] == f["steps"] == [2, 4, 6]
  assert len(results["rel_error"]) == 3 and len(results["val_rel_error"]) == len(b["eval_steps"])
  # FP8 changes the numbers, but only a little.
  assert 0 < results["summary"]["final_val_rel"] < 0.02
  _outputs(tmp_path, "fp8", results, fp8.table(results), fp8.figure(results))


def test_study_cli_bad_flag_is_one_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "dsv3.bench.studies.balance", "--modes=aux_fre", f"--out={tmp_path}",
                         "--steps=2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "must be one of" in proc.stderr and "Traceback" not in proc.stderr
  assert not os.listdir(tmp_path)      # the modes are checked before anything is written
