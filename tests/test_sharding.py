"""The mesh and the placement table: clear errors, per-stage sub-meshes, experts on 'expert', ZeRO-1."""
import jax
import jax.numpy as jnp
import ml_collections
import optax
import pytest
from jax.sharding import PartitionSpec as P

import tiny_model

from dsv3 import model
from dsv3.parallel import sharding

CFG = tiny_model.even_config(num_hidden_layers=3)


def _abstract():
  return jax.eval_shape(lambda: model.init(CFG, jax.random.key(0)))


def test_mesh_product_must_match_devices():
  with pytest.raises(ValueError, match=r"mesh.data × mesh.expert × mesh.pipeline = 2 × 2 × 1 = 4 but there "
                                       r"are 8 devices"):
    sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, expert=2, pipeline=1)))
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, expert=2, pipeline=2)))
  assert mesh.axis_names == ("pipeline", "data", "expert")
  assert dict(mesh.shape) == {"pipeline": 2, "data": 2, "expert": 2}


def test_stage_meshes():
  mesh = sharding.make_mesh(dict(data=2, expert=1, pipeline=4))
  stages = sharding.stage_meshes(mesh)
  assert len(stages) == 4
  assert all(s.axis_names == ("data", "expert") and dict(s.shape) == {"data": 2, "expert": 1} for s in stages)
  devices = [d for s in stages for d in s.devices.flat]
  assert len(set(devices)) == 8                      # the stages partition the devices
  assert [d for d in stages[1].devices.flat] == list(mesh.devices[1].flat)


def test_partition_table():
  mesh = sharding.make_mesh(dict(data=2, expert=4, pipeline=1))
  specs = sharding.param_specs(mesh, _abstract())
  flat = {sharding.path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(
      specs, is_leaf=lambda x: isinstance(x, P))[0]}
  experts = {k: v for k, v in flat.items() if "/experts_" in k}
  assert len(experts) == 6                           # gate/up/down in the MoE stack and in the MTP block
  for k, v in experts.items():
    stacked = "/moe_layers/" in k                    # [L, E, ...] under nn.scan, [E, ...] in the MTP block
    assert v == (P(None, "expert") if stacked else P("expert")), (k, v)
  others = {k: v for k, v in flat.items() if k not in experts}
  assert others and all(v == P() for v in others.values()), others
  shardings = sharding.param_shardings(mesh, _abstract())
  leaf = shardings["params"]["moe_layers"]["mlp"]["experts_up_proj"]
  assert leaf.shard_shape((2, 8, 32, 16)) == (2, 2, 32, 16)
  # fsdp: the replicated ones go over 'data' on their first divisible axis.
  fsdp = sharding.param_specs(mesh, _abstract(), fsdp=True)
  assert fsdp["params"]["lm_head"] == P("data")
  assert fsdp["params"]["moe_layers"]["mlp"]["experts_up_proj"] == P("data", "expert")


def test_zero1_shards_optimizer_state_over_data():
  """Non-expert leaves over data x expert (the batch's axes: their data-parallel degree), expert leaves keep E
  over 'expert' and take 'data' elsewhere."""
  mesh = sharding.make_mesh(dict(data=4, expert=2, pipeline=1))
  params = _abstract()["params"]
  opt_state = jax.eval_shape(optax.adamw(1e-3).init, params)
  sh = sharding.zero1_shardings(mesh, opt_state)
  mu = sh[0].mu
  assert mu["lm_head"].spec == P(("data", "expert"))                        # [32, 64]: 32 % 8 == 0
  assert mu["moe_layers"]["mlp"]["experts_gate_proj"].spec == P(None, "expert", "data")   # [2, 8, 32, 16]
  assert mu["mtp_0"]["block"]["mlp"]["experts_down_proj"].spec == P("expert", "data")     # [8, 16, 32]
  assert sh[0].count.spec == P()                                            # scalar: replicated
  odd = sharding.zero1_shardings(mesh, {"x": jax.ShapeDtypeStruct((3, 5), jnp.float32)})
  assert odd["x"].spec == P()                                               # nothing divisible by 8
  # Pipelined: the state is split over the pipeline ranks as well (each stage's state lives on one rank).
  pp = sharding.zero1_shardings(sharding.make_mesh(dict(data=2, expert=2, pipeline=2)), opt_state)
  assert pp[0].mu["lm_head"].spec == P(("pipeline", "data", "expert"))
  assert pp[0].mu["moe_layers"]["mlp"]["experts_gate_proj"].spec == P(None, "expert", ("pipeline", "data"))


def test_batch_sharding():
  mesh = sharding.make_mesh(dict(data=2, expert=4, pipeline=1))
  assert sharding.batch_sharding(mesh).spec == P(("data", "expert"))
  assert sharding.batch_sharding(mesh).shard_shape((16, 5)) == (2, 5)
