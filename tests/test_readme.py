"""Every `python -m dsv3...` command the README and docs/ show works: its module is an entry point that defines
the flags they pass it, and a test (named in RUN_BY) runs that command. Their links resolve, the files they
name exist, and nothing points outside the repository. A doc edit that drifts from the code, or a new command
without a test, fails here."""
import importlib
import glob
import json
import os
import re
import shlex
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from absl import flags

from dsv3 import cli, hf, model
from dsv3.config import ModelConfig
from dsv3.data import tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC_FILES = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                                   if f.endswith(".md"))
DOCS = {f: open(os.path.join(ROOT, f)).read() for f in DOC_FILES}
README = "\n".join(DOCS.values())      # the commands of every page are checked alike
# Subcommand -> the module that defines its flags (and runs it).
SUBCOMMANDS = {"dsv3.bench": {"gpu": "dsv3.bench.gpu"}, "dsv3.data": {"prepare": "dsv3.data.prepare"}}

# The test that runs each README command (file::function; a slow one where the command is long by nature).
RUN_BY = {
    "dsv3.train": "tests/test_train.py::test_entry_cli_two_steps",
    "dsv3.plan": "tests/test_plan.py::test_671b_exact_numbers_via_cli",
    "dsv3.generate": "tests/test_readme.py::test_generate_cli_as_the_readme_shows_it",
    "dsv3.convert": "tests/test_convert.py::test_roundtrip_through_orbax",
    "dsv3.data": "tests/test_prepare.py::test_kill_resume_is_byte_identical_and_up_to_date",
    "dsv3.pipeline.schedules": "tests/test_schedules.py::test_timeline_png_and_cli",
    "dsv3.bench": "tests/test_bench_gpu.py::test_smoke_on_cpu_writes_the_tables_and_json",
    "dsv3.bench.hlo_gemms": "tests/test_readme.py::test_hlo_gemms_cli_counts_a_compiled_dot",
    "dsv3.bench.ep": "tests/test_readme.py::test_bench_entry_points_run",
    "dsv3.bench.pipeline": "tests/test_readme.py::test_bench_entry_points_run",
    "dsv3.bench.overlap": "tests/test_overlap.py::test_fused_fb_hides_the_expert_all_to_alls",
    "dsv3.analysis.step_time": "tests/test_step_time.py::test_cli_costs_a_dry_run_for_another_chip",
    "dsv3.bench.studies.balance": "tests/test_studies.py::test_balance_study_runs_and_reports",
    "dsv3.bench.studies.mtp": "tests/test_studies.py::test_mtp_study_ablates_and_measures_acceptance",
    "dsv3.bench.studies.fp8": "tests/test_studies.py::test_fp8_study_compares_the_same_steps",
}


def readme_commands() -> list:
  """Every `python -m dsv3...` command of the README and docs/ (fenced blocks with their continuation lines joined, and
  inline code), as [module, args...]; optional parts in [brackets] count as given."""
  text = re.sub(r"\\\n\s*", " ", README)
  blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
  inline = [s.replace("\n", " ") for s in re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))]
  out = []
  for span in blocks + inline:
    for line in span.splitlines():
      for m in re.finditer(r"python3? -m (dsv3[\w.]*)([^#&;|`]*)", line):
        out.append([m.group(1)] + shlex.split(re.sub(r"[\[\]]", " ", m.group(2))))
  return out


COMMANDS = readme_commands()
MODULES = sorted({c[0] for c in COMMANDS})


def test_readme_commands_are_found():
  assert {"dsv3.train", "dsv3.plan", "dsv3.bench"} <= set(MODULES), MODULES


