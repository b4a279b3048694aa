import sys

from ctcspec.cli import main

sys.exit(main())
