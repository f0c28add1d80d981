"""Kernel-engineer tools: A/B of template changes, variant folders, plots, profiling and sanitizer drivers."""
