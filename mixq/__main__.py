"""``python -m mixq``: the same as the ``mixq`` command."""

import sys

from mixq.cli import main

if __name__ == "__main__":
    sys.exit(main())
