import sys

from sparse_engine.sweep.cli import main

if __name__ == "__main__":
    sys.exit(main())
