"""`python -m fastsample.export ...` (see fastsample/export/command.py)."""

from fastsample.export.command import main

if __name__ == "__main__":
    raise SystemExit(main())
