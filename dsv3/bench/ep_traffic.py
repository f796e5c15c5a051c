"""Expert-parallel traffic accounting: which rows the dispatch and combine send, per link, from the routing.

Pure numpy over `topk_idx`, laid out as dsv3.parallel.expert_parallel lays out its units (the tests check that the
dispatch sends exactly these), so `python -m dsv3.bench.ep` can count bytes for meshes larger than any here.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from dsv3.parallel import expert_parallel


def dispatch_units(topk_idx, n_experts: int, num_shards: int) -> int:
  """How many (token, shard) rows the dispatch sends: a token goes once to each shard it needs."""
  idx = np.asarray(topk_idx).reshape(-1, np.asarray(topk_idx).shape[-1])
  shard = idx // (n_experts // num_shards)
  return int(sum(len(set(row)) for row in shard.tolist()))


def alltoall_bytes(topk_idx, n_experts: int, num_shards: int, hidden: int, itemsize: int = 4,
                   dense: bool = False, token_shards: Optional[int] = None) -> dict:
  """Bytes of hidden rows crossing devices per step, dispatch + combine (ids/weights are extra, small).

  'payload' counts only rows sent to ANOTHER shard (what the ragged transport moves); 'dense' is what
  the padded CPU transport moves: every device's full [shards, n, H] buffer, minus its own block.
  """
  idx = np.asarray(topk_idx).reshape(-1, np.asarray(topk_idx).shape[-1])
  N = idx.shape[0]
  token_shards = token_shards or num_shards
  n = N // token_shards
  shard = idx // (n_experts // num_shards)
  own = (np.arange(N) // n) % num_shards               # the expert-axis coordinate of each token's device
  remote = sum(len(set(row) - {o}) for row, o in zip(shard.tolist(), own.tolist()))
  row = hidden * itemsize
  out = {"units": dispatch_units(idx, n_experts, num_shards), "remote_units": remote,
         "payload": 2 * remote * row}
  if dense:
    out["dense"] = 2 * token_shards * (num_shards - 1) * n * row
  return out


def _token_device(N: int, ep: int, token_shards: int):
  """The expert-axis coordinate of each token's device: tokens split over (data, expert), expert minor."""
  return (np.arange(N) // (N // token_shards)) % ep


def dispatch_traffic(topk_idx, n_experts: int, ep: int, node_size: int = 0, two_hop: bool = False,
                     token_shards: Optional[int] = None) -> dict:
  """Hidden rows the dropless dispatch sends between devices (the combine sends the same rows back), by link.

  Expert-axis device d is on node d // node_size (node_size 0 or >= ep: one node). Flat: a unit per (token,
  shard) it needs, straight to the shard. two_hop (`dispatch_plan` with cfg.ep_node_size = node_size): a unit
  per (token, node) to the device with the token's in-node index there, which forwards a unit per shard.
  Returns inter_node / intra_node (rows crossing a node boundary / between devices of one node),
  token_inter_node [N] (each token's inter-node rows) and hop_units (rows each of the dispatch's
  all-to-alls moves to another device: what the shard body's stats count).
  """
  idx = np.asarray(topk_idx).reshape(-1, np.asarray(topk_idx).shape[-1])
  N = idx.shape[0]
  L = node_size if 0 < node_size < ep else ep
  own = _token_device(N, ep, token_shards or ep)
  hit = np.zeros((N, ep), bool)
  hit[np.arange(N)[:, None], idx // (n_experts // ep)] = True
  dev = np.arange(ep)[None, :]
  same_node = dev // L == own[:, None] // L
  if two_hop and 1 < L < ep:
    node_hit = hit.reshape(N, ep // L, L).any(2)
    token_inter = node_hit.sum(1) - node_hit[np.arange(N), own // L]
    intra = int((hit & (dev % L != own[:, None] % L)).sum())     # forwarder (its in-node index) -> shard
    hops = [int(token_inter.sum()), intra]
  else:
    token_inter = (hit & ~same_node).sum(1)
    intra = int((hit & same_node & (dev != own[:, None])).sum())
    hops = [int(token_inter.sum()) + intra]
  return dict(inter_node=int(token_inter.sum()), intra_node=intra, token_inter_node=token_inter, hop_units=hops)


def row_bytes(hidden: int, payload: str) -> int:
  """Bytes of one hidden row on the wire: 'fp32', 'bf16', or 'fp8' (E4M3 values and an f32 scale per 1x128
  tile, as `_fp8_pack` sends them)."""
  if payload == "fp8":
    return expert_parallel.fp8_row_bytes(hidden)
  return hidden * {"fp32": 4, "bf16": 2}[payload]


def traffic_bytes(traffic: dict, hidden: int, dispatch: str = "bf16", combine: str = "bf16") -> dict:
  """`dispatch_traffic`'s rows in bytes: dispatch and combine (the reverse, one row per unit) per link."""
  d, c = row_bytes(hidden, dispatch), row_bytes(hidden, combine)
  inter, intra = traffic["inter_node"], traffic["intra_node"]
  return dict(dispatch_inter=inter * d, dispatch_intra=intra * d, combine_inter=inter * c, combine_intra=intra * c)
