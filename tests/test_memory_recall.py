"""Long-term memory as units: recalled in later sessions in other words (English and Russian),
bounded in the prompt, grouped by session with dates, and searchable by words when vectors fail."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from graph.agent import Agent, Answer
from graph.recall import MEMORY_CLOSE, MEMORY_OPEN, MEMORY_PROMPT_TOKENS, for_prompt, memory_block
from graph.tokens import count_tokens
from memory.base import MemoryHit
from memory.units import exchanges, split_facts
from storage.models import MemoryRecord
from tests.fakes.openai import FakeOpenAI
from tests.test_graph import say

# A conversation in three sessions; the first says the fact, the others are about other things.
CONVERSATIONS = {
    "en": {
        "sessions": [
            ("My sister Anna works as a veterinarian in Porto.",
             "The user's sister Anna works as a veterinarian in Porto"),
            ("I am learning to bake sourdough bread on weekends.",
             "The user bakes sourdough bread on weekends"),
            ("Which laptop should I buy for video editing?",
             "The user is choosing a laptop for video editing"),
        ],
        "question": "Tell me about my sister's job",
        "recalled": "veterinarian in Porto",
    },
    "ru": {
        "sessions": [
            ("Моя сестра Анна работает ветеринаром в Казани.",
             "Сестра пользователя Анна работает ветеринаром в Казани"),
            ("По выходным я учусь печь хлеб на закваске.",
             "Пользователь по выходным печёт хлеб на закваске"),
            ("Какой ноутбук купить для монтажа видео?",
             "Пользователь выбирает ноутбук для монтажа видео"),
        ],
        # Other words, other forms: "сестре" is "сестра" declined, found by its stem.
        "question": "Что ты помнишь о моей сестре?",  # noqa: RUF001 (Russian, not a lookalike)
        "recalled": "ветеринаром в Казани",
    },
}


def summariser_says(fake_openai: FakeOpenAI, fact: str) -> None:
    fake_openai.reply = lambda body: (
        f"Title: Notes\nSummary: A conversation.\nFacts:\n- {fact}\nOpen questions:\n"
        if body["model"] == "gpt-4o-mini" else "Noted."
    )


def memory_in(system_prompt: str | None) -> str:
    text = system_prompt or ""
    if MEMORY_OPEN not in text:
        return ""
    return text.split(MEMORY_OPEN, 1)[1].split(MEMORY_CLOSE, 1)[0]


@pytest.mark.parametrize("language", ["en", "ru"])
async def test_a_fact_said_once_is_recalled_sessions_later_in_other_words(
    agent_factory: Callable[..., Agent], fake_openai: FakeOpenAI, language: str,
) -> None:
    conversation = CONVERSATIONS[language]
    agent = agent_factory(memory_top_k=1)  # one session may be drawn on: it must be the right one
    for said, fact in conversation["sessions"]:
        summariser_says(fake_openai, fact)
        await say(agent, 5, said)
        ended = await agent.end_session(5, 5)
        assert ended is not None and ended.outcome == "summarised"

    fake_openai.reply = "Here you go."
    events = await say(agent, 5, conversation["question"])

    assert isinstance(events[-1], Answer)
    recalled = memory_in(fake_openai.last_system_prompt())
    assert conversation["recalled"] in recalled
    for said, fact in conversation["sessions"][1:]:
        assert fact not in recalled and said not in recalled


async def test_what_recall_adds_is_grouped_by_session_with_its_date(
    agent_factory: Callable[..., Agent], fake_openai: FakeOpenAI,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    agent = agent_factory()
    summariser_says(fake_openai, "The user keeps bees in the garden")
    await say(agent, 6, "I keep bees in my garden, three hives.")
    ended = await agent.end_session(6, 6)
    assert ended is not None

    await say(agent, 6, "How are my bees doing?")

    recalled = memory_in(fake_openai.last_system_prompt())
    today = dt.datetime.now(dt.UTC).date().isoformat()
    assert recalled.count("[session 1]") == 1 and today in recalled.splitlines()[1]
    assert "- fact: The user keeps bees in the garden" in recalled
    assert "- exchange: User: I keep bees in my garden, three hives." in recalled
    async with sessions() as db:
        kinds = sorted((await db.scalars(
            select(MemoryRecord.kind).where(MemoryRecord.user_id == 6)
        )).all())
    assert kinds == ["exchange", "fact", "summary"]


def hit(session: int, text: str, kind: str = "exchange") -> MemoryHit:
    return MemoryHit(
        id=f"1:{session}:{kind}:{len(text)}", text=text, title=f"Session {session}", role="coder",
        started_at=dt.datetime(2026, 1, session, tzinfo=dt.UTC), score=1.0, kind=kind,  # type: ignore[arg-type]
        session_id=session,
    )


def test_the_prompt_takes_what_fits_from_at_most_the_allowed_sessions() -> None:
    long = "word " * 400  # about 400 tokens each
    hits = [hit(s, f"{long} number {s}.{i}") for s in range(1, 8) for i in range(3)]

    chosen = for_prompt(hits, sessions=3, budget=MEMORY_PROMPT_TOKENS, model="gpt-4o")

    assert chosen and len({h.session_id for h in chosen}) <= 3
    assert count_tokens(memory_block(chosen), "gpt-4o") <= MEMORY_PROMPT_TOKENS
    short = [hit(9, "short note")]
    assert for_prompt(hits[:1] + short, sessions=1, budget=MEMORY_PROMPT_TOKENS, model="gpt-4o") == (
        hits[:1]
    )  # a second session is not drawn on when one is allowed
    assert for_prompt(hits, sessions=0, budget=MEMORY_PROMPT_TOKENS, model="gpt-4o") == []


def test_a_summary_is_split_into_its_gist_and_its_facts() -> None:
    gist, facts = split_facts(
        "Title: Trip\nSummary: Planning Porto.\nFacts:\n- Flies on May 3\n* Vegetarian\n\n"
        "Open questions:\n- Which hotel?"
    )
    assert gist == "Title: Trip\nSummary: Planning Porto.\nOpen questions:\n- Which hotel?"
    assert facts == ["Flies on May 3", "Vegetarian"]
    assert split_facts("Summary: nothing else") == ("Summary: nothing else", [])


def test_exchanges_pair_each_question_with_its_answer_and_stay_short() -> None:
    found = exchanges([
        ("user", "first"), ("assistant", "an answer " * 200), ("user", "unanswered"),
        ("user", "second"), ("assistant", "ok"),
    ])
    assert found[0].startswith("User: first\nAssistant: an answer") and len(found[0]) < 700
    assert found[1:] == ["User: unanswered", "User: second\nAssistant: ok"]


async def test_recall_goes_on_by_words_when_the_embeddings_endpoint_fails(
    agent_factory: Callable[..., Agent], fake_openai: FakeOpenAI,
) -> None:
    agent = agent_factory(embedding_provider="openai")
    summariser_says(fake_openai, "The user plays the bassoon in an orchestra")
    await say(agent, 7, "I play the bassoon.")
    await agent.end_session(7, 7)
    assert len(fake_openai.embedding_requests) == 1  # every unit of the session in one request
    assert len(fake_openai.embedding_requests[0]["input"]) == 3

    fake_openai.reply = "Sure."
    fake_openai.fail_next_embeddings("server_error", times=10)
    events = await say(agent, 7, "Which orchestra bassoon music suits me?")

    assert isinstance(events[-1], Answer)
    assert "bassoon in an orchestra" in memory_in(fake_openai.last_system_prompt())


def test_the_local_model_is_not_loaded_when_its_files_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    from memory import embedders

    monkeypatch.setitem(embedders.WORDLLAMA_FILES, "weights/l2_supercat_256.safetensors", "0" * 64)
    with pytest.raises(embedders.ModelFilesChanged, match="sha256"):
        embedders._load_wordllama.__wrapped__()  # the cached copy aside: load it again


async def test_the_local_model_embeds_meaning_offline() -> None:
    from memory.embedders import LocalEmbedder

    dog, puppy, taxes = await LocalEmbedder().embed(
        ["my dog loves long walks", "a puppy playing in the park", "filing the yearly tax return"]
    )

    def cosine(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert len(dog) == 256
    assert cosine(dog, puppy) > cosine(dog, taxes) + 0.1


def test_the_local_model_gives_the_vectors_of_wordllamas_own_inference() -> None:
    """Stored memories were embedded by wordllama's WordLlamaInference: the lighter inference
    must put questions in the same space, or recall would quietly drift."""
    import numpy as np
    from wordllama.inference import WordLlamaInference

    from memory.embedders import _load_wordllama

    ours = _load_wordllama.__wrapped__()  # a copy of its own: the reference changes the tokenizer
    reference = WordLlamaInference(ours.matrix, _load_wordllama.__wrapped__().tokenizer)
    texts = [
        "my dog loves long walks",
        "Напомни мне завтра позвонить маме в 9 утра",
        "x",
        "def retry(fn, attempts=3):\n    return fn()  # 🙂 <|endoftext|>",
        "a long session summary " * 300,
    ]

    expected = reference.embed(texts, norm=True)
    # One text at a time and all together (the reference pads a batch to its longest text).
    assert np.allclose(ours.embed(texts), expected, rtol=0, atol=1e-6)
    assert np.allclose(ours.embed(texts[1:2]), expected[1:2], rtol=0, atol=1e-6)
    assert not np.allclose(ours.embed(texts[:1]), expected[1:2], rtol=0, atol=1e-6)


def test_a_text_without_tokens_gets_a_zero_vector_not_nans() -> None:
    import numpy as np

    from memory.embedders import _load_wordllama

    vectors = _load_wordllama().embed(["", "hello"])

    assert not np.isnan(vectors).any()
    assert not vectors[0].any()
    assert np.isclose(np.linalg.norm(vectors[1]), 1.0)

