"""``python -m mmtriton.server``: the command line of :mod:`mmtriton.serving.server`, kept at its documented name."""

import sys

from mmtriton.serving.server import main

if __name__ == "__main__":
    sys.exit(main())
