from tests.clients.conftest import live_server  # noqa: F401  (the same real-server fixture)
