"""Feature cache for frozen-encoder methods (see `cache.py` for keys, layout and the TAILCLIP_CACHE variable)."""

from .cache import ENV_VAR, CacheKey, FeatureCache, FeatureSet, cache_root
from .extract import backbone_fingerprint, extract_from_config, method_features, split_features, view_transform

__all__ = [
    "ENV_VAR",
    "CacheKey",
    "FeatureCache",
    "FeatureSet",
    "backbone_fingerprint",
    "cache_root",
    "extract_from_config",
    "method_features",
    "split_features",
    "view_transform",
]
