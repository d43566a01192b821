"""Fixtures of the EM-evaluation tests: the toy organism's ones and the local OpenAI server."""

from tests.fakes.openai_server import openai_server  # noqa: F401
from tests.steering.toy_env import eval_app, paper_questions, toy_exp, toy_home, toy_rt  # noqa: F401
