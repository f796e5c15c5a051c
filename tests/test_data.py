"""Tests of the data pipeline: formats, packing, determinism, sharding, exact resume and error messages.

Corpora are small temp files (synthetic word documents, or an `arange` token stream whose windows reveal
exactly which stream positions each batch row holds); the default stdlib corpus is used for real but on a
few files with a small BPE. The tokenizer cache is a per-session temp dir (DSV3_CACHE).
"""
import json

import ml_collections
import numpy as np
import pytest

from dsv3 import data
from dsv3.data import corpus, tokenizer

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega def return class import yield lambda while").split()


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("DSV3_CACHE", str(tmp_path_factory.mktemp("dsv3_cache")))
    # Small BPE training text keeps the stdlib tokenizer at about a second.
    mp.setattr(corpus, "_BPE_CHARS", 300_000)
    yield


def _docs(n, seed=0):
  rng = np.random.RandomState(seed)
  return [" ".join(rng.choice(WORDS, rng.randint(20, 120))) + "\n" for _ in range(n)]


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("text")
  for i, doc in enumerate(_docs(120)):
    (d / f"doc{i:03d}.txt").write_text(doc)
  return d


@pytest.fixture(scope="module")
def arange_npy(tmp_path_factory):
  path = tmp_path_factory.mktemp("npy") / "stream.npy"
  np.save(path, np.arange(5000, dtype=np.uint16))
  return str(path)


def _config(source, seq_len=16, batch_size=4, seed=0, vocab_size=300, eval_batches=16, **data_kw):
  """A training config: the data block with data_kw; model.vocab_size also sizes a trained BPE."""
  d = data.default_data_config()
  d.update({"source": str(source), **data_kw})
  return ml_collections.ConfigDict(dict(seq_len=seq_len, batch_size=batch_size, seed=seed, eval_batches=eval_batches,
                                        model=dict(vocab_size=vocab_size), data=d))


def _make(cfg, index=0, count=1):
  return data.make_datasets(cfg, process_index=index, process_count=count)


def _take(it, n):
  return [next(it) for _ in range(n)]


# ------------------------------------------------------------------------------------------------
def test_stdlib_default_corpus_and_cache(monkeypatch):
  cfg = _config("stdlib", seq_len=64, batch_size=4, vocab_size=512, max_files=40, tokenizer="")
  ds = data.make_datasets(cfg)                                    # process index/count from jax
  train_iter, eval_batches, tok = ds                              # also unpacks as a 3-tuple
  assert train_iter is ds.train and tok is ds.tokenizer and callable(eval_batches)
  assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 512)
  assert tok.decode(tok.encode("def f(x):\n  return x")) == "def f(x):\n  return x"
  batch = next(ds.train)
  assert batch.shape == (4, 65) and batch.dtype == np.int32
  assert ds.train_tokens > 10 * ds.val_tokens > 0
  assert ds.num_eval_batches >= 1
  ds.check_vocab(512)
  # Second start: tokenizer and token streams come from the cache, nothing is retrained or re-tokenized.
  monkeypatch.setattr(tokenizer, "train_bpe", lambda *a: pytest.fail("retrained the BPE"))
  monkeypatch.setattr(data, "_tokenize", lambda *a: pytest.fail("re-tokenized the corpus"))
  again = _make(cfg)
  np.testing.assert_array_equal(next(again.train), batch)


def test_default_config_fields():
  d = data.default_data_config()
  assert d.source == "stdlib" and d.format == "auto" and d.tokenizer == "" and d.validation_fraction > 0


