"""The trainer's outbound interface: callbacks, and the two built-in ones that write the run folder.

Metrics leave the trainer only through callbacks, so the orchestration layer (Ray reports, MLflow)
plugs in without the library knowing about it. `MetricsWriter` writes the run folder's
metrics.jsonl / train.csv / eval.csv; on resume it drops rows logged after the checkpoint being
resumed, because the resumed run logs them again.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any


class StopTraining(Exception):
    """Raised by a callback to end a run cleanly after the current checkpoint."""


class Callback:
    """Base class with no-op hooks; any object with some of these methods works too."""

    def on_train_start(self, info: dict[str, Any]) -> None: ...
    def on_step(self, step: int, metrics: dict[str, float]) -> None: ...
    def on_eval(self, step: int, metrics: dict[str, float]) -> None: ...
    def on_checkpoint(self, step: int, path: Path, is_best: bool) -> None: ...
    def on_train_end(self, summary: dict[str, Any]) -> None: ...


class CallbackList:
    def __init__(self, callbacks):
        self.callbacks = list(callbacks)

    def __getattr__(self, hook: str):
        def call(*args, **kwargs):
            for cb in self.callbacks:
                fn = getattr(cb, hook, None)
                if fn is not None:
                    fn(*args, **kwargs)
        return call


def _clean(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


class MetricsWriter(Callback):
    """Appends every logged row to metrics.jsonl and to train.csv / eval.csv."""

    def __init__(self, run_dir: Path, resume_step: int = 0):
        self.run_dir = Path(run_dir)
        self.jsonl = self.run_dir / "metrics.jsonl"
        self.csvs = {"train": self.run_dir / "train.csv", "eval": self.run_dir / "eval.csv"}
        self._truncate_after(resume_step)

    def _truncate_after(self, step: int) -> None:
        if self.jsonl.exists():
            rows = [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]
            kept = [r for r in rows if r["step"] <= step]
            self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in kept))
            for kind, path in self.csvs.items():
                path.unlink(missing_ok=True)
                for r in kept:
                    if r["kind"] == kind:
                        self._append_csv(kind, {k: v for k, v in r.items() if k != "kind"})

    def _append_csv(self, kind: str, row: dict[str, Any]) -> None:
        path = self.csvs[kind]
        if path.exists():
            with path.open() as f:
                header = next(csv.reader(f))
            if set(row) - set(header):
                # A new column (e.g. a class first seen): rewrite the file with the wider header.
                with path.open() as f:
                    old = list(csv.DictReader(f))
                header = header + sorted(set(row) - set(header))
                with path.open("w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=header)
                    w.writeheader()
                    w.writerows(old)
        else:
            header = list(row)
            with path.open("w", newline="") as f:
                csv.DictWriter(f, fieldnames=header).writeheader()
        with path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=header).writerow(row)

    def _log(self, kind: str, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with self.jsonl.open("a") as f:
            f.write(json.dumps({"kind": kind, **row}) + "\n")
        self._append_csv(kind, row)

    def on_step(self, step, metrics):
        self._log("train", step, metrics)

    def on_eval(self, step, metrics):
        self._log("eval", step, metrics)


def read_csv(path: Path) -> list[dict[str, float]]:
    with Path(path).open() as f:
        return [{k: (float(v) if v not in ("", None) else math.nan) for k, v in row.items()}
                for row in csv.DictReader(f)]
