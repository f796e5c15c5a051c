"""DeepSeek-V3 671B (37B activated): the published model with the pre-training recipe of the report (§3-4).

Train on a cluster: 2048 GPUs = 256 nodes x 8, one process per node (jax.distributed.initialize reads the
SLURM environment), mesh pipeline 16 (DualPipe) x expert 64 x data 2, FP8 GEMMs. The corpus must be a
pre-tokenized stream in the DeepSeek-V3 vocabulary (uint32 ids: 129,280 does not fit in 16 bits):

  srun --nodes=256 --ntasks-per-node=1 --gpus-per-node=8 \
    python -m dsv3.train --config=configs/deepseek_v3.py --workdir=/shared/runs/dsv3_671b \
      --config.data.source='/shared/corpus/train-*.bin' --config.data.tokenizer=/shared/DeepSeek-V3

Plan it first (parameter counts, KV cache, FLOPs per token, bytes per device; runs on a laptop CPU):

  python -m dsv3.plan --config=configs/deepseek_v3.py           # table
  python -m dsv3.plan --config=configs/deepseek_v3.py --json    # one JSON object
  python -m dsv3.plan --config=configs/deepseek_v3.py --config.mesh.expert=32 --config.mesh.data=4

Token budget: 14.8T tokens. The report ramps the batch from 3,072 to 15,360 sequences over the first
469B tokens; this config has one batch size, so it runs the whole budget at 15,360 x 4,096 tokens.
The model block is the released config (YaRN included, as in HF's config.json); the report pre-trains at 4K
with plain RoPE and adds YaRN for the 32K and 128K context-extension phases (§4.3).
"""
from dsv3.config import deepseek_v3_671b
from dsv3.training.train_config import base_train_config, check_variant

_TOTAL_TOKENS = 14.8e12
_CONSTANT_LR_TOKENS = 10.0e12     # lr held at its peak until here ...
_COSINE_END_TOKENS = 14.3e12      # ... then cosine-decayed to min_lr over 4.3T tokens


def get_config(arg=None):
  check_variant("configs/deepseek_v3.py", arg)   # one recipe; mesh and sizes are --config.* overrides
  c = base_train_config(deepseek_v3_671b())
  c.precision = "fp8"                       # E4M3 GEMMs, 1x128 / 128x128 scales (report §3.3)
  # Memory per H800 (python -m dsv3.train --config=configs/deepseek_v3.py --workdir=DIR --compile_only=h800;
  # docs/results.md "Every rank, the shipped config"): at most 77.8 GB per device, on ranks 0 and 15 (FP32
  # master weights ZeRO-sharded, BF16 working copies, as the report keeps them). The report recomputes RMSNorm and the MLA
  # up-projections only (remat='paper') and caches activations in FP8; here 'paper' keeps 11.7 GB of BF16
  # residuals per micro-batch, x16 in flight on a DualPipe rank, so every layer is recomputed ('full': 0.36
  # GB). XLA:GPU's ragged_dot holds f32 [experts, rows, 7168] buffers (13 GB each);
  # 'scan' holds none.
  c.model.remat = "full"
  c.model.grouped_gemm = "scan"
  # The report's dispatch (§3.2.2): a token crosses InfiniBand once per node it needs, to the GPU with the same
  # in-node index, which forwards it over NVLink; the dispatch rows travel as E4M3 with 1x128 scales (the
  # combine stays BF16). Compiled at this layout: +2.9 GB on ranks 0/15 against the flat BF16 dispatch.
  c.model.ep_node_size = 8                  # GPUs per node: mesh.expert's devices d // 8 share a node
  c.model.ep_fp8_dispatch = True
  c.seed = 0
  c.batch_size = 15360                      # sequences per step, after the batch-size ramp
  c.seq_len = 4096
  tokens_per_step = c.batch_size * c.seq_len
  c.num_train_steps = round(_TOTAL_TOKENS / tokens_per_step)               # 235,240 steps
  c.grad_accum_steps = 1                    # the pipeline's micro-batches already accumulate

  # AdamW(0.9, 0.95, wd 0.1), clip 1.0; lr warms up over 2K steps to 2.2e-4, stays there for 10T tokens,
  # cosine-decays to 2.2e-5 by 14.3T and stays there. (The report drops to 7.3e-6 for the last 167B
  # tokens; the 'deepseek' schedule has one tail value.)
  c.learning_rate = 2.2e-4
  c.min_lr_ratio = 0.1
  c.lr_schedule = "deepseek"
  c.warmup_steps = 2000
  c.decay_start_frac = _CONSTANT_LR_TOKENS / _TOTAL_TOKENS
  c.decay_end_frac = _COSINE_END_TOKENS / _TOTAL_TOKENS
  c.b1, c.b2, c.weight_decay, c.grad_clip = 0.9, 0.95, 0.1, 1.0
  c.adam_moments_dtype = "bfloat16"         # the FP8 recipe keeps AdamW moments in BF16 (report §3.3.3)

  # MTP loss weight 0.3 for the first 10T tokens, 0.1 for the remaining 4.8T.
  c.mtp_weight, c.mtp_weight_final = 0.3, 0.1
  c.mtp_weight_switch_frac = _CONSTANT_LR_TOKENS / _TOTAL_TOKENS
  # Bias update speed 0.001 for the first 14.3T tokens, 0 for the last 500B; sequence-wise alpha 1e-4.
  c.balance.mode = "aux_free"
  c.balance.gamma, c.balance.gamma_final = 0.001, 0.0
  c.balance.gamma_switch_frac = _COSINE_END_TOKENS / _TOTAL_TOKENS
  c.balance.sequence_alpha = 1e-4

  c.log_every_steps = 10
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 500

  # 2048 devices: PP16 x EP64 x DP2. Non-expert weights see data x expert = 128 batch shards (the report's
  # ZeRO-1 DP degree); routed experts are split 256 / 64 = 4 per device.
  c.mesh.pipeline, c.mesh.expert, c.mesh.data = 16, 64, 2
  c.pipeline.schedule = "dualpipe"
  # 15,360 / 128 batch shards = 120 sequences per pipeline, one per micro-batch (60 per direction, >= 2 x 16).
  c.pipeline.microbatches = c.batch_size // (c.mesh.data * c.mesh.expert)

  c.data.format = "bin"
  c.data.dtype = "uint32"
  return c
