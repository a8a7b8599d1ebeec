"""``python -m sdft_fast`` is the ``sdft-fast`` command."""

import sys

from sdft_fast.cli import main

if __name__ == "__main__":
    sys.exit(main())
