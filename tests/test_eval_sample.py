"""Tests of the validation sample: spread over the whole held-out split, fixed, sharded like training, sized
as the config says, and a default split large enough for stable numbers.

An `arange` token stream makes each window's first token its stream position; a word corpus with one
<|bos|> per document tells which documents the windows come from. The tokenizer cache is a per-module temp
dir (DSV3_CACHE).
"""
import os

import ml_collections
import numpy as np
import pytest

from configs import tiny
from dsv3 import data
from dsv3.data import corpus
from dsv3.training import resume

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("DSV3_CACHE", str(tmp_path_factory.mktemp("dsv3_cache")))
    yield


@pytest.fixture(scope="module")
def arange_npy(tmp_path_factory):
  path = tmp_path_factory.mktemp("npy") / "stream.npy"
  np.save(path, np.arange(20000, dtype=np.uint16))
  return str(path)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
  d, rng = tmp_path_factory.mktemp("text"), np.random.RandomState(0)
  for i in range(300):
    (d / f"doc{i:03d}.txt").write_text(" ".join(rng.choice(WORDS, rng.randint(30, 90))) + "\n")
  return d


def _config(source, seq_len=15, batch_size=4, seed=0, eval_batches=None, **data_kw):
  """A config; eval_batches None leaves the field out, data_kw is the data block."""
  d = data.default_data_config()
  d.update({"source": str(source), **data_kw})
  c = dict(seq_len=seq_len, batch_size=batch_size, seed=seed, model=dict(vocab_size=300), data=d)
  if eval_batches is not None:
    c["eval_batches"] = eval_batches
  return ml_collections.ConfigDict(c)


def _make(cfg, index=0, count=1):
  return data.make_datasets(cfg, process_index=index, process_count=count)


def test_sample_spans_the_split_not_its_head(arange_npy):
  # The tail half of the stream is held out: tokens 10000..19999, 625 windows of 16; 32 are sampled.
  ds = _make(_config(arange_npy, validation_fraction=0.5, eval_batches=8))
  rows = np.concatenate(list(ds.eval_batches()))
  assert rows.shape == (32, 16)
  np.testing.assert_array_equal(np.diff(rows, axis=1), 1)         # contiguous windows ...
  starts = rows[:, 0] - 10000
  assert (starts % 16 == 0).all() and len(set(starts)) == 32      # ... on the window grid, all distinct
  np.testing.assert_array_equal(starts, ds.eval_starts)
  assert starts.min() < 1000 and starts.max() > 9000              # from both ends of the split
  assert np.histogram(starts, bins=4, range=(0, 10000))[0].min() >= 3   # and every quarter of it
  assert sorted(starts) != list(range(0, 32 * 16, 16))            # not the head of the stream
  assert not (np.diff(starts) > 0).all()                          # shuffled, not in stream order


def test_sample_covers_many_documents(text_dir):
  ds = _make(_config(text_dir, tokenizer="data", validation_fraction=0.5, eval_batches=6))
  val = ds.streams[1].read(0, ds.val_tokens)
  doc_starts = np.flatnonzero(val == ds.tokenizer.bos_id)
  docs = np.searchsorted(doc_starts, ds.eval_starts, side="right") - 1
  n_docs, n_windows = len(doc_starts), len(ds.eval_starts)
  assert n_docs > 100 and n_windows == 24
  head = np.searchsorted(doc_starts, np.arange(n_windows) * 16, side="right") - 1   # the old sample
  assert len(set(docs)) >= 15 and len(set(docs)) >= 2 * len(set(head))
  assert docs.max() - docs.min() > n_docs // 2


def test_sample_is_fixed_across_calls_seeds_and_processes(arange_npy):
  cfg = _config(arange_npy, batch_size=8, validation_fraction=0.5, eval_batches=5)
  whole = _make(cfg)
  a, b = list(whole.eval_batches()), list(whole.eval_batches())
  assert len(a) == 5 and all(np.array_equal(x, y) for x, y in zip(a, b))
  cfg.seed = 7                                                     # training seed: same validation sample
  assert all(np.array_equal(x, y) for x, y in zip(a, _make(cfg).eval_batches()))
  cfg.seed = 0
  for count in (2, 4):
    shards = [list(_make(cfg, p, count).eval_batches()) for p in range(count)]
    for step, batch in enumerate(a):
      # Process p holds rows p, p + P, ... of each global batch, as in training.
      for p in range(count):
        np.testing.assert_array_equal(shards[p][step], batch[p::count])


def test_sample_size_is_what_the_config_says(arange_npy):
  fit = (10000 // 16) // 4                                        # 156 global batches fit
  for n, want in [(None, fit), (3, 3), (40, 40), (0, fit), (10**6, fit)]:
    ds = _make(_config(arange_npy, validation_fraction=0.5, eval_batches=n))
    batches = list(ds.eval_batches())
    assert ds.num_eval_batches == len(batches) == want, n
    assert all(b.shape == (4, 16) for b in batches) and len(ds.eval_starts) == 4 * want
  # A smaller sample is the head of a larger one: any prefix is itself spread over the split.
  small = _make(_config(arange_npy, validation_fraction=0.5, eval_batches=3)).eval_starts
  large = _make(_config(arange_npy, validation_fraction=0.5, eval_batches=30)).eval_starts
  np.testing.assert_array_equal(small, large[:12])


def test_bad_top_level_eval_batches(arange_npy):
  with pytest.raises(data.DataError, match=r"eval_batches: must be an integer >= 0"):
    _make(_config(arange_npy, validation_fraction=0.5, eval_batches=-2))


def test_default_split_holds_out_enough_of_the_stdlib():
  # Whole files are held out by the hash of their name. 0.1 holds out 78 files, 970 KB, 278K tokens with the
  # 4096-entry BPE (~0.29 tokens per byte) on Python 3.11: well over 250K tokens and many documents, so one
  # file (e.g. a charmap table in encodings/) cannot set the validation loss.
  assert data.default_data_config().validation_fraction == corpus.VALIDATION_FRACTION == 0.1
  std = corpus.stdlib_corpus()
  held = [p for n, p in zip(std.names, std.files) if corpus.is_validation(n, corpus.VALIDATION_FRACTION)]
  held_bytes = sum(os.path.getsize(p) for p in held)
  total = sum(os.path.getsize(p) for p in std.files)
  assert len(held) >= 50 and held_bytes >= 850_000 and 0.05 < held_bytes / total < 0.15


def test_resuming_a_run_made_with_the_old_default_split_names_the_field():
  # A checkpoint of the 0.02 default: its training data differ, so resuming says which flag restores them;
  # the size of the validation sample may change freely.
  new = resume.flatten_config(tiny.get_config())
  old = dict(new, **{"data.validation_fraction": 0.02, "data.eval_batches": 16, "eval_batches": 4})
  with pytest.raises(ValueError, match=r"data\.validation_fraction: checkpoint has 0\.02.*\n.*"
                                       r"--config\.data\.validation_fraction=0\.02"):
    resume.check_compatible(old, new)
  changes = resume.check_compatible(dict(old, **{"data.validation_fraction": 0.1}), new)
  assert {n for n, _, _ in changes} == {"data.eval_batches", "eval_batches"}
