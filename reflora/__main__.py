"""``python -m reflora``: the command line."""

import sys

from reflora.cli import main

sys.exit(main())
