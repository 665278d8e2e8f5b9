import sys

from raydistill.cli import main

if __name__ == "__main__":
    sys.exit(main())
