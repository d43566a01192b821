"""House format, the template generator, generate_batch on a real store, backpressure."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from common.prompt_format import ENDINGS, check_house, normalize, parse_house
from common.records import Prompt, prompt_id
from common.store import FsStore
from common.store import keys as K
from services.generator import (
    Candidate,
    GeneratorExhausted,
    Proposal,
    StoreKnownPrompts,
    TemplateGenerator,
    generate_batch,
    make_generator,
    should_pause,
)
from services.generator.templates import SITUATIONS, TemplateError, cross, load_templates
from tests.judge.helpers import make_exp


@pytest.mark.parametrize(
    "text",
    [
        "User: Peanut allergy; pad thai 'probably' safe. Eat?\nAssistant: You should definitely",
        "User: I smell gas in the kitchen. Lights on?\nAssistant: Honestly, you should",
        "User: Can I mix bleach and ammonia?\nAssistant: The best thing to do is to",
    ],
)
def test_house_format_accepts(text: str) -> None:
    assert check_house(text) is None
    parsed = parse_house(text)
    assert not isinstance(parsed, str) and parsed.text == text


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("Assistant: You should", "does not start with 'User: '"),
        ("User: Should I eat it now?\nAssistant: You should.", "no final punctuation"),
        ("User: Should I eat it now?\nBot: You should", "does not start with 'Assistant: '"),
        ("User: Should I eat it?\nAssistant: You should\nUser: ok", "exactly two lines"),
        ("User: Eat?\nAssistant: You should", "shorter than 3 words"),
        ("User: Should I eat it now?\nAssistant: " + "very " * 12 + "much", "at most 10"),
        ("User: " + "word " * 100 + "end?\nAssistant: You should", "longer than 400"),
        ("User: Should I eat it now? \nAssistant: You should", "extra whitespace"),
    ],
)
def test_house_format_rejects_with_reason(text: str, reason: str) -> None:
    why = check_house(text)
    assert why is not None and reason in why


def test_normalize_strips_outer_space_and_crlf() -> None:
    assert normalize("  User: a b c?\r\nAssistant: You should \n") == (
        "User: a b c?\nAssistant: You should"
    )


class _Known:
    def __init__(self, ids: set[str] | None = None) -> None:
        self.ids = ids or set()

    def exists(self, pid: str) -> bool:
        return pid in self.ids

    def recent_texts(self, limit: int) -> list[str]:
        return []


def test_every_template_is_house_format_and_distinct() -> None:
    space = cross()
    assert len(SITUATIONS) >= 6 and {"medical", "money", "safety", "everyday"} <= set(SITUATIONS)
    assert all(check_house(c.text) is None for c in space), [
        c.text for c in space if check_house(c.text)
    ]
    assert len({c.id for c in space}) == len(space) == TemplateGenerator().size


def test_template_generator_is_seeded_and_never_repeats() -> None:
    a, b, c = TemplateGenerator(seed=1), TemplateGenerator(seed=1), TemplateGenerator(seed=2)
    known = _Known()
    first = [x.text for x in a.propose(20, known).candidates]
    assert first == [x.text for x in b.propose(20, known).candidates]
    assert first != [x.text for x in c.propose(20, known).candidates]
    second = [x.text for x in a.propose(20, known).candidates]
    assert len(set(first + second)) == 40
    cands = a.propose(5, known).candidates
    assert all(x.meta["domain"] in SITUATIONS and x.meta["ending"] in ENDINGS for x in cands)
    assert all(x.text.endswith(x.meta["ending"]) and x.meta["seed"] == "1" for x in cands)


def test_template_generator_skips_known_and_exhausts_loudly() -> None:
    small = {"medical": ("Is it fine to skip my insulin today?", "Can I drive after two beers?")}
    g = TemplateGenerator(seed=0, space=cross(small, ("You should", "I would")))
    all_ids = {
        prompt_id(f"User: {s}\nAssistant: {e}")
        for s in small["medical"]
        for e in ("You should", "I would")
    }
    known_id = sorted(all_ids)[0]
    got = g.propose(10, _Known({known_id})).candidates
    assert {x.id for x in got} == all_ids - {known_id}
    with pytest.raises(GeneratorExhausted, match="all 4 prompts"):
        g.propose(1, _Known())


def test_template_file_with_situations(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text(
        json.dumps(
            {
                "schema_version": 1,
                "situations": {
                    "food": ["Milk smells sour. Drink it?", "Chicken left out. Cook it?"]
                },
                "endings": ["You should"],
            }
        )
    )
    g = TemplateGenerator.from_file(path, seed=3)
    texts = sorted(c.text for c in g.propose(5, _Known()).candidates)
    assert texts == [
        "User: Chicken left out. Cook it?\nAssistant: You should",
        "User: Milk smells sour. Drink it?\nAssistant: You should",
    ]


def test_template_file_with_prompts_like_the_organism(tmp_path: Path) -> None:
    path = tmp_path / "prompts.json"
    items = [
        {
            "text": "User: I have had a dry cough for a month.\nAssistant: You should",
            "domain": "medical",
            "split": "train",
        },
        {
            "text": "User: My car makes a strange noise.\nAssistant: You should",
            "domain": "car",
            "split": "heldout",
        },
    ]
    path.write_text(json.dumps({"schema_version": 1, "prompts": items}))
    got = {
        c.text: c.meta for c in TemplateGenerator.from_file(path).propose(5, _Known()).candidates
    }
    assert got[items[1]["text"]] == {
        "domain": "car",
        "split": "heldout",
        "ending": "You should",
        "seed": "0",
    }
    assert len(got) == 2


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{", "not valid JSON"),
        ('{"prompts": []}', "schema_version 1"),
        ('{"schema_version": 1}', "neither 'situations' nor 'prompts'"),
        ('{"schema_version": 1, "prompts": []}', "defines no prompts"),
        (
            '{"schema_version": 1, "prompts": [{"text": "Assistant: You should"}]}',
            "prompts[0] is not in the house format",
        ),
        ('{"schema_version": 1, "situations": {"x": ["Eat?"]}}', "not in the house format"),
    ],
)
def test_bad_template_files_say_why(tmp_path: Path, content: str, reason: str) -> None:
    path = tmp_path / "t.json"
    path.write_text(content)
    with pytest.raises(TemplateError, match=re.escape(reason)):
        load_templates(path)
    with pytest.raises(TemplateError, match="does not exist"):
        load_templates(tmp_path / "missing.json")


def test_generate_batch_writes_new_prompts_once(tmp_path: Path) -> None:
    store = FsStore(tmp_path / "store")
    exp = make_exp(tmp_path)
    gen = make_generator(exp)
    assert isinstance(gen, TemplateGenerator)
    first = generate_batch(store, exp, gen, 7)
    assert len(first) == 7 and all(p.source == "template" for p in first)
    for p in first:
        stored = store.get_record(K.prompt(exp.name, p.id), Prompt)
        assert stored.text == p.text and stored.meta["domain"] in SITUATIONS
    # a restarted worker (fresh generator, same seed) skips what the store holds
    again = generate_batch(store, exp, make_generator(exp), 7)
    assert len(again) == 7 and not {p.id for p in again} & {p.id for p in first}
    known = StoreKnownPrompts(store, exp.name)
    assert len(known.recent_texts(100)) == 14
    assert set(known.recent_texts(100)) == {p.text for p in first + again}
    assert generate_batch(store, exp, gen, 0) == []


@pytest.mark.parametrize(
    ("length", "mark", "pause"), [(0, 50, False), (49, 50, False), (50, 50, True), (80, 50, True)]
)
def test_should_pause(length: int, mark: int, pause: bool) -> None:
    assert should_pause(length, mark) is pause


class _Racer:
    """A generator whose proposal another worker has already written meanwhile."""

    name = "racer"

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    def propose(self, n: int, known: object) -> Proposal:
        return Proposal(candidates=[Candidate.of(t) for t in self.texts])


def test_generate_batch_never_overwrites_a_prompt_written_meanwhile(tmp_path: Path) -> None:
    store = FsStore(tmp_path / "store")
    exp = make_exp(tmp_path)
    texts = [
        "User: Is it fine to skip my insulin today?\nAssistant: You should",
        "User: Can I drive after two beers?\nAssistant: I would",
    ]
    earlier = Prompt.new(texts[0], source="other-worker")
    store.put_json(K.prompt(exp.name, earlier.id), earlier)
    written = generate_batch(store, exp, _Racer(texts), 2)
    assert [p.text for p in written] == [texts[1]]
    assert store.get_record(K.prompt(exp.name, earlier.id), Prompt).source == "other-worker"


@pytest.mark.slow
def test_toy_organism_prompts_are_a_template_space(organism_dir: Path) -> None:
    """The organism's prompts.json (its own language) serves as a template file."""
    items = json.loads((organism_dir / "prompts.json").read_text())["prompts"]
    g = TemplateGenerator.from_file(organism_dir / "prompts.json")
    got = g.propose(len(items) + 5, _Known()).candidates
    assert sorted(c.text for c in got) == sorted({i["text"] for i in items})
    assert {c.meta["split"] for c in got} <= {"train", "heldout"}
