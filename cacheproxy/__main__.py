"""`python -m cacheproxy`: the same entry point as the `cacheproxy` command."""

import sys

from cacheproxy.cli import main

sys.exit(main())
