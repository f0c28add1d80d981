"""Kernel-level benchmarks: the plain SWR kernels, the fused Phalanx kernels, the host cost per call."""
