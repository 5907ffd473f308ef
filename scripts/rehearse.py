#!/usr/bin/env python3
"""Rehearse a campus deployment on this machine: bundles, one network namespace per node,
each node started by its bundle's start.sh, `m3tgossip status` from an operator namespace.

    python scripts/rehearse.py --topology topology/campus.toml --workload consensus \\
        --out runs/rehearsal -o size=256

See `m3tgossip.deploy.rehearse` for what is run and checked and `OUT/rehearsal.json`. Exits 0
when every check passed, 1 when one failed, 2 when namespaces are unavailable or the input is
bad. Needs root.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from m3tgossip.deploy.rehearse import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
