"""The ControlNet residual inputs of an engine folder built with ``--controlnet``: which stage inputs they are,
their shapes, and the manifest's ``controlnet`` section.

An engine built with ``build --controlnet`` takes diffusers'
``down_block_additional_residuals`` as the graph inputs ``controlnet_down{i}``
(one per skip tensor of the down path: 12 for SD 1.x/2.x, 9 for SDXL; the
count comes from the U-Net, never from a constant) and
``mid_block_additional_residual`` as ``controlnet_mid``. :class:`ControlNetInputs` finds them among a chain's
stage specs; :class:`ControlNetRecord` is the manifest's ``controlnet``
section (absent in engines built without the option).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from catome_export.engine.io_names import CONTROLNET_MID, controlnet_down_index, controlnet_down_name
from catome_export.engine.specs import DOWNSAMPLES, StageSpec, TensorSpec
from catome_export.errors import CatomeError


@dataclass(frozen=True)
class ControlNetInputs:
    """The ControlNet residual inputs of a stage chain, in diffusers' order."""

    down: tuple[TensorSpec, ...]
    """``controlnet_down0``..``controlnet_down{n-1}``: ``down_block_additional_residuals`` in order."""
    mid: TensorSpec
    """``controlnet_mid``: ``mid_block_additional_residual``."""

    @property
    def names(self) -> tuple[str, ...]:
        return (*(t.name for t in self.down), self.mid.name)

    @classmethod
    def of(cls, specs: Sequence[StageSpec]) -> "ControlNetInputs | None":
        """The residual inputs among the inputs of ``specs`` (None for a chain built without ``--controlnet``);
        CatomeError when some are missing (a damaged or hand-edited chain)."""
        found: dict[str, TensorSpec] = {}
        for spec in specs:
            for t in spec.inputs:
                if t.name == CONTROLNET_MID or controlnet_down_index(t.name) is not None:
                    found.setdefault(t.name, t)
        if not found:
            return None
        count = len(found) - (CONTROLNET_MID in found)
        want = [controlnet_down_name(i) for i in range(count)]
        missing = [n for n in (*want, CONTROLNET_MID) if n not in found]
        if missing:
            raise CatomeError(f"the engine's stages take some ControlNet residuals but not {missing}: rebuild it "
                              "with catome-export build ... --controlnet")
        return cls(tuple(found[n] for n in want), found[CONTROLNET_MID])

    def shapes(self, batch: int, latent_hw: tuple[int, int]) -> tuple[tuple[tuple[int, ...], ...], tuple[int, ...]]:
        """(down shapes, mid shape) at ``batch`` and latent size ``latent_hw``."""
        return tuple(resolve_shape(t, batch, latent_hw) for t in self.down), resolve_shape(self.mid, batch, latent_hw)

    def record(self) -> "ControlNetRecord":
        return ControlNetRecord(down=tuple(t.name for t in self.down), mid=self.mid.name)


def resolve_shape(spec: TensorSpec, batch: int, latent_hw: tuple[int, int]) -> tuple[int, ...]:
    """The concrete shape of a tensor whose dims are ``B``, ``H``, ``W``, ``Hd``, ``Wd`` or static."""
    h, w = latent_hw
    table = {"B": batch, "H": h, "W": w}
    for d in DOWNSAMPLES:
        table[f"H{d}"] = -(-h // d)
        table[f"W{d}"] = -(-w // d)
    out = []
    for dim in spec.shape:
        if isinstance(dim, int):
            out.append(dim)
        elif dim in table:
            out.append(table[dim])
        else:
            raise CatomeError(f"internal: {spec.name} has a dim {dim!r} that only the batch and latent size "
                              "should fix")
    return tuple(out)


@dataclass(frozen=True)
class ControlNetRecord:
    """The manifest's ``controlnet`` section: the engine takes ControlNet residuals (``build --controlnet``)."""

    down: tuple[str, ...]
    """The graph inputs of ``down_block_additional_residuals``, in order."""
    mid: str = CONTROLNET_MID
    """The graph input of ``mid_block_additional_residual``."""

    def to_dict(self) -> dict[str, Any]:
        return {"down": list(self.down), "mid": self.mid}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ControlNetRecord":
        if not isinstance(data, Mapping) or not isinstance(data.get("down"), list):
            raise ValueError("the controlnet section is malformed")
        return cls(down=tuple(str(n) for n in data["down"]), mid=str(data.get("mid", CONTROLNET_MID)))

    def problem(self, specs: Sequence[StageSpec]) -> str | None:
        """What is wrong with this record for a chain of ``specs`` (None: it describes them)."""
        try:
            found = ControlNetInputs.of(specs)
        except CatomeError as exc:
            return str(exc)
        if found is None:
            return "the controlnet section names residual inputs that no stage takes"
        if found.record() != self:
            return (f"the controlnet section lists {len(self.down)} down residuals, the stages take "
                    f"{len(found.down)}")
        return None
