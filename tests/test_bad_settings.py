"""Every bad setting fails where it is read, naming the field and the fix, and nothing on disk changes.

Validators are called directly (fast); the command lines run as subprocesses only where the CLI is the point:
one line on stderr, exit status 2 for flag and config errors, and the workdir / cwd left as it was.
"""
import hashlib
import os
import re
import subprocess
import sys

import ml_collections
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))

import tiny  # noqa: E402

from dsv3 import cli, data, generate, plan  # noqa: E402
from dsv3.config import ConfigError, ModelConfig  # noqa: E402
from dsv3.training.train_config import model_config_dict, validate_train_config  # noqa: E402
from disk import snapshot  # noqa: E402

TINY_MODEL = ModelConfig.from_config_dict(tiny.get_config())


def _config(**kw):
  """configs/tiny.py with dotted-key overrides."""
  c = tiny.get_config()
  with c.unlocked(), c.ignore_type():
    for key, value in kw.items():
      node = c
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
  return c


@pytest.fixture
def workdir(tmp_path):
  """A directory holding one sentinel file; tests assert it holds exactly that afterwards."""
  (tmp_path / "sentinel.txt").write_text("keep me")
  return tmp_path


# ------------------------------------------------------------------------------------------------
# validate_train_config: each field the trainer reads.

BAD_TRAIN = [
    ({"keep_checkpoints": 0}, r"config\.keep_checkpoints: must be a positive integer, got 0; keep at least 1"),
    ({"data.max_files": -1}, r"data\.max_files: must be an integer >= 0 \(0 = every file\), got -1"),
    ({"seq_len": 1024}, r"config\.seq_len: 1024 exceeds config\.model\.max_position_embeddings=512; lower "
                        r"config\.seq_len to <= 512 or raise config\.model\.max_position_embeddings"),
    ({"eval_batches": -1}, r"config\.eval_batches: must be an integer >= 0"),
    ({"warmup_steps": -5}, r"config\.warmup_steps: must be an integer >= 0, got -5"),
    ({"mtp_weight": 1.5}, r"config\.mtp_weight: must be in \[0, 1\] .*got 1\.5"),
    ({"mtp_weight_switch_frac": -0.1}, r"config\.mtp_weight_switch_frac: must be in \[0, 1\]"),
    ({"balance.gamma_switch_frac": 2.0}, r"config\.balance\.gamma_switch_frac: must be in \[0, 1\]"),
    ({"balance.sequence_alpha": -1e-4}, r"config\.balance\.sequence_alpha: must be >= 0"),
    ({"weight_decay": -0.1}, r"config\.weight_decay: must be >= 0 \(0 disables it\)"),
    ({"b1": 1.0}, r"config\.b1: must be in \[0, 1\)"),
    ({"b2": -0.5}, r"config\.b2: must be in \[0, 1\)"),
    ({"decay_end_frac": 1.5}, r"config\.decay_end_frac: must be in \[0, 1\]"),
    ({"decay_start_frac": 0.95}, r"config\.decay_start_frac: need 0 <= decay_start_frac <= decay_end_frac"),
    ({"learning_rate": "fast"}, r"config\.learning_rate: must be a number, got 'fast'"),
    ({"grad_accum_steps": 0}, r"config\.grad_accum_steps: must be a positive integer"),
    ({"init_from": None}, r"config\.init_from: must be a path string"),
    ({"nan_guard.max_update_ratio": -1.0}, r"config\.nan_guard\.max_update_ratio: must be >= 0"),
    ({"mesh.expert": 3}, r"config\.mesh\.expert: model\.n_routed_experts=16 must be divisible by mesh\.expert=3"),
    ({"pipeline.microbatches": 0}, r"config\.pipeline\.microbatches: must be an integer >= 1"),
    ({"pipeline.fb_barriers": "yes"}, r"config\.pipeline\.fb_barriers: must be True or False, got 'yes'"),
    ({"pipeline.collectives_in_flight": 0},
     r"config\.pipeline\.collectives_in_flight: must be an integer >= 1, got 0"),
    ({"mesh.pipeline": 2, "mesh.data": 4, "pipeline.schedule": "dualpipe"},
     r"config\.pipeline\.microbatches must be even and >= 2 \* mesh\.pipeline = 4 for dualpipe"),
    ({"mesh.pipeline": 8, "mesh.data": 1, "pipeline.schedule": "dualpipev", "pipeline.microbatches": 16},
     r"config\.mesh\.pipeline: model\.num_hidden_layers=\d+ cannot be cut into 16 pipeline stages"),
    ({"data.eval_batches": 1}, r"data\.eval_batches: unknown field; it moved: set config\.eval_batches instead"),
    ({"data.vocab_size": 512}, r"data\.vocab_size: unknown field; it moved: set config\.model\.vocab_size"),
    ({"model.precision": "bf16"}, r"model\.precision: unknown field; it moved: set config\.precision instead"),
    ({"data.prefetch": -2}, r"data\.prefetch: must be an integer >= 0"),
    ({"data.validation_fraction": 1.0}, r"data\.validation_fraction: must be in \[0, 1\)"),
    ({"model.vocab_size": 100}, r"model\.vocab_size: 100 is too small for the byte-level BPE data\.tokenizer=''"),
    ({"data.format": "csv"}, r"data\.format: unknown format 'csv'"),
    ({"learnng_rate": 1.0}, r"config\.learnng_rate: unknown field; did you mean config\.learning_rate\?"),
    ({"mesh.dat": 2}, r"config\.mesh\.dat: unknown field; did you mean config\.mesh\.data\?"),
    ({"data.max_file": 3}, r"data\.max_file: unknown field; did you mean data\.max_files\?"),
    ({"model.hiden_size": 64}, r"model\.hiden_size: unknown field; did you mean model\.hidden_size\?"),
]


