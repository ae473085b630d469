"""The evaluation's outputs: report.json, TensorBoard scalars and a PNG chart."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

from grc_jax.files import atomic_write_json
from grc_jax.metrics import MetricWriter

REPORT_FILE = "report.json"
CHART_FILE = "summary.png"
TENSORBOARD_DIR = "tensorboard"


def write_json(out_dir: Path, report: Mapping[str, Any]) -> Path:
    """report.json, written atomically: a reader, or a crash, never sees half a report."""
    return atomic_write_json(out_dir / REPORT_FILE, report, indent=2, sort_keys=False, default=str)


def write_tensorboard(out_dir: Path, metrics: Mapping[str, float], step: int) -> Path:
    """The finite figures as `eval/<name>` scalars at `step`, through the training's writer."""
    log_dir = out_dir / TENSORBOARD_DIR
    writer = MetricWriter(log_dir)
    try:
        writer.write(step, {"eval/" + name: value for name, value in metrics.items() if math.isfinite(value)})
    finally:
        writer.close()
    return log_dir


def _panels(metrics: Mapping[str, float]) -> list[tuple[str, list[str], list[float], str]]:
    """(title, bar labels, values, y label) for each headline group that has figures; a y label
    of "score" marks figures in [0, 1]."""
    panels = []
    ndcg = {k: v for k, v in metrics.items() if k.startswith("retrieval/") and k.endswith("/ndcg@10")}
    if ndcg:
        labels = [k[len("retrieval/") : -len("/ndcg@10")] for k in ndcg]
        panels.append(("Retrieval nDCG@10", labels, list(ndcg.values()), "score"))
    qa = {
        k.split("/")[1] + " " + k.split("/")[2].replace("exact_match", "EM"): v
        for k, v in metrics.items()
        if k.startswith("memory_qa/") and k.count("/") == 2
    }
    if qa:
        ratio = metrics.get("memory_qa/compression_ratio")
        title = "Memory QA" + (f" ({ratio:.3g}x compression)" if ratio is not None else "")
        panels.append((title, list(qa), list(qa.values()), "score"))
    gen = {k.split("/")[1]: v for k, v in metrics.items() if k.startswith("generation/") and k.endswith("/exact_match")}
    if gen:
        panels.append(("Generation exact match", list(gen), list(gen.values()), "score"))
    ttft = {k.split("/")[1]: v for k, v in metrics.items() if k.startswith("latency/") and k.endswith("/ttft_ms")}
    if ttft:
        panels.append(("Time to first token", list(ttft), list(ttft.values()), "ms"))
    return panels


def write_chart(out_dir: Path, metrics: Mapping[str, float], title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    panels = _panels(metrics) or [("No headline figures", [], [], "")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (name, labels, values, ylabel) in zip(axes[0], panels):
        bars = ax.bar(range(len(values)), values, color="#4C72B0")
        ax.set_xticks(range(len(values)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(name)
        ax.set_ylabel(ylabel)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
        if ylabel == "score":
            ax.set_ylim(0, 1.05)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = out_dir / CHART_FILE
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
