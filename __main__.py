"""`python -m molmocap`: the same command as `molmocap`."""

from molmocap.cli import entry

entry()