@pytest.mark.parametrize("override,pattern", BAD_TRAIN, ids=[next(iter(o)) for o, _ in BAD_TRAIN])
def test_train_config_names_field_and_fix(override, pattern):
  with pytest.raises(ConfigError, match=pattern):
    validate_train_config(_config(**override))


def test_tiny_config_is_valid():
  validate_train_config(_config())
  validate_train_config(_config(seq_len=512, keep_checkpoints=1, **{"data.max_files": 0}))


def test_config_variants_through_the_one_loader():
  plain = tiny.get_config().to_json()
  assert cli.load_config("tiny").to_json() == cli.load_config(f"{ROOT}/configs/tiny.py").to_json() == plain
  for name, fields in tiny.VARIANTS.items():
    c = cli.load_config(f"tiny:{name}")
    validate_train_config(c)
    assert c.mesh.data * c.mesh.expert * c.mesh.pipeline == 8, name
    assert {k: c[k.split(".")[0]][k.split(".")[1]] for k in fields} == fields
    with c.unlocked():
      c.mesh, c.pipeline = tiny.get_config().mesh, tiny.get_config().pipeline
    assert c.to_json() == plain, name                    # a variant changes only its fields
  with pytest.raises(ConfigError, match=r"^--config=configs/tiny\.py:foo: unknown variant 'foo'; "
                                        r"configs/tiny\.py takes one of ep, dualpipe$"):
    cli.load_config("tiny:foo")
  with pytest.raises(ConfigError, match=r"configs/small\.py takes none: it has no variants"):
    cli.load_config("small:ep")


# ------------------------------------------------------------------------------------------------
# dsv3.data: max_files and friends, where they are read; nothing is tokenized or cached.

def test_data_max_files_negative(tmp_path):
  with pytest.raises(data.DataError, match=r"data\.max_files: must be an integer >= 0"):
    data.stdlib_corpus(-1)
  with pytest.raises(data.DataError, match=r"data\.max_files: must be an integer >= 0"):
    data.resolve_corpus("stdlib", max_files=-1)
  (tmp_path / "a.txt").write_text("hello")
  with pytest.raises(data.DataError, match=r"data\.max_files: .* got -1"):
    data.resolve_corpus(str(tmp_path), max_files=-1)


