"""The pipeline executor must reproduce the unpipelined step exactly: loss, metrics, gradients and loads.

Every schedule is run on 8 simulated CPU devices (P=4 ranks of 2 devices, and P=8 of 1) and compared with
jax.value_and_grad of losses.objective over model.forward_train on the whole batch. The stage programs
are cached by jit per stage shape and sub-mesh, so the P=4 schedules that share a batch split (gpipe,
1f1b, zb1p and DualPipe's first direction) compile them once; XLA's CPU optimisation level is lowered to
keep compilation short (the results are fp32 either way).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import tiny_model

from dsv3 import layout, model
from dsv3.parallel import sharding
from dsv3.pipeline import executor, per_device, stages
from dsv3.training import losses

CFG4 = tiny_model.even_config(num_hidden_layers=4, remat="none")
CFG8 = CFG4.replace(num_hidden_layers=8)
BATCH, SEQ = 16, 8
MTP_WEIGHT, ALPHA = 0.3, 1e-2          # alpha large enough that the balance term's gradient matters
FAST_COMPILE = {"xla_backend_optimization_level": 0}
TOL = 1e-5


def _variables(cfg, seed=0):
  """Random variables without compiling model.init: normal weights, ones for norms, small biases."""
  shapes = jax.eval_shape(lambda: model.init(cfg, jax.random.key(0)))
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = jax.tree_util.keystr(path)
    if name.endswith("['weight']"):
      return jnp.asarray(1.0 + 0.1 * rng.standard_normal(s.shape), s.dtype)
    return jnp.asarray(0.05 * rng.standard_normal(s.shape), s.dtype)
  return jax.tree_util.tree_map_with_path(leaf, shapes)


def _reference(cfg, variables, tokens):
  def ref(params):
    out = model.forward_train(cfg, {"params": params, "routing": variables["routing"]}, tokens[:, :-1])
    loss, metrics = losses.objective(cfg, out, tokens[:, 1:], MTP_WEIGHT, ALPHA)
    return loss, (metrics, losses.load_tree(out))
  (loss, (metrics, loads)), grads = jax.jit(jax.value_and_grad(ref, has_aux=True))(variables["params"])
  return loss, metrics, grads, loads


def _setup(cfg):
  variables = _variables(cfg)
  tokens = jax.random.randint(jax.random.key(1), (BATCH, SEQ + 1), 0, cfg.vocab_size, jnp.int32)
  return cfg, variables, tokens, _reference(cfg, variables, tokens)


@pytest.fixture(scope="module")
def model4():
  return _setup(CFG4)


@pytest.fixture(scope="module")
def model8():
  return _setup(CFG8)


def _max_diff(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  return max(float(jnp.max(jnp.abs(jnp.asarray(x) - jnp.asarray(y)))) for x, y in
             zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _check(setup, schedule, num_stages, microbatches, **kwargs):
  cfg, variables, tokens, (loss0, metrics0, grads0, loads0) = setup
  loss, metrics, grads, loads = executor.pipeline_value_and_grad(
      cfg, variables, tokens, schedule=schedule, num_stages=num_stages, microbatches=microbatches,
      mtp_weight=MTP_WEIGHT, alpha=ALPHA, compiler_options=FAST_COMPILE, **kwargs)
  assert set(metrics) == set(metrics0)
  diffs = {"loss": abs(float(loss - loss0)), "metrics": _max_diff(metrics, metrics0),
           "grads": _max_diff(grads, grads0), "loads": _max_diff(loads, loads0)}
  print(f"{schedule} P={num_stages} M={microbatches}: max |diff| {diffs}")
  assert all(d <= TOL for d in diffs.values()), diffs
  # The loads are integer counts summed over the whole batch: every token picks k experts per MoE layer.
  for leaf in jax.tree.leaves(loads):
    np.testing.assert_allclose(np.asarray(leaf).sum(-1), BATCH * SEQ * cfg.num_experts_per_tok)
  return loss, metrics, grads, loads


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe", "zb1p", "dualpipe"])
def test_p4_matches_reference(model4, schedule):
  _check(model4, schedule, 4, 8)


def test_second_step_reuses_compiled_programs(model4):
  _check(model4, "zb1p", 4, 8)
  progs = executor.get_plan(CFG4, "zb1p", 4, 8, compiler_options=FAST_COMPILE).programs
  sizes = [f._cache_size() for f in progs]
  _check(model4, "zb1p", 4, 8)
  assert [f._cache_size() for f in progs] == sizes and any(sizes)     # compiled by the first step only


@pytest.mark.slow
def test_p4_dualpipev_matches_reference(model8):
  _check(model8, "dualpipev", 4, 8)          # 8 stages in a V on 4 ranks: one layer each


@pytest.mark.slow
@pytest.mark.parametrize("schedule,microbatches", [("dualpipe", 16), ("1f1b", 16)])
def test_p8_matches_reference(model8, schedule, microbatches):
  _check(model8, schedule, 8, microbatches)


def test_uneven_layer_split():
  cfg = CFG4.replace(num_hidden_layers=6)
  specs = stages.split_layers(cfg, 4)
  assert [s.layers for s in specs] == [(0, 1), (2, 3), (4,), (5,)]
  assert specs[0].moe == (False, True) and specs[0].first and specs[-1].last


@pytest.mark.parametrize("schedule,num_stages,microbatches,match", [
    ("dualpipe", 4, 6, r"pipeline\.microbatches must be even and >= 2 \* mesh\.pipeline = 8"),
    ("dualpipe", 4, 9, r"pipeline\.microbatches must be even"),
    ("dualpipe", 3, 8, r"mesh\.pipeline must be even"),
    ("dualpipev", 4, 7, r"pipeline\.microbatches must be >= 2 \* mesh\.pipeline = 8"),
    ("1f1b", 4, 0, r"pipeline\.microbatches must be a positive integer"),
    ("interleaved", 4, 8, r"pipeline\.schedule must be one of"),
    ("1f1b", 3, 8, r"mesh\.pipeline = 3 must divide the number of devices"),
])
def test_bad_settings_raise(model4, schedule, num_stages, microbatches, match):
  cfg, variables, tokens, _ = model4
  with pytest.raises(ValueError, match=match):
    executor.pipeline_value_and_grad(cfg, variables, tokens, schedule=schedule, num_stages=num_stages,
                                     microbatches=microbatches, mtp_weight=MTP_WEIGHT, alpha=ALPHA)


def test_batch_and_layer_errors(model4):
  cfg, variables, tokens, _ = model4
  with pytest.raises(ValueError, match=r"pipeline\.microbatches: batch_size=12 must split into 8 micro-batches"):
    executor.pipeline_value_and_grad(cfg, variables, tokens[:12], schedule="1f1b", num_stages=4,
                                     microbatches=8, mtp_weight=MTP_WEIGHT, alpha=ALPHA)
  with pytest.raises(ValueError, match=r"num_hidden_layers = 4 cannot be cut into 8 pipeline stages"):
    executor.pipeline_value_and_grad(cfg, variables, tokens, schedule="dualpipev", num_stages=4,
                                     microbatches=8, mtp_weight=MTP_WEIGHT, alpha=ALPHA)


@pytest.mark.parametrize("schedule", ["dualpipe", "zb1p"])
def test_collective_transfers_match_reference(model4, schedule):
  """The two-rank ppermute programs that carry activations between processes, here within one."""
  _check(model4, schedule, 4, 8, transfer="collective")


def test_variables_on_the_pipeline_mesh(model4):
  """Variables given on the trainer's ('pipeline', 'data', 'expert') mesh: each rank gets its stages'."""
  cfg, variables, tokens, _ = model4
  mesh = executor.pipeline_mesh(4)
  placed = jax.device_put(variables, NamedSharding(mesh, P()))
  _check((cfg, placed, tokens, model4[3]), "1f1b", 4, 8, devices=mesh)


def test_expert_parallel_inside_stages(model4):
  """P=4 ranks of ('data' 1, 'expert' 2): each stage's routed experts split over its 'expert' axis (the
  dense all-to-all dispatch of dsv3.parallel.expert_parallel), variables placed as the trainer places them."""
  from dsv3.parallel import sharding
  cfg, variables, tokens, reference = model4
  mesh = tiny_model.mesh(data=1, expert=2, pipeline=4)
  placed = {"params": jax.device_put(variables["params"], sharding.param_shardings(mesh, variables["params"])),
            "routing": jax.device_put(variables["routing"], NamedSharding(mesh, P()))}
  experts = placed["params"]["moe_layers"]["mlp"]["experts_gate_proj"]
  assert experts.sharding.spec == P(None, "expert")
  plan = executor.get_plan(cfg, "dualpipe", 4, 8, devices=mesh, compiler_options=FAST_COMPILE)
  assert all(ep is not None and ep.num_shards == 2 for ep in plan.expert_parallel)
  _check((cfg, placed, tokens, reference), "dualpipe", 4, 8, devices=mesh)


@pytest.mark.parametrize("schedule", ["1f1b", "dualpipe"])
def test_evaluate_in_microbatches_matches_the_whole_batch(model4, schedule):
  """executor.evaluate runs the batch in training-sized micro-batches (as much activation memory as a
  step): the mean cross entropy and the summed loads are the whole batch's."""
  cfg, variables, tokens, _ = model4
  plan = executor.get_plan(cfg, schedule, 2, 4, compiler_options=FAST_COMPILE)
  per_layer = {k: layout.unstack(cfg, jax.tree.map(np.asarray, variables[k])) for k in ("params", "routing")}
  ranks = []
  for r, mesh in enumerate(plan.meshes):
    part = plan.layout.restrict(per_layer, r)
    ranks.append({k: jax.device_put(part[k], sharding.param_shardings(mesh, part[k])) for k in part})
  ce, loads = executor.evaluate(plan, ranks, np.asarray(tokens))
  out = model.forward_train(cfg, variables, tokens[:, :-1])
  _, metrics = losses.objective(cfg, out, tokens[:, 1:], 0.0, 0.0)
  assert abs(ce - float(metrics["ce"])) < 1e-5
  want = np.asarray(layout.moe_loads(losses.load_tree(out))[0])           # stacked: [moe layers, E]
  np.testing.assert_array_equal(loads, want)


