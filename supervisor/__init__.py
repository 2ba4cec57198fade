"""The supervisor: fault-tolerant training for GPUs that vanish. This package never imports torch."""

__version__ = "0.1.0"
