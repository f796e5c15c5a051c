"""The planner: the published 671B numbers through the CLI, GQA baselines, hand counts on a tiny model,
FLOPs, and how bytes per device respond to the mesh."""
import json
import os
import pathlib
import subprocess
import sys
import time

import ml_collections
import pytest

import tiny_model

from dsv3 import abstract_model
from dsv3 import cli, plan
from dsv3.analysis import memory
from dsv3.training.train_config import model_config_dict

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "deepseek_v3.py"

# Smaller than the shared tiny model, with 4 experts and rope dim 2: the hand counts below are written for it.
TINY = tiny_model.config(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                         num_hidden_layers=3, num_attention_heads=2, q_lora_rank=8, kv_lora_rank=8,
                         qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=4, n_routed_experts=4, n_group=2,
                         topk_group=1)


def _run_cli(*args):
  env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-m", "dsv3.plan", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def _load_config():
  return cli.load_config(str(CONFIG))


def _train_config(cfg, data=1, expert=1, pipeline=1, schedule="none", seq_len=16, moments="float32"):
  c = ml_collections.ConfigDict()
  c.model = model_config_dict(cfg)
  c.precision, c.seq_len, c.batch_size, c.adam_moments_dtype = "fp32", seq_len, 4, moments
  c.mesh = ml_collections.ConfigDict(dict(data=data, expert=expert, pipeline=pipeline))
  c.pipeline = ml_collections.ConfigDict(dict(schedule=schedule, microbatches=2 * pipeline))
  return c


# --------------------------------------------------------------------------------------------------
# The published model.
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_json():
  out = _run_cli(f"--config={CONFIG}", "--json")
  return json.loads(out)       # the whole stdout must be exactly one JSON object


def test_671b_exact_numbers_via_cli(cli_json):
  assert cli_json["total_params"] == 671_026_404_352
  assert cli_json["mtp_params"] == 11_610_067_968
  assert cli_json["kv_cache_bytes_per_token"] == 70_272
  # The report's "37B activated"; ours counts embedding and head too.
  assert 36e9 < cli_json["activated_params"] < 38e9
  assert cli_json["activated_params"] < cli_json["total_params"]
  # ~250 GFLOPs per token at 4K (DeepSeek's own MoE-vs-dense comparison quotes 250).
  assert 240e9 < cli_json["flops_per_token"] < 260e9
  assert 0 < cli_json["mtp_flops_per_token"] < cli_json["flops_per_token"] / 10


def test_671b_config_recipe(cli_json):
  c = _load_config()
  assert (c.batch_size, c.seq_len, c.learning_rate, c.precision) == (15360, 4096, 2.2e-4, "fp8")
  assert (c.mesh.pipeline, c.mesh.expert, c.mesh.data) == (16, 64, 2)
  assert c.pipeline.schedule == "dualpipe"
  assert c.pipeline.microbatches % 2 == 0 and c.pipeline.microbatches >= 2 * c.mesh.pipeline
  mem = cli_json["memory_per_device"]
  assert mem["devices"] == 2048
  # DualPipe: rank 0 holds stages 0 and 15 (embedding, head and MTP), the largest rank.
  assert mem["rank_stages"] == [0, 15]
  assert mem["total_bytes"] == max(mem["per_rank_total_bytes"])
  assert mem["optimizer"] == {"bfloat16": mem["optimizer"]["bfloat16"]}     # BF16 moments, FP32 params
  assert 10 * 2**30 < mem["total_bytes"] < 80 * 2**30


def test_fb_cell_adds_the_other_chunks_forward_peak_not_a_whole_layer():
  """An F&B program holds one chunk's backward and the other's forward: the plan adds the forward's peak (the
  routed experts' dispatch, grouped GEMM and combine run one after another), below a layer's whole working set;
  an FP8 dispatch payload never grows that forward and leaves the backward's buffers alone."""
  def rank0(**model):
    c = _load_config()
    for k, v in model.items():
      c.model[k] = v
    return plan.plan(c, platform="gpu")["memory_per_device"]["activations"]
  flat, fp8_rows = rank0(ep_fp8_dispatch=False), rank0(ep_fp8_dispatch=True)
  for act in (flat, fp8_rows):
    assert 0 < act["forward_working_bytes"] < act["layer_working_bytes"]
    assert act["fb_forward_working_bytes"] == max(act["forward_working_bytes"], act["logits_bytes"])
  assert fp8_rows["layer_working_bytes"] == flat["layer_working_bytes"]
  assert fp8_rows["forward_working_bytes"] <= flat["forward_working_bytes"]
  # Unfused schedules add nothing.
  c = _load_config()
  c.pipeline.schedule = "1f1b"
  assert plan.plan(c, platform="gpu")["memory_per_device"]["activations"]["fb_forward_working_bytes"] == 0


