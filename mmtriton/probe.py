"""``python -m mmtriton.probe``: the command line of :mod:`mmtriton.serving.probe`, kept at its documented name."""

import sys

from mmtriton.serving.probe import main

if __name__ == "__main__":
    sys.exit(main())
