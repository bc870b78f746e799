"""Numerics: rounding to storage dtypes, correctly rounded merges, rounding-error bounds."""
