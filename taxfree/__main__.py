import sys

from taxfree.cli import main

sys.exit(main())
