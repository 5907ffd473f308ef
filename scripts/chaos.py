#!/usr/bin/env python3
"""Chaos runner: a testbed under a seeded nemesis, then heal, settle and check.

    python scripts/chaos.py --topology topology/torus-16.toml --workload consensus \\
        --duration 90 --seed 1 --out runs/chaos

See `m3tgossip.harness.chaos` for the phases, the checks and `DIR/verdict.json`. Exits 0 when every
check passed, 1 when one failed, 2 on a usage or set-up error.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from m3tgossip.harness.chaos import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
