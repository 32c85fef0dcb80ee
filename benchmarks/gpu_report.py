"""The report of `gpu_validate.py`: sections run in order, each within its time box, every
line printed and the markdown/JSON rewritten as it is produced, so a run cut short keeps
what it measured."""

from __future__ import annotations

import json
import os
import time
import traceback

from gpu_common import free_torch


# --------------------------------------------------------------------------------------
# Report: sections, time boxes, incremental markdown
# --------------------------------------------------------------------------------------


class SectionTimeout(Exception):
    """A section ran past its time box (raised between its steps)."""


def _fmt_exc(e: BaseException, frames: int = 6) -> str:
    tb = traceback.format_exception(type(e), e, e.__traceback__)
    body = "".join(tb[-frames:]) if len(tb) > frames else "".join(tb)
    return body[-3000:]


class Section:
    """One running section: its lines, numbers and time box."""

    def __init__(self, report: "Report", name: str, title: str, box_s: float):
        self.report, self.name, self.title, self.box_s = report, name, title, box_s
        self.t0 = time.perf_counter()
        self.lines: list[str] = []
        self.data: dict = {}
        self.status = "running"
        self.seconds = 0.0

    def line(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)
        self.report.write()

    def table(self, *columns: str) -> None:
        self.line()
        self.line("| " + " | ".join(columns) + " |")
        self.line("|" + "---|" * len(columns))

    def row(self, *cells) -> None:
        self.line("| " + " | ".join(str(c) for c in cells) + " |")

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        """Seconds left in this section's box (and in the whole budget)."""
        return min(self.box_s - self.elapsed(), self.report.budget_left())

    def check(self, need_s: float = 0.0, what: str = "") -> None:
        """Stop the section (SectionTimeout) if fewer than need_s seconds are left."""
        if self.left() < need_s:
            why = ("budget spent" if self.report.budget_left() < need_s
                   else f"time box of {self.box_s:.0f} s reached")
            raise SectionTimeout(f"{why} after {self.elapsed():.1f} s" + (f" (before {what})" if what else ""))


MIN_START_S = 8.0  # a section is skipped when less than this much budget is left


class Report:
    """Sections in order; the markdown (and json) rewritten to every path after each line."""

    def __init__(self, title: str, header: list[str], paths: list[str], budget_s: float, t0: float):
        """budget_s: seconds from t0 (a `time.perf_counter()` reading: the run's start) to the end of the run."""
        self.title, self.header, self.paths, self.budget_s, self.t0 = title, header, paths, budget_s, t0
        self.sections: list[Section] = []
        self.data: dict = {}

    def budget_left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def markdown(self) -> str:
        out = [f"# {self.title}", "", *self.header, "", "| section | status | seconds |", "|---|---|---|"]
        for s in self.sections:
            out.append(f"| {s.name} | {s.status.replace('|', '/')} | {s.seconds:.1f} |")
        for i, s in enumerate(self.sections, 1):
            out += ["", f"## {i}. {s.title}", "", f"Status: {s.status}.", ""] + s.lines
        return "\n".join(out) + "\n"

    def write(self) -> None:
        text = self.markdown()
        data = {"sections": {s.name: {"status": s.status, "seconds": round(s.seconds, 2), **s.data}
                             for s in self.sections}, **self.data}
        for p in self.paths:
            os.makedirs(os.path.dirname(p) or ".", exist_ok=True)
            for path, body in ((p, text), (p[:-3] + ".json", json.dumps(data, indent=1, default=str))):
                tmp = path + ".tmp"
                with open(tmp, "w") as f:
                    f.write(body)
                os.replace(tmp, path)

    def run(self, plan, ctx) -> None:
        """Run [(name, title, fn, share)] in order; fn(section, ctx). Shares of the budget
        not used by a section carry over to the next."""
        slack = 0.0
        for name, title, fn, share in plan:
            box = share * self.budget_s + slack
            s = Section(self, name, title, box)
            self.sections.append(s)
            if self.budget_left() < MIN_START_S:
                s.status = f"skipped: budget ({self.budget_left():.0f} s left)"
                print(f"\n== {name}: {s.status}", flush=True)
                self.write()
                continue
            print(f"\n== {name}: {title} (time box {box:.0f} s)", flush=True)
            self.write()
            try:
                fn(s, ctx)
                s.status = "ok"
            except SectionTimeout as e:
                s.status = f"stopped: {e}"
                s.line(f"- stopped: {e}")
            except Exception as e:  # noqa: BLE001 (recorded, then the next section runs)
                s.status = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                s.line("")
                s.line("```")
                for ln in _fmt_exc(e).rstrip().splitlines():
                    s.line(ln)
                s.line("```")
            s.seconds = s.elapsed()
            slack = max(0.0, box - s.seconds)
            free_torch()
            self.write()