@pytest.mark.parametrize("field,value,pattern", [
    ("max_files", -1, r"data\.max_files: must be an integer >= 0 \(0 = every file\), got -1"),
    ("prefetch", -1, r"data\.prefetch: must be an integer >= 0 \(0 = no background thread\)"),
    ("eval_batches", 3, r"data\.eval_batches: unknown field; it moved: set config\.eval_batches instead"),
    ("validation_fraction", -0.5, r"data\.validation_fraction: must be in \[0, 1\)"),
    ("max_file", 2, r"data\.max_file: unknown field; did you mean data\.max_files\?"),
])
def test_make_datasets_rejects_before_touching_disk(workdir, field, value, pattern):
  cache = workdir / "cache"
  cache.mkdir()
  before = snapshot(workdir)
  d = data.default_data_config()
  with d.unlocked():
    d[field] = value
  d.cache_dir = str(cache)
  cfg = ml_collections.ConfigDict(dict(seq_len=16, batch_size=2, seed=0, data=d))
  with pytest.raises(data.DataError, match=pattern):
    data.make_datasets(cfg, process_index=0, process_count=1)
  assert snapshot(workdir) == before


def test_make_datasets_seed_must_be_integer():
  cfg = ml_collections.ConfigDict(dict(seq_len=16, batch_size=2, seed="zero", data=data.default_data_config()))
  with pytest.raises(data.DataError, match=r"seed: must be an integer, got 'zero'"):
    data.make_datasets(cfg, process_index=0, process_count=1)


# ------------------------------------------------------------------------------------------------
# dsv3.plan: the batch, sequence and mesh values it reads.

@pytest.mark.parametrize("override,pattern", [
    ({"batch_size": 0}, r"config\.batch_size: must be a positive integer, got 0"),
    ({"seq_len": 0}, r"config\.seq_len: must be a positive integer, got 0"),
    ({"seq_len": 4096}, r"config\.seq_len: 4096 exceeds config\.model\.max_position_embeddings=512"),
    ({"mesh.data": 0}, r"config\.mesh\.data: must be a positive integer, got 0"),
    ({"mesh.pipeline": -1}, r"config\.mesh\.pipeline: must be a positive integer"),
    ({"mesh.expert": 3}, r"config\.mesh\.expert: n_routed_experts=16 must be divisible by mesh\.expert=3"),
    ({"pipeline.microbatches": 0}, r"config\.pipeline\.microbatches: must be a positive integer"),
    ({"pipeline.schedule": "interleaved"}, r"config\.pipeline\.schedule: unknown 'interleaved'"),
    ({"adam_moments_dtype": "float16"}, r"config\.adam_moments_dtype: must be 'float32' or 'bfloat16'"),
    ({"batch_size": 2.5}, r"config\.batch_size: must be a positive integer, got 2\.5"),
])
def test_plan_names_field(override, pattern):
  with pytest.raises(ConfigError, match=pattern):
    plan.plan(_config(**override))


def test_plan_of_model_block_only_defaults_seq_len_within_limit():
  assert plan.plan(ml_collections.ConfigDict(dict(model=model_config_dict(TINY_MODEL))))["seq_len"] == 512


@pytest.mark.parametrize("call", [
    lambda: plan.plan(TINY_MODEL),
    lambda: plan.param_counts(tiny.get_config()),
    lambda: generate.generate({"vocab_size": 512}, {}, [1, 2]),
])
def test_model_api_names_the_converter(call):
  """The model API takes a ModelConfig (plan.plan a training config): anything else is a TypeError that
  names the converter to call, not an AttributeError deep inside."""
  with pytest.raises(TypeError, match=r"from_config_dict|from_hf_dict|base_train_config"):
    call()


# ------------------------------------------------------------------------------------------------
# dsv3.generate: the prompt plus the new tokens must fit the model's positions (checked before any work).

@pytest.mark.parametrize("fn", [generate.generate, generate.speculative_generate])
def test_generate_longer_than_max_positions(fn):
  pattern = (r"max_new_tokens: the prompt length 10 \+ max_new_tokens 503 = 513 exceeds the model's "
             r"max_position_embeddings=512; set max_new_tokens <= 502 or shorten the prompt")
  with pytest.raises(ValueError, match=pattern):
    fn(TINY_MODEL, None, list(range(1, 11)), max_new_tokens=503)


