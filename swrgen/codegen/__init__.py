"""Spec -> CUDA source (Jinja2 templates in ``templates/``)."""

from swrgen.codegen.render import KERNEL_NAMES, TEMPLATE_DIR, render_source

__all__ = ["KERNEL_NAMES", "TEMPLATE_DIR", "render_source"]
