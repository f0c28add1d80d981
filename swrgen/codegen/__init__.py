"""Spec -> CUDA source (Jinja2 templates in ``templates/``)."""

from swrgen.codegen.render import (
    FUSED_KERNEL_NAMES,
    KERNEL_NAMES,
    TEMPLATE_DIR,
    kernel_names,
    kernel_shared_bytes,
    render_source,
)

__all__ = ["FUSED_KERNEL_NAMES", "KERNEL_NAMES", "TEMPLATE_DIR", "kernel_names", "kernel_shared_bytes", "render_source"]
