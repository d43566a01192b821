"""The fake OpenAI-compatible server fixture for these tests (see tests/fakes/openai_server.py)."""

from tests.fakes.openai_server import openai_server  # noqa: F401
