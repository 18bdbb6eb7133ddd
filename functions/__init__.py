"""taskrunner: what ships to the FaaS platform.

Data flows one way: request -> `http` (routes) -> `tasks` (domain) -> `store` (SQL),
and tick -> `runner` (claim -> run -> record) -> `store`. The task kinds live in `kinds`,
every concurrency-critical SQL statement in `queries`.
"""
