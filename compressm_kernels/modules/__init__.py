from .mamba import Mamba

__all__ = ["Mamba"]
