"""Load cubins and launch kernels through the CUDA driver API on torch's stream."""
