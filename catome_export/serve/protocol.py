"""The HTTP protocol of the service, without Ray: request validation, error and response bodies.

Requests follow OpenAI's images API (``POST /v1/images/generations``):
``{"prompt": str, "n": int = 1, "size": "WxH", "response_format": "b64_json"}``
plus the extensions ``seed``, ``steps``, ``guidance_scale``,
``negative_prompt`` and ``threshold``. :func:`parse_request` checks a raw body
against the limits of the loaded engine (:class:`EngineLimits`: its built
resolution and batch ranges, read from the engine's manifest, and the most
steps its scheduler runs) and raises :class:`RequestError` with a message that
says what to send instead; the service answers that with HTTP 400 and
:func:`error_body`. A body that is not JSON at all (malformed, not UTF-8, a
number of more digits than Python reads, nesting deeper than the parser goes)
is a :class:`RequestError` too, never another exception. :func:`render` writes
a response body as ASCII JSON, so that no text a request sent (a lone
surrogate, say) can make the answer itself fail.

A request of ``n`` images becomes ``n`` :class:`ImageJob` s (seeds ``seed``,
``seed + 1``, ...), each batched on its own by the replica.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from typing import Any

from catome_export.checks import is_int, is_number
from catome_export.errors import CatomeError

MAX_PROMPT_CHARS = 10_000
"""Longest prompt accepted (the text encoder reads 77 tokens of it anyway)."""
MAX_GUIDANCE = 100.0
"""Largest guidance scale accepted: far above useful values (images saturate past ~30), small enough that the
guided noise estimate ``uncond + scale * (text - uncond)`` stays finite in fp32 (1e30 made NaN images)."""
MAX_SEED = 2**63 - 1
ALLOWED_FIELDS = ("prompt", "n", "size", "response_format", "seed", "steps", "guidance_scale", "negative_prompt",
                  "threshold", "model", "user")
"""Fields a request may carry; ``model`` and ``user`` (sent by OpenAI clients) are accepted and ignored."""
_SIZE = re.compile(r"^\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*$")


class RequestError(CatomeError):
    """A request the service refuses; ``param`` names the field at fault, where there is one.

    ``status`` is the HTTP status: 400 for a request validation refuses, 422 for a valid-looking request whose
    generation failed on its own inputs while the engine kept working.
    """

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status


@dataclass(frozen=True)
class EngineLimits:
    """What a loaded engine can run, as the service checks requests against it."""

    batch: tuple[int, int]
    """Built U-Net batch range (lo, hi); with guidance each image takes two rows."""
    height: tuple[int, int]
    """Built image height range in pixels (latent range x 8)."""
    width: tuple[int, int]
    """Built image width range in pixels."""
    default_size: tuple[int, int]
    """(height, width) used when a request gives no size: the engine's optimal profile."""
    default_steps: int
    """Denoising steps when a request gives none."""
    max_steps: int
    """Most denoising steps the pipeline's scheduler runs (found by asking it; see
    :func:`catome_export.serve.service.scheduler_step_limit`)."""
    default_guidance: float
    """Guidance scale when a request gives none."""
    max_images: int
    """Most images (``n``) one request may ask for."""
    threshold_allowed: bool
    """Whether ``threshold`` may be set per request (engines built in threshold mode)."""
    scheduler: str = "scheduler"
    """The pipeline's scheduler (its class name), as messages about ``steps`` name it."""

    @classmethod
    def from_ranges(cls, ranges: dict[str, tuple[int, int]], *, default_size: tuple[int, int] | None,
                    default_steps: int, max_steps: int, default_guidance: float, max_images: int,
                    threshold_allowed: bool, scheduler: str = "scheduler") -> "EngineLimits":
        """From the built ranges (a manifest's ``shapes``: batch, latent_height, latent_width as latent (lo, hi))."""
        height = (ranges["latent_height"][0] * 8, ranges["latent_height"][1] * 8)
        width = (ranges["latent_width"][0] * 8, ranges["latent_width"][1] * 8)
        if default_size is None or not (height[0] <= default_size[0] <= height[1]
                                        and width[0] <= default_size[1] <= width[1]):
            default_size = (height[1], width[1])
        return cls(batch=(int(ranges["batch"][0]), int(ranges["batch"][1])), height=height, width=width,
                   default_size=default_size, default_steps=default_steps, max_steps=max_steps,
                   default_guidance=default_guidance, max_images=max_images, threshold_allowed=threshold_allowed,
                   scheduler=scheduler)

    def size_text(self) -> str:
        """``128x128..192x192`` (width x height, as the ``size`` field is written)."""
        return f"{self.width[0]}x{self.height[0]}..{self.width[1]}x{self.height[1]}"


