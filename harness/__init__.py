"""ssl-repro harness: configs, registries, matrix expansion, launching, checkpoints and records."""

__version__ = "0.1.0"