def test_determinism_and_seeds(text_dir):
  cfg = _config(text_dir, tokenizer="data")
  a = _take(_make(cfg).train, 6)
  b = _take(_make(cfg).train, 6)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  cfg.seed = 1
  c = _take(_make(cfg).train, 6)
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_packing_windows_are_contiguous_and_reshuffled_per_epoch(arange_npy):
  cfg = _config(arange_npy, seq_len=15, batch_size=5, validation_fraction=0.1)
  ds = _make(cfg)
  n = ds.train.windows_per_epoch
  assert n == (4500 - 15) // 16
  rows = np.concatenate(_take(ds.train, 3 * n // 5))
  assert rows.shape[1] == 16
  np.testing.assert_array_equal(np.diff(rows, axis=1), 1)        # each example is a contiguous window
  assert rows.max() < 4500                                       # training never reads the held-out tail
  epochs = [rows[i * n:(i + 1) * n, 0] for i in range(3)]
  for e in epochs:
    assert len(set(e % 16)) == 1 and len(set(e)) == n            # one offset per epoch, every window once
  assert not np.array_equal(epochs[0] // 16, epochs[1] // 16)    # reshuffled each epoch


def test_documents_are_separated_by_eos(text_dir):
  ds = _make(_config(text_dir, tokenizer="data", validation_fraction=0.1))
  train, val = ds.streams
  stream = train.read(0, len(train))
  n_docs = int((stream == ds.tokenizer.eos_id).sum())
  assert n_docs == int((stream == ds.tokenizer.bos_id).sum()) and 80 < n_docs < 120
  assert stream[0] == ds.tokenizer.bos_id and stream[-1] == ds.tokenizer.eos_id
  first_doc = stream[1:int(np.argmax(stream == ds.tokenizer.eos_id))]
  assert ds.tokenizer.decode(first_doc) in _docs(120)
  assert len(val) > 0


@pytest.mark.parametrize("count", [2, 4])
def test_process_shards_are_disjoint_and_cover_the_global_batch(arange_npy, count):
  cfg = _config(arange_npy, seq_len=15, batch_size=8, validation_fraction=0.1)
  whole = _take(_make(cfg).train, 5)
  shards = [_take(_make(cfg, p, count).train, 5) for p in range(count)]
  for step in range(5):
    parts = [s[step] for s in shards]
    assert all(p.shape == (8 // count, 16) for p in parts)
    firsts = np.concatenate([p[:, 0] for p in parts])
    assert len(set(firsts)) == 8                                  # disjoint
    assert set(firsts) == set(whole[step][:, 0])                  # together exactly the global batch
  evals = [list(_make(cfg, p, count).eval_batches()) for p in range(count)]
  firsts = np.concatenate([b[:, 0] for e in evals for b in e])
  assert len(firsts) == len(set(firsts)) == sum(b.shape[0] for b in _make(cfg).eval_batches())


@pytest.mark.parametrize("prefetch", [0, 2])
def test_exact_resume_from_state(text_dir, prefetch):
  cfg = _config(text_dir, seq_len=255, tokenizer="data", prefetch=prefetch)
  ds = _make(cfg)
  _take(ds.train, 7)
  state = json.loads(json.dumps(ds.train.get_state()))            # survives a JSON checkpoint
  expected = _take(ds.train, 40)                                  # crosses epoch boundaries
  assert ds.train.epoch > 1
  fresh = _make(cfg)
  fresh.train.set_state(state)
  for x, y in zip(expected, _take(fresh.train, 40)):
    np.testing.assert_array_equal(x, y)


def test_resume_with_a_different_batch_size_keeps_the_example_order(arange_npy):
  a = _make(_config(arange_npy, seq_len=15, batch_size=8, validation_fraction=0)).train
  rows = np.concatenate(_take(a, 4))
  state = a.get_state() | {"examples": 8}                         # as saved after one batch of 8
  b = _make(_config(arange_npy, seq_len=15, batch_size=4, validation_fraction=0)).train
  b.set_state(state)
  np.testing.assert_array_equal(np.concatenate(_take(b, 6)), rows[8:32])


def test_eval_batches_are_finite_and_fixed(text_dir):
  ds = _make(_config(text_dir, tokenizer="data", validation_fraction=0.3, eval_batches=2))
  a, b = list(ds.eval_batches()), list(ds.eval_batches())
  assert len(a) == 2 == ds.num_eval_batches
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert a[0].shape == (4, 17)


# ------------------------------------------------------------------------------------------------
# Formats.

def test_jsonl_parquet_text_load_the_same_documents(tmp_path, text_dir):
  import pyarrow as pa
  import pyarrow.parquet as pq
  docs = _docs(120)
  (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)))
  pq.write_table(pa.table({"body": docs}), tmp_path / "a.parquet")
  tok = _make(_config(text_dir, tokenizer="data")).tokenizer.path
  for source, fmt in [(tmp_path / "a.jsonl", "auto"), (tmp_path / "a.parquet", "auto"),
                      (f"{text_dir}/doc0*.txt,{text_dir}/doc1*.txt", "text"), (text_dir, "auto")]:
    ds = _make(_config(source, tokenizer=tok, field="body", format=fmt, validation_fraction=0))
    assert next(ds.train).shape == (4, 17)
    assert ds.train_tokens > 5000 and ds.val_tokens == 0 and list(ds.eval_batches()) == []


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_bin_token_files(tmp_path, dtype):
  np.arange(3000, dtype=dtype).tofile(tmp_path / "a.bin")
  np.arange(3000, 6000, dtype=dtype).tofile(tmp_path / "b.bin")
  ds = _make(_config(tmp_path / "*.bin", seq_len=31, batch_size=4, dtype=dtype, validation_fraction=0.1))
  assert ds.tokenizer is None and ds.train_tokens + ds.val_tokens == 6000
  rows = np.concatenate(_take(ds.train, 100))
  np.testing.assert_array_equal(np.diff(rows, axis=1), 1)         # windows run across the file boundary
  ds.check_vocab(6000)
  with pytest.raises(ValueError, match=r"model.vocab_size: .* token id 5\d\d\d .* >= "):
    ds.check_vocab(5000)


def test_npy_with_tokenizer_json(arange_npy, text_dir):
  tok = _make(_config(text_dir, tokenizer="data")).tokenizer
  ds = _make(_config(arange_npy, tokenizer=tok.path))
  assert ds.tokenizer.vocab_size == tok.vocab_size and next(ds.train).shape == (4, 17)


def test_tokenizer_json_and_directory(tmp_path, text_dir):
  tok = _make(_config(text_dir, tokenizer="data")).tokenizer
  tok.save(tmp_path / "hf")
  for spec in (str(tmp_path / "hf"), str(tmp_path / "hf" / "tokenizer.json")):
    loaded = tokenizer.load(spec)
    assert (loaded.bos_id, loaded.eos_id) == (0, 1)
    assert loaded.encode("alpha beta", bos=True, eos=True) == tok.encode("alpha beta", bos=True, eos=True)
  # Other vocabularies: special tokens found by their well-known names (DeepSeek's, GPT-2's one for both).
  for specials, ids in [(["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"], (0, 1)), (["<|endoftext|>"], (0, 0))]:
    path = _raw_tokenizer(tmp_path, specials)
    assert (tokenizer.load(path).bos_id, tokenizer.load(path).eos_id) == ids


def _raw_tokenizer(tmp_path, specials):
  import tokenizers
  from tokenizers import models, pre_tokenizers, trainers
  raw = tokenizers.Tokenizer(models.BPE())
  raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  raw.train_from_iterator(_docs(20), trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                         show_progress=False))
  path = str(tmp_path / f"raw{len(specials)}.json")
  raw.save(path)
  return path


# ------------------------------------------------------------------------------------------------
# Errors: each names the config field and says what to do.

def _error(cfg, match, count=1):
  with pytest.raises(ValueError, match=match):
    _make(cfg, 0, count)


def test_errors_source_and_format(tmp_path, text_dir):
  _error(_config(tmp_path / "missing.txt"), r"data.source: .*missing.txt' does not exist")
  _error(_config(tmp_path / "*.txt"), r"data.source: no files match .*\*.txt'; point it at existing")
  _error(_config(text_dir, format="csv"), r"data.format: unknown format 'csv'; use one of")
  (tmp_path / "x.npy").write_bytes(b"")
  _error(_config(f"{text_dir},{tmp_path / 'x.npy'}"), r"data.format: data.source mixes formats")
  cfg = _config(text_dir)
  cfg.data.shuffle = True
  _error(cfg, r"data.shuffle: unknown field")


def test_errors_fields(tmp_path):
  (tmp_path / "a.jsonl").write_text(json.dumps({"content": "hello"}) + "\n")
  _error(_config(tmp_path / "a.jsonl", tokenizer="data"), r"data.field: .*a.jsonl:1 has no field 'text' .*content")
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"content": ["hello"]}), tmp_path / "a.parquet")
  _error(_config(tmp_path / "a.parquet", tokenizer="data"), r"data.field: .* has no column 'text' .*content")


