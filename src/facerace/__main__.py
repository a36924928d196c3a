"""`python -m facerace` is the `facerace` command."""

import sys

from facerace.apps.cli import main

sys.exit(main())
