"""tailclip: adapt CLIP-style vision-language models to long-tailed and few-shot recognition."""

__version__ = "0.1.0"
