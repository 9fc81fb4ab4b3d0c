"""`s4mc-sweep`: run or resume a sweep, and open the MLflow UI on its runs.

`s4mc-sweep run --manifest M [--resume] [key=value ...]` validates the manifest (one line naming the
bad key, exit code 2, before anything starts), then runs the sweep (orchestration/sweep.py);
`s4mc-sweep ui --manifest M --port P` serves the MLflow UI over the manifest's tracking store on
127.0.0.1. Heavy imports (Ray, MLflow) happen only after the arguments and the manifest are valid.
"""

from __future__ import annotations

import argparse
import signal
import sys

from orchestration.env import apply_env
from orchestration.manifest import load_manifest
from orchestration.report import add_report_parser
from orchestration.reproduce import add_reproduce_parser
from orchestration.secrets import secure_environment, secure_manifest
from s4mc.config import ConfigError

EXIT_USAGE = 2  # argparse's own code for bad arguments; bad manifests are usage errors too
EXIT_INTERRUPTED = 130  # the shell's code for Ctrl-C: the sweep stopped, its state is saved
EXIT_FAILED = 1  # the sweep ran, but some trial failed on every attempt


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="s4mc-sweep", description="S4MC hyperparameter sweeps: Ray Tune "
                                     "trials, Optuna search, MLflow tracking (docs/sweeps.md).")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a sweep, or resume an interrupted one",
                         description="Run the sweep a manifest describes; --resume continues it "
                                     "(same Ray experiment, Optuna study and MLflow parent run).")
    run.add_argument("--manifest", required=True, help="sweep manifest YAML, e.g. "
                                                        "experiments/sweeps/embedded_default.yaml")
    run.add_argument("--resume", action="store_true", help="continue the sweep from its saved state")
    run.add_argument("overrides", nargs="*", metavar="key=value",
                     help="manifest overrides, e.g. num_trials=4 search.0.high=3")
    ui = sub.add_parser("ui", help="serve the MLflow UI on a sweep's tracking store (127.0.0.1 only)")
    ui.add_argument("--manifest", required=True, help="sweep manifest YAML")
    ui.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default 5000)")
    add_reproduce_parser(sub)  # paper tables (docs/reproduce.md): `reproduce` and `report`
    add_report_parser(sub)
    return parser


def _fail(message: str) -> int:
    print(f"s4mc-sweep: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        secure_environment()  # a password in MLFLOW_TRACKING_URI moves to its own variable (secrets.py)
    except ConfigError as exc:
        return _fail(str(exc))
    if getattr(args, "handler", None) is not None:  # reproduce / report take a paper table, not a manifest
        return args.handler(args)
    try:
        manifest = secure_manifest(load_manifest(args.manifest, getattr(args, "overrides", ()) or ()))
    except ConfigError as exc:
        return _fail(str(exc))
    apply_env(local_ray=not manifest.ray.address)  # before Ray is imported (orchestration/env.py)
    if args.command == "ui":
        return _ui(manifest, args.port)
    from orchestration.sweep import run_sweep

    try:
        result = run_sweep(manifest, resume=args.resume, manifest_path=args.manifest)
    except ConfigError as exc:  # includes SweepError and ExecutionError (checks before Ray starts)
        return _fail(str(exc))
    if result.interrupted:
        return EXIT_INTERRUPTED
    for error in result.errors:  # a trial that exhausted its retries: the sweep did not do what was asked
        print(f"s4mc-sweep: error: trial {error} (failed after {manifest.retries} retries)", file=sys.stderr)
    return EXIT_FAILED if result.errors else 0


def _ui(manifest, port: int) -> int:
    uri = manifest.tracking.uri
    if uri.startswith(("http://", "https://")):
        print(f"the sweep tracks to an MLflow server: open {uri} (experiment {manifest.tracking.experiment})")
        return 0
    from orchestration import tracking
    from orchestration.services import serve_ui

    def _stop(*_):  # SIGTERM (e.g. `timeout`, a service manager) stops the server like Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    uri = tracking.configure(uri, project_dir=manifest.project)
    exp_id = tracking.experiment_id(manifest.tracking.experiment, tracking_uri=uri)
    where = f"experiments/{exp_id}/runs" if exp_id else "experiments"
    page = f"#/{where}?{tracking.TRAINING_VIEW}"
    return serve_ui(uri, port=port, page=page)


if __name__ == "__main__":
    sys.exit(main())
