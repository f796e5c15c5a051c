"""Tests of offline data preparation (`python -m dsv3.data prepare`, dsv3.data.prepare) and of training from it.

The corpus is the stdlib (a few dozen files), the tokenizer a small BPE trained once per session in a temp
cache (DSV3_CACHE). The prepared streams must give exactly the batches the raw source gives; a run killed
with SIGKILL and run again must write the same bytes as an uninterrupted run; bad inputs fail with one line
naming the flag or field, and leave every directory as it was.
"""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest

from dsv3 import data
from dsv3.data import corpus, prepare, tokenizer
from disk import snapshot

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
  """A 512-entry BPE trained on a little stdlib text, in a per-module cache that subprocesses see too."""
  cache = tmp_path_factory.mktemp("dsv3_cache")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("DSV3_CACHE", str(cache))
    mp.setattr(corpus, "_BPE_CHARS", 300_000)
    cfg = ml_collections.ConfigDict(dict(tokenizer="", validation_fraction=0.02, cache_dir=""))
    yield corpus.load_tokenizer(cfg, vocab_size=512).path


def _config(source, seed=3, seq_len=64, eval_batches=16, **data_kw):
  d = data.default_data_config()
  d.update({"source": str(source), **data_kw})
  return ml_collections.ConfigDict(dict(seq_len=seq_len, batch_size=4, seed=seed, eval_batches=eval_batches, data=d))


def _cli(*args, **kw):
  return subprocess.run([sys.executable, "-m", "dsv3.data", "prepare", "--noprogress", *args], cwd=ROOT,
                        capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tok_path):
  """40 stdlib files with 2 workers, a fifth of the documents held out by name."""
  out = tmp_path_factory.mktemp("prepared") / "stdlib40"
  manifest = prepare.prepare("", tok_path, str(out), workers=2, chunk_files=8, validation_fraction=0.2,
                             max_files=40, progress=False)
  return out, manifest


# ------------------------------------------------------------------------------------------------
def test_manifest(prepared, tok_path):
  out, manifest = prepared
  assert json.loads((out / "manifest.json").read_text()) == manifest
  assert manifest["format"] == "dsv3.prepared" and manifest["format_version"] == 1
  assert manifest["files"] == 40 and manifest["max_files"] == 40 and len(manifest["chunks"]) == 5
  assert manifest["source"] == "stdlib" and manifest["source_fingerprint"] == corpus.stdlib_corpus(40).fingerprint
  tok = tokenizer.load(tok_path)
  assert manifest["tokenizer"] == {"path": tok_path, "fingerprint": tok.fingerprint, "file": "tokenizer.json",
                                   "bos_id": 0, "eos_id": 1}
  assert manifest["vocab_size"] == 512 and manifest["dtype"] == "uint16" and manifest["split"] == "name_hash"
  assert manifest["documents"]["train"] > manifest["documents"]["validation"] > 0
  assert manifest["tokens"]["train"] == sum(c["train_tokens"] for c in manifest["chunks"])
  for c in manifest["chunks"]:
    assert np.load(out / c["train"]).shape == (c["train_tokens"],)


def test_prepared_batches_equal_raw_batches(prepared, tok_path):
  out, _ = prepared
  raw = data.make_datasets(_config("stdlib", tokenizer=tok_path, max_files=40, validation_fraction=0.2), 0, 1)
  prep = data.make_datasets(_config(out, validation_fraction=0.2), 0, 1)
  assert (prep.train_tokens, prep.val_tokens) == (raw.train_tokens, raw.val_tokens)
  assert prep.train.get_state() == raw.train.get_state()          # same fingerprint: checkpoints carry over
  assert prep.tokenizer.fingerprint == raw.tokenizer.fingerprint
  for _ in range(30):
    np.testing.assert_array_equal(next(prep.train), next(raw.train))
  evals = list(zip(raw.eval_batches(), prep.eval_batches()))
  assert len(evals) == raw.num_eval_batches == prep.num_eval_batches > 0
  for x, y in evals:
    np.testing.assert_array_equal(x, y)
  prep.check_vocab(512)
  # Process shards as from the raw source.
  np.testing.assert_array_equal(next(data.make_datasets(_config(out, validation_fraction=0.2), 1, 2).train),
                                next(data.make_datasets(_config("stdlib", tokenizer=tok_path, max_files=40,
                                                                validation_fraction=0.2), 1, 2).train))


def test_tail_split_and_one_worker(tmp_path, tok_path):
  # 6 documents at 2%: none is held out by name, so the stream's tail is, as from raw text.
  m = prepare.prepare("", tok_path, str(tmp_path / "p"), workers=1, chunk_files=2, max_files=6, progress=False,
                      validation_fraction=0.02)
  assert m["split"] == "tail" and m["tokens"]["validation"] > 0
  raw = data.make_datasets(_config("stdlib", seq_len=16, tokenizer=tok_path, max_files=6, eval_batches=0,
                                   validation_fraction=0.02), 0, 1)
  prep = data.make_datasets(_config(tmp_path / "p", seq_len=16, max_files=6, eval_batches=0,
                                    validation_fraction=0.02), 0, 1)
  assert (prep.train_tokens, prep.val_tokens) == (raw.train_tokens, raw.val_tokens)
  for _ in range(5):
    np.testing.assert_array_equal(next(prep.train), next(raw.train))
  for x, y in zip(raw.eval_batches(), prep.eval_batches()):
    np.testing.assert_array_equal(x, y)


