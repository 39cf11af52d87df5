"""Timelines as pictures and as Chrome traces.

Both the simulator and the real runtime produce the same thing: a list of ``Span`` records
(rank, label, kind, start, end).  This module turns such a list into a Gantt chart in the
style of Figure 5 of the DeepSeek-V3 report (one row per pipeline rank, forward / backward /
weight-gradient / overlapped blocks coloured by kind and direction), into Chrome-trace JSON
(viewable in chrome://tracing or Perfetto), and reads Chrome-trace JSON back into spans, so a
profile of a real run can be drawn next to the simulated schedule it was meant to follow.

matplotlib is imported lazily (Agg backend) so the simulator stays importable without it.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple, Union

# Colours follow the report's figure: forwards orange, backwards green, weight grads blue,
# overlapped pairs purple; chunk 1 (DualPipe's reverse direction, the V's ascending arm) uses
# a darker shade of each.
_COLORS: Dict[Tuple[str, int], str] = {
    ("F", 0): "#f6b26b", ("F", 1): "#e69138",
    ("B", 0): "#93c47d", ("B", 1): "#6aa84f",
    ("BW", 0): "#b6d7a8", ("BW", 1): "#38761d",
    ("W", 0): "#9fc5e8", ("W", 1): "#3d85c6",
    ("FB", 0): "#b4a7d6", ("FB", 1): "#8e7cc3",
}
_FALLBACK = "#cccccc"


@dataclass(frozen=True)
class Span:
    """One timed block on one rank.

    ``kind`` is ``F``/``B``/``W``/``BW``/``FB`` for pipeline work (anything else is drawn grey),
    ``direction`` the chunk / pipeline direction used to pick the shade, times in any unit.
    """

    rank: int
    name: str
    kind: str
    start: float
    end: float
    direction: int = 0

    @property
    def duration(self) -> float:
        return self.end - self.start


def chrome_trace(spans: Iterable[Span], time_scale: float = 1.0) -> dict:
    """Chrome-trace dict: one complete ("X") event per span, ``pid`` = rank.

    ``time_scale`` multiplies times into microseconds (the trace format's unit); simulated
    cost units map 1:1 by default.
    """
    events = []
    ranks = set()
    for sp in spans:
        ranks.add(sp.rank)
        events.append({
            "name": sp.name, "ph": "X", "pid": sp.rank, "tid": 0,
            "ts": sp.start * time_scale, "dur": sp.duration * time_scale,
            "args": {"kind": sp.kind, "direction": sp.direction},
        })
    for rank in sorted(ranks):
        events.append({"name": "process_name", "ph": "M", "pid": rank,
                       "args": {"name": f"pp rank {rank}"}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chrome_trace(spans: Iterable[Span], path: Union[str, Path],
                       time_scale: float = 1.0) -> Path:
    """Write ``chrome_trace(spans)`` as JSON to ``path`` and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(chrome_trace(spans, time_scale)))
    return path


def _kind_from_name(name: str) -> str:
    """Best-effort kind from a span name such as ``"FB(F3.0,B1.1)"``, ``"W12"`` or ``"B"``."""
    for kind in ("FB", "BW", "F", "B", "W"):
        if name.startswith(kind):
            return kind
    return name


def short_label(name: str) -> str:
    """Compact block label: the micro-batch numbers of a name, e.g. ``"FB(F7.0,B13.1)"`` ->
    ``"7/13"`` and ``"W12.1"`` -> ``"12"`` (the colour already says kind and chunk)."""
    mbs = re.findall(r"(\d+)\.\d+", name)
    return "/".join(mbs) if mbs else name


def spans_from_chrome_trace(trace: Union[Mapping, str, Path]) -> List[Span]:
    """Read complete ("X") events of a Chrome trace (dict or file path) back into spans.

    The rank is ``args["rank"]`` if present, else ``pid``; the kind is ``args["kind"]`` if
    present, else guessed from the name's prefix.  Times stay in the trace's microseconds.
    """
    if not isinstance(trace, Mapping):
        trace = json.loads(Path(trace).read_text())
    events = trace["traceEvents"] if "traceEvents" in trace else trace
    spans = []
    for ev in events:
        if ev.get("ph") != "X":
            continue
        args = ev.get("args") or {}
        start = float(ev["ts"])
        spans.append(Span(
            rank=int(args.get("rank", ev.get("pid", 0))),
            name=str(ev.get("name", "")),
            kind=str(args.get("kind", _kind_from_name(str(ev.get("name", ""))))),
            start=start, end=start + float(ev.get("dur", 0.0)),
            direction=int(args.get("direction", 0)),
        ))
    return spans


def save_gantt(spans: Sequence[Span], path: Union[str, Path], title: str = "",
               labels: bool = True) -> Path:
    """Draw ``spans`` as a Gantt chart PNG (rank 0 on top) and return the path.

    ``labels`` prints each block's ``short_label`` inside it when it is wide enough to read.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not spans:
        raise ValueError("save_gantt needs at least one span")
    ranks = sorted({sp.rank for sp in spans})
    row = {r: i for i, r in enumerate(ranks)}
    t0 = min(sp.start for sp in spans)
    t1 = max(sp.end for sp in spans)
    width = max(8.0, min(24.0, 0.25 * len({round(sp.start, 6) for sp in spans})))
    fig, ax = plt.subplots(figsize=(width, 0.45 * len(ranks) + 1.5))
    used = set()
    for sp in spans:
        color = _COLORS.get((sp.kind, sp.direction % 2), _FALLBACK)
        used.add((sp.kind, sp.direction % 2) if color != _FALLBACK else ("other", 0))
        y = row[sp.rank]
        ax.barh(y, sp.duration, left=sp.start - t0, height=0.8, color=color,
                edgecolor="black", linewidth=0.4)
        if labels and sp.duration >= 0.012 * (t1 - t0):
            ax.text(sp.start - t0 + sp.duration / 2, y, short_label(sp.name), ha="center",
                    va="center", fontsize=6)
    ax.set_yticks(range(len(ranks)))
    ax.set_yticklabels([f"rank {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlim(0, t1 - t0)
    ax.set_xlabel("time")
    if title:
        ax.set_title(title)
    handles = [Patch(color=_COLORS.get(k, _FALLBACK), label=f"{k[0]} chunk {k[1]}"
                     if k[0] != "other" else "other") for k in sorted(used)]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.18),
              ncol=min(len(handles), 10), fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path
