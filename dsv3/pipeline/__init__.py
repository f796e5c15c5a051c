"""Pipeline parallelism: schedules (which stage runs which micro-batch when: `schedules`, `ops`, `simulate`,
`timeline`) and the executor that runs them on per-rank sub-meshes (`executor`, `stages`, `per_device`,
`reduction`, `transfers`, `rank_state`, `pipelined`)."""
