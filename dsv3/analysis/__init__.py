"""What a layout costs: compile-only dry runs, compiled and modelled memory, overlap in scheduled HLO."""
