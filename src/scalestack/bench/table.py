"""The comparison as a markdown table (ratios against scalestack, or the first system) and a PNG."""

from __future__ import annotations

from pathlib import Path

from .runner import BenchResult

MIB = 2**20


def markdown(results: list[BenchResult]) -> str:
    lines = []
    for w in dict.fromkeys(r.world for r in results):
        rows = [r for r in results if r.world == w]
        ref = next((r for r in rows if r.system == "scalestack"), rows[0])
        lines += [
            f"W={w}:",
            "",
            f"| system | step (ms) | {ref.system} / it | peak MiB/rank | {ref.system} / it | AG MiB/step "
            "| RS MiB/step | AR MiB/step | copy MiB/step |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            b = r.bytes
            lines.append(
                f"| {r.system} | {r.step_s * 1e3:.1f} | {_ratio(ref.step_s, r.step_s)} | {r.peak / MIB:.1f} | "
                f"{_ratio(ref.peak, r.peak)} | {b['ag'] / MIB:.2f} | {b['rs'] / MIB:.2f} | {b['ar'] / MIB:.2f} | "
                f"{b['copy'] / MIB:.2f} |"
            )
        lines += ["", f"W={w}, peak MiB/rank by phase of one step (each phase's own peak):", "",
                  "| system | forward | backward | optimizer step |", "|---|---|---|---|"]  # fmt: skip
        for r in rows:
            p = r.phases
            lines.append(
                f"| {r.system} | {p['forward'] / MIB:.1f} | {p['backward'] / MIB:.1f} | {p['update'] / MIB:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


def _ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}x" if theirs > 0 else "n/a"


def plot(results: list[BenchResult], path: Path, title: str) -> None:
    """Two panels, step time and peak memory per rank, one group of bars per W."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = list(dict.fromkeys(r.world for r in results))
    systems = list(dict.fromkeys(r.system for r in results))
    by = {(r.world, r.system): r for r in results}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(systems)
    for panel, (label, value) in zip(axes, [("median step (ms)", lambda r: r.step_s * 1e3),
                                            ("peak memory per rank (MiB)", lambda r: r.peak / MIB)]):  # fmt: skip
        for i, s in enumerate(systems):
            xs = [j + i * width for j in range(len(worlds))]
            panel.bar(xs, [value(by[(w, s)]) for w in worlds], width, label=s)
        panel.set_xticks([j + width * (len(systems) - 1) / 2 for j in range(len(worlds))], [f"W={w}" for w in worlds])
        panel.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
