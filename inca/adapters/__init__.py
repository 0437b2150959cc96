"""Adapters: InCA (on frozen activations) and end-to-end methods attached to timm blocks."""

from .compacter import apply_compacter
from .inca import AdapterSpec, InCA, InCABank, OpenInCA
from .lora import apply_lora, load_lora, merge_lora, save_lora, unmerge_lora
from .lora_ga import init_lora_ga
from .peft_export import export_peft, load_peft_export
from .saved import TaskAdapter, load_adapter, resign_adapter, save_adapter

__all__ = [
    "AdapterSpec",
    "InCA",
    "InCABank",
    "OpenInCA",
    "TaskAdapter",
    "apply_compacter",
    "apply_lora",
    "export_peft",
    "init_lora_ga",
    "load_adapter",
    "load_lora",
    "load_peft_export",
    "merge_lora",
    "resign_adapter",
    "save_adapter",
    "save_lora",
    "unmerge_lora",
]
