"""The parts of ``examples/embedding_service.py``: request parsing and limits,
the dynamic batcher, the guarded HTTP protocol, the ASGI app, the model
backends and the load-test client. Each module is about one of these."""
