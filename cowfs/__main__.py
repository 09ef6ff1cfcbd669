import sys

from cowfs.cli.main import main

sys.exit(main())