def test_cli_overrides_reach_the_model():
  p = json.loads(_run_cli(f"--config={CONFIG}", "--json", "--config.model.num_nextn_predict_layers=2",
                          "--config.mesh.expert=32", "--config.mesh.data=4"))
  assert p["total_params"] == 671_026_404_352
  assert p["mtp_params"] == 2 * 11_610_067_968
  assert p["mesh"] == {"data": 4, "expert": 32, "pipeline": 16}


def test_671b_abstract_build_is_fast():
  abstract_model.abstract_variables.cache_clear()
  abstract_model.leaves.cache_clear()
  start = time.perf_counter()
  p = plan.plan(_load_config())
  assert time.perf_counter() - start < 60
  assert p["total_params"] == 671_026_404_352


def test_compare_kv_cli():
  out = _run_cli("--compare_kv")
  lines = [l for l in out.splitlines() if l.strip()]
  assert len(lines) == 4                                     # header + three rows
  for name, value in (("DeepSeek-V3", "70,272"), ("Qwen2.5-72B", "327,680"), ("LLaMA-3.1-405B", "516,096")):
    assert any(name in l and value in l for l in lines), out


def test_gqa_baselines():
  assert plan.QWEN2_5_72B.kv_cache_bytes_per_token() == 327_680
  assert plan.LLAMA3_1_405B.kv_cache_bytes_per_token() == 516_096
  rows = plan.kv_comparison()
  assert [r["kv_cache_bytes_per_token"] for r in rows] == [70_272, 327_680, 516_096]


# --------------------------------------------------------------------------------------------------
# A tiny model counted by hand.
# --------------------------------------------------------------------------------------------------
def _attn(cfg):
  H, nh, dn, dr, dv, C, r = (cfg.hidden_size, cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                             cfg.v_head_dim, cfg.kv_lora_rank, cfg.q_lora_rank)
  q = H * nh * (dn + dr) if r is None else H * r + r + r * nh * (dn + dr)
  return q + H * (C + dr) + C + C * nh * (dn + dv) + nh * dv * H


def test_tiny_hand_count():
  cfg = TINY
  H, V, I, M, E = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size, cfg.moe_intermediate_size, 4
  norms = 2 * H
  dense = _attn(cfg) + norms + 3 * H * I
  experts = 3 * E * H * M
  moe = _attn(cfg) + norms + H * E + experts + 3 * H * M
  counts = plan.param_counts(cfg)
  assert counts["total_params"] == 2 * V * H + H + dense + 2 * moe
  assert counts["activated_params"] == counts["total_params"] - 2 * experts * (1 - 2 / E)
  assert counts["mtp_params"] == 3 * H + 2 * H * H + moe
  assert counts["routing_state"] == 3 * E                   # two MoE layers + the MTP block
  assert plan.kv_cache(cfg)["kv_cache_bytes_per_token"] == (8 + 2) * 3 * 2


def test_q_lora_rank_changes_count_by_expected_amount():
  full = TINY.replace(q_lora_rank=None)
  H, nh, d = TINY.hidden_size, TINY.num_attention_heads, TINY.qk_head_dim
  r = TINY.q_lora_rank
  per_layer = H * nh * d - (H * r + r + r * nh * d)          # q_proj vs q_a_proj + q_a_layernorm + q_b_proj
  a, b = plan.param_counts(TINY), plan.param_counts(full)
  assert b["total_params"] - a["total_params"] == 3 * per_layer
  assert b["mtp_params"] - a["mtp_params"] == per_layer
  assert b["activated_params"] - a["activated_params"] == 3 * per_layer


def test_flops_per_token_formula():
  cfg = TINY
  counts = plan.param_counts(cfg)
  H, L = cfg.hidden_size, cfg.num_hidden_layers
  norm_params = L * (2 * H + cfg.q_lora_rank + cfg.kv_lora_rank) + H
  matmul = counts["activated_params"] - counts["embedding_params"] - norm_params
  for seq_len in (16, 64):
    attn = 3 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len * L
    assert plan.flops_per_token(cfg, seq_len) == pytest.approx(6 * matmul + attn)
  with_mtp = plan.flops_per_token(cfg, 16, include_mtp=True)
  assert with_mtp == pytest.approx(plan.flops_per_token(cfg, 16) + plan.mtp_flops_per_token(cfg, 16))
  # Tied embeddings: the head GEMM still costs V*H per token although its kernel is the embedding.
  tied = cfg.replace(tie_word_embeddings=True)
  assert plan.flops_per_token(tied, 16) == pytest.approx(plan.flops_per_token(cfg, 16))


