"""`python -m dendrite.server ...` is `dendrite serve ...`."""

import sys

from dendrite.server.cli import serve_main

if __name__ == "__main__":
    sys.exit(serve_main(sys.argv[1:]))
