"""Serving benchmarks: decode throughput of the hybrid LM with Phalanx state slots vs KV caches (decode.py)."""
