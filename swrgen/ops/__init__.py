"""Ops: one folder per op, a naive reference beside every fast path."""
