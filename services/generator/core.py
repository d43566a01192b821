"""Generator contract and the plain functions the generate task calls.

A generator *proposes* candidate prompts in the house format (:mod:`.house`);
:func:`generate_batch` writes the new ones to the store (``put_new``: never overwrites,
so concurrent workers cannot duplicate a prompt) and returns them. :func:`should_pause`
is the backpressure rule; :func:`services.generator.factory.make_generator` builds one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from common.errors import UserError
from common.experiment import Experiment
from common.records import Prompt, prompt_id
from common.store import NotFound, ObjectStore
from common.store import keys as K
from common.store.base import dumps

log = logging.getLogger(__name__)


class GeneratorError(UserError, RuntimeError):
    """The generator could not produce prompts; the message says why and what to do."""


class GeneratorExhausted(GeneratorError):
    """A finite generator has nothing new left to propose."""


@dataclass(frozen=True)
class Candidate:
    """A proposed prompt text in the house format, with string metadata (domain, ending...)."""

    text: str
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """The prompt id of the text (:func:`~common.records.prompt_id`)."""
        return prompt_id(self.text)

    @classmethod
    def of(cls, text: str, **meta: str) -> Candidate:
        """A candidate with ``meta`` given as keyword arguments."""
        return cls(text=text, meta=dict(meta))


@dataclass(frozen=True)
class Rejection:
    """A proposed text that was not accepted, and why."""

    text: str
    reason: str


@dataclass
class Proposal:
    """What one ``propose`` call gives: the accepted candidates, and the rejected texts with their
    reasons."""

    candidates: list[Candidate]
    rejected: list[Rejection] = field(default_factory=list)


class KnownPrompts(Protocol):
    """What a generator may ask about prompts that already exist."""

    def exists(self, pid: str) -> bool:
        """Whether a prompt with id ``pid`` is already stored."""
        ...

    def recent_texts(self, limit: int) -> list[str]:
        """Texts of up to ``limit`` stored prompts (for near-duplicate checks)."""
        ...


class Generator(Protocol):
    """Proposes up to ``n`` new house-format prompts that ``known`` does not hold yet."""

    @property
    def name(self) -> str:
        """Recorded as ``Prompt.source``."""
        ...

    def propose(self, n: int, known: KnownPrompts) -> Proposal:
        """Up to ``n`` new candidates, with the texts rejected on the way; raises
        :class:`GeneratorError` when it can produce none."""
        ...


class StoreKnownPrompts:
    """:class:`KnownPrompts` over the prompts of one experiment in the object store."""

    def __init__(self, store: ObjectStore, exp: str) -> None:
        self.store = store
        self.exp = exp

    def exists(self, pid: str) -> bool:
        """Whether ``pid``'s prompt record exists in the store."""
        return self.store.exists(K.prompt(self.exp, pid))

    def _prompt_keys(self) -> Iterator[str]:
        prefix = K.prompts_prefix(self.exp)
        for key in self.store.list_keys(prefix):
            _pid, _, rest = key[len(prefix) :].partition("/")
            if rest == "prompt.json":
                yield key

    def recent_texts(self, limit: int) -> list[str]:
        """Texts of the ``limit`` newest prompts (by ``created_at``).

        Reads every prompt record of the experiment once; generators call it once per
        process and then keep their own memory.
        """
        prompts: list[Prompt] = []
        for key in self._prompt_keys():
            try:
                prompts.append(self.store.get_record(key, Prompt))
            except NotFound:
                continue  # deleted meanwhile
        prompts.sort(key=lambda p: p.created_at, reverse=True)
        return [p.text for p in prompts[:limit]]


def generate_batch(
    store: ObjectStore, exp: Experiment, generator: Generator, n: int
) -> list[Prompt]:
    """Ask ``generator`` for ``n`` prompts and write the new ones; returns those written.

    Fewer than ``n`` come back when the generator's answers were rejected (logged with
    the reasons) or another worker wrote the same prompt first.
    """
    if n <= 0:
        return []
    known = StoreKnownPrompts(store, exp.name)
    proposal = generator.propose(n, known)
    for r in proposal.rejected:
        log.warning("generator %s: rejected %r: %s", generator.name, r.text[:200], r.reason)
    written: list[Prompt] = []
    for cand in proposal.candidates[:n]:
        prompt = Prompt.new(cand.text, source=generator.name, **cand.meta)
        if store.put_new(K.prompt(exp.name, prompt.id), dumps(prompt)):
            written.append(prompt)
        else:
            log.info("prompt %s already stored (another worker wrote it first)", prompt.id)
    log.info(
        "generator %s: %d new prompts (%d asked, %d rejected)",
        generator.name,
        len(written),
        n,
        len(proposal.rejected),
    )
    return written


def should_pause(queue_length: int, high_water_mark: int) -> bool:
    """Backpressure: pause generating while the review queue holds ``high_water_mark`` or more."""
    return queue_length >= high_water_mark
