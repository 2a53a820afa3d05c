"""Feature cache for frozen-encoder methods (see `cache.py` for keys, layout and the TAILCLIP_CACHE variable,
`extract.py` for augmented views and the calls methods use)."""

from .cache import ENV_VAR, STORAGE_DTYPES, CacheKey, FeatureCache, FeatureSet, cache_root
from .extract import (
    AUG_SEED,
    DEFAULT_AUG,
    AugSpec,
    FeatureViews,
    backbone_fingerprint,
    extract_from_config,
    method_features,
    method_views,
    split_features,
    split_views,
    view_transform,
)

__all__ = [
    "AUG_SEED",
    "DEFAULT_AUG",
    "ENV_VAR",
    "STORAGE_DTYPES",
    "AugSpec",
    "CacheKey",
    "FeatureCache",
    "FeatureSet",
    "FeatureViews",
    "backbone_fingerprint",
    "cache_root",
    "extract_from_config",
    "method_features",
    "method_views",
    "split_features",
    "split_views",
    "view_transform",
]
