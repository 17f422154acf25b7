#!/usr/bin/env python3
"""The acceptance table of a nano run (same as `dspark eval`); see dspark/eval/."""

import sys

from dspark.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
