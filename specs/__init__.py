"""The shipped specs, installed as the package data swrgen.specs (see swrgen/resources.py)."""
