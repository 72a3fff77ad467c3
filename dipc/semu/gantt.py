"""Gantt charts of simulated (or measured) pipeline steps, several schedules side by side."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from dipc.ir import Op
from dipc.semu.emulator import STREAM_COMPUTE, SimResult

_COLORS = {Op.FWD: "#4C78A8", Op.BWD: "#54A24B", Op.BWD_I: "#72B7B2", Op.BWD_W: "#B279A2",
           Op.LOAD: "#BAB0AC", Op.REDUCE: "#F58518", Op.OPTIM: "#E45756"}


def plot_gantt(results: Mapping[str, SimResult], path: str | Path, *, title: str = "",
               share_time_axis: bool = True) -> Path:
    """One panel per schedule, one row per rank; forward blue, backward green (input-grad teal,
    weight-grad purple), idle time white. Each panel is labelled with its step time and bubble
    fraction. Panels share one time axis unless ``share_time_axis=False`` (each then spans its own
    step: for a prediction on one device next to a measurement on another). A measured timeline
    plots through :meth:`dipc.runtime.timeline.MeasuredTimeline.as_sim_result`."""
    import matplotlib

    matplotlib.use("Agg")   # files only: no display on servers
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    horizon = max(r.step_time for r in results.values()) * 1e3
    fig, axes = plt.subplots(len(results), 1, figsize=(12, 1.2 + 0.45 * sum(r.program.num_ranks for r in
                                                                          results.values())), squeeze=False)
    for ax, (label, res) in zip(axes[:, 0], results.items()):
        width = horizon if share_time_axis else max(res.step_time * 1e3, 1e-9)
        for rank, stream, step, start, end, _ in res.raw_spans:
            if stream != STREAM_COMPUTE:
                continue
            instr = res.program.streams[rank][step]
            if instr.op not in (Op.FWD, Op.BWD, Op.BWD_I, Op.BWD_W):
                continue
            ax.barh(rank, (end - start) * 1e3, left=start * 1e3, height=0.8, color=_COLORS[instr.op],
                    edgecolor="white", linewidth=0.3)
            if (end - start) * 1e3 > width / 60:
                ax.text((start + end) / 2 * 1e3, rank, str(instr.mb), ha="center", va="center", fontsize=6,
                        color="white")
        ax.set_yticks(range(res.program.num_ranks), [f"rank {r}" for r in range(res.program.num_ranks)])
        ax.invert_yaxis()
        ax.set_xlim(0, width)
        ax.set_title(f"{label}: step {res.step_time * 1e3:.2f} ms, bubble {res.bubble_fraction:.1%}", fontsize=9,
                     loc="left")
    axes[-1, 0].set_xlabel("time (ms)")
    fig.legend(handles=[Patch(color=c, label=o.value) for o, c in _COLORS.items()
                        if o in (Op.FWD, Op.BWD, Op.BWD_I, Op.BWD_W)], loc="upper right", fontsize=7, ncol=4)
    if title:
        fig.suptitle(title, fontsize=10, x=0.01, ha="left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
