#!/usr/bin/env python3
"""Train the nano default model (same as `dspark train-nano`); see dspark/train/nano.py."""

import sys

from dspark.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-nano", *sys.argv[1:]]))
