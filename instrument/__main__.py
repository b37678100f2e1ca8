"""`python -m instrument ...` is the `instrument` command."""

import sys

from instrument.cli import main

sys.exit(main())
