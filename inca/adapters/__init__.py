"""Adapters: InCA (on cached activations) and end-to-end methods attached to timm blocks."""
