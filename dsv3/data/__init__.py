"""The training data pipeline: documents -> one token stream per split -> packed, shuffled, sharded batches.

  ds = make_datasets(config, process_index=None, process_count=None)   # defaults: jax.process_*()
  batch = next(ds.train)                 # int32 [batch_size // process_count, seq_len + 1]
  ds.train.set_state(state)              # state = ds.train.get_state() (JSON): exact resume
  for batch in ds.eval_batches(): ...    # the same fixed validation sample on every call
  ds.check_vocab(model_vocab_size)       # DataError if a token id does not fit the model's vocabulary

`make_datasets` reads `config.data` (fields in `default_data_config`), `seq_len`, `batch_size` (global),
`seed`, `eval_batches` and `model.vocab_size` (also the size of a BPE it trains). Every bad setting raises
DataError naming the field and the fix. How streams are cached, packed, shuffled and sharded, and how the
validation sample is drawn: README "Training data". Offline tokenization: dsv3.data.prepare.
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Callable, Iterator, Optional

import grain
import jax
import ml_collections
import numpy as np

from dsv3.config import closest_key
from dsv3.data import prepare
from dsv3.data import tokenizer as tokenizer_lib
# Corpus discovery and tokenization live in dsv3.data.corpus; their public names stay importable from here.
from dsv3.data.corpus import (FORMATS, VALIDATION_FRACTION, Corpus, DataError, encode_documents, is_validation,
                              iter_documents, load_tokenizer, resolve_corpus, stdlib_corpus, tail_cut, tail_split)
from dsv3.data.corpus import check_max_files, digest, unit_hash

VERSION = 1                      # bump when tokenization or packing changes: old cached streams are ignored
# The validation sample's shuffle seed: fixed, not config.seed, so runs with different seeds are scored on
# the same windows.
EVAL_SEED = 0x5EED_E7A1


def default_data_config() -> ml_collections.ConfigDict:
  """The `data` block of the training config, with each field's meaning."""
  return ml_collections.ConfigDict(dict(
      # 'stdlib' (the running Python's standard-library *.py sources, without tests and site-packages), a path,
      # glob, directory or comma-separated list, or a directory dsv3.data.prepare wrote (its own tokenizer and split).
      source="stdlib",
      format="auto",              # 'auto' (by extension) | 'text' (a document per file) | 'jsonl' | 'parquet' | 'bin' | 'npy'
      field="text",               # the jsonl key / parquet column holding the document text
      # '': a byte-level BPE of model.vocab_size entries trained on the stdlib (cached) | 'data': trained on
      # data.source's training split | a tokenizer.json or a directory holding one.
      tokenizer="",
      validation_fraction=VALIDATION_FRACTION,   # share of documents held out (by name hash); 0: none
      dtype="uint16",             # token width of raw .bin files: 'uint16' | 'uint32'
      max_files=0,                # only the first N files of the sorted source (0: all); for quick runs and tests
      prefetch=2,                 # batches a background grain thread prepares ahead (0: none)
      cache_dir=""))              # '' = $DSV3_CACHE or ~/.cache/dsv3


# ------------------------------------------------------------------------------------------------
# Token streams.

class TokenStream:
  """A sequence of 1-D integer arrays (memory-mapped or not) read as one concatenated stream."""

  def __init__(self, parts):
    self.parts = [p for p in parts if len(p)]
    self.starts = np.cumsum([0] + [len(p) for p in self.parts])

  def __len__(self) -> int:
    return int(self.starts[-1])

  def read(self, a: int, b: int) -> np.ndarray:
    """Tokens [a, b) as int32, crossing part boundaries as needed."""
    out, i = [], int(np.searchsorted(self.starts, a, side="right")) - 1
    while a < b:
      s = a - self.starts[i]
      take = min(b - a, len(self.parts[i]) - s)
      out.append(self.parts[i][s:s + take])
      a, i = a + take, i + 1
    return np.concatenate(out).astype(np.int32) if out else np.zeros([0], np.int32)

  def split(self, cut: int) -> tuple["TokenStream", "TokenStream"]:
    """Two streams of views: tokens [0, cut) and [cut, end)."""
    head, tail = [], []
    for p, s in zip(self.parts, self.starts):
      head.append(p[:max(0, cut - s)])
      tail.append(p[max(0, cut - s):])
    return TokenStream(head), TokenStream(tail)

  def id_range(self) -> tuple[int, int]:
    lo, hi = 0, -1
    for p in self.parts:
      for s in range(0, len(p), 1 << 26):  # chunks keep a large memory-mapped file out of RAM
        c = np.asarray(p[s:s + (1 << 26)])
        lo, hi = min(lo, int(c.min())), max(hi, int(c.max()))
    return lo, hi


