"""`python -m tatitok_fast.cli ...`, the same as the `tatitok-fast` console script."""
import sys

from tatitok_fast.cli import main

if __name__ == "__main__":
    sys.exit(main())
