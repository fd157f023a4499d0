"""Eager CA-ToMe: a diffusers patch (attention-processor wrappers and hooks), the reference of every engine."""

from catome_export.eager.deepcache import DeepCacheHandle, apply_deepcache
from catome_export.eager.patch import CatomeHandle, apply_merging, apply_tome

__all__ = ["CatomeHandle", "DeepCacheHandle", "apply_deepcache", "apply_merging", "apply_tome"]
