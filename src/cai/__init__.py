"""Constitutional AI (Bai et al. 2022, arXiv 2212.08073) reproduced end to end."""

__version__ = "0.1.0"
