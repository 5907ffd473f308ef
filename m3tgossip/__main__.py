"""`python -m m3tgossip` is the `m3tgossip` command."""

import sys

from m3tgossip.cli import main

sys.exit(main())
