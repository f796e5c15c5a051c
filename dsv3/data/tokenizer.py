"""Tokenizers: a byte-level BPE trained once and cached, or any HF `tokenizer.json` (DeepSeek's included).

DeepSeek-V3 ships a 128K-entry byte-level BPE; small research configs want a small vocabulary so that the
embedding and head do not dominate the model. `load_or_train('', vocab_size, texts_fn, fingerprint)`
trains a byte-level BPE with HF `tokenizers` on the texts `texts_fn()` yields, with the special tokens
`<|bos|>` = 0 and `<|eos|>` = 1 (DeepSeek's bos/eos ids, so a trained model and its generate/HF export agree
with DeepSeek's conventions). Training is deterministic for a given text sequence, so the result is cached
under `cache_dir()` ($DSV3_CACHE, else ~/.cache/dsv3), keyed by the corpus fingerprint, the vocabulary size
and `VERSION`, and written atomically (several processes of a multi-host job may race to write it).

Any other spec is a path to a `tokenizer.json` (or a directory holding one, e.g. an HF checkpoint). Its
bos/eos tokens come from a `tokenizer_config.json` next to it when there is one, else from well-known names.
`Tokenizer` never adds special tokens on its own (DeepSeek's file has a post-processor that prepends bos);
callers say what they want with `encode(..., bos=, eos=)`.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile
from typing import Callable, Iterable, Optional, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from dsv3.config import ConfigError

VERSION = 1                       # bump when training changes, so old cache entries are not reused
BOS, EOS = "<|bos|>", "<|eos|>"
MIN_VOCAB = 256 + 2 + 1           # every byte, the two special tokens, and at least one merge

# Names tried, in order, when a tokenizer.json comes without a tokenizer_config.json.
_BOS_NAMES = (BOS, "<｜begin▁of▁sentence｜>", "<s>", "<|begin_of_text|>", "<bos>", "<|endoftext|>")
_EOS_NAMES = (EOS, "<｜end▁of▁sentence｜>", "</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>")


class TokenizerError(ConfigError):
  """The tokenizer setting is wrong; the message names the config field and the fix."""


def cache_dir(override: str = "") -> pathlib.Path:
  """Where trained tokenizers and tokenized corpora live: `override`, $DSV3_CACHE, or ~/.cache/dsv3."""
  d = pathlib.Path(override or os.environ.get("DSV3_CACHE") or pathlib.Path.home() / ".cache" / "dsv3")
  d.mkdir(parents=True, exist_ok=True)
  return d


def atomic_write(path: pathlib.Path, write: Callable) -> None:
  """Calls write(binary file) on a temporary file next to `path`, then renames it into place.

  A reader (or a concurrent writer on another host) therefore sees either no file or a complete one.
  """
  path = pathlib.Path(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a shared cache must be readable by everyone
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


class Tokenizer:
  """A thin wrapper over `tokenizers.Tokenizer` that knows its bos/eos ids."""

  def __init__(self, tok: tokenizers.Tokenizer, bos_id: int, eos_id: int, path: str = ""):
    self.tok, self.bos_id, self.eos_id, self.path = tok, int(bos_id), int(eos_id), path
    # Identifies the exact vocabulary and merges: tokenized corpora are cached under it.
    self.fingerprint = hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]

  @property
  def vocab_size(self) -> int:
    return self.tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
    ids = self.tok.encode(text, add_special_tokens=False).ids
    return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

  def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
    # encode_batch runs on all cores in Rust; the special tokens are added here, not by the post-processor.
    pre, post = ([self.bos_id] if bos else []), ([self.eos_id] if eos else [])
    return [pre + e.ids + post for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def save(self, directory) -> None:
    """Writes tokenizer.json + tokenizer_config.json, the layout transformers' AutoTokenizer reads."""
    d = pathlib.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "add_eos_token": False,
           "bos_token": self.tok.id_to_token(self.bos_id), "eos_token": self.tok.id_to_token(self.eos_id)}
    # Atomic: a reader (another host, a resumed dsv3.data.prepare) sees a complete file or none.
    atomic_write(d / "tokenizer.json", lambda f: f.write(self.tok.to_str(pretty=True).encode()))
    atomic_write(d / "tokenizer_config.json", lambda f: f.write(json.dumps(cfg, indent=2).encode()))

  def __repr__(self):
    return f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, path={self.path!r})"


