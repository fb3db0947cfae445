"""mtakd: distillation of causal language models with MTA (Multi-Granular Trajectory Alignment)."""

__version__ = "0.1.0"
