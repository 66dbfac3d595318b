"""Frontends: one module per model format, each with read (and write where the format is a conversion target)."""
