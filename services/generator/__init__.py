"""Generator service: proposes pivotal-token prompts in the house format.

Plain functions for the tasks: :func:`make_generator` (template or openai, from the
experiment), :func:`generate_batch` (propose and write new prompts), :func:`should_pause`
(backpressure on the review queue).
"""

from services.generator.core import (
    Candidate,
    Generator,
    GeneratorError,
    GeneratorExhausted,
    KnownPrompts,
    Proposal,
    Rejection,
    StoreKnownPrompts,
    generate_batch,
    should_pause,
)
from services.generator.factory import make_generator
from services.generator.near_dup import NearDuplicateFilter
from services.generator.templates import TemplateGenerator

__all__ = [
    "Candidate",
    "Generator",
    "GeneratorError",
    "GeneratorExhausted",
    "KnownPrompts",
    "NearDuplicateFilter",
    "Proposal",
    "Rejection",
    "StoreKnownPrompts",
    "TemplateGenerator",
    "generate_batch",
    "make_generator",
    "should_pause",
]
