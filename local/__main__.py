"""`python -m local` is `taskrunner`."""

from local.cli import main

main()
