"""The model as a service: an OpenAI-compatible HTTP API (app.py) over the engine, with API keys
(auth.py), admission control (limits.py), the usage ledger (usage.py, store.py) and metrics."""
