"""taskrunner on a machine: the CLI, the dev server, the timer loop, the embedded database."""
