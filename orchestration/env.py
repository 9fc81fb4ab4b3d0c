"""The process environment of a sweep driver: quiet, offline services, set before Ray is imported.

Ray reads some of these variables once, when it is imported (e.g. whether node addresses may leave
loopback), and its workers inherit the driver's environment when the driver starts a local Ray; so the
CLI applies them before importing anything from Ray. `setdefault` keeps whatever the user or a cluster
set. Values and reasons: docs/platform.md.
"""

from __future__ import annotations

import os

QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
    "AWS_EC2_METADATA_DISABLED": "true",
    # num_to_keep=1 snapshots the experiment at every checkpoint, which we want (resume); no warning.
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    # Ray's new console output ignores verbose=0 for some lines; the sweep's own progress line replaces it.
    "RAY_AIR_NEW_OUTPUT": "0",
    # Ray saves experiment + searcher state every ~10 s by default; a shorter period narrows the window in
    # which a killed driver leaves a trial that the restored searcher does not know (search.py).
    "TUNE_GLOBAL_CHECKPOINT_S": "2",
    # With reuse_actors, Tune gives the previous trial's thread only 2 s to end (function_trainable.py
    # reset_config) before it declares the actor unusable and fails the next trial; a trial's last MLflow
    # artifact uploads took longer than that on a loaded machine (issue on orchestration). Wait for them.
    "TUNE_FUNCTION_THREAD_TIMEOUT_S": "120",
}
# A local Ray only: keep every node address on 127.0.0.1 (Ray otherwise picks the interface address,
# e.g. for Ray Train's torch.distributed rendezvous) and skip token authentication (Ray >= 2.59 turns
# it on for started heads) on a Ray that listens on loopback only.
LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


def apply_env(local_ray: bool) -> None:
    """Sets the quiet defaults and moves URI-embedded passwords into the environment (orchestration/
    secrets.py); Ray is imported only after the variables are set. AWS keys are kept out of Ray's trial
    runtime environments where Ray is started (orchestration/execution.py, `init_ray`)."""
    for key, value in {**QUIET_ENV, **(LOCAL_ENV if local_ray else {})}.items():
        os.environ.setdefault(key, value)
    from orchestration import secrets

    secrets.secure_environment()
