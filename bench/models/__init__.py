"""Model-level benchmarks: training throughput of a hybrid language model."""
