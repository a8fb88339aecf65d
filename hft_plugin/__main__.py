"""``python -m hft_plugin``: the ``hft`` command."""

import sys

from .cli import main

sys.exit(main())
