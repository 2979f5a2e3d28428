"""minicpm: train small language models with the MiniCPM recipe."""

__version__ = "0.1.0"
