"""The trial key protocol shared by the driver and the workers, free of Optuna, Ray and MLflow.

A Ray trial's config carries the Optuna trial number under `NUMBER_KEY` (a paper table uses its seed
number there: one trial per cell x seed); the stable trial key `<name>-t<number>` names the Ray trial,
its folder, its run folders and its MLflow run, so it is the same across retries and restores. Every
trial report carries the fraction of its training schedule done under `PROGRESS_KEY`. Workers import
this module instead of orchestration/search.py, which would pull Optuna into every trial process.
"""

from __future__ import annotations

from typing import Any

NUMBER_KEY = "optuna_trial"  # the Optuna trial number (sweeps) or the seed (paper tables)
PROGRESS_KEY = "trial/progress"  # step / total steps of the last report (orchestration/trial.py)
KEY_KEY = "trial/key"  # the trial key, in every report


def trial_key(name: str, config: dict) -> str:
    """Stable across retries and restores: the sweep (or table cell) name and the trial number."""
    return f"{name}-t{int(config[NUMBER_KEY]):03d}"


def sampled_params(config: dict) -> dict[str, Any]:
    """The searched parameters of a trial config (everything but the number and Ray's own `__` keys)."""
    return {k: v for k, v in config.items() if k != NUMBER_KEY and not k.startswith("__")}


def error_line(error: BaseException | str | None, limit: int = 300) -> str | None:
    """The line of a trial's error a user reads first: the exception's own message, not Ray's
    "Failure # 1 (occurred at ...)" banner or the traceback above it."""
    if error is None:
        return None
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    own = [ln for ln in lines if not ln.startswith(("Failure #", "Traceback", "File ", "^", "~"))
           and ":" in ln and ln.split(":", 1)[0].replace(".", "").replace("_", "").isalnum()]
    return (own[-1] if own else lines[-1] if lines else type(error).__name__)[:limit]
