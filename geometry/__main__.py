"""``python -m geometry``: see :mod:`geometry.cli`."""

import sys

from geometry.cli import main

sys.exit(main())