# --------------------------------------------------------------------------------------------------
# Bytes per device.
# --------------------------------------------------------------------------------------------------
def _total(cfg=TINY, **kw):
  return plan.plan(_train_config(cfg, **kw))["memory_per_device"]


def test_bytes_shrink_as_expert_and_data_grow():
  by_expert = [_total(expert=e)["total_bytes"] for e in (1, 2, 4)]
  assert by_expert[0] > by_expert[1] > by_expert[2]
  by_data = [_total(data=d)["total_bytes"] for d in (1, 2, 4)]
  assert by_data[0] > by_data[1] > by_data[2]
  # Data parallelism only shards optimizer states (ZeRO-1): params and grads stay.
  one, four = _total(data=1), _total(data=4)
  assert one["params"] == four["params"] and one["grads"] == four["grads"]
  assert sum(four["optimizer"].values()) < sum(one["optimizer"].values())
  with pytest.raises(ValueError, match="mesh.expert"):
    _total(expert=3)


def test_single_device_bytes_by_dtype():
  cfg = TINY
  m = _total(cfg)
  counts = plan.param_counts(cfg)
  n = counts["total_params"] + counts["mtp_params"]
  assert m["params"] == {"float32": 4 * (n + counts["routing_state"])}
  assert m["grads"] == {"float32": 4 * n}
  assert m["optimizer"] == {"float32": 8 * n}
  bf16 = _total(cfg, moments="bfloat16")
  assert bf16["optimizer"] == {"bfloat16": 4 * n}
  # BF16 weights get an FP32 master copy in the optimizer; norms and the router stay FP32 (no copy).
  narrow = _total(cfg.replace(param_dtype="bfloat16"), moments="bfloat16")
  assert narrow["optimizer"]["bfloat16"] == 4 * n
  assert narrow["optimizer"]["float32"] == 2 * narrow["params"]["bfloat16"]
  assert narrow["grads"] == {"float32": 4 * n}


def test_pipeline_stages():
  cfg = TINY.replace(num_hidden_layers=8)
  one = _total(cfg, pipeline=1)["total_bytes"]
  four = _total(cfg, pipeline=4, schedule="1f1b")
  assert four["total_bytes"] < one and four["pipeline_stages"] == 4
  assert len(four["per_rank_total_bytes"]) == 4
  dual = _total(cfg, pipeline=4, schedule="dualpipe")
  assert dual["rank_stages"] in ([0, 3], [1, 2])
  assert dual["total_bytes"] > four["total_bytes"]            # DualPipe keeps two stages per rank
  v = _total(cfg, pipeline=4, schedule="dualpipev")
  assert v["pipeline_stages"] == 8 and len(v["rank_stages"]) == 2
  # Every stage once in both; 1F1B's last rank also holds the embedding (the MTP modules embed), DualPipeV
  # holds it on rank 0 with stage 0.
  embed = memory.memory_plan(cfg, 1, 1, 1)["per_rank"][0]["params"]["float32"] - sum(
      l.total * 4 for l in abstract_model.leaves(cfg) if l.group != "embed")
  held = lambda m: sum(sum(r["params"].values()) + sum(r["optimizer"].values()) for r in m["per_rank"])
  four_m = memory.memory_plan(cfg, 1, 1, 4, "1f1b")
  assert held(four_m) - held(memory.memory_plan(cfg, 1, 1, 4, "dualpipev")) == 3 * embed   # params + 2 moments
  # Per stage copy, the accumulator and the per-device parameter copy are shaped like the stage's trainable
  # params (all but the routing biases: E float32 per MoE layer).
  for r, stages in zip(four_m["per_rank"], four_m["per_rank_stages"]):
    moe = sum(l >= cfg.first_k_dense_replace for l in memory.rank_layers(cfg, 4, stages))
    moe += cfg.num_nextn_predict_layers if 3 in stages else 0                   # the MTP modules' MoE layers
    assert r["grads"] == r["copies"] == {"float32": r["params"]["float32"] - 4 * cfg.n_routed_experts * moe}
