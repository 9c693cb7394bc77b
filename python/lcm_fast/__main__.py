"""``python -m lcm_fast ...`` is ``lcm-fast ...``."""

import sys

from .cli.__main__ import main

main(sys.argv[1:])
