"""`python -m cowfs`: the command line, as the installed `cowfs` script runs it."""

import sys

from cowfs.cli.main import main

sys.exit(main())
