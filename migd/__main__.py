"""``python -m migd`` is the ``migd`` command."""

import sys

from migd.cli import main

sys.exit(main())
