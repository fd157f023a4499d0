"""The built shape ranges of an engine folder (the manifest's ``shapes`` section): batch, latent size and text
length ranges, and the shapes TensorRT tunes for."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from catome_export.defaults import DEFAULT_TEXT_LEN
from catome_export.checks import check_float, is_int
from catome_export.errors import CatomeError


@dataclass(frozen=True)
class ShapeRanges:
    """The built shape ranges (the manifest's ``shapes`` section), normalised."""

    batch: tuple[int, int]
    """(min, max) batch size."""
    latent_height: tuple[int, int]
    """(min, max) latent height (image height / 8)."""
    latent_width: tuple[int, int]
    """(min, max) latent width."""
    text_len: tuple[int, int]
    """(min, max) text length; equal ends for a static length."""
    opt_batch: int
    """Batch TensorRT tunes for."""
    opt_height: int
    """Latent height TensorRT tunes for."""
    opt_width: int
    """Latent width TensorRT tunes for."""
    opt_text_len: int
    """Text length TensorRT tunes for."""
    opt_merge_fraction: float | None = None
    """Expected merged share of src tokens (None: not given)."""
    text_dim: int | None = None
    """Width of the text embeddings (recorded by a build; None where not known)."""
    opt_text_len_given: bool = False
    """The opt text length was written out (kept so that a manifest reads back as it was written)."""

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``shapes`` section (inverse of :meth:`from_dict`)."""
        lo, hi = self.text_len
        d: dict[str, Any] = {"batch": list(self.batch), "latent_height": list(self.latent_height),
                             "latent_width": list(self.latent_width), "text_len": lo if lo == hi else [lo, hi]}
        if self.text_dim is not None:
            d["text_dim"] = self.text_dim
        opt: dict[str, Any] = {"batch": self.opt_batch, "latent_height": self.opt_height,
                               "latent_width": self.opt_width}
        if self.opt_text_len_given:
            opt["text_len"] = self.opt_text_len
        if self.opt_merge_fraction is not None:
            opt["merge_fraction"] = self.opt_merge_fraction
        d["opt"] = opt
        return d

    @classmethod
    def from_dict(cls, shapes: Mapping[str, Any]) -> "ShapeRanges":
        """Parse a manifest ``shapes`` dict (ranges as ``[min, max]`` pairs or single ints)."""
        try:
            batch = _pair(shapes["batch"], "batch")
            lh = _pair(shapes["latent_height"], "latent_height")
            lw = _pair(shapes["latent_width"], "latent_width")
        except KeyError as exc:
            raise CatomeError(f"shape ranges lack {exc.args[0]!r}: rebuild the engine folder "
                              "(catome-export build ...)") from None
        text = _pair(shapes.get("text_len", DEFAULT_TEXT_LEN), "text_len")
        opt = dict(shapes.get("opt") or {})
        frac = opt.get("merge_fraction")
        ranges = cls(
            batch=batch, latent_height=lh, latent_width=lw, text_len=text,
            opt_batch=int(opt.get("batch", batch[1])),
            opt_height=int(opt.get("latent_height", lh[1])),
            opt_width=int(opt.get("latent_width", lw[1])),
            opt_text_len=int(opt.get("text_len", text[1])),
            opt_merge_fraction=None if frac is None else float(frac),
            text_dim=None if shapes.get("text_dim") is None else int(shapes["text_dim"]),
            opt_text_len_given="text_len" in opt,
        )
        ranges.validate()
        return ranges

    def validate(self) -> None:
        """Raise CatomeError unless every range is positive and holds its opt value."""
        for name, (lo, hi), opt in (("batch", self.batch, self.opt_batch),
                                    ("latent_height", self.latent_height, self.opt_height),
                                    ("latent_width", self.latent_width, self.opt_width),
                                    ("text_len", self.text_len, self.opt_text_len)):
            if lo < 1 or hi < lo:
                raise CatomeError(f"{name} range [{lo}, {hi}] is empty or not positive: give min <= max, both >= 1")
            if not lo <= opt <= hi:
                raise CatomeError(f"opt {name} {opt} lies outside the built range [{lo}, {hi}]: "
                                  f"choose an opt value inside it")
        if self.opt_merge_fraction is not None:
            check_float("opt merge fraction", self.opt_merge_fraction, 0.0, 1.0)


def _pair(value: Any, name: str) -> tuple[int, int]:
    if is_int(value):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(is_int(v) for v in value):
        return int(value[0]), int(value[1])
    raise CatomeError(f"shape range {name} must be an int or [min, max], got {value!r}")
