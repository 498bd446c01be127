"""Entry of ``python -m egtunnel.launcher``, the command a kernelspec's argv runs on the kernel host."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
