"""The Jinja2 CUDA templates, installed as the package data swrgen.templates (see swrgen/resources.py)."""
