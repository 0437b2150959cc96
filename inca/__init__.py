"""inca: parallel cross-attention adapters on frozen Vision Transformer activations."""

__version__ = "0.1.0"
