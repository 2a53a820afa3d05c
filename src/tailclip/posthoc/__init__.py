"""Post-hoc adjustments on logits: temperature calibration, GLA prior estimation / debiasing / ensembles,
plain logit adjustment, WiSE-FT weight interpolation."""

from .calibration import confidence_temperature, mean_confidence, nll_temperature
from .gla import align, debias_zeroshot, gla_ensemble, logit_adjust
from .prior import estimate_prior, prior_nll, save_prior
from .wise_ft import interpolate_states

__all__ = [
    "align",
    "confidence_temperature",
    "debias_zeroshot",
    "estimate_prior",
    "gla_ensemble",
    "interpolate_states",
    "logit_adjust",
    "mean_confidence",
    "nll_temperature",
    "prior_nll",
    "save_prior",
]
