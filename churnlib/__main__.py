import sys

from churnlib.cli import main

sys.exit(main())
