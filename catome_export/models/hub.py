"""Hugging Face hub access that fails in seconds when the hub cannot be reached.

Left alone, ``from_pretrained`` on a machine without network retries every
file request with back-off (five tries each, once more after the cache
misses): about a minute before its error. Here one metadata request
(``huggingface_hub.get_hf_file_metadata``, no retries, a short timeout)
asks the hub first; when it cannot be reached, or when ``HF_HUB_OFFLINE=1``
is set, the model is loaded from the local cache only
(``local_files_only=True``) and a miss becomes one :class:`CatomeError` that
names the ways out. ``HF_ENDPOINT`` (a mirror) and the proxy settings are
respected, because the request goes through huggingface_hub itself.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, TypeVar

from catome_export.errors import CatomeError

logger = logging.getLogger(__name__)

T = TypeVar("T")

PROBE_TIMEOUT_S = 3.0
"""Seconds the one metadata request may take (``HF_HUB_ETAG_TIMEOUT``, where set, replaces it)."""


@dataclass(frozen=True)
class HubAccess:
    """Whether the hub answers, and if not, why."""

    online: bool
    """True when the hub answered (any HTTP status: a missing or gated repo is the loader's error to report)."""
    reason: str = ""
    """Why the hub is not used: ``HF_HUB_OFFLINE=1 is set`` or ``the hub at <url> cannot be reached (...)``."""


def probe_timeout() -> float:
    """:data:`PROBE_TIMEOUT_S`, or ``HF_HUB_ETAG_TIMEOUT`` seconds where the user set it."""
    text = os.environ.get("HF_HUB_ETAG_TIMEOUT")
    try:
        value = float(text) if text else PROBE_TIMEOUT_S
    except ValueError:
        return PROBE_TIMEOUT_S
    return value if value > 0 else PROBE_TIMEOUT_S


def hub_access(repo_id: str, filename: str) -> HubAccess:
    """One HEAD request for ``filename`` of ``repo_id`` (no retries, :func:`probe_timeout` seconds)."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url

    if constants.HF_HUB_OFFLINE:
        return HubAccess(False, "HF_HUB_OFFLINE=1 is set")
    url = hf_hub_url(repo_id, filename)
    try:
        get_hf_file_metadata(url, timeout=probe_timeout())
    except Exception as exc:  # noqa: BLE001 - network errors come from the HTTP client in many types
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

        if isinstance(exc, OfflineModeIsEnabled):
            return HubAccess(False, "HF_HUB_OFFLINE=1 is set")
        if isinstance(exc, HfHubHTTPError) and getattr(exc, "response", None) is not None:
            return HubAccess(True)  # the hub answered: 401/403/404 are the loader's to report
        detail = " ".join(str(exc).split())[:120] or type(exc).__name__
        return HubAccess(False, f"the hub at {constants.ENDPOINT} cannot be reached ({type(exc).__name__}: {detail})")
    return HubAccess(True)


def load_from_hub(repo_id: str, probe_file: str, load: Callable[[bool], T], what: str, ways_out: str) -> T:
    """``load(local_files_only)`` with the hub when it answers, else from the local cache only.

    ``what`` names what is loaded (``the U-Net of stable-diffusion-v1-5/...``);
    ``ways_out`` ends the error raised when the hub is out of reach and the
    cache lacks the files. Errors of an online load are the caller's to word.
    """
    access = hub_access(repo_id, probe_file)
    if access.online:
        return load(False)
    logger.info("%s: loading %s from the local cache only", access.reason, repo_id)
    try:
        return load(True)
    except Exception as exc:  # noqa: BLE001 - cache misses come in many types
        logger.debug("cache load of %s failed: %s: %s", repo_id, type(exc).__name__, exc)
        from huggingface_hub import constants

        raise CatomeError(f"cannot load {what}: {access.reason}; not in the local Hugging Face cache "
                          f"({constants.HF_HUB_CACHE}) either. {ways_out}") from None