def test_every_readme_command_is_run_by_a_test():
  missing = [m for m in MODULES if m not in RUN_BY]
  assert not missing, f"README commands no test runs: {missing}; add the test and name it in RUN_BY"
  for module, node in RUN_BY.items():
    path, name = node.split("::")
    body = open(os.path.join(ROOT, path)).read()
    assert re.search(rf"^def {name}\(", body, flags=re.M), f"RUN_BY[{module!r}]: no test {node}"
    test = body[body.index(f"def {name}("):].split("\ndef ")[0]
    parent, _, leaf = module.rpartition(".")
    assert module in test or module in body or re.search(rf"from {parent} import .*\b{leaf}\b", body), \
        f"RUN_BY[{module!r}]: {node} does not mention {module}"


def _anchor(heading: str) -> str:
  """GitHub's id for a markdown heading."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_doc_links_resolve():
  """Each relative link of the README and docs/ names a file of the repository, and its #anchor a heading."""
  bad = []
  for f, text in DOCS.items():
    for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"```.*?```", "", text, flags=re.S)):
      if re.match(r"[a-z]+:", target):
        continue
      path, _, frag = target.partition("#")
      full = os.path.normpath(os.path.join(ROOT, os.path.dirname(f), path)) if path else os.path.join(ROOT, f)
      if not os.path.exists(full):
        bad.append(f"{f}: {target} (no such file)")
      elif frag and full.endswith(".md"):
        headings = re.findall(r"^#+ (.+)$", open(full).read(), flags=re.M)
        if frag not in {_anchor(h) for h in headings}:
          bad.append(f"{f}: {target} (no such heading)")
  assert not bad, bad


def test_docs_stay_inside_the_repository():
  """A user's clone has only the repository: every `../` path a page names stays inside it, and every
  markdown file a page names is one of the repository's."""
  repo_md = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "**", "*.md"), recursive=True)}
  bad = []
  for f, text in DOCS.items():
    for n, line in enumerate(text.splitlines(), 1):
      for up in re.findall(r"(?:\.\./)+[\w./-]*", line):
        full = os.path.normpath(os.path.join(ROOT, os.path.dirname(f), up))
        if not (full.startswith(ROOT + os.sep) and os.path.exists(full)):
          bad.append(f"{f}:{n}: {up} is not in the repository")
      bad += [f"{f}:{n}: {md} is no file of the repository" for md in re.findall(r"\b[\w-]+\.md\b", line)
              if md not in repo_md]
  assert not bad, bad


def test_named_package_paths_exist():
  """Every dsv3/... file or folder the README and docs/ name (`dsv3/nn/moe.py`, `dsv3/training/`) exists."""
  named = {m.group(1) for text in DOCS.values() for m in re.finditer(r"\b(dsv3/[\w/]*?(?:\.py|/))(?![\w/])", text)}
  missing = sorted(p for p in named if not os.path.exists(os.path.join(ROOT, p)))
  assert not missing, f"named in the docs but not in the repository: {missing}"


def _entry(module: str, sub: str | None):
  """The module whose define_flags() a `python -m module [sub]` command line runs: the module itself, a
  package's __main__, or the subcommand's module (SUBCOMMANDS)."""
  name = SUBCOMMANDS.get(module, {}).get(sub) or module
  mod = importlib.import_module(name)
  if hasattr(mod, "__path__"):                   # a package runs its __main__.py
    mod = importlib.import_module(f"{name}.__main__")
  return mod


def _flags(module: str, sub: str | None) -> set:
  """The flags `python -m module [sub]` defines: its define_flags() run on a fresh FlagValues (the convention:
  flags are defined only there, never at import, so this defines nothing on the global FLAGS)."""
  mod = _entry(module, sub)
  assert hasattr(mod, "define_flags"), f"{mod.__name__}: a command line defines its flags in define_flags()"
  fv = flags.FlagValues()
  mod.define_flags(fv)
  return set(fv)


