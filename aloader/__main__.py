"""``python -m aloader``: the same as the ``aloader`` command."""

import sys

from aloader.cli import main

sys.exit(main())
