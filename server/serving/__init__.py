"""Serving logic behind the routers: one module per endpoint family."""
