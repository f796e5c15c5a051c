"""Pipeline parallelism: which stage runs which micro-batch when, and how to run it.

`schedules` generates the per-rank op lists (GPipe, 1F1B, ZB1P, DualPipe, DualPipeV) in the notation of
README.md ("Pipeline op notation"), validates them and simulates their timing; `simulate` holds the dependency engine behind that;
`timeline` draws a simulated run like Figure 5 of the DeepSeek-V3 report.
"""
