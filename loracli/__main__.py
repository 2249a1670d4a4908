"""`python -m loracli` runs the command line."""

from .cli import main

main()
