"""FID and CLIP score, computed only from weights already on this machine.

Neither metric's network ships with catome-export, and nothing here
downloads: each one is looked up first (package importable, weights file in
the local cache), and when something is missing the evaluation reports a
:class:`Availability` line that says what is missing and how to get it.

- FID: InceptionV3 pool features (2048-d) from ``pytorch-fid``
  (``pt_inception-2015-12-05-6726825d.pth``) or from ``torch-fidelity``, the
  extractor ``torchmetrics`` uses (``weights-inception-2015-12-05-6726825d.pth``),
  both looked up in torch's hub cache (``$TORCH_HOME/hub/checkpoints``). The
  Fréchet distance between the two feature Gaussians is computed here.
- CLIP score: a ``transformers`` CLIP model from the Hugging Face cache (or
  a local folder); score = ``100 * max(cos(image, text), 0)``, as torchmetrics
  defines it.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from catome_export.errors import CatomeError

logger = logging.getLogger(__name__)

PYTORCH_FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
"""File name of pytorch-fid's InceptionV3 weights in the torch hub cache."""
TORCH_FIDELITY_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
"""File name of torch-fidelity's (torchmetrics') InceptionV3 weights in the torch hub cache."""
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
"""CLIP model of torchmetrics' CLIPScore default."""


@dataclass(frozen=True)
class Availability:
    """Whether a metric can be computed here, and if not, how to make it so."""

    metric: str
    """``FID`` or ``CLIP``."""
    available: bool
    detail: str
    """What was found (backend and weights), or what is missing."""
    fix: str = ""
    """How to get what is missing (empty when available)."""

    def line(self) -> str:
        """One line for the console: ``FID: ...``."""
        if self.available:
            return f"{self.metric}: {self.detail}"
        return f"{self.metric}: not computed: {self.detail}; to get it: {self.fix}"

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "available": self.available, "detail": self.detail, "fix": self.fix}


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def torch_hub_checkpoints() -> Path:
    """Where torch keeps downloaded checkpoints (``torch.hub.get_dir()/checkpoints``)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


# -- FID ---------------------------------------------------------------------------------
def fid_availability() -> Availability:
    """Which InceptionV3 extractor and weights are present (no download)."""
    ckpt = torch_hub_checkpoints()
    found_packages = []
    for package, weights in (("pytorch_fid", PYTORCH_FID_WEIGHTS), ("torch_fidelity", TORCH_FIDELITY_WEIGHTS)):
        if not _has(package):
            continue
        found_packages.append(package)
        if (ckpt / weights).is_file():
            return Availability("FID", True, f"InceptionV3 from {package} ({ckpt / weights})")
    if found_packages:
        what = f"{', '.join(found_packages)} installed but its InceptionV3 weights are not in {ckpt}"
    else:
        what = "no InceptionV3 extractor installed (pytorch-fid or torch-fidelity)"
    fix = (f"pip install pytorch-fid and, on a machine with internet access, run "
           f"python -c \"from pytorch_fid.inception import InceptionV3; InceptionV3()\" once "
           f"(or copy {PYTORCH_FID_WEIGHTS} into {ckpt})")
    return Availability("FID", False, what, fix)


class InceptionFeatures:
    """InceptionV3 pool3 features (2048-d) of uint8 ``[N, H, W, 3]`` images, from local weights only."""

    def __init__(self, device: str = "cpu") -> None:
        import torch

        status = fid_availability()
        if not status.available:
            raise CatomeError(f"FID is not available here: {status.detail}; to get it: {status.fix}")
        ckpt = torch_hub_checkpoints()
        self.device = torch.device(device)
        if _has("pytorch_fid") and (ckpt / PYTORCH_FID_WEIGHTS).is_file():
            from pytorch_fid.inception import InceptionV3

            self.kind = "pytorch_fid"
            # Its loader reads the cached file when present (checked above).
            self.model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval().to(self.device)
        else:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

            self.kind = "torch_fidelity"
            self.model = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(ckpt / TORCH_FIDELITY_WEIGHTS)
            ).eval().to(self.device)

    def __call__(self, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
        import torch

        feats = []
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).permute(0, 3, 1, 2)
                x = x.to(self.device)
                if self.kind == "pytorch_fid":
                    out = self.model(x.float() / 255.0)[0]
                else:
                    out = self.model(x)[0]
                feats.append(out.reshape(out.shape[0], -1).double().cpu().numpy())
        return np.concatenate(feats, axis=0)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two ``[N, D]`` feature sets (N >= 2 each).

    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``.
    """
    from scipy import linalg

    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise CatomeError(f"feature sets must be [N, D] with the same D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise CatomeError("FID needs at least 2 images per set (thousands for a meaningful value)")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    if not np.isfinite(covmean).all():  # singular product: shift both covariances slightly
        offset = np.eye(cov_a.shape[0]) * 1e-6
        covmean = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    covmean = np.real(covmean)
    diff = mu_a - mu_b
    value = float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean))
    return max(value, 0.0)


# -- CLIP score --------------------------------------------------------------------------
def _local_clip_dir(model: str) -> Path | None:
    """The local folder of ``model`` (a path, or its snapshot in the Hugging Face cache), or None."""
    path = Path(model)
    if (path / "config.json").is_file():
        return path
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    config = try_to_load_from_cache(model, "config.json")
    if not isinstance(config, str):
        return None
    folder = Path(config).parent
    if any((folder / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")):
        return folder
    return None


def clip_availability(model: str = DEFAULT_CLIP_MODEL) -> Availability:
    """Whether the CLIP model is in a local folder or the Hugging Face cache (no download)."""
    if not _has("transformers"):
        return Availability("CLIP", False, "transformers is not installed", "pip install transformers")
    folder = _local_clip_dir(model)
    if folder is None:
        return Availability("CLIP", False, f"the CLIP model {model!r} is not in the local Hugging Face cache",
                            f"on a machine with internet access run hf download {model} (huggingface_hub) "
                            "(or pass --clip-model with a local folder)")
    return Availability("CLIP", True, f"CLIP score with {model} ({folder})")


class ClipScorer:
    """CLIP score of images against their prompts, from a local CLIP model only."""

    def __init__(self, model: str = DEFAULT_CLIP_MODEL, device: str = "cpu") -> None:
        import torch

        status = clip_availability(model)
        if not status.available:
            raise CatomeError(f"CLIP score is not available here: {status.detail}; to get it: {status.fix}")
        from transformers import CLIPModel, CLIPProcessor

        folder = str(_local_clip_dir(model))
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(folder, local_files_only=True).eval().to(self.device)
        self.processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)

    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> list[float]:
        """Per image: ``100 * max(cos(image embedding, prompt embedding), 0)``."""
        import torch

        if len(images) != len(prompts):
            raise CatomeError(f"{len(images)} images for {len(prompts)} prompts: they must pair up")
        inputs = self.processor(text=list(prompts), images=list(images), return_tensors="pt", padding=True,
                                truncation=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with torch.no_grad():
            out = self.model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                             pixel_values=inputs["pixel_values"])
        img = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
        txt = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
        return [float(v) for v in (100.0 * (img * txt).sum(dim=-1)).clamp(min=0).cpu()]
