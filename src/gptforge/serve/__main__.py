"""`python -m gptforge.serve MODEL [--host] [--port] [--api-key]`."""

import sys

from . import main

sys.exit(main())
