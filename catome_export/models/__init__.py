"""Model registry: sd15 (hub id or local folder), tiny (bundled config), local folders."""

from catome_export.models.registry import (
    MODELS, SD15_HUB_ID, SD21_HUB_ID, SDXL_HUB_ID, ModelInfo, bundled_config, load_unet, model_info, weights_hash,
)

__all__ = ["MODELS", "SD15_HUB_ID", "SD21_HUB_ID", "SDXL_HUB_ID", "ModelInfo", "bundled_config", "load_unet",
           "model_info", "weights_hash"]
from catome_export.models.sites import MergeSite, default_merge_level, find_merge_sites

__all__ += ["MergeSite", "default_merge_level", "find_merge_sites"]
