"""The HTTP service: `create_app()` builds the FastAPI app that `facerace serve` runs."""
