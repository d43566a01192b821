"""Building the generator an experiment names (``generator.kind``: template or openai)."""

from __future__ import annotations

from common.examples import ExampleSource, StaticExamples
from common.experiment import Experiment
from common.llm import LLMClient
from common.settings import Settings
from services.generator.core import Generator, GeneratorError


def make_generator(
    exp: Experiment,
    settings: Settings | None = None,
    examples_source: ExampleSource | None = None,
) -> Generator:
    """The generator the experiment names (``generator.kind``: template or openai; the
    answers generator is a chain of tasks, :mod:`services.generator.answers`)."""
    spec = exp.generator
    if spec.kind == "template":
        from services.generator.templates import TemplateGenerator

        if spec.templates:
            return TemplateGenerator.from_file(spec.templates, seed=spec.seed)
        return TemplateGenerator(seed=spec.seed)
    if spec.kind == "openai":
        from services.generator.llm_generator import OpenAIGenerator

        # without a source the generator runs zero-shot (no labels exist yet)
        return OpenAIGenerator(
            LLMClient.for_spec(spec, settings),
            spec,
            examples_source or StaticExamples(),
            reference=exp.reference,
        )
    if spec.kind == "answers":
        raise GeneratorError(
            "generator.kind answers runs as a chain of tasks (services.generator.answers), "
            "not as a proposing generator: mine with `emc mine` through the running system"
        )
    raise GeneratorError(f"unknown generator.kind {spec.kind!r}: use template, openai or answers")
