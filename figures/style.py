"""The one seaborn style of every emalab figure: paper column width, readable at print size."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

__all__ = ["COLUMN", "FULL", "apply", "save", "DOMAIN_LABELS", "plt", "sns"]

COLUMN = 3.35  # inches: one column of a two-column ACL paper
FULL = 6.9
DOMAIN_LABELS = {"cybersecurity": "Cyber", "safety": "Safety", "toxicity": "Toxicity", "bias": "Bias",
                 "sensitive_content": "Sensitive", "medical_legal": "Med/Legal", "privacy": "Privacy"}


def apply() -> None:
    sns.set_theme(context="paper", style="whitegrid", font_scale=0.9,
                  rc={"figure.dpi": 150, "savefig.dpi": 300, "axes.titlesize": 9, "axes.labelsize": 8,
                      "xtick.labelsize": 7, "ytick.labelsize": 7, "legend.fontsize": 7, "pdf.fonttype": 42})


def save(fig, out_dir: Path, name: str) -> list[Path]:
    """Save ``fig`` as PNG and PDF under ``out_dir``; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    fig.tight_layout()
    for p in paths:
        fig.savefig(p, bbox_inches="tight")
    plt.close(fig)
    return paths
