"""A figure like the paper's Figure 4: Jaccard distance between consecutive steps, per merge site.

Drawn with matplotlib's Agg canvas on a ``Figure`` object (no pyplot, no
global backend switch), written atomically as PNG.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from catome_export.fsutil import atomic_write_with
from catome_export.analysis.result import PairAnalysis
from catome_export.errors import CatomeError


def plot_consecutive(
    analysis: PairAnalysis,
    path: str | os.PathLike,
    *,
    checkpoints: Sequence[int] | None = None,
    title: str | None = None,
) -> Path:
    """Write the per-site consecutive-step Jaccard distance over loop index as a PNG.

    ``checkpoints`` (loop indices) are drawn as dotted vertical lines.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise CatomeError("--plot needs matplotlib: pip install 'catome-export[eval]'") from None

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps = np.arange(analysis.num_calls)
    for s, site in enumerate(analysis.sites):
        ax.plot(steps[1:], analysis.consecutive[1:, s], marker=".", linewidth=1.2,
                label=f"site {s}: {site.path.replace('.transformer_blocks.0', '')}")
    for i, c in enumerate(checkpoints or ()):
        ax.axvline(int(c), color="grey", linestyle=":", linewidth=0.8, label="proposed checkpoints" if i == 0 else None)
    ax.set_xlabel("loop index (U-Net call)")
    ax.set_ylabel("Jaccard distance to previous step")
    ax.set_xlim(0, max(1, analysis.num_calls - 1))
    ax.set_ylim(bottom=0.0)
    ax.grid(True, alpha=0.3)
    cfg = analysis.config
    merge = f"t={cfg.threshold:g}" if cfg.threshold is not None else f"ratio={cfg.ratio:g}"
    ax.set_title(title or f"pair drift between consecutive steps ({merge}, {cfg.scheduler}, {cfg.latents} latents)",
                 fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png"))
