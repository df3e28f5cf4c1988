"""``python -m steerlab.cli`` runs the ``steerlab`` command."""

import sys

from steerlab.cli import main

sys.exit(main())
