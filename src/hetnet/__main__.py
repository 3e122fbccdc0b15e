"""`python -m hetnet ...` is the `hetnet` command."""
import sys

from .cli import main

sys.exit(main())