def _load_token_file(path: pathlib.Path, fmt: str, dtype: str) -> np.ndarray:
  if fmt == "bin":
    size = path.stat().st_size
    itemsize = np.dtype(dtype).itemsize
    if size % itemsize:
      raise DataError(f"data.dtype: {path} has {size} bytes, not a multiple of {itemsize} ({dtype}); check "
                      f"data.dtype ('uint16' or 'uint32') or the file")
    return np.memmap(path, dtype=dtype, mode="r") if size else np.zeros([0], dtype)
  try:
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
  except (ValueError, OSError) as e:
    raise DataError(f"data.source: {path} is not a readable .npy array ({e}); save token ids with np.save") from None
  if not np.issubdtype(arr.dtype, np.integer):
    raise DataError(f"data.source: {path} holds {arr.dtype} values; pre-tokenized .npy files must hold "
                    f"integer token ids")
  return arr.reshape(-1)


def _tokenize(docs, tok: tokenizer_lib.Tokenizer, fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """Documents -> (train, validation) streams; see corpus.encode_documents and corpus.tail_split."""
  train, val, ndocs = encode_documents(docs, tok, fraction)
  if tail_split(ndocs, fraction):
    # Too few documents for a split by name (e.g. one big file): hold out the stream's tail instead.
    both = np.concatenate([train, val])
    cut = tail_cut(len(both), fraction)
    train, val = both[:cut], both[cut:]
  return train, val


def _prepared_streams(d, manifest: dict) -> tuple[TokenStream, TokenStream, tokenizer_lib.Tokenizer, str]:
  """(train, validation, tokenizer, fingerprint) of a prepared directory, checked against the data block."""
  source, fraction = d.source, float(d.validation_fraction)
  if d.format != "auto":
    raise DataError(f"data.format: {source!r} is a prepared directory; leave data.format at 'auto'")
  if fraction != manifest["validation_fraction"]:
    raise DataError(f"data.validation_fraction: {source!r} was prepared with {manifest['validation_fraction']}, "
                    f"the config sets {fraction}; set data.validation_fraction={manifest['validation_fraction']} "
                    f"or prepare again with --validation_fraction={fraction}")
  if d.max_files not in (0, manifest["max_files"]):
    raise DataError(f"data.max_files: {source!r} was prepared with --max_files={manifest['max_files']}, the "
                    f"config sets {d.max_files}; set data.max_files=0 (all of it) or prepare again")
  train_parts, val_parts, tok = prepare.load(source, manifest)
  if d.tokenizer not in ("", "bpe") and (d.tokenizer == "data" or
                                         load_tokenizer(d).fingerprint != tok.fingerprint):
    raise DataError(f"data.tokenizer: {source!r} was tokenized with {manifest['tokenizer']['path']!r} "
                    f"(fingerprint {tok.fingerprint}), not {d.tokenizer!r}; set data.tokenizer='' to use the "
                    f"prepared directory's own tokenizer, or prepare again with --tokenizer={d.tokenizer}")
  train, val = TokenStream(train_parts), TokenStream(val_parts)
  if manifest["split"] == "tail":
    both = TokenStream(train_parts + val_parts)
    train, val = both.split(tail_cut(len(both), fraction))
  fingerprint = digest([manifest["source_fingerprint"], tok.fingerprint, fraction])   # as from the raw source
  return train, val, tok, fingerprint


def _cached_streams(corpus: Corpus, tok, fraction: float, cache: str) -> tuple[np.ndarray, np.ndarray]:
  key = digest([VERSION, corpus.fingerprint, tok.fingerprint, fraction])
  paths = [tokenizer_lib.cache_dir(cache) / f"tokens-v{VERSION}-{key}-{s}.npy" for s in ("train", "val")]
  if not all(p.is_file() for p in paths):
    streams = _tokenize(iter_documents(corpus), tok, fraction)
    for p, arr in zip(paths, streams):
      tokenizer_lib.atomic_write(p, lambda f, a=arr: np.save(f, a))
  return tuple(np.load(p, mmap_mode="r") for p in paths)


# ------------------------------------------------------------------------------------------------
# grain pipelines.

def _epoch_offset(seed: int, epoch: int, length: int) -> int:
  return int(unit_hash(f"offset:{seed}:{epoch}") * length)


class TrainIterator:
  """Infinite iterator of int32 [per_process_batch, seq_len + 1] batches with exact, portable state."""

  def __init__(self, stream: TokenStream, seq_len: int, global_batch: int, seed: int, process_index: int,
               process_count: int, prefetch: int, fingerprint: str):
    length = seq_len + 1
    self.windows_per_epoch = (len(stream) - length + 1) // length   # every window fits at any offset
    self.global_batch, self.seed, self.seq_len, self.fingerprint = global_batch, seed, seq_len, fingerprint
    n = self.windows_per_epoch

    def window(index, j):
      start = _epoch_offset(seed, index // n, length) + j * length
      return stream.read(start, start + length)

    # grain reshuffles epoch e with seed + e; hashing the seed keeps runs with seeds s and s+1 unrelated.
    ds = grain.MapDataset.range(n).shuffle(seed=int(unit_hash(f"shuffle:{seed}") * 2 ** 32)).repeat(None)
    self._examples = ds.map_with_index(window)      # global example k: a pure function of k
    self._process = (process_index, process_count)
    self._read = grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch)
    self._it = None
    self._start(0)

  def _start(self, examples: int):
    """Batches from global example `examples` on: global batch b holds examples examples + b*G ..
    examples + (b+1)*G - 1, and process p takes every P-th of them from the p-th."""
    if self._it is not None and hasattr(self._it, "close"):
      self._it.close()   # stops the old prefetch thread
    self._next = examples
    index, count = self._process
    batches = self._examples[examples:][index::count].batch(self.global_batch // count, drop_remainder=True)
    self._it = iter(batches.to_iter_dataset(self._read))

  def __iter__(self):
    return self

  def __next__(self) -> np.ndarray:
    batch = next(self._it)
    self._next += self.global_batch
    return batch

  @property
  def epoch(self) -> float:
    return self._next / self.windows_per_epoch

  def get_state(self) -> dict:
    return {"version": VERSION, "examples": self._next, "seed": self.seed,
            "seq_len": self.seq_len, "fingerprint": self.fingerprint}

  def set_state(self, state: dict) -> None:
    """Continues with global example `state['examples']`, the first one not yet read: exact when the data
    settings are unchanged, whatever batch_size or process count read the examples before it."""
    for k in ("seed", "seq_len", "fingerprint"):
      if state.get(k) != getattr(self, k):
        logging.warning("data: checkpoint's data %s was %r, now %r; continuing from its example count, but "
                        "the batches differ from an uninterrupted run", k, state.get(k), getattr(self, k))
    self._start(int(state["examples"]))


@dataclasses.dataclass
class Datasets:
  """What `make_datasets` returns; unpacks as (train, eval_batches, tokenizer)."""
  train: TrainIterator
  eval_batches: Callable[[], Iterator[np.ndarray]]
  tokenizer: Optional[tokenizer_lib.Tokenizer]
  train_tokens: int
  val_tokens: int
  num_eval_batches: int
  streams: tuple = dataclasses.field(repr=False, default=())
  _id_range: Optional[tuple] = dataclasses.field(repr=False, default=None)
  prepared: Optional[tuple] = dataclasses.field(repr=False, default=None)   # (dir, manifest) if prepared
  # Validation-stream offsets of the sample's windows, global batch after global batch (eval_sample_starts).
  eval_starts: np.ndarray = dataclasses.field(repr=False, default_factory=lambda: np.zeros([0], np.int64))

  def __iter__(self):
    return iter((self.train, self.eval_batches, self.tokenizer))

  def check_vocab(self, model_vocab_size: int) -> None:
    """Raises DataError when a token id is negative or >= model_vocab_size (the embedding would be OOB).

    A prepared directory is checked by its manifest's vocabulary size, without reading the tokens."""
    if self.prepared is not None:
      prepare.check_model_vocab(*self.prepared, model_vocab_size)
      return
    if self._id_range is None:
      ranges = [s.id_range() for s in self.streams if len(s)]
      self._id_range = (min(r[0] for r in ranges), max(r[1] for r in ranges))
    lo, hi = self._id_range
    if lo < 0:
      raise DataError(f"data.source: the token stream holds negative id {lo}; pre-tokenized files must hold ids "
                      f"in [0, vocab_size)")
    if hi >= model_vocab_size:
      raise DataError(f"model.vocab_size: the data holds token id {hi} but model.vocab_size is "
                      f"{model_vocab_size}; set model.vocab_size >= {hi + 1}")


def _get(cfg, key, default):
  return cfg[key] if cfg is not None and key in cfg else default


def validate_data_config(d, model_vocab_size: Optional[int] = None) -> None:
  """Checks every field of a `data` block, and model.vocab_size against it; DataError names the field and the fix."""
  defaults = default_data_config()
  for k in d:
    if k not in defaults:
      hint = closest_key(k, defaults.keys(), prefix="data.") or f"; valid fields are {sorted(defaults)}"
      raise DataError(f"data.{k}: unknown field{hint}")
  get = lambda k: d[k] if k in d else defaults[k]
  is_int = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool)
  for k in ("source", "format", "field", "tokenizer", "dtype", "cache_dir"):
    if not isinstance(get(k), str):
      raise DataError(f"data.{k}: must be a string, got {get(k)!r}")
  if get("format") not in FORMATS:
    raise DataError(f"data.format: unknown format {get('format')!r}; use one of {', '.join(FORMATS)}")
  if not get("field"):
    raise DataError("data.field: must name the jsonl key / parquet column holding the text, e.g. 'text'")
  if get("dtype") not in ("uint16", "uint32"):
    raise DataError(f"data.dtype: must be 'uint16' or 'uint32' (the .bin token width), got {get('dtype')!r}")
  fraction = get("validation_fraction")
  if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 <= fraction < 1:
    raise DataError(f"data.validation_fraction: must be in [0, 1) (0 = no validation split), got {fraction!r}")
  check_max_files(get("max_files"))
  if not is_int(get("prefetch")) or get("prefetch") < 0:
    raise DataError(f"data.prefetch: must be an integer >= 0 (0 = no background thread), got {get('prefetch')!r}")
  manifest = prepare.find(get("source"))
  if manifest is not None and model_vocab_size is not None:
    prepare.check_model_vocab(get("source"), manifest, model_vocab_size)
  # A trained BPE has model.vocab_size entries; a prepared directory brings its own tokenizer.
  trains_bpe = get("tokenizer") in ("", "bpe", "data") and manifest is None
  if trains_bpe and model_vocab_size is not None and model_vocab_size < tokenizer_lib.MIN_VOCAB:
    raise DataError(f"model.vocab_size: {model_vocab_size!r} is too small for the byte-level BPE "
                    f"data.tokenizer={get('tokenizer')!r} trains; it needs >= {tokenizer_lib.MIN_VOCAB} (256 bytes + "
                    f"<|bos|> + <|eos|> + merges; tiny configs use 2048-8192), or give data.tokenizer a tokenizer.json")


def make_datasets(config, process_index: Optional[int] = None, process_count: Optional[int] = None) -> Datasets:
  """Builds the train iterator, the validation batches and the tokenizer from `config` (see module doc)."""
  d = default_data_config()
  given = _get(config, "data", None) or {}
  vocab_size = _get(_get(config, "model", None), "vocab_size", None)
  validate_data_config(given, vocab_size)
  for k in given:
    d[k] = given[k]
  seq_len, batch_size, seed = (_get(config, "seq_len", None), _get(config, "batch_size", None),
                               _get(config, "seed", 0))
  eval_cap = _get(config, "eval_batches", 0)
  if not isinstance(eval_cap, (int, np.integer)) or isinstance(eval_cap, bool) or eval_cap < 0:
    raise DataError(f"eval_batches: must be an integer >= 0 (0 = every validation batch), got {eval_cap!r}")
  if not isinstance(seq_len, int) or seq_len <= 0:
    raise DataError(f"seq_len: must be a positive integer, got {seq_len!r}")
  if not isinstance(batch_size, int) or batch_size <= 0:
    raise DataError(f"batch_size: must be a positive integer (the global batch), got {batch_size!r}")
  if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
    raise DataError(f"seed: must be an integer, got {seed!r}")
  seed = int(seed)
  if process_index is None or process_count is None:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if batch_size % process_count:
    raise DataError(f"batch_size: the global batch {batch_size} is not divisible by the process count "
                    f"{process_count}; set batch_size to a multiple of {process_count}")
  if not 0 <= process_index < process_count:
    raise DataError(f"process_index {process_index} is outside [0, process_count={process_count})")
  fraction = float(d.validation_fraction)
  manifest = prepare.find(d.source)
  if manifest is not None:
    train, val, tok, fingerprint = _prepared_streams(d, manifest)
    corpus_desc = f"prepared, {manifest['files']} files"
  else:
    train, val, tok, fingerprint, corpus_desc = _raw_streams(d, fraction, vocab_size)

  length, per_process = seq_len + 1, batch_size // process_count
  if (len(train) - length + 1) // length < batch_size:
    raise DataError(f"data.source: the training split has {len(train)} tokens, fewer than one global batch of "
                    f"batch_size={batch_size} x (seq_len+1)={length} (+ seq_len); add data or lower "
                    f"batch_size / seq_len")
  train_iter = TrainIterator(train, seq_len, batch_size, seed, process_index, process_count, int(d.prefetch),
                             fingerprint)

  num_eval = (len(val) // length) // batch_size
  if eval_cap:                                # 0: every batch that fits
    num_eval = min(num_eval, int(eval_cap))
  if fraction > 0 and num_eval == 0:
    raise DataError(f"data.validation_fraction: the validation split has {len(val)} tokens, fewer than one "
                    f"global batch of {batch_size} x {length}; raise data.validation_fraction (or set it to 0 "
                    f"for no validation), or lower batch_size / seq_len")
  starts = eval_sample_starts(len(val), seq_len, num_eval * batch_size)
  val_ds = (grain.MapDataset.source(starts).map(lambda a: val.read(int(a), int(a) + length))
            [process_index::process_count].batch(per_process, drop_remainder=True))

  def eval_batches() -> Iterator[np.ndarray]:
    return iter(val_ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))

  logging.info("data: %s (%s): %d train / %d validation tokens, %d windows per epoch, tokenizer %s; "
               "validation sample: %d batches = %d windows (%d tokens) from across the split",
               d.source, corpus_desc, len(train), len(val), train_iter.windows_per_epoch, tok, num_eval,
               len(starts), len(starts) * length)
  return Datasets(train_iter, eval_batches, tok, len(train), len(val), num_eval, streams=(train, val),
                  prepared=None if manifest is None else (d.source, manifest), eval_starts=starts)


def eval_sample_starts(val_tokens: int, seq_len: int, count: int) -> np.ndarray:
  """Stream offsets (int64 [count], in evaluation order) of the validation sample's windows.

  The validation stream is cut into its len // (seq_len + 1) non-overlapping windows from offset 0, and
  the first `count` of them in a grain index shuffle with the fixed EVAL_SEED are the sample: spread over
  the whole held-out split rather than its first documents, the same on every call, in every process and
  for every config.seed (runs stay comparable), and any prefix of it is itself a uniform sample.
  """
  n = val_tokens // (seq_len + 1)
  if not 0 <= count <= n:
    raise ValueError(f"eval_sample_starts: count={count} is outside [0, {n} windows]")
  order = grain.MapDataset.range(n).shuffle(seed=EVAL_SEED)
  return np.array([order[i] for i in range(count)], np.int64) * (seq_len + 1)


def _raw_streams(d, fraction: float, vocab_size: Optional[int]) -> tuple:
  """(train, validation, tokenizer, fingerprint, description) of a raw or pre-tokenized data.source."""
  corpus = resolve_corpus(d.source, d.format, d.field, int(d.max_files))
  if corpus.format in ("bin", "npy"):
    tok = load_tokenizer(d) if d.tokenizer not in ("", "bpe") else None
    full = TokenStream([_load_token_file(p, corpus.format, d.dtype) for p in corpus.files])
    train, val = full.split(len(full) - int(len(full) * fraction))
  else:
    tok = load_tokenizer(d, corpus, vocab_size)
    train, val = (TokenStream([s]) for s in _cached_streams(corpus, tok, fraction, d.cache_dir))
  fingerprint = digest([corpus.fingerprint, tok.fingerprint if tok else "", fraction])
  return train, val, tok, fingerprint, f"{corpus.format}, {len(corpus.files)} files"

