"""The original HART release -> diffusers: `from_original` builds the pipeline, `convert` also saves it.

Only this package knows the released layout; nothing else in `diffusers_hart` imports it.
"""

from .convert_hart_to_diffusers import convert, from_original

__all__ = ["convert", "from_original"]
