"""The HTTP API: the FastAPI app and its routes, the middleware around it, and the fast path
that serves the busiest requests without FastAPI. `functions.api` is its Lambda handler,
`local.serve` its local server; the request rules both paths apply are in `rules`."""
