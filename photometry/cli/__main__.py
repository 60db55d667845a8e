"""``python -m photometry.cli``: the ``tessphot`` command."""
import sys

from photometry.cli import main

sys.exit(main())
