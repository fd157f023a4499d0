"""DeepCache-style feature caching: which U-Net calls are full, and which modules a cached call skips.

The semantics are those of ``DeepCache.DeepCacheSDHelper`` (package
``DeepCache`` 0.1.1, Ma et al., CVPR 2024), which this project's eager patch
(:func:`catome_export.eager.apply_deepcache`) and the engine's stage chain
both follow:

- **Which calls are full** (:class:`CacheClock`): a call's position is the
  index of the *first* occurrence of its timestep in the scheduler's
  timesteps (so PNDM's repeated timestep gives two calls the same position);
  the first call of a generation sets the start; a call is full when
  ``(position - start) % cache_interval == 0`` (or, with an explicit list,
  when ``position - start`` is in it). On the other calls the deep modules
  return what they returned on the last full call.
- **Which modules a cached call skips** (:func:`is_skipped`): with
  ``cache_branch_id`` b, block B = b // 3 and layer L = b % 3; a down-path
  module at (block i, layer j) is skipped when i > B or (i == B and j >= L),
  the mid block always, an up-path module at (block i, layer j), counted
  from the output end as DeepCache counts them, when i > B or (i == B and
  j > L). Everything else (time embedding, conv_in, conv_out and the shallow
  branch) runs on every call.

Nothing here imports diffusers or an engine backend.
"""

from catome_export.featurecache.branches import (
    BlockPosition, UNetLayout, cached_tensors, is_skipped, position_of, valid_branches,
)
from catome_export.featurecache.clock import CacheClock, timestep_position
from catome_export.featurecache.settings import FeatureCacheSettings, nonuniform_full_steps, parse_feature_cache

__all__ = [
    "BlockPosition", "CacheClock", "FeatureCacheSettings", "UNetLayout", "cached_tensors", "is_skipped",
    "nonuniform_full_steps", "parse_feature_cache", "position_of", "timestep_position", "valid_branches",
]
