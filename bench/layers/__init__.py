"""Layer-level benchmarks: the Phalanx layer against attention layers of the same width."""