def test_kill_resume_is_byte_identical_and_up_to_date(tmp_path, tok_path):
  args = dict(workers=1, chunk_files=3, max_files=90)
  ref = tmp_path / "ref"
  prepare.prepare("", tok_path, str(ref), progress=False, **args)     # uninterrupted, in this process
  out = tmp_path / "out"
  env = dict(os.environ, DSV3_CACHE=str(pathlib.Path(tok_path).parent))
  proc = subprocess.Popen([sys.executable, "-m", "dsv3.data", "prepare", "--noprogress", f"--tokenizer={tok_path}",
                           f"--out={out}", "--workers=2", "--chunk_files=3", "--max_files=90"], cwd=ROOT, env=env,
                          start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  while len(list((out / "chunks").glob("*.json"))) < 2 and time.time() < deadline and proc.poll() is None:
    time.sleep(0.002)
  os.killpg(proc.pid, signal.SIGKILL)        # the CLI and its pool workers: the session started above
  proc.wait()
  done = {p.name: p.stat().st_mtime_ns for p in (out / "chunks").glob("*.json")}
  assert not (out / "manifest.json").exists() and 2 <= len(done) < 30, "the run was not interrupted mid-way"
  with pytest.raises(ValueError, match=r"data.source: .* is an unfinished preparation"):
    data.make_datasets(_config(out), 0, 1)
  prepare.prepare("", tok_path, str(out), workers=2, progress=False, chunk_files=3, max_files=90)
  assert snapshot(out) == snapshot(ref)                               # byte for byte, nothing left over
  assert {n: (out / "chunks" / n).stat().st_mtime_ns for n in done} == done   # finished chunks kept
  # A finished --out is reused as it is.
  before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
  r = _cli(f"--tokenizer={tok_path}", f"--out={out}", "--workers=2", "--chunk_files=3", "--max_files=90", env=env)
  assert r.returncode == 0 and "is up to date" in r.stdout, r.stderr
  assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


# ------------------------------------------------------------------------------------------------
# Bad inputs: one line naming the flag / field and the fix; no directory changes.

def _fails(match, out, **kw):
  before = snapshot(out) if out else None
  with pytest.raises(ValueError, match=match):
    prepare.prepare(**{"progress": False, "max_files": 4, "out": str(out), **kw})
  assert (snapshot(out) if out else None) == before


def test_bad_inputs(tmp_path, tok_path, prepared):
  out = tmp_path / "out"
  _fails(r"--source: .*nope' does not exist", out, source=str(tmp_path / "nope"), tokenizer=tok_path)
  _fails(r"--tokenizer: .*missing.json' not found; give a tokenizer.json", out, tokenizer=str(tmp_path / "missing.json"))
  _fails(r"--out: required", "", tokenizer=tok_path)
  (tmp_path / "file").write_text("mine")
  _fails(r"--out: .*file' is a file, not a directory", tmp_path / "file", tokenizer=tok_path)
  (tmp_path / "theirs").mkdir()
  (tmp_path / "theirs" / "notes.txt").write_text("mine")
  _fails(r"--out: .*theirs' holds files prepare did not write \(notes.txt\)", tmp_path / "theirs", tokenizer=tok_path)
  # Our own directory, with a stranger's file in it, or prepared from other settings.
  prepared_dir, _ = prepared
  (prepared_dir / "chunks" / "extra.npy").write_bytes(b"x")
  try:
    _fails(r"--out: .* also holds files prepare did not write \(chunks/extra.npy\)", prepared_dir,
           tokenizer=tok_path, max_files=40, validation_fraction=0.2, chunk_files=8)
  finally:
    (prepared_dir / "chunks" / "extra.npy").unlink()
  _fails(r"--out: .* holds the preparation of another corpus or settings \(differs in: files, max_files, "
         r"source_fingerprint\)", prepared_dir, tokenizer=tok_path, validation_fraction=0.2, chunk_files=8)
  assert not out.exists()


def test_bad_inputs_cli_one_line(tmp_path, tok_path):
  (tmp_path / "theirs").mkdir()
  (tmp_path / "theirs" / "notes.txt").write_text("mine")
  before = snapshot(tmp_path)
  for args, match in [((f"--source={tmp_path}/nope", f"--out={tmp_path}/o"), "--source: "),
                      ((f"--tokenizer={tok_path}", f"--out={tmp_path}/theirs", "--max_files=2"), "--out: ")]:
    r = _cli(*args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"dsv3.data: {match}"), r.stderr
  assert snapshot(tmp_path) == before


def test_trainer_checks_the_manifest(prepared, tok_path, tmp_path):
  out, _ = prepared
  before = snapshot(out)
  cfg = _config(out, validation_fraction=0.2)
  data.validate_data_config(cfg.data, model_vocab_size=512)
  for model_vocab in (300, 511):
    with pytest.raises(ValueError, match=r"model.vocab_size: .* 512-entry vocabulary \(manifest.json\) but "
                                         rf"model.vocab_size is {model_vocab}; set model.vocab_size >= 512"):
      data.validate_data_config(cfg.data, model_vocab_size=model_vocab)
  with pytest.raises(ValueError, match=r"model.vocab_size: .* set model.vocab_size >= 512"):
    data.make_datasets(cfg, 0, 1).check_vocab(500)
  for kw, match in [(dict(validation_fraction=0.02), r"data.validation_fraction: .* prepared with 0.2"),
                    (dict(validation_fraction=0.2, max_files=7), r"data.max_files: .* prepared with --max_files=40"),
                    (dict(validation_fraction=0.2, tokenizer="data"), r"data.tokenizer: .* set data.tokenizer=''")]:
    with pytest.raises(ValueError, match=match):
      data.make_datasets(_config(out, **kw), 0, 1)
  assert snapshot(out) == before
