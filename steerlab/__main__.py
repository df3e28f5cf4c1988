"""``python -m steerlab`` runs the ``steerlab`` command."""

import sys

from steerlab.cli import main

sys.exit(main())
