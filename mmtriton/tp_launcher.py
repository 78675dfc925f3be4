"""``python -m mmtriton.tp_launcher``: the command line of :mod:`mmtriton.serving.tp_launcher`, kept at its documented name."""

import sys

from mmtriton.serving.tp_launcher import main

if __name__ == "__main__":
    sys.exit(main())
