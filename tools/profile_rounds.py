#!/usr/bin/env python3
"""Profile decode rounds (same as `dspark profile`; not named profile.py, which would shadow the standard library's `profile` module for scripts in tools/); see dspark/profiling.py."""

import sys

from dspark.cli import main

if __name__ == "__main__":
    sys.exit(main(["profile", *sys.argv[1:]]))