@dataclass(frozen=True)
class ImageJob:
    """One image to generate: the unit the replica batches."""

    prompt: str
    negative_prompt: str | None
    seed: int
    steps: int
    guidance: float
    height: int
    width: int
    threshold: float | None
    """None: the engine's own merge settings."""

    def group_key(self) -> tuple[Any, ...]:
        """Jobs with the same key can share one pipeline call (one scheduler, one guidance scale, one r)."""
        return (self.height, self.width, self.steps, self.guidance, self.threshold)


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request."""

    prompt: str
    negative_prompt: str | None
    n: int
    seed: int
    steps: int
    guidance: float
    height: int
    width: int
    threshold: float | None

    def jobs(self) -> list[ImageJob]:
        return [ImageJob(self.prompt, self.negative_prompt, self.seed + i, self.steps, self.guidance, self.height,
                         self.width, self.threshold) for i in range(self.n)]


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error",
               code: str | None = None) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}`` as OpenAI's API answers errors; ``code`` names a
    condition a client may act on (``queue_full``, ``timeout``, ``replica_lost``, ``shutting_down``), else None."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def unet_rows(guidance: float) -> int:
    """U-Net batch rows per image: 2 with classifier-free guidance (scale > 1), else 1."""
    return 2 if guidance > 1 else 1


def render(body: dict[str, Any]) -> bytes:
    """A response body as JSON bytes: ASCII only (``\\uXXXX`` escapes), so text from a request that UTF-8 cannot
    encode (a lone surrogate) cannot make the answer fail."""
    return json.dumps(body, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _json_problem(exc: Exception) -> str:
    """What kept a body from being read as JSON, in a few words (no advice meant for a server's programmer)."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    if isinstance(exc, UnicodeDecodeError):
        return "it is not UTF-8 text"
    if isinstance(exc, ValueError) and "integer string conversion" in str(exc):
        return "an integer has more digits than Python reads (4300 by default)"
    return type(exc).__name__


def _load_json(body: bytes | str, limits: EngineLimits) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RequestError(f"the body is not valid JSON ({_json_problem(exc)}): send a JSON object like "
                           '{"prompt": "a red fox", "size": "' + f"{limits.default_size[1]}x{limits.default_size[0]}"
                           + '"}') from None


def parse_request(body: bytes | str, limits: EngineLimits) -> GenerationRequest:
    """Validate a raw JSON body; :class:`RequestError` (one line saying what to send) on anything wrong."""
    data = _load_json(body, limits)
    if not isinstance(data, dict):
        raise RequestError(f"the body must be a JSON object, got {type(data).__name__}")
    unknown = sorted(k for k in data if k not in ALLOWED_FIELDS)
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(map(repr, unknown))}: allowed are {', '.join(ALLOWED_FIELDS)}",
                           unknown[0])

    prompt = data.get("prompt")
    if prompt is None:
        raise RequestError("prompt is missing: send {\"prompt\": \"a photograph of ...\"}", "prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError(f"prompt must be a non-empty string, got {_show(prompt)}", "prompt")
    _check_text("prompt", prompt)
    negative = data.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise RequestError(f"negative_prompt must be a string or null, got {_show(negative)}", "negative_prompt")
    if negative is not None:
        _check_text("negative_prompt", negative)

    fmt = data.get("response_format", "b64_json")
    if fmt != "b64_json":
        raise RequestError(f"response_format {_show(fmt)} is not supported: use \"b64_json\" (PNG, base64)",
                           "response_format")
    n = _int_field(data, "n", 1, 1, limits.max_images)
    steps = _steps(data, limits)
    seed = data.get("seed")
    seed = random.randint(0, 2**31 - 1) if seed is None else _int_field(data, "seed", 0, 0, MAX_SEED - n)
    height, width = _size(data.get("size"), limits)
    guidance = _guidance(data.get("guidance_scale", limits.default_guidance), limits)
    threshold = _threshold(data.get("threshold"), limits)
    return GenerationRequest(prompt, negative, n, seed, steps, guidance, height, width, threshold)


def _check_text(name: str, text: str) -> None:
    """Prompt text the tokenizer can read: at most MAX_PROMPT_CHARS characters, every one encodable as UTF-8."""
    if len(text) > MAX_PROMPT_CHARS:
        raise RequestError(f"{name} has {len(text)} characters, at most {MAX_PROMPT_CHARS} are accepted", name)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(f"{name} contains a lone surrogate {ascii(text[exc.start])[1:-1]} at character "
                           f"{exc.start}, which is not Unicode text: in JSON a \\uD800-\\uDFFF escape must be "
                           "one half of a high-low pair (\\ud83e\\udd8a is one character); send the text as "
                           "UTF-8 or escape whole characters", name) from None


def _show(value: Any) -> str:
    try:
        text = json.dumps(value) if not isinstance(value, (bytes, bytearray)) else repr(value)
    except (ValueError, RecursionError, TypeError):
        text = f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


def _number(value: Any) -> float | None:
    """A JSON number as a finite float, or None (not a number, a bool, NaN, infinite, or an int too large)."""
    if not is_number(value, finite=False):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _int_field(data: dict, name: str, default: int, lo: int, hi: int, why: str = "") -> int:
    value = data.get(name, default)
    if value is None:
        value = default
    if not is_int(value) or not lo <= value <= hi:
        raise RequestError(f"{name} must be an integer in {lo}..{hi}{why}, got {_show(value)}", name)
    return value


def _steps(data: dict, limits: EngineLimits) -> int:
    why = f" ({limits.max_steps} is the most the pipeline's {limits.scheduler} runs)"
    return _int_field(data, "steps", limits.default_steps, 1, limits.max_steps, why)


def _size(value: Any, limits: EngineLimits) -> tuple[int, int]:
    """``"WxH"`` -> (height, width), inside the engine's built range and a multiple of 8."""
    if value is None:
        return limits.default_size
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        raise RequestError(f"size must be a string \"WIDTHxHEIGHT\" like \"{limits.default_size[1]}x"
                           f"{limits.default_size[0]}\", got {_show(value)}", "size")
    width, height = int(match.group(1)), int(match.group(2))
    for name, side in (("width", width), ("height", height)):
        if side % 8:
            lower = max(8, side - side % 8)
            raise RequestError(f"size {value}: {name} {side} is not a multiple of 8 (the VAE downsamples by 8): "
                               f"use {lower} or {lower + 8}", "size")
    if not (limits.width[0] <= width <= limits.width[1] and limits.height[0] <= height <= limits.height[1]):
        raise RequestError(f"size {value} is outside the engine's built range {limits.size_text()} "
                           "(width x height): use a size inside it, or serve an engine built for this size "
                           "(catome-export build --min-resolution/--max-resolution)", "size")
    return height, width


def _guidance(value: Any, limits: EngineLimits) -> float:
    number = _number(value)
    if number is None or not 0 <= number <= MAX_GUIDANCE:
        raise RequestError(f"guidance_scale must be a number in 0..{MAX_GUIDANCE:g} (7.5 is usual; <= 1 turns "
                           f"guidance off), got {_show(value)}", "guidance_scale")
    rows = unet_rows(number)
    lo, hi = limits.batch
    if rows > hi:
        raise RequestError(f"guidance_scale {value} runs the U-Net at batch {rows} per image, but the engine is built "
                           f"for batch {lo}..{hi}: send guidance_scale <= 1, or serve an engine built with "
                           f"--max-batch {rows}", "guidance_scale")
    if rows < lo:
        raise RequestError(f"guidance_scale {value} runs the U-Net at batch {rows} per image, but the engine is built "
                           f"for batch {lo}..{hi}: send guidance_scale > 1, or serve an engine built with "
                           f"--min-batch {rows}", "guidance_scale")
    return number


def _threshold(value: Any, limits: EngineLimits) -> float | None:
    if value is None:
        return None
    if not limits.threshold_allowed:
        raise RequestError("threshold cannot be set for this engine (it merges by ratio or a forced fraction, "
                           "not by threshold): leave threshold out", "threshold")
    number = _number(value)
    if number is None or not -1 <= number <= 1:
        raise RequestError(f"threshold must be a number in [-1, 1] (1 merges nothing), got {_show(value)}",
                           "threshold")
    return number
