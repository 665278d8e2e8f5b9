"""raydistill: prompt (context) distillation at cluster scale on Ray."""

__version__ = "0.1.0"
