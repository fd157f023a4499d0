"""LoRA with the engine: fused at build (``build --lora``), swapped later by refit (``refit``, ``Runtime.set_lora``).

See docs/lora.md. :mod:`.files` reads, checks and fuses diffusers-format LoRA files;
:mod:`.weights` maps U-Net parameters to the initializers of the exported graphs;
:mod:`.refit` swaps the LoRA of a built engine in place.
"""

from catome_export.lora.files import LoraSpec, parse_lora_arg

__all__ = ["LoraSpec", "parse_lora_arg"]
