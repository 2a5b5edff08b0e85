"""rlloop: distributed online RL for language models with TD-trained process reward models."""

__version__ = "0.1.0"
