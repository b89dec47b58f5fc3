"""``python -m bridge`` runs the ``postfix-bridge`` command line."""

import sys

from bridge.cli import main

sys.exit(main())
