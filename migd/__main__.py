"""``python -m migd`` is the ``migd`` command."""

import sys

from migd.cli.commands import main

sys.exit(main())
