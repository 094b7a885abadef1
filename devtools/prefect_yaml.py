"""Write prefect.yaml's block of message-kind deployments from the registry (lib.notify.kinds).

`python -m devtools.prefect_yaml` rewrites the lines between the two markers; the rest of
the file is written by hand. tests/test_project.py fails while the block is stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lib.notify import kinds

ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = ROOT / "prefect.yaml"
BEGIN = "  # BEGIN message kinds: written by `python -m devtools.prefect_yaml` from lib/notify/kinds.py"
END = "  # END message kinds"


def render_kinds(registry: dict[str, kinds.Kind] | None = None) -> str:
    """The deployments of every message kind, as prefect.yaml lists them (one ``default`` each)."""
    lines = [BEGIN]
    for kind in (registry or kinds.KINDS).values():
        tags = ", ".join(("notifications", *kind.tags))
        lines += [
            "  - name: default",
            f"    entrypoint: flows/notifications.py:{kind.function}",
            f"    tags: [{tags}]",
            f"    work_pool: *{kind.queue}",
        ]
    return "\n".join([*lines, END])


def rewrite(text: str, registry: dict[str, kinds.Kind] | None = None) -> str:
    """``text`` (prefect.yaml) with its message-kind block made anew."""
    head, sep, rest = text.partition(BEGIN + "\n")
    _, sep2, tail = rest.partition(END + "\n")
    if not sep or not sep2:
        raise SystemExit(f"{PREFECT_YAML.name}: the markers of the message-kind block are missing")
    return f"{head}{render_kinds(registry)}\n{tail}"


def main() -> int:
    PREFECT_YAML.write_text(rewrite(PREFECT_YAML.read_text()))
    print(f"wrote {PREFECT_YAML.name}: {len(kinds.KINDS)} message kinds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
