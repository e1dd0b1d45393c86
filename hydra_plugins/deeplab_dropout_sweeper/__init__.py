"""Hydra plugin: the `study` sweeper (Hydra instantiates plugins only from the hydra_plugins namespace)."""
