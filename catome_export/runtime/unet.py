"""``RuntimeUNet``: a parameter-free ``torch.nn.Module`` that a diffusers pipeline can call as its U-Net.

It takes the arguments of ``UNet2DConditionModel.forward`` that Stable
Diffusion uses, checks them (dtype, device, shapes, the engine's built
range) and runs one step of its :class:`~catome_export.runtime.runtime.Runtime`.
An engine built with ``--controlnet`` also takes ControlNet's
``down_block_additional_residuals`` and ``mid_block_additional_residual``
(docs/controlnet.md). It carries what pipelines read from ``pipe.unet``: ``config`` (the full U-Net
config with attribute access), ``dtype``, ``device``, ``in_channels``; an
empty buffer on the engine's device makes pipelines find the right device.
The engine cannot move: ``.to()`` to another device or dtype keeps it where
it is (with a warning), and inputs elsewhere are refused with a clear error.
"""

from __future__ import annotations

import inspect
import logging
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Mapping

import torch

from catome_export.errors import CatomeError
from catome_export.engine.controlnet import ControlNetInputs, resolve_shape
from catome_export.engine.io_names import ADDED_INPUTS

if TYPE_CHECKING:
    from catome_export.runtime.runtime import Runtime

logger = logging.getLogger(__name__)

_IGNORED_IF_EMPTY = ("class_labels", "timestep_cond", "attention_mask", "cross_attention_kwargs",
                     "added_cond_kwargs", "down_block_additional_residuals", "mid_block_additional_residual",
                     "down_intrablock_additional_residuals", "encoder_attention_mask")
"""Keyword arguments of the diffusers U-Net that the engine cannot take: accepted only when None or empty
(ControlNet's two residual arguments are taken by an engine built with ``--controlnet``)."""
_CONTROLNET_KWARGS = ("down_block_additional_residuals", "mid_block_additional_residual")


class EngineFeatureError(CatomeError, AttributeError):
    """A ``UNet2DConditionModel`` attribute the compiled engine does not have (``enable_freeu``,
    ``set_attn_processor``, ...). It is an AttributeError too, so ``hasattr`` and ``getattr(..., default)`` in
    pipelines keep working; a direct use gets a message that says what to do."""


def _diffusers_unet_has(name: str) -> bool:
    from diffusers import UNet2DConditionModel

    return hasattr(UNet2DConditionModel, name)


