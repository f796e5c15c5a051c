"""Where arrays live: the mesh and shardings, expert parallelism, multi-process start-up."""
