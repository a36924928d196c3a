"""`python -m facerace` is the `facerace` command."""

import sys

from .cli import main

sys.exit(main())
