"""Fixtures of the steering tests (defined in toy_env, shared with tests/em_eval)."""

from tests.fakes.openai_server import openai_server  # noqa: F401
from tests.steering.toy_env import eval_app, paper_questions, toy_exp, toy_home, toy_rt  # noqa: F401
