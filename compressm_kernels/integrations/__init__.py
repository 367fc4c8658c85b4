"""Bridges to other Mamba libraries (import the submodule you need)."""