# ------------------------------------------------------------------------------------------------
# Command lines: one line on stderr, non-zero exit, nothing written.

def _run(module, *args, cwd):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", DSV3_CACHE=str(cwd))
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=120)
  lines = [l for l in proc.stderr.splitlines() if l.strip() and "xla_bridge" not in l]
  return proc.returncode, lines


@pytest.mark.parametrize("args,pattern", [
    (["--config.x=1"], r"^dsv3\.plan: config\.x: unknown field; .*configs/tiny\.py has no such field"),
    (["--config.learnng_rate=1"], r"^dsv3\.plan: config\.learnng_rate: unknown field; did you mean "
                                  r"config\.learning_rate\?$"),
    (["--config.batch_size=abc"], r"^dsv3\.plan: config\.batch_size: 'abc' is not an integer \(.*sets 16\); "
                                  r"give an integer"),
    (["--config.batch_size=0"], r"^dsv3\.plan: config\.batch_size: must be a positive integer, got 0"),
    (["--config.data.vocab_size=512"], r"^dsv3\.plan: config\.data\.vocab_size: unknown field; it moved: set "
                                       r"config\.model\.vocab_size instead$"),
    (["--config.data.eval_batches=2"], r"^dsv3\.plan: config\.data\.eval_batches: unknown field; it moved: set "
                                       r"config\.eval_batches instead$"),
])
def test_plan_cli_one_line(workdir, args, pattern):
  before = snapshot(workdir)
  rc, lines = _run("dsv3.plan", f"--config={ROOT}/configs/tiny.py", *args, cwd=workdir)
  assert rc == 2 and len(lines) == 1, lines
  assert re.search(pattern, lines[0]), lines
  assert snapshot(workdir) == before


def test_plan_cli_missing_config_file(workdir):
  rc, lines = _run("dsv3.plan", "--config=configs/nope.py", cwd=workdir)
  assert rc == 2 and lines == ["dsv3.plan: --config: config file 'configs/nope.py' does not exist; give a file "
                               "such as configs/tiny.py"]
  assert snapshot(workdir) == {"sentinel.txt": hashlib.sha256(b"keep me").hexdigest()}


def test_train_cli_unknown_field_writes_nothing(workdir):
  rc, lines = _run("dsv3.train", f"--config={ROOT}/configs/tiny.py", f"--workdir={workdir}",
                   "--config.learnng_rate=1", cwd=workdir)
  assert snapshot(workdir) == {"sentinel.txt": hashlib.sha256(b"keep me").hexdigest()}
  assert rc == 2 and lines == ["dsv3.train: config.learnng_rate: unknown field; did you mean "
                               "config.learning_rate?"], lines


@pytest.mark.parametrize("args,pattern", [
    (["--temperature=-1"], r"--temperature: must be >= 0 \(0 = greedy\), got -1\.0"),
    (["--top_p=0"], r"--top_p: must be in \(0, 1\]"),
    (["--top_p=1.5"], r"--top_p: must be in \(0, 1\]"),
    (["--checkpoint=missing_dir"], r"--checkpoint: 'missing_dir' does not exist; give an HF-format dir"),
    (["--tokenizer=missing.json"], r"--tokenizer: 'missing.json' does not exist; give a tokenizer\.json"),
    (["--max_new_tokens=600"], r"max_new_tokens: the prompt length 3 \+ max_new_tokens 600 = 603 exceeds "
                               r"the model's max_position_embeddings=512; set max_new_tokens <= 509"),
])
def test_generate_cli_one_line(workdir, args, pattern):
  before = snapshot(workdir)
  rc, lines = _run("dsv3.generate", f"--config={ROOT}/configs/tiny.py", "--prompt_ids=1,2,3", *args, cwd=workdir)
  assert rc != 0 and len(lines) == 1, lines
  assert re.search(r"^dsv3\.generate: ValueError: " + pattern, lines[0]), lines
  assert snapshot(workdir) == before
