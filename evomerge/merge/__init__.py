"""Merging: pure tensor methods and their registry, per-layer parameters, recipes, engines."""