def test_errors_tokenizer(tmp_path, text_dir):
  _error(_config(text_dir, tokenizer=str(tmp_path / "nope.json")), r"data.tokenizer: .*nope.json' not found")
  (tmp_path / "bad.json").write_text("{not json")
  _error(_config(text_dir, tokenizer=str(tmp_path / "bad.json")), r"data.tokenizer: .* not a valid HF tokenizer")
  _error(_config(text_dir, tokenizer="data", vocab_size=100), r"model.vocab_size: 100 is too small .* >= 259")
  _error(_config(text_dir, tokenizer=_raw_tokenizer(tmp_path, [])), r"data.tokenizer: cannot tell which token ends")


def test_errors_bin_shapes_and_sizes(tmp_path, arange_npy):
  (tmp_path / "odd.bin").write_bytes(b"\x00" * 1001)
  _error(_config(tmp_path / "odd.bin"), r"data.dtype: .*odd.bin has 1001 bytes, not a multiple of 2")
  _error(_config(arange_npy, dtype="int8"), r"data.dtype: must be 'uint16' or 'uint32'")
  _error(_config(arange_npy, seq_len=0), r"seq_len: must be a positive integer")
  _error(_config(arange_npy, batch_size=6), r"batch_size: the global batch 6 is not divisible .* 4", count=4)
  _error(_config(arange_npy, seq_len=511, batch_size=16), r"data.source: the training split has .* fewer than one")
  _error(_config(arange_npy, seq_len=255, batch_size=2, validation_fraction=0.05),
         r"data.validation_fraction: the validation split has 250 tokens")
  np.save(tmp_path / "f.npy", np.zeros(100, np.float32))
  _error(_config(tmp_path / "f.npy"), r"data.source: .*f.npy holds float32")
