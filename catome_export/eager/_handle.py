"""What the eager patches' handles share: one live patch per U-Net and kind, removal, ``with`` blocks."""

from __future__ import annotations

import weakref
from typing import Any, TypeVar

import torch

from catome_export.errors import CatomeError

H = TypeVar("H", bound="PatchHandle")


class PatchHandle:
    """A live patch on one U-Net, registered in its class's ``_registry`` while active; ``remove()`` undoes it."""

    _registry: "weakref.WeakKeyDictionary[torch.nn.Module, PatchHandle]"
    _what = "this patch"
    """How a refusal names the patch (``token merging``, ``feature caching``)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._registry = weakref.WeakKeyDictionary()

    def __init__(self, unet: torch.nn.Module) -> None:
        self._unet = unet
        self._active = False

    @classmethod
    def refuse_if_patched(cls, unet: torch.nn.Module) -> None:
        existing = cls._registry.get(unet)
        if existing is not None and existing.active:
            raise CatomeError(f"{cls._what} is already applied to this U-Net: call remove() on the first handle "
                              "(or leave its `with` block) before applying again")

    def _register(self) -> None:
        self._active = True
        type(self)._registry[self._unet] = self

    def _uninstall(self) -> None:
        raise NotImplementedError

    @property
    def active(self) -> bool:
        """True until :meth:`remove`."""
        return self._active

    def remove(self) -> None:
        """Undo the patch, leaving the model as it was. Safe to call twice."""
        if not self._active:
            return
        self._uninstall()
        self._active = False
        if type(self)._registry.get(self._unet) is self:
            del type(self)._registry[self._unet]

    def __enter__(self: H) -> H:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
