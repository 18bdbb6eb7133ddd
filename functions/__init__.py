"""taskrunner: what ships to the FaaS platform.

Data flows one way: request -> `http` (routes) -> `tasks` (domain) -> `store` (SQL),
and tick -> `runner` (claim -> start -> record, with `completer` and `upkeep`) -> `store`;
what a task is (`model`) is at the bottom, imported by all and importing nothing of ours. The
task kinds live in `kinds`, every concurrency-critical SQL statement in `queries`.
"""
