"""``python -m nucflow``: the same as the ``nucflow`` command."""

from nucflow.cli import console

console()
