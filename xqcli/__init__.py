"""xq: XQuant (arXiv 2508.10395) for Llama-family models."""

__version__ = "0.1.0"