def train_bpe(texts: Iterable[str], vocab_size: int) -> tokenizers.Tokenizer:
  """A GPT-2-style byte-level BPE with <|bos|>=0 and <|eos|>=1; every byte string is encodable."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer)
  return tok


def _special(tok: tokenizers.Tokenizer, names: Sequence[str], configured) -> Optional[int]:
  if isinstance(configured, dict):
    configured = configured.get("content")
  for name in ([configured] if configured else []) + list(names):
    i = tok.token_to_id(name)
    if i is not None:
      return i
  return None


def load(spec: str) -> Tokenizer:
  """Loads a tokenizer.json (or a directory containing one) and finds its bos/eos ids."""
  path = pathlib.Path(os.path.expanduser(spec))
  if path.is_dir():
    path = path / "tokenizer.json"
  if not path.is_file():
    raise TokenizerError(f"data.tokenizer: {spec!r} not found; give a tokenizer.json file (or a directory "
                         f"holding one), or '' to train a byte-level BPE on the default corpus")
  try:
    tok = tokenizers.Tokenizer.from_file(str(path))
  except Exception as e:  # the Rust side raises plain Exceptions with parser messages
    raise TokenizerError(f"data.tokenizer: {str(path)!r} is not a valid HF tokenizer.json ({e}); give a file "
                         f"saved by `tokenizers` / transformers, or '' to train one") from None
  cfg = {}
  if (path.parent / "tokenizer_config.json").is_file():
    try:
      cfg = json.loads((path.parent / "tokenizer_config.json").read_text())
    except ValueError:
      cfg = {}
  eos = _special(tok, _EOS_NAMES, cfg.get("eos_token"))
  if eos is None:
    raise TokenizerError(f"data.tokenizer: cannot tell which token ends a document in {str(path)!r}; put a "
                         f"tokenizer_config.json with \"eos_token\" next to it")
  bos = _special(tok, _BOS_NAMES, cfg.get("bos_token"))
  # GPT-2-style vocabularies have one <|endoftext|> for both roles.
  return Tokenizer(tok, eos if bos is None else bos, eos, str(path))


def load_or_train(spec: str, vocab_size: int, texts_fn: Callable[[], Iterable[str]], fingerprint: str,
                  cache: str = "") -> Tokenizer:
  """spec '' (or 'bpe'): the cached BPE for corpus `fingerprint`, trained on `texts_fn()` on a cache miss.

  Any other spec is a tokenizer.json path (see `load`); vocab_size and texts_fn are then unused.
  """
  if spec not in ("", "bpe"):
    return load(spec)
  if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
    raise TokenizerError(f"data.vocab_size: {vocab_size!r} is too small for a byte-level BPE; it needs >= "
                         f"{MIN_VOCAB} (256 bytes + <|bos|> + <|eos|> + merges); tiny configs use 2048-8192")
  key = hashlib.sha256(f"{fingerprint}|{vocab_size}|{VERSION}".encode()).hexdigest()[:16]
  path = cache_dir(cache) / f"bpe-v{VERSION}-{vocab_size}-{key}.json"
  if not path.is_file():
    tok = train_bpe(texts_fn(), vocab_size)
    atomic_write(path, lambda f: f.write(tok.to_str().encode()))
  tok = tokenizers.Tokenizer.from_file(str(path))
  return Tokenizer(tok, tok.token_to_id(BOS), tok.token_to_id(EOS), str(path))
