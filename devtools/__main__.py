"""`python -m devtools up | seed`: the developer's commands (devtools.cli)."""

import sys

from devtools.cli import main

sys.exit(main())
