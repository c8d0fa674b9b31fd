"""How a driver wires its Ray workers: the settings they inherit and the arguments of ``ray.init`` (plain data).

Shared by the batch job and the training job (which never import each other); nothing here imports Ray.
"""

from __future__ import annotations

import os
from typing import Any

FORWARDED_ENV_PREFIXES = ("AWS_", "DREAMRELATION_", "HF_")


def forwarded_env() -> dict[str, str]:
    """The driver's storage and model settings (``AWS_*``, ``DREAMRELATION_*``, ``HF_*``) for remote workers."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}


def ray_init_args(address: str | None) -> dict[str, Any]:
    """``ray.init`` keyword arguments: join ``address``, or start a local Ray.

    A local Ray gets at least 4 logical CPUs: on a 2-core laptop, Ray Data's own tasks then still find a CPU beside
    actors that hold fractional ones (otherwise the job deadlocks).
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    common: dict[str, Any] = dict(log_to_driver=False)
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:  # inside a Ray job the job's runtime env already has them
        common["runtime_env"] = {"env_vars": forwarded_env()}
    if address:
        return dict(address=address, **common)
    return dict(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, **common)
