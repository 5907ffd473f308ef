#!/usr/bin/env python3
"""Run a multi-process testbed on this machine (same as `m3tgossip testbed`).

    python scripts/testbed.py --topology topology/ring-8.toml --workload consensus \\
        --rounds 60 --out runs/ring8
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from m3tgossip.harness.testbed import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
