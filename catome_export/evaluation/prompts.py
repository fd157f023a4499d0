"""Evaluation prompts: the paper's ImageNet-1k prompts (bundled) or a user's prompt file.

The paper evaluates on one prompt per image, ``"A high-quality photograph of
a {class name}."``, over ImageNet-1k class names. The 1000 names ship in
``catome_export/data/imagenet_classes.txt`` in the standard class-index order:
the short names of the widely used Keras class index
(``imagenet_class_index.json``) with underscores written as spaces, checked
entry by entry against it (so "crane" and "maillot" appear twice, as there).

``imagenet_prompts(n)`` picks ``n`` classes *evenly spaced* over the 1000
(class ``floor(i * 1000 / n)`` for ``i = 0..n-1``), so a small ``n`` covers
animals, objects and scenes alike instead of only the first classes (fish
and birds); ``order="first"`` takes classes 0..n-1 instead. For ``n > 1000``
the classes repeat in index order (2000 images = every class twice, as in the
paper); the evaluation gives every image its own seed, so repeats differ.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

from catome_export.checks import check_int
from catome_export.errors import CatomeError

PROMPT_TEMPLATE = "A high-quality photograph of a {}."
"""The paper's prompt per ImageNet class."""
NUM_CLASSES = 1000
ORDERS = ("spaced", "first")


@lru_cache(maxsize=1)
def _classes() -> tuple[str, ...]:
    text = resources.files("catome_export").joinpath("data", "imagenet_classes.txt").read_text(encoding="utf-8")
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(names) != NUM_CLASSES:
        raise CatomeError(f"the bundled ImageNet class list has {len(names)} names, expected {NUM_CLASSES}: "
                          "reinstall catome-export")
    return names


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names, in class-index order."""
    return list(_classes())


def imagenet_indices(n: int, order: str = "spaced") -> list[int]:
    """Class indices of ``n`` prompts (see the module docstring for ``spaced`` and ``first``)."""
    check_int("the number of ImageNet prompts", n, 1)
    if order not in ORDERS:
        raise CatomeError(f"unknown ImageNet class order {order!r}: use {' or '.join(ORDERS)}")
    if n > NUM_CLASSES:
        return [i % NUM_CLASSES for i in range(n)]
    if order == "first":
        return list(range(n))
    return [i * NUM_CLASSES // n for i in range(n)]


def imagenet_prompts(n: int, order: str = "spaced") -> list[str]:
    """``n`` prompts ``"A high-quality photograph of a {class}."`` over ImageNet-1k classes."""
    names = _classes()
    return [PROMPT_TEMPLATE.format(names[i]) for i in imagenet_indices(n, order)]


def load_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: a JSON list of strings (``.json``) or one prompt per line.

    In text files, blank lines and lines starting with ``#`` are skipped.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CatomeError(f"prompt file {str(p)!r} does not exist: pass a text file with one prompt per line, "
                          "or use --imagenet N") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CatomeError(f"cannot read prompt file {str(p)!r}: {exc}") from None
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CatomeError(f"prompt file {str(p)!r} is not valid JSON ({exc}): write a list of strings") from None
        if not isinstance(data, list) or not all(isinstance(s, str) for s in data):
            raise CatomeError(f"prompt file {str(p)!r} must hold a JSON list of strings")
        prompts = [s.strip() for s in data if s.strip()]
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise CatomeError(f"prompt file {str(p)!r} holds no prompt: write one prompt per line")
    return prompts
