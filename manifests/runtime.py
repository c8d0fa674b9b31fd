"""How a driver wires its Ray workers: the settings they inherit and the arguments of ``ray.init`` (plain data).

Shared by the batch job and the training job (which never import each other); nothing here imports Ray.
"""

from __future__ import annotations

import os
from typing import Any

FORWARDED_ENV_PREFIXES = ("AWS_", "DREAMRELATION_", "HF_")
# Secrets never travel in a runtime environment: Ray writes runtime environments into its session logs and shows
# them in the dashboard. A variable whose name holds one of these words stays on the machine it was set on.
SECRET_NAME_PARTS = ("SECRET", "TOKEN", "PASSWORD", "PASSPHRASE", "CREDENTIAL", "ACCESS_KEY", "SESSION", "API_KEY",
                     "PRIVATE", "AUTH")


def is_secret(name: str) -> bool:
    """True for an environment variable that may hold a credential (``AWS_SECRET_ACCESS_KEY``, ``HF_TOKEN``, ...)."""
    upper = name.upper()
    return any(part in upper for part in SECRET_NAME_PARTS)


def forwarded_env() -> dict[str, str]:
    """The driver's storage and model settings (``AWS_*``, ``DREAMRELATION_*``, ``HF_*``) that remote workers need
    (an S3 endpoint, a region, offline switches), never a secret (:func:`is_secret`): on a cluster, credentials come
    from the nodes themselves (instance roles, IRSA / workload identity, a mounted credentials file)."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES) and not is_secret(k)}


def ray_init_args(address: str | None) -> dict[str, Any]:
    """``ray.init`` keyword arguments: join ``address``, or start a local Ray.

    A local Ray's processes inherit this process's environment, credentials included, without a runtime
    environment (which Ray would write into its logs). Joining a cluster forwards :func:`forwarded_env` only.
    A local Ray gets at least 4 logical CPUs: on a 2-core laptop, Ray Data's own tasks then still find a CPU beside
    actors that hold fractional ones (otherwise the job deadlocks).
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    common: dict[str, Any] = dict(log_to_driver=False)
    if address:
        if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:  # inside a Ray job its runtime env already has them
            common["runtime_env"] = {"env_vars": forwarded_env()}
        return dict(address=address, **common)
    return dict(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, **common)