def full_unet_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` completed with ``UNet2DConditionModel``'s defaults (what ``unet.config`` would hold)."""
    from diffusers import UNet2DConditionModel

    full: dict[str, Any] = {}
    for name, param in inspect.signature(UNet2DConditionModel.__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        if param.default is not inspect.Parameter.empty:
            full[name] = param.default
    full.update(config)
    return full


def _frozen(config: Mapping[str, Any]) -> Any:
    from diffusers.configuration_utils import FrozenDict

    return FrozenDict(full_unet_config(config))  # type: ignore[no-untyped-call]  # diffusers' FrozenDict is unannotated


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    return (a.index or 0) == (b.index or 0)


class RuntimeUNet(torch.nn.Module):
    """Stands in for ``pipe.unet``; every call is one step of the runtime's controller."""

    _runtime: "Runtime"

    def __init__(self, runtime: "Runtime", unet_config: Mapping[str, Any]) -> None:
        super().__init__()
        object.__setattr__(self, "_runtime", runtime)  # not a submodule: the runtime owns this module
        self.register_buffer("_device_anchor", torch.empty(0, dtype=runtime.dtype, device=runtime.device),
                             persistent=False)
        self._config = _frozen(unet_config)
        sample = runtime.chain.input_spec("sample")
        ehs = runtime.chain.input_spec("encoder_hidden_states")
        self._in_channels = int(sample.shape[1]) if sample is not None and isinstance(sample.shape[1], int) \
            else int(self._config.get("in_channels", 4))
        self._text_shape = tuple(ehs.shape) if ehs is not None else ("B", "L", self._config.get("cross_attention_dim"))
        # SDXL-style engines take added_cond_kwargs as graph inputs of stage 0: name -> spec (empty otherwise)
        self._added = {name: spec for name in ADDED_INPUTS
                       if (spec := runtime.chain.input_spec(name)) is not None}
        self._controlnet: ControlNetInputs | None = runtime.controlnet
        if self._added:
            # StableDiffusionXLPipeline checks its time ids against add_embedding.linear_1.in_features: a
            # shape-only stand-in (the embedding itself runs inside the engine's first stage)
            width = int(self._config.get("projection_class_embeddings_input_dim") or 0)
            object.__setattr__(self, "add_embedding", SimpleNamespace(linear_1=SimpleNamespace(in_features=width)))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or not _diffusers_unet_has(name):
                raise
        raise EngineFeatureError(
            f"runtime.unet.{name}: the engine runs fixed compiled graphs and cannot do what the diffusers U-Net's "
            f"{name} does (weights, attention processors and blocks are fixed at build time). Apply it to the eager "
            "U-Net and rebuild the engine from that model, or run the eager model (detach the engine)")

    # -- what pipelines read ------------------------------------------------------------
    @property
    def runtime(self) -> "Runtime":
        return self._runtime

    @property
    def config(self) -> Any:
        """The U-Net config (diffusers ``FrozenDict``: ``config.sample_size``, ``config["in_channels"]``)."""
        return self._config

    @property
    def dtype(self) -> torch.dtype:
        return self._runtime.dtype

    @property
    def device(self) -> torch.device:
        return self._runtime.device

    @property
    def in_channels(self) -> int:
        return self._in_channels

    def _apply(self, fn: Any, recurse: bool = True) -> "RuntimeUNet":
        # .cuda(), .half(), .to(...): the engine's device and dtype are fixed when it is loaded.
        return self

    def to(self, *args: Any, **kwargs: Any) -> "RuntimeUNet":
        """Keeps the engine where it was loaded; warns when asked to move it elsewhere."""
        try:
            device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        except (TypeError, RuntimeError):
            device, dtype = None, None
        if device is not None and not _same_device(torch.device(device), self.device):
            logger.warning("the engine runs on %s and stays there (asked for %s): load it with "
                           "Runtime.load(..., device=...) to run elsewhere", self.device, device)
        if dtype is not None and dtype != self.dtype:
            logger.warning("the engine was built for %s and stays so (asked for %s): build it with the other "
                           "precision to change it", self.dtype, dtype)
        return self

    # -- the call -----------------------------------------------------------------------
    def forward(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor | None = None,
                class_labels: Any = None, timestep_cond: Any = None, attention_mask: Any = None,
                cross_attention_kwargs: Any = None, added_cond_kwargs: Any = None,
                down_block_additional_residuals: Any = None, mid_block_additional_residual: Any = None,
                down_intrablock_additional_residuals: Any = None, encoder_attention_mask: Any = None,
                return_dict: bool = True, **unknown: Any) -> Any:
        """Like ``UNet2DConditionModel.forward`` for what Stable Diffusion passes; one controller step."""
        if unknown:
            takes = "encoder_hidden_states, added_cond_kwargs" if self._added else "encoder_hidden_states"
            if self._controlnet is not None:
                takes += ", down_block_additional_residuals, mid_block_additional_residual"
            raise CatomeError(f"the engine's U-Net does not take {sorted(unknown)}: it accepts sample, timestep, "
                              f"{takes} and return_dict")
        given = dict(class_labels=class_labels, timestep_cond=timestep_cond, attention_mask=attention_mask,
                     cross_attention_kwargs=cross_attention_kwargs, added_cond_kwargs=added_cond_kwargs,
                     down_block_additional_residuals=down_block_additional_residuals,
                     mid_block_additional_residual=mid_block_additional_residual,
                     down_intrablock_additional_residuals=down_intrablock_additional_residuals,
                     encoder_attention_mask=encoder_attention_mask)
        used = [k for k in _IGNORED_IF_EMPTY if not _empty(given[k]) and not (k == "added_cond_kwargs" and self._added)
                and not (k in _CONTROLNET_KWARGS and self._controlnet is not None)]
        if used:
            hint = ""
            if self._controlnet is None and any(k in _CONTROLNET_KWARGS for k in used):
                hint = ("; this engine was built without ControlNet inputs: for ControlNet, rebuild it with "
                        "catome-export build ... --controlnet")
            raise CatomeError(f"the engine's U-Net cannot take {used} (ControlNet without --controlnet, LoRA scales, "
                              "IP-Adapter, masks and class labels are not exported): pass them as None, or use the "
                              f"eager model{hint}")
        sample, ehs = self._check(sample, encoder_hidden_states)
        added = self._check_added(added_cond_kwargs, int(sample.shape[0]))
        residuals = self._check_controlnet(down_block_additional_residuals, mid_block_additional_residual, sample)
        t, t_value = self._timesteps(timestep, sample.shape[0])
        noise_pred = self._runtime.step(sample, t, ehs, timestep_value=t_value, added=added, controlnet=residuals)
        if not return_dict:
            return (noise_pred,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=noise_pred)

    def _check(self, sample: Any, ehs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        dev, dtype = self.device, self.dtype
        if not isinstance(sample, torch.Tensor) or sample.ndim != 4 or sample.shape[1] != self._in_channels:
            shape = tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__
            raise CatomeError(f"sample must be a [B, {self._in_channels}, H, W] tensor, got {shape}")
        if not isinstance(ehs, torch.Tensor) or ehs.ndim != 3:
            shape = tuple(ehs.shape) if isinstance(ehs, torch.Tensor) else type(ehs).__name__
            raise CatomeError(f"encoder_hidden_states must be a [B, L, D] tensor, got {shape}")
        for name, t in (("sample", sample), ("encoder_hidden_states", ehs)):
            if t.dtype != dtype:
                raise CatomeError(f"{name} is {t.dtype}, the engine runs in {dtype}: pass {dtype} inputs "
                                  "(pipe.to(dtype) or the pipeline's torch_dtype)")
            if not _same_device(t.device, dev):
                raise CatomeError(f"{name} is on {t.device}, the engine runs on {dev}: move the inputs "
                                  "(or the pipeline) there, or load the engine on the inputs' device")
        b, _, h, w = sample.shape
        if ehs.shape[0] != b:
            raise CatomeError(f"encoder_hidden_states has batch {ehs.shape[0]}, sample has {b}: they must match")
        _, text_len, text_dim = self._text_shape
        if isinstance(text_dim, int) and ehs.shape[2] != text_dim:
            raise CatomeError(f"encoder_hidden_states has width {ehs.shape[2]}, the engine expects {text_dim} "
                              "(the text encoder of the model it was built from)")
        if isinstance(text_len, int) and ehs.shape[1] != text_len:
            raise CatomeError(f"encoder_hidden_states has {ehs.shape[1]} tokens, the engine expects {text_len}")
        if self._runtime.shape_check is not None:
            self._runtime.shape_check(int(b), int(h), int(w))
        return sample.detach().contiguous(), ehs.detach().contiguous()

    def _check_added(self, added_cond_kwargs: Any, batch: int) -> dict[str, torch.Tensor] | None:
        """The ``text_embeds``/``time_ids`` an SDXL-style engine needs, checked; None for other engines."""
        if not self._added:
            return None
        want = ", ".join(f"{n} [B, {spec.shape[1]}]" for n, spec in self._added.items())
        if not isinstance(added_cond_kwargs, Mapping) or any(n not in added_cond_kwargs for n in self._added):
            given = sorted(added_cond_kwargs) if isinstance(added_cond_kwargs, Mapping) else type(added_cond_kwargs).__name__
            raise CatomeError(f"this engine is an SDXL-style U-Net: pass added_cond_kwargs with {want} (got {given}); "
                              "StableDiffusionXLPipeline does this")
        extra = sorted(set(added_cond_kwargs) - set(self._added))
        if extra:
            raise CatomeError(f"added_cond_kwargs holds {extra}, which the engine does not take: it takes {want}")
        out = {}
        for name, spec in self._added.items():
            t = added_cond_kwargs[name]
            width = spec.shape[1]
            if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.shape[0] != batch or \
                    (isinstance(width, int) and t.shape[1] != width):
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise CatomeError(f"added_cond_kwargs[{name!r}] must be [{batch}, {width}] (batch as sample), got "
                                  f"{shape}")
            out[name] = self._engine_input(f"added_cond_kwargs[{name!r}]", t, spec, "move the inputs there")
        return out

    def _engine_input(self, label: str, t: torch.Tensor, spec: Any, move: str) -> torch.Tensor:
        """``t`` (already checked for shape) as the engine's input ``spec``: a floating-point tensor on the engine's
        device, cast to the input's dtype; ``move`` says what to do about a tensor on another device."""
        if not t.is_floating_point():
            raise CatomeError(f"{label} is {t.dtype}: pass a floating-point tensor")
        if not _same_device(t.device, self.device):
            raise CatomeError(f"{label} is on {t.device}, the engine runs on {self.device}: {move}")
        return t.detach().to(dtype=spec.torch_dtype).contiguous()

    def _check_controlnet(self, down: Any, mid: Any, sample: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """ControlNet's residuals as graph inputs (checked against the engine's shapes at this call's batch and
        size), or None when neither is given (the runtime then feeds zeros: the U-Net without ControlNet)."""
        if self._controlnet is None or (_empty(down) and _empty(mid)):
            return None
        cn = self._controlnet
        n = len(cn.down)
        if _empty(mid):
            raise CatomeError("down_block_additional_residuals without mid_block_additional_residual is diffusers' "
                              "deprecated T2I-Adapter form, which the engine does not take: pass both, as "
                              "ControlNetModel returns them (down_block_res_samples, mid_block_res_sample)")
        if _empty(down):
            raise CatomeError("mid_block_additional_residual without down_block_additional_residuals (which "
                              "diffusers' U-Net ignores): pass both, as ControlNetModel returns them, or neither")
        if not isinstance(down, (tuple, list)) or len(down) != n:
            got = f"{len(down)} tensors" if isinstance(down, (tuple, list)) else type(down).__name__
            raise CatomeError(f"down_block_additional_residuals must be a tuple of {n} tensors (one per skip tensor "
                              f"of this U-Net's down path, as its ControlNet returns them), got {got}")
        batch, hw = int(sample.shape[0]), (int(sample.shape[2]), int(sample.shape[3]))
        out: dict[str, torch.Tensor] = {}
        for label, spec, t in (*((f"down_block_additional_residuals[{i}]", s, d)
                                 for i, (s, d) in enumerate(zip(cn.down, down))),
                               ("mid_block_additional_residual", cn.mid, mid)):
            want = resolve_shape(spec, batch, hw)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise CatomeError(f"{label} must be a {list(want)} tensor at this sample's batch and size (a "
                                  f"ControlNet of the engine's model, on the same latents), got {shape}")
            out[spec.name] = self._engine_input(label, t, spec, "run the ControlNet there (or move its outputs)")
        return out

    def _timesteps(self, timestep: Any, batch: int) -> tuple[torch.Tensor, float | None]:
        """float32 [B] on the engine's device, and the scalar the controller numbers steps with."""
        if isinstance(timestep, torch.Tensor):
            t = timestep.detach()
            if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, batch)) or t.is_complex() or t.dtype == torch.bool:
                raise CatomeError(f"timestep must be a number, a scalar tensor, or a [B] tensor with B={batch}; "
                                  f"got {tuple(t.shape)} {t.dtype}")
        elif isinstance(timestep, (int, float)) and not isinstance(timestep, bool):
            t = torch.tensor(float(timestep))
        else:
            raise CatomeError(f"timestep must be a number or a tensor, got {type(timestep).__name__}")
        value = float(t.reshape(-1)[0]) if t.numel() else None
        t = t.to(device=self.device, dtype=torch.float32).reshape(-1).expand(batch).contiguous()
        return t, value


def _empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, (dict, list, tuple)) and len(value) == 0:
        return True
    return False
