"""Serving a model over HTTP: the batching engine (``gpt2.serving.engine``) and the OpenAI-compatible
API with its playground page (``gpt2.serving.app``, its parts in the modules beside it, one concern
each); ``gpt2 serve`` starts them."""

from gpt2.serving.app import create_app
from gpt2.serving.engine import Engine

__all__ = ["Engine", "create_app"]