@pytest.fixture(scope="module")
def model4_remat():
  return _setup(CFG4.replace(remat="full"))


def test_residuals_leave_out_the_parameters(model4_remat):
  """Under a remat policy a stage's VJPs refer to its parameter copies, which F leaves out of its outputs
  (stages.ParamRef) and B, B*, W put back: a rank holds its parameters once, not once per micro-batch in
  flight. The step still equals the unpipelined one."""
  cfg, variables, tokens, _ = model4_remat
  _check(model4_remat, "zb1p", 2, 4)          # B* and W as well as F and B
  plan = executor.get_plan(cfg, "zb1p", 2, 4, compiler_options=FAST_COMPILE)
  per_layer = {k: layout.unstack(cfg, jax.tree.map(np.asarray, variables[k])) for k in ("params", "routing")}
  part = plan.layout.restrict(per_layer, 1)
  mesh = plan.meshes[1]
  p, rt = stages.stage_variables(part["params"], part["routing"], plan.specs[1])
  devices = per_device.Devices.of(mesh, BATCH // 4)
  p = devices.copies(jax.device_put(p, sharding.param_shardings(mesh, p)), cfg)
  x = jax.device_put(jnp.zeros((BATCH // 4, SEQ, cfg.hidden_size)), NamedSharding(mesh, P(("data", "expert"))))
  coefs = jnp.asarray([MTP_WEIGHT, ALPHA, 0.25], jnp.float32)
  _, vjps, _ = plan.programs.forward(cfg, plan.specs[1].program_key, p, rt, x, tokens[:BATCH // 4], coefs, devices)
  refs = jax.tree.leaves(vjps, is_leaf=lambda r: isinstance(r, stages.ParamRef))
  assert sum(isinstance(r, stages.ParamRef) for r in refs) == len(jax.tree.leaves(p))    # every parameter
  weights = {(a.shape[1:], a.dtype) for a in jax.tree.leaves(p) if a.ndim > 2}
  assert not [a.shape for a in jax.tree.leaves(vjps) if (a.shape[1:], a.dtype) in weights]


def test_fused_fb_cells_equal_their_halves(model4, monkeypatch):
  """DualPipe's F&B cells run as one program (stages.forward_backward), once per cell; dispatching each
  cell's F and B programs back to back instead (fused=False) never runs it, and gives the same step."""
  cfg, variables, tokens, _ = model4
  kw = dict(schedule="dualpipe", num_stages=4, microbatches=8, mtp_weight=MTP_WEIGHT, alpha=ALPHA,
            compiler_options=FAST_COMPILE)
  plan = executor.get_plan(CFG4, "dualpipe", 4, 8, compiler_options=FAST_COMPILE)
  cells = sum(op.kind == "FB" for line in plan.schedule for op in line)
  calls, program = [], plan.programs.forward_backward
  monkeypatch.setattr(plan, "programs", plan.programs._replace(
      forward_backward=lambda *a, **k: calls.append(1) or program(*a, **k)))
  fused = executor.pipeline_value_and_grad(cfg, variables, tokens, **kw)
  assert len(calls) == cells > 0
  apart = executor.pipeline_value_and_grad(cfg, variables, tokens, fused=False, **kw)
  assert len(calls) == cells
  assert _max_diff(fused, apart) <= 1e-6


def test_fused_fb_with_input_only_backward(model4):
  """stages.forward_backward with a B* half returns F's outputs and B*'s (input gradient, cotangents) as the
  separate programs do: the F&B* cell of a zero-bubble schedule."""
  cfg, variables, tokens, _ = model4
  plan = executor.get_plan(cfg, "1f1b", 2, 4, compiler_options=FAST_COMPILE)
  per_layer = {k: layout.unstack(cfg, jax.tree.map(np.asarray, variables[k])) for k in ("params", "routing")}
  part = plan.layout.restrict(per_layer, 1)
  mesh, spec = plan.meshes[1], plan.specs[1]
  devices = per_device.Devices.of(mesh, BATCH // 4)
  p, rt = stages.stage_variables(part["params"], part["routing"], spec)
  p = devices.copies(jax.device_put(p, sharding.param_shardings(mesh, p)), cfg)
  rows = NamedSharding(mesh, P(("data", "expert")))
  x0, x1 = (jax.device_put(jax.random.normal(jax.random.key(i), (BATCH // 4, SEQ, cfg.hidden_size)), rows)
            for i in (2, 3))
  tok = lambda m: jax.device_put(tokens[m * (BATCH // 4):(m + 1) * (BATCH // 4)], rows)
  coefs = jax.device_put(jnp.asarray([MTP_WEIGHT, ALPHA, 0.25], jnp.float32), NamedSharding(mesh, P()))
  key = spec.program_key
  _, vjps, _ = plan.programs.forward(cfg, key, p, rt, x0, tok(0), coefs, devices)
  want_f = plan.programs.forward(cfg, key, p, rt, x1, tok(1), coefs, devices)
  want_b = plan.programs.backward_input(key, vjps, None, coefs, p)
  args = (cfg, key, key, True, devices, p, rt, x1, tok(1), coefs, vjps, None, None, p)
  got_f, got_b = plan.programs.forward_backward(*args)
  assert _max_diff((want_f[0], want_f[2], want_b), (got_f[0], got_f[2], got_b)) <= 1e-6
  # pipeline.fb_barriers: one barrier per step the two chunks take side by side (F's layers, then its head;
  # B*'s head, then its layers), none without; the numbers are the same either way.
  free = stages.programs(tuple(sorted(FAST_COMPILE.items())), fb_barriers=False).forward_backward
  barriers = lambda program: program.lower(*args).as_text().count("stablehlo.optimization_barrier")
  assert barriers(plan.programs.forward_backward) - barriers(free) == len(spec.layers)
  free_f, free_b = free(*args)
  assert _max_diff((got_f[0], got_f[2], got_b), (free_f[0], free_f[2], free_b)) == 0.0


def test_bf16_working_copies_equal_the_fp32_master(monkeypatch):
  """A BF16 model's stages run on BF16 per-device copies of the FP32 master (half the bytes; RMSNorm scales,
  the router and the embedding, which the model reads in FP32, and the head, read twice, stay FP32), and give
  bitwise the loss and gradients of FP32 copies: the model casts each weight to BF16 where it reads it
  either way, and the accumulators are FP32."""
  from dsv3.nn import layers
  cfg = CFG4.replace(dtype="bfloat16")
  variables = _variables(cfg)
  tokens = jax.random.randint(jax.random.key(1), (BATCH, SEQ + 1), 0, cfg.vocab_size, jnp.int32)
  mesh = tiny_model.mesh(data=2, expert=2, pipeline=2)
  placed = {"params": jax.device_put(variables["params"], sharding.param_shardings(mesh, variables["params"])),
            "routing": jax.device_put(variables["routing"], NamedSharding(mesh, P()))}
  seen = []
  copies = per_device.Devices.copies

  def spy(self, params, cfg):
    out = copies(self, params, cfg)
    seen.append({jax.tree_util.keystr(p)[-12:]: x.dtype for p, x in jax.tree_util.tree_flatten_with_path(out)[0]})
    return out

  monkeypatch.setattr(per_device.Devices, "copies", spy)
  run = lambda: executor.pipeline_value_and_grad(cfg, placed, tokens, schedule="dualpipe", num_stages=2,
                                                 microbatches=4, mtp_weight=MTP_WEIGHT, alpha=ALPHA,
                                                 compiler_options=FAST_COMPILE, devices=mesh)
  loss, metrics, grads, loads = run()
  dtypes = {k: v for s in seen for k, v in s.items()}
  assert dtypes and {str(d) for d in dtypes.values()} == {"bfloat16", "float32"}, dtypes
  assert all(str(d) == "float32" for k, d in dtypes.items() if k.endswith(("['weight']", "['gate']", "mbedding']", "['lm_head']")))
  assert all(str(g.dtype) == "float32" for g in jax.tree.leaves(grads))
  monkeypatch.setattr(layers, "working_dtype", lambda name, dtype, cfg: jnp.dtype(jnp.float32))
  seen.clear()
  loss32, metrics32, grads32, loads32 = run()
  assert {str(d) for s in seen for d in s.values()} == {"float32"}
  assert float(loss) == float(loss32)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), grads, grads32)
