"""The results figure (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .report import SYSTEM_NAMES as NAMES

COLORS = {"naive": "tab:gray", "request": "tab:orange", "step": "tab:blue", "step-all": "tab:green"}


def plot_results(results: dict[str, Any], path: Path) -> Path:
    """Four panels: the engine's batch sweep, closed-loop throughput, open-loop latency, and the
    mix's per-step-count p95 under request- and step-level batching."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(12, 9))
    _sweep(axes[0][0], results)
    _closed(axes[0][1], results)
    _open(axes[1][0], results)
    _mix(axes[1][1], results)
    machine = results["machine"]
    figure.suptitle(
        f"imagegen-serve bench: {machine['cpu_model']}, {machine['torch_threads']} threads on "
        f"{machine['device']}, {machine['date'][:10]}"
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _sweep(ax: Any, results: dict[str, Any]) -> None:
    sweep = results["limit"]["sweep"]
    sizes = [str(point["batch_size"]) for point in sweep]
    bars = ax.bar(sizes, [point["images_per_s"] for point in sweep], color="tab:green")
    for bar, point in zip(bars, sweep, strict=True):
        ax.annotate(
            f"{point['ms_per_step']:.0f} ms/step",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_title(f"engine alone, {sweep[0]['label']}")
    ax.set_xlabel("batch size")
    ax.set_ylabel("images/s")


def _closed(ax: Any, results: dict[str, Any]) -> None:
    limit = results["limit"]["limit_ips"]
    for system, name in NAMES.items():
        runs = _runs(results, system, "single", "closed")
        if runs:
            ax.plot(
                [r["clients"] for r in runs],
                [r["stats"]["throughput_ips"] for r in runs],
                marker="o",
                color=COLORS[system],
                label=name,
            )
    ax.axhline(limit, color="tab:green", linestyle="--", label="limit (engine alone)")
    ax.axhline(0.9 * limit, color="tab:green", linestyle=":", label="0.9 x limit")
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set_title("closed loop, single workload: throughput")
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("images/s")
    ax.legend(fontsize=8)


def _open(ax: Any, results: dict[str, Any]) -> None:
    for system, name in NAMES.items():
        runs = _runs(results, system, "single", "open")
        if runs:
            fractions = [100 * r["fraction"] for r in runs]
            for key, style in (("p50", "--"), ("p95", "-")):
                ax.plot(
                    fractions,
                    [_nan(r["stats"]["latency"][key]) for r in runs],
                    marker="o",
                    linestyle=style,
                    color=COLORS[system],
                    label=f"{name} {key}",
                )
    ax.axhline(
        results["limit"]["latency_s"], color="tab:green", linestyle=":", label="engine alone"
    )
    _log_seconds(ax)
    ax.set_title("open loop (Poisson), single workload: latency")
    ax.set_xlabel("offered load, % of limit")
    ax.set_ylabel("seconds")
    ax.legend(fontsize=7)


def _mix(ax: Any, results: dict[str, Any]) -> None:
    steps_styles = dict(zip(results["settings"]["mix_steps"], ("-", "--", ":", "-."), strict=False))
    for system in ("request", "step", "step-all"):
        runs = _runs(results, system, "mix", "open")
        for steps, style in steps_styles.items():
            values = [
                _nan(r["stats"]["latency_by_steps"].get(str(steps), {}).get("p95")) for r in runs
            ]
            if runs:
                ax.plot(
                    [100 * r["fraction"] for r in runs],
                    values,
                    marker="o",
                    linestyle=style,
                    color=COLORS[system],
                    label=f"{NAMES[system]}, {steps}-step p95",
                )
    _log_seconds(ax)
    ax.set_title("open loop, mix: p95 by step count")
    ax.set_xlabel("offered load, % of mix limit")
    ax.set_ylabel("seconds")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:  # a run without the mix workload (--workloads single)
        ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)


def _runs(results: dict[str, Any], system: str, workload: str, kind: str) -> list[dict[str, Any]]:
    return [
        run
        for run in results["runs"]
        if (run["system"], run["workload"], run["kind"]) == (system, workload, kind)
    ]


def _nan(value: float | None) -> float:
    """Unknown percentiles (among unfinished requests) are gaps in the line."""
    return float("nan") if value is None else value


def _log_seconds(ax: Any) -> None:
    """Log scale with plain-number tick labels (latencies span 0.5 s to a minute)."""
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    plain = FuncFormatter(lambda value, _position: f"{value:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.grid(True, which="both", alpha=0.3)
