"""Which U-Net modules a cached call skips, by module path, as ``DeepCacheSDHelper`` decides it.

DeepCache wraps, per down block i: each ``attentions.j`` and ``resnets.j`` at
(i, j), the downsampler at (i, number of resnets) and the block itself at
(i, 0); the mid block; per up block k, counted from the output end
(i = number of up blocks - k - 1): ``resnets.j`` and ``attentions.j`` at
(i, number of resnets - j - 1), the upsampler and the block itself at (i, 0).
A skipped module returns its output of the last full call; a module inside a
skipped block is not called at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Literal, Mapping, Sequence

from catome_export.checks import is_int
from catome_export.errors import CatomeError

Kind = Literal["down", "mid", "up"]


@dataclass(frozen=True)
class BlockPosition:
    """A module's place as DeepCache numbers it."""

    kind: Kind
    block: int
    layer: int


@dataclass(frozen=True)
class UNetLayout:
    """What positions need of a U-Net: its down blocks' and up blocks' resnet counts."""

    down_resnets: tuple[int, ...]
    up_resnets: tuple[int, ...]

    @classmethod
    def of(cls, unet: object) -> "UNetLayout":
        """The layout of a diffusers ``UNet2DConditionModel`` (its ``down_blocks`` / ``up_blocks``)."""
        down = tuple(len(b.resnets) for b in unet.down_blocks)  # type: ignore[attr-defined]
        up = tuple(len(b.resnets) for b in unet.up_blocks)  # type: ignore[attr-defined]
        return cls(down, up)

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> "UNetLayout":
        """The layout from a U-Net config (``layers_per_block``, the block type lists), as diffusers builds it:
        down blocks have ``layers_per_block`` resnets, up blocks one more."""
        down_types = list(config["down_block_types"])  # type: ignore[call-overload]
        up_types = list(config["up_block_types"])  # type: ignore[call-overload]
        lpb = config.get("layers_per_block", 2)
        per = list(lpb) if isinstance(lpb, (list, tuple)) else [lpb] * len(down_types)
        up_per = list(reversed(per))
        return cls(tuple(int(n) for n in per), tuple(int(n) + 1 for n in up_per[:len(up_types)]))

    @property
    def num_branches(self) -> int:
        """Branch ids DeepCache can address on this layout: 3 per down block (b // 3 picks the block)."""
        return 3 * len(self.down_resnets)


_DOWN = re.compile(r"^down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)(?:\.|$)")
_UP = re.compile(r"^up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)(?:\.|$)")
_UP_CAT = re.compile(r"^up_blocks\.(\d+)\.cat(\d+)$")


def position_of(path: str, layout: UNetLayout) -> BlockPosition | None:
    """DeepCache's position of the module at ``path`` (or a step named after one: ``....pre``, ``up_blocks.k.cat{j}``,
    the concatenation in front of ``resnets.j``); None for what always runs (time embedding, conv_in, conv_out)."""
    if path.startswith("mid_block"):
        return BlockPosition("mid", 0, 0)
    m = _DOWN.match(path)
    if m:
        i, what, j = int(m.group(1)), m.group(2), int(m.group(3))
        return BlockPosition("down", i, layout.down_resnets[i] if what == "downsamplers" else j)
    m = _UP.match(path)
    cat = _UP_CAT.match(path)
    if m or cat:
        k = int((m or cat).group(1))  # type: ignore[union-attr]
        i = len(layout.up_resnets) - k - 1
        if m and m.group(2) == "upsamplers":
            return BlockPosition("up", i, 0)
        j = int(m.group(3)) if m else int(cat.group(2))  # type: ignore[union-attr]
        return BlockPosition("up", i, layout.up_resnets[k] - j - 1)
    if path.startswith(("down_blocks", "up_blocks")):
        raise CatomeError(f"internal: no DeepCache position for {path}")
    return None


def is_skipped(position: BlockPosition | None, branch: int) -> bool:
    """Whether a cached call skips the module at ``position`` (``DeepCacheSDHelper.is_skip_step`` on a cached call).

    A module inside a skipped block is skipped too, which this rule already
    gives: the block itself sits at layer 0, so it is skipped exactly when
    every module in it is.
    """
    if position is None:
        return False
    block, layer = branch // 3, branch % 3
    if position.kind == "mid" or position.block > block:
        return True
    if position.block < block:
        return False
    return position.layer >= layer if position.kind == "down" else position.layer > layer


def valid_branches(layout: UNetLayout) -> range:
    return range(layout.num_branches)


def check_branch(branch: int, layout: UNetLayout) -> None:
    """CatomeError naming the valid range unless ``branch`` is one DeepCache can address on ``layout``."""
    if not is_int(branch) or branch not in valid_branches(layout):
        raise CatomeError(f"cache branch {branch!r} does not exist on this U-Net: it has "
                          f"{len(layout.down_resnets)} down blocks, so branches 0..{layout.num_branches - 1} "
                          "(0 = shallowest, caches the most)")


@dataclass(frozen=True)
class StepIO:
    """What a step of the flat U-Net step list reads and writes (by tensor name), and its module path."""

    name: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]


def cached_tensors(steps: Sequence[StepIO], branch: int, layout: UNetLayout) -> tuple[str, ...]:
    """Names a cached call reads from the last full call: written by a skipped step, read by a step that runs.

    ``steps`` is the U-Net's flat step list in execution order. CatomeError
    when the steps that run are not one prefix and one suffix of the list
    (the stage chain runs them as two runs of whole stages).
    """
    skipped = [is_skipped(position_of(s.name, layout), branch) for s in steps]
    _check_contiguous(skipped)
    written_by_skipped = {n for s, skip in zip(steps, skipped) if skip for n in s.writes}
    out: list[str] = []
    for s, skip in zip(steps, skipped):
        if skip:
            continue
        for n in s.reads:
            if n in written_by_skipped and n not in out:
                out.append(n)
    return tuple(out)


def _check_contiguous(skipped: Iterable[bool]) -> None:
    flags = list(skipped)
    changes = sum(1 for a, b in zip(flags, flags[1:]) if a != b)
    if changes != 2 or flags[0] or flags[-1]:
        raise CatomeError("internal: the steps a cached call runs are not one prefix and one suffix of the U-Net")
