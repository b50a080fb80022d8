"""H11: membership-inference priors of each target's forget set vs the EMA its unlearning caused."""

from __future__ import annotations

from pathlib import Path

from figures import latest_metrics
from figures.style import DOMAIN_LABELS, FULL, apply, plt, save, sns

EXPERIMENT = "h11_mia_prior"

PANELS = (("response", "loss", "LOSS of own refusal (nats/token)"),
          ("response", "zlib", "zlib-normalised LOSS"),
          ("response", "min_k", "Min-K% log-prob of own refusal"),
          ("prompt", "loss", "LOSS of the prompt"))


def _rho(c: dict) -> str:
    if c.get("spearman") is None:
        return f"n={c['n']}: no ρ"
    return f"ρ={c['spearman']:.2f}, p={c['p_perm_spearman']:.3f}, n={c['n']}"


def make(results: Path, out: Path) -> list[Path]:
    metrics = latest_metrics(results, EXPERIMENT)
    if metrics is None or not metrics.get("priors"):
        return []
    apply()
    priors, ema = metrics["priors"], metrics["ema"]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(FULL, 2.2), sharey=True)
    for ax, (form, stat, label) in zip(axes, PANELS):
        for t, v in ema.items():
            if t not in priors:
                continue
            x = priors[t][form][stat]
            ax.scatter(x, v["judge"], s=16, color=sns.color_palette("deep")[0])
            ax.annotate(DOMAIN_LABELS.get(t, t), (x, v["judge"]), fontsize=5, xytext=(2, 2), textcoords="offset points")
        # Domains without an EMA still show where their prior lies (ticks on the x axis).
        for d, p in priors.items():
            if d not in ema:
                ax.plot([p[form][stat]], [0], marker="|", color="0.6", ms=6, transform=ax.get_xaxis_transform())
        ax.set_xlabel(label)
        ax.set_title(_rho(metrics["correlations"][f"{form}/{stat}"]["judge"]))
    axes[0].set_ylabel("EMA: mean untouched drop (judge)")
    sns.despine(fig)
    return save(fig, out, "prior_vs_ema")
