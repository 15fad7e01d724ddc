"""`python -m gptkit` is the same as the `gptkit` command."""

import sys

from gptkit.cli import main

sys.exit(main())