@pytest.mark.parametrize("module", MODULES)
def test_readme_flags_are_the_modules_flags(module):
  """Each flag the README passes to `module` is one the module defines (--config.* fields are checked by
  dsv3.cli against the config file at run time); a positional word is one of the module's subcommands."""
  by_sub = {}
  for cmd in (c for c in COMMANDS if c[0] == module):
    words = [a for a in cmd[1:] if not a.startswith("-") and not re.fullmatch(r"[\w./]+\.(txt|py|json|png)|[A-Z_]+|\.\.\.|\d+", a)]
    sub = words[0] if words and words[0] in SUBCOMMANDS.get(module, ()) else None
    names = [a[2:].split("=")[0] for a in cmd[1:] if a.startswith("--") and not a.startswith("--config.")]
    by_sub.setdefault(sub, set()).update(n[2:] if n.startswith("no") and n[2:] else n for n in names)
  for sub, names in by_sub.items():
    if not names:
      continue                                   # positional arguments only (dsv3.bench.hlo_gemms FILE)
    defined = _flags(module, sub)
    assert defined, f"`python -m {module} {sub or ''}`: define_flags() defined no flags"
    unknown = sorted(n for n in names if n not in defined and f"no{n}" not in defined)
    assert not unknown, f"README passes `python -m {module} {sub or ''}` flags it does not define: {unknown}"


def test_importing_the_commands_defines_no_flag():
  """Library callers (tests, notebooks, other modules) import the command modules: none may define a flag at
  import, or two of them in one process would clash."""
  entries = sorted({_entry(c[0], None).__name__ for c in COMMANDS} | set().union(*map(set, (
      d.values() for d in SUBCOMMANDS.values()))))
  code = ("import sys; from absl import flags; import " + ", ".join(entries) + "; "
          "print([n for n in flags.FLAGS if (flags.FLAGS.find_module_defining_flag(n) or '').startswith('dsv3')])")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "[]", f"flags defined at import: {out.stdout}"


def test_subcommand_help_lists_its_flags():
  """`python -m dsv3.data prepare --help` shows prepare's flags (absl's --help lists the main module's)."""
  out = subprocess.run([sys.executable, "-m", "dsv3.data", "prepare", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300).stdout
  assert "--source" in out and "--out" in out, out


def test_hlo_gemms_cli_counts_a_compiled_dot(tmp_path):
  hlo = jax.jit(lambda a, b: a @ b).lower(jnp.ones((64, 32)), jnp.ones((32, 16))).compile().as_text()
  path = tmp_path / "train_step.hlo.txt"
  path.write_text(hlo)
  proc = subprocess.run([sys.executable, "-m", "dsv3.bench.hlo_gemms", str(path)], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert re.search(r"\b1\b", proc.stdout) and "dot" in proc.stdout.lower(), proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("args", [["dsv3.bench.ep", "--iters=1"],
                                  ["dsv3.bench.pipeline", "--schedules", "dualpipe", "--unfused", "--steps", "1"]])
def test_bench_entry_points_run(args):
  proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert len(proc.stdout.strip().splitlines()) > 3, proc.stdout


def test_generate_cli_as_the_readme_shows_it(tmp_path):
  """README: python -m dsv3.generate --checkpoint=HF_DIR --tokenizer=tokenizer.json --prompt="def main(" --speculative"""
  cfg = ModelConfig.from_config_dict(cli.load_config("tiny")).replace(vocab_size=512)
  hf.save_checkpoint(cfg, model.init(cfg, jax.random.key(0)), str(tmp_path / "hf"))
  texts = [open(os.path.join(os.path.dirname(json.__file__), f)).read() for f in ("decoder.py", "encoder.py")]
  tokenizer.train_bpe(texts, 512).save(str(tmp_path / "tokenizer.json"))
  proc = subprocess.run([sys.executable, "-m", "dsv3.generate", f"--checkpoint={tmp_path / 'hf'}",
                         f"--tokenizer={tmp_path / 'tokenizer.json'}", "--prompt=def main(", "--speculative",
                         "--max_new_tokens=4"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "def main(" in proc.stdout, proc.stdout
