"""``python -m plasticine``: the same as the ``plasticine`` command (see :mod:`plasticine.cli`)."""

import sys

from .cli import main

sys.exit(main())
