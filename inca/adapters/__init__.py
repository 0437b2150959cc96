"""Adapters: InCA (on frozen activations) and end-to-end methods attached to timm blocks."""

from .compacter import apply_compacter
from .inca import AdapterSpec, InCA, InCABank, OpenInCA, load_adapter, save_adapter
from .lora import apply_lora, load_lora, merge_lora, save_lora, unmerge_lora
from .lora_ga import init_lora_ga

__all__ = [
    "AdapterSpec",
    "InCA",
    "InCABank",
    "OpenInCA",
    "apply_compacter",
    "apply_lora",
    "init_lora_ga",
    "load_adapter",
    "load_lora",
    "merge_lora",
    "save_adapter",
    "save_lora",
    "unmerge_lora",
]
