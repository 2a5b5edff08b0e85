"""PNG plots of a run: reward and accuracy by step, held-out accuracy at each evaluation."""

from __future__ import annotations

from pathlib import Path

from rlloop.tracking import read_metrics


def plot_run(metrics_path: str | Path, out_png: str | Path, *, title: str = "rlloop run") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [r for r in rows if "reward/total" in r]
    evals = [r for r in rows if r.get("eval/accuracy") is not None]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    if train:
        steps = [r["step"] for r in train]
        for key, label in [("reward/total", "fused reward"), ("accuracy", "train accuracy")]:
            ys = [r.get(key) for r in train]
            ax.plot(steps, ys, label=label, alpha=0.4)
            ax.plot(steps, _smooth(ys), label=f"{label} (smoothed)")
    ax.set_xlabel("RL step")
    ax.set_title("training batches")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[1]
    if evals:
        ax.plot(
            [r["step"] for r in evals], [r["eval/accuracy"] for r in evals], "o-", label="greedy"
        )
        sampled = [r for r in evals if r.get("eval/accuracy_sampled") is not None]
        if sampled:
            ax.plot(
                [r["step"] for r in sampled],
                [r["eval/accuracy_sampled"] for r in sampled],
                "s--",
                label="sampled (training temperature)",
            )
    ax.set_xlabel("RL step")
    ax.set_ylim(0, 1)
    ax.set_title("held-out accuracy")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def _smooth(ys: list, k: int = 5) -> list:
    vals = [y if y is not None else float("nan") for y in ys]
    out = []
    for i in range(len(vals)):
        window = [v for v in vals[max(0, i - k + 1) : i + 1] if v == v]
        out.append(sum(window) / len(window) if window else float("nan"))
    return out
