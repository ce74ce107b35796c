"""Runs several ``iddpm`` command lines one after another in this process, as a user's
script calling ``iddpm_ext.cli.main`` would (each command sets up and tears down its own
process group): under torchrun, one launch instead of one per command.

    python cli_sequence.py '[["train", ...], ["sample", ...]]'

Exits with the first non-zero exit status, else 0."""

import json
import sys

from iddpm_ext.cli import main

if __name__ == "__main__":
    for words in json.loads(sys.argv[1]):
        status = main(words)
        sys.stdout.flush()
        if status:
            sys.exit(status)
