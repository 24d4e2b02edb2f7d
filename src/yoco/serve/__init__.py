"""``yoco serve``: an OpenAI-compatible server with continuous batching, and its load benchmark."""
