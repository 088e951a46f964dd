"""The OpenAI-compatible server (`hallm serve`): FastAPI in the API process, the engine loop in
its own process (`hallm.core.engine_process`), ZMQ + msgspec between them."""
