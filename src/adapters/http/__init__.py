"""Quart HTTP and SSE adapter: routes, problem details, authentication glue, the SSE encoder."""
