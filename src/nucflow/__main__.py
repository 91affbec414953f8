"""``python -m nucflow``: the ``nucflow`` command."""

from nucflow.cli import console

if __name__ == "__main__":
    console()
