"""Shared building blocks (norms, rotary, attention, MLPs) with logically named parameters."""
