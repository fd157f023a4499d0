"""The graph IO naming convention: the names of the tensors that cross a stage cut.

One module owns it (the stage cutter writes these names, the runtime, the
CUDA-graph runner, the profiles and the build read them back):

=========================  =====================================================
``sample``                 model input [B, 4, H, W]
``timestep``               model input [B] float32
``encoder_hidden_states``  model input [B, L, D]
``text_embeds``            model input [B, E] (SDXL-style added conditioning only)
``time_ids``               model input [B, 6] (SDXL-style added conditioning only)
``emb``                    time embedding [B, T] (output of ``time_embedding``)
``skip{i}``                i-th skip tensor of the down path (``skip0`` = conv_in)
``x{k}``                   input of merge site k's block [B, N{k}, C]
``site{k}_residual``       input of the Transformer2DModel that holds site k
``site{k}_out``            output of site k's block (internal to its stage)
``site{k}_{plan}``         the five plan tensors of site k (``PLAN_TENSORS``)
``noise_pred``             model output [B, 4, H, W]
``controlnet_down{i}``     ControlNet residual added to ``skip{i}`` [B, C, Hd, Wd]
                           (engines built with ``--controlnet`` only)
``controlnet_mid``         ControlNet residual added to the mid block's output
                           (engines built with ``--controlnet`` only)
=========================  =====================================================

Any other tensor is named by the step that writes it, ``{module path}.out``
(``up_blocks.1.resnets.2.out``, ``up_blocks.1.cat0.out``): such a name crosses a
cut where the stage chain is cut between sites, for the feature cache (the deep
outputs a cached call reuses) or by size. The ControlNet residuals are
model inputs like ``sample``: ``controlnet_down{i}`` is the i-th entry of
diffusers' ``down_block_additional_residuals`` (one per skip tensor, in the
down path's order), ``controlnet_mid`` its ``mid_block_additional_residual``.
"""

from __future__ import annotations

import re

from catome_export.merging.plan import PLAN_TENSORS

SAMPLE = "sample"
TIMESTEP = "timestep"
TEXT = "encoder_hidden_states"
TEXT_EMBEDS = "text_embeds"
TIME_IDS = "time_ids"
ADDED_INPUTS = (TEXT_EMBEDS, TIME_IDS)
"""``added_cond_kwargs`` of an SDXL-style U-Net (``addition_embed_type: text_time``), as graph inputs of stage 0."""
MODEL_INPUTS = (SAMPLE, TIMESTEP, TEXT, *ADDED_INPUTS)
"""Graph input names of the whole model (stage 0 reads the first two and, for SDXL-style U-Nets, the added
conditioning; any stage may read the text). A U-Net without added conditioning has no ``text_embeds``/``time_ids``
inputs anywhere."""
MODEL_OUTPUT = "noise_pred"
"""Graph output name of the last stage."""
EMB = "emb"
CONTROLNET_MID = "controlnet_mid"
"""ControlNet's ``mid_block_additional_residual`` as a graph input (engines built with ``--controlnet``)."""

_SITE_INPUT = re.compile(r"^x(\d+)$")
_SITE_TENSOR = re.compile(r"^site(\d+)_")
_CONTROLNET_DOWN = re.compile(r"^controlnet_down(\d+)$")


def site_input_name(site: int) -> str:
    """Name of the block input of merge site ``site`` (``x{site}``)."""
    return f"x{site}"


def site_of_input(name: str) -> int | None:
    """The site whose block input ``name`` is (``x3`` -> 3), or None for any other name."""
    m = _SITE_INPUT.match(name)
    return int(m.group(1)) if m else None


def plan_names(site: int) -> tuple[str, ...]:
    """Graph input names of site ``site``'s plan tensors, in ``MergePlan.tensors()`` order."""
    return tuple(f"site{site}_{name}" for name in PLAN_TENSORS)


def site_residual_name(site: int) -> str:
    """Input of the Transformer2DModel that holds site ``site``."""
    return f"site{site}_residual"


def site_output_name(site: int) -> str:
    """Output of site ``site``'s block (when no later site in the same transformer follows)."""
    return f"site{site}_out"


def site_of(name: str) -> int | None:
    """The merge site a ``site{k}_*`` tensor belongs to (``site3_keep_idx`` -> 3), or None for any other name."""
    m = _SITE_TENSOR.match(name)
    return int(m.group(1)) if m else None


def skip_name(i: int) -> str:
    """The ``i``-th skip tensor of the down path (``skip0`` is conv_in's output)."""
    return f"skip{i}"


def controlnet_down_name(i: int) -> str:
    """The graph input of ControlNet's ``down_block_additional_residuals[i]`` (added to ``skip{i}``)."""
    return f"controlnet_down{i}"


def controlnet_down_index(name: str) -> int | None:
    """``controlnet_down3`` -> 3; None for any other name."""
    m = _CONTROLNET_DOWN.match(name)
    return int(m.group(1)) if m else None


def is_controlnet_input(name: str) -> bool:
    """True for the ControlNet residual inputs (``controlnet_down{i}``, ``controlnet_mid``)."""
    return name == CONTROLNET_MID or _CONTROLNET_DOWN.match(name) is not None


def is_model_input(name: str) -> bool:
    """True for a graph input the caller feeds (``MODEL_INPUTS`` and the ControlNet residuals), as opposed to a
    tensor one stage hands the next or a plan tensor."""
    return name in MODEL_INPUTS or is_controlnet_input(name)
