"""Eager CA-ToMe: a diffusers patch (attention-processor wrappers and hooks), the reference of every engine."""

from catome_export.eager.patch import CatomeHandle, apply_catome, apply_merging, apply_tome

__all__ = ["CatomeHandle", "apply_catome", "apply_merging", "apply_tome"]
