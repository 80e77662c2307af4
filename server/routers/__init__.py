"""Thin FastAPI routers; the logic lives in server.serving."""
