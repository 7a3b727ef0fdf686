"""`python -m tinymoe ...`: see tinymoe/cli.py."""
import sys

from .cli import main

sys.exit(main())
