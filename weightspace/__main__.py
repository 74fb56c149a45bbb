import sys

from weightspace.cli import main

sys.exit(main())
