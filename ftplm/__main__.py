import sys

from ftplm.cli import main

sys.exit(main())
