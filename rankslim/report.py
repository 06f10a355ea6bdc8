"""What changed: per-layer rows, totals, skipped layers — as a dict/JSON, Markdown and a rich table."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .cost import Cost


def pct(after: float, before: float) -> str:
    """``after / before`` as a percentage string ("-" when ``before`` is 0)."""
    return f"{100.0 * after / before:.1f}%" if before else "-"


@dataclass
class LayerRow:
    """One target layer: shapes, method, rank and costs before/after (``params``, ``macs`` per sample)."""

    name: str
    type: str
    shape: str
    method: str
    rank: str
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    info: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def replaced(self) -> bool:
        return self.method != "dense"


@dataclass
class Report:
    """The report of one :func:`rankslim.compress` call.

    ``original``/``compressed`` are whole-model costs; ``targeted_before``/``targeted_after`` the
    same restricted to the target layers; ``budget`` the requested fractions.  ``metrics["latency"]``
    (optional, filled by :func:`rankslim.bench.add_latency`) holds measured latency of original vs
    compressed; ``to_markdown`` shows it as a section of its own; a latency budget
    (:mod:`rankslim.latency_budget`) adds its ``requested`` / ``predicted`` / ``measured`` fractions there (one
    "latency:" line of the totals).  ``metrics["allocation_mode"]`` says whether
    the ranks were allocated speed-aware (measured) or MAC-only and why (one "allocation:" line of the totals).
    """

    rows: list[LayerRow]
    skipped: list[dict[str, str]]
    original: Cost
    compressed: Cost
    budget: dict[str, float | None]
    allocator: str
    method: str
    input_shape: list[int]
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def targeted_before(self) -> Cost:
        return Cost(sum(r.params_before for r in self.rows), sum(r.macs_before for r in self.rows))

    @property
    def targeted_after(self) -> Cost:
        return Cost(sum(r.params_after for r in self.rows), sum(r.macs_after for r in self.rows))

    def fractions(self) -> dict[str, float]:
        """Kept fractions: of the whole model and of the targeted layers alone."""
        tb, ta = self.targeted_before, self.targeted_after
        return {
            "params": self.compressed.params / max(self.original.params, 1),
            "macs": self.compressed.macs / max(self.original.macs, 1),
            "targeted_params": ta.params / max(tb.params, 1),
            "targeted_macs": ta.macs / max(tb.macs, 1),
        }

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["original"] = asdict(self.original)
        d["compressed"] = asdict(self.compressed)
        d["fractions"] = self.fractions()
        return d

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, default=str))

    def table_rows(self) -> list[list[str]]:
        """Rows of the per-layer table as strings (GreBdec Tables 2-4 style "% kept")."""
        out = []
        for r in self.rows:
            out.append([r.name, r.shape, r.method, r.rank, f"{r.params_before:,}", f"{r.params_after:,}",
                        pct(r.params_after, r.params_before), f"{r.macs_before:,}", f"{r.macs_after:,}",
                        pct(r.macs_after, r.macs_before)])
        return out

    HEADER = ["layer", "weight", "method", "rank", "params", "params after", "kept", "MACs", "MACs after", "kept"]

    def totals_lines(self) -> list[str]:
        f = self.fractions()
        lines = [
            f"model params: {self.original.params:,} -> {self.compressed.params:,} ({100 * f['params']:.1f}% kept)",
            f"model MACs/sample: {self.original.macs:,} -> {self.compressed.macs:,} ({100 * f['macs']:.1f}% kept)",
            f"targeted layers: params {100 * f['targeted_params']:.1f}% kept, MACs {100 * f['targeted_macs']:.1f}% kept",
        ]
        req = {k: v for k, v in self.budget.items() if v is not None}
        if req:
            lines.append("budget: " + ", ".join(f"{k} <= {v:g}" for k, v in req.items()))
        if self.metrics.get("allocation_mode"):
            from .speed_mode import describe
            lines.append("allocation: " + describe(self.metrics["allocation_mode"]))
        if (self.metrics.get("latency") or {}).get("requested") is not None:
            from .latency_budget import describe_latency
            lines.append(describe_latency(self.metrics["latency"]))
        for k, v in self.metrics.items():
            # latency: a section of its own in to_markdown; allocation_mode: the line above; speed_aware: its
            # per-layer timings belong in report.json, the allocation line and notes summarise them
            if k in ("latency", "allocation_mode", "speed_aware", "whole_model"):  # summarised above / notes
                continue
            lines.append(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
        return lines

    def to_markdown(self) -> str:
        lines = [f"# rankslim report — method `{self.method}`, allocator `{self.allocator}`", ""]
        lines += [f"- {t}" for t in self.totals_lines()]
        lines += ["", "| " + " | ".join(self.HEADER) + " |", "|" + "---|" * len(self.HEADER)]
        lines += ["| " + " | ".join(row) + " |" for row in self.table_rows()]
        if self.skipped:
            lines += ["", "## Skipped layers", "", "| layer | type | reason |", "|---|---|---|"]
            lines += [f"| {s['name']} | {s['type']} | {s['reason']} |" for s in self.skipped]
        if (self.metrics.get("latency") or {}).get("rows"):  # a latency budget alone has its totals line
            from .bench import latency_markdown
            lines += ["", "## Latency (measured)", "", latency_markdown(self.metrics["latency"]).rstrip("\n")]
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        if self.seconds:
            lines += ["", "Wall time: " + ", ".join(f"{k} {v:.2f} s" for k, v in self.seconds.items())]
        return "\n".join(lines) + "\n"

    def rich_table(self):
        """A ``rich.table.Table`` of the per-layer rows."""
        from rich.table import Table

        t = Table(title=f"rankslim: {self.method} / {self.allocator}")
        for h in self.HEADER:
            t.add_column(h, justify="left" if h in ("layer", "weight", "method") else "right")
        for row in self.table_rows():
            t.add_row(*row)
        return t
