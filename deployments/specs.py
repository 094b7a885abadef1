"""prefect.yaml as data: the deployments it lists and the flow each entrypoint names.

Read by `serve` (which registers the same deployments as `prefect deploy --all`) and by the
schedules (each job's ``default_schedule``), so neither keeps a list of its own.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml
from prefect import Flow

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PREFECT_YAML = PROJECT_ROOT / "prefect.yaml"


def deployment_specs(path: Path = PREFECT_YAML) -> list[dict[str, Any]]:
    """The deployments section of prefect.yaml (YAML anchors resolved)."""
    return yaml.safe_load(path.read_text())["deployments"]


def load_flow(entrypoint: str) -> Flow:
    """Import ``flows/x.py:func`` as a module attribute (the project root is on sys.path)."""
    file, func = entrypoint.split(":")
    module = importlib.import_module(file.removesuffix(".py").replace("/", "."))
    return getattr(module, func)
