"""Which thread a runtime's current generation belongs to.

A generation is a sequence of U-Net calls that share the controller's state
(step counter, plan caches, history), so it belongs to one thread from its
first call (or ``reset``) to its end. Two ways to hold it:

- explicitly, for a bounded stretch: ``with runtime.generation():`` and every
  call of a pipeline the runtime is attached to (from the progress bar that
  opens the denoising loop to its close). Another thread waits for it.
- implicitly, on the manual path: ``reset()``, ``set_step()`` or a U-Net call
  from a thread that holds nothing claims the runtime until that thread calls
  ``runtime.release()`` or ends. The runtime cannot know when such a
  generation is over, so another thread is refused (``CatomeError``) at
  once, before anything changes, rather than made to wait for an end that
  may never come.

When the runtime passes to a thread other than the one that held it last,
the controller starts a new generation: nobody continues another thread's
caches.
"""

from __future__ import annotations

import threading
import time

from catome_export.errors import CatomeError

_POLL_S = 0.05
"""How often a waiting thread checks whether the holder has ended without releasing."""


class GenerationOwner:
    """The per-runtime record of who holds the current generation (see the module doc)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._owner: threading.Thread | None = None
        self._explicit = False
        self._last: threading.Thread | None = None
        self.wait_timeout_s: float | None = None
        """How long a thread waits for another thread's explicit generation; None: as long as it takes."""

    def claim(self, what: str, *, explicit: bool) -> tuple[bool, bool, bool]:
        """Hold the runtime for the calling thread (waiting or refusing as the module doc says).

        Returns ``(newly, handed_over, was_explicit)``: whether this thread did not hold it before, whether
        it last belonged to another thread (the caller then starts a new generation), and the hold's kind
        before this claim.
        """
        me = threading.current_thread()
        deadline = None if self.wait_timeout_s is None else time.monotonic() + self.wait_timeout_s
        with self._cond:
            while True:
                owner = self._owner
                if owner is None or owner is me or not owner.is_alive():
                    break
                if not self._explicit:
                    raise CatomeError(
                        f"{what}: thread {owner.name!r} is in the middle of a generation on this runtime (it called "
                        "reset, set_step or the U-Net and has not released it); a generation belongs to one thread. "
                        "Have that thread call runtime.release() when it is done (or use `with runtime.generation():`), "
                        "or load one Runtime per thread")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise CatomeError(
                        f"{what}: waited {self.wait_timeout_s:g} s for thread {owner.name!r} to finish its generation "
                        "on this runtime: raise runtime.wait_timeout_s, or load one Runtime per thread")
                self._cond.wait(_POLL_S if remaining is None else min(_POLL_S, remaining))
            newly = self._owner is not me
            was_explicit = self._explicit and not newly
            handed_over = self._last is not None and self._last is not me
            self._owner = me
            self._explicit = explicit or was_explicit
            self._last = me
            return newly, handed_over, was_explicit

    def restore(self, explicit: bool) -> None:
        """Set the calling thread's hold back to ``explicit`` (the end of a nested explicit stretch)."""
        with self._cond:
            if self._owner is threading.current_thread():
                self._explicit = explicit

    def release(self) -> bool:
        """Let go of the runtime if the calling thread holds it; False when it did not."""
        with self._cond:
            if self._owner is not threading.current_thread():
                return False
            self._owner = None
            self._explicit = False
            self._cond.notify_all()
            return True

    @property
    def holder(self) -> threading.Thread | None:
        """The thread that holds the runtime now (None when free or its holder has ended)."""
        owner = self._owner
        return owner if owner is not None and owner.is_alive() else None
