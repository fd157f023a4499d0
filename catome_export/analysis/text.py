"""Prompt embeddings from a pipeline's CLIP text encoder (pretrained models only).

A pipeline folder (or hub id) with ``tokenizer/`` and ``text_encoder/`` gives
real embeddings: for each prompt, the pair (empty prompt, prompt) that a
pipeline feeds the U-Net under classifier-free guidance. transformers is
imported lazily.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from catome_export.errors import CatomeError

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "A high-quality photograph of a golden retriever."
"""Used with a text encoder when no prompt is given (the paper's prompt template)."""


def encode_prompts(
    source: str, prompts: Sequence[str], *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """One [2, L, D] tensor (uncond, cond) per prompt, from the text encoder of ``source``."""
    if not prompts:
        raise CatomeError("no prompts to encode")
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError:
        raise CatomeError("prompts need transformers: pip install 'catome-export[eval]'") from None
    from pathlib import Path

    from catome_export.models.hub import load_from_hub

    def load(local_only: bool) -> tuple[Any, Any]:
        return (CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", local_files_only=local_only),
                CLIPTextModel.from_pretrained(source, subfolder="text_encoder", local_files_only=local_only))

    try:
        if Path(source).is_dir():
            tokenizer, encoder = load(True)
        else:  # a hub id: out of reach, the cache only, in seconds
            tokenizer, encoder = load_from_hub(source, "text_encoder/config.json", load,
                                               f"the text encoder of {source!r}",
                                               "Leave out --prompts to use random embeddings, or pass a local folder")
    except CatomeError:
        raise
    except Exception as exc:  # hub, cache and file errors come in many types
        raise CatomeError(
            f"cannot load the text encoder of {source!r} ({type(exc).__name__}); prompts need a pipeline with "
            "tokenizer/ and text_encoder/ (hub id or local folder). Leave out --prompts to use random embeddings"
        ) from None
    encoder = encoder.to(device).eval()
    out = []
    with torch.no_grad():
        for prompt in prompts:
            tokens = tokenizer(["", prompt], padding="max_length", max_length=tokenizer.model_max_length,
                               truncation=True, return_tensors="pt")
            hidden = encoder(tokens.input_ids.to(device)).last_hidden_state
            out.append(hidden.to(dtype))
    logger.debug("encoded %d prompt(s) with the text encoder of %s", len(prompts), source)
    return out
