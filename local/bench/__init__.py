"""`taskrunner bench`: how many tasks taskrunner moves, how close to their time they start.

Each scenario (`scenarios`) runs real `taskrunner worker` / `taskrunner api` processes against
a database of its own (`<db>_bench_<scenario>`, created on the configured or embedded server and
dropped afterwards; `harness`), and beside each figure the same run measures what PostgreSQL
itself does with the same SQL (`references`), so the ratio holds on a noisy machine. Figures
come from the database's own timestamps. `suite` picks the scenarios (`--only`) and sets each
figure's goal; `load` drives wrk, pgbench and the HTTP clients; `coldstart` is the fresh
process a cold start is timed in; `minimal_app` is the API figures' minimal route.

Two commits compared, three alternating runs each, medians within 10%: `python -m
local.bench.compare BASE HEAD --only drain --only create --only cold-start --runs 3`.

Nothing is imported here: `python -m local.bench.coldstart` times its own imports.
"""
