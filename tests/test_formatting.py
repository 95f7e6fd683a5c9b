"""Model Markdown -> Telegram text + entities, and splitting into messages (handlers/formatting.py)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handlers.formatting import (
    MIN_LIMIT,
    TELEGRAM_LIMIT,
    Part,
    render_parts,
    strip_html,
    utf16_len,
)
from tests.telegram_html import TelegramHTMLError, check_entities, check_telegram_html, entities_html

PY = '<pre><code class="language-python">'


def render(markdown: str) -> Part:
    """The whole answer as one message, however long."""
    return (render_parts(markdown, limit=10**9) or [Part("", [])])[0]


def no_space(text: str) -> str:
    """Text with every whitespace character removed: splits may only drop whitespace."""
    return "".join(ch for ch in text if not ch.isspace())


def html_of(part: Part) -> str:
    """The part as Telegram HTML: entities must nest as Telegram requires to get this far."""
    return entities_html(part.text, part.entities)


def visible(parts: list[Part]) -> str:
    return "".join(check_entities(part.text, part.entities) for part in parts)


def pre_blocks(part: Part) -> list[tuple[str, str | None]]:
    """(text, language) of each code block in a part."""
    text = part.text.encode("utf-16-le")
    return [(text[e.offset * 2 : (e.offset + e.length) * 2].decode("utf-16-le"), e.language)
            for e in part.entities if e.type == "pre"]  # fmt: skip


# --- utf16_len ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "units"),
    [("", 0), ("abc", 3), ("é", 1), ("😀", 2), ("👨‍👩‍👧", 8), ("🇺🇦", 4), ("я😀я", 4)],
)
def test_utf16_len_counts_code_units(text: str, units: int) -> None:
    assert utf16_len(text) == units


# --- render: one construct at a time -----------------------------------------------------------


@pytest.mark.parametrize(
    ("markdown", "expected"),
    [
        ("**bold**", "<b>bold</b>"),
        ("__bold__", "<b>bold</b>"),
        ("*italic*", "<i>italic</i>"),
        ("_italic_", "<i>italic</i>"),
        ("~~gone~~", "<s>gone</s>"),
        ("***both***", "<b><i>both</i></b>"),
        ("**bold _and italic_**", "<b>bold <i>and italic</i></b>"),
        ("`a < b`", "<code>a &lt; b</code>"),
        ("`` a `tick` ``", "<code>a `tick`</code>"),
        ("||secret||", "<tg-spoiler>secret</tg-spoiler>"),
        ("[site](https://example.com/a_b?x=1&y=2)",
         '<a href="https://example.com/a_b?x=1&amp;y=2">site</a>'),
        ('[q](https://e.com/?a="b")', '<a href="https://e.com/?a=&quot;b&quot;">q</a>'),
        ("[wiki](https://en.wikipedia.org/wiki/Foo_(bar))",
         '<a href="https://en.wikipedia.org/wiki/Foo_(bar)">wiki</a>'),
        ("[mail](mailto:a@b.c) [me](tg://user?id=1)",
         '<a href="mailto:a@b.c">mail</a> <a href="tg://user?id=1">me</a>'),
        ("![cat](https://e.com/cat.png)", '🖼<a href="https://e.com/cat.png">cat</a>'),
        ("[](https://e.com)", "[](https://e.com)"),  # nothing to click on: shown as typed
        ("**see [docs](http://u.io) now**", '<b>see <a href="http://u.io">docs</a> now</b>'),
        ("[`x`](https://e.com)", '<a href="https://e.com">x</a>'),  # no code inside a link
        ("**`code` inside**", "<code>code</code><b> inside</b>"),  # no code inside bold
        ("# Title", "📌 <b><u>Title</u></b>"),
        ("### Sub ###", "📚 <b>Sub</b>"),
        ("## Use `x`", "✏ <b><u>Use </u></b><code>x</code>"),
        ("- a\n- b", "⦁ a\n⦁ b"),
        ("* a\n+ b", "⦁ a\n⦁ b"),
        ("1. one\n2. two", "1. one\n2. two"),
        ("- a\n  - b\n    1. c\n- d", "⦁ a\n  ⦁ b\n    1. c\n⦁ d"),
        ("> quoted\n> **line**", "<blockquote>quoted\n<b>line</b></blockquote>"),
        ("> a\n> > nested", "<blockquote>a\nnested</blockquote>"),  # Telegram can't nest quotes
        ("a\n\n---\n\nb", "a\n\n————————\n\nb"),
        ("```python\nx = 1 < 2\n```", PY + "x = 1 &lt; 2</code></pre>"),
        ("```\nplain\n```", "<pre>plain</pre>"),
        ("  ```js\n  let a;\n    b();\n  ```",
         '<pre><code class="language-js">let a;\n  b();</code></pre>'),
        ("````md\n```\ninner\n```\n````",
         '<pre><code class="language-md">```\ninner\n```</code></pre>'),
        ("> ```py\n> a = 1\n> ```",
         '<blockquote><pre><code class="language-py">a = 1</code></pre></blockquote>'),
        ("| a | bb |\n|---|:-:|\n| 1 | **2** |", "<pre>a | bb\n--+---\n1 | 2</pre>"),
        ("para one\nline two\n\n\n\npara two", "para one\nline two\n\npara two"),
        (r"\*not italic\* and \_no\_", "*not italic* and _no_"),
        ("这是**粗体**文字", "这是<b>粗体</b>文字"),
        ("**https://e.com/a_b_c** and _https://e.com/x_", "<b>https://e.com/a_b_c</b> and <i>https://e.com/x</i>"),
        ("**жирный** и *курсив*", "<b>жирный</b> и <i>курсив</i>"),
        ("$x^2$ costs $5", "<code>x^2</code> costs $5"),  # math as code; a price stays a price
    ],
)  # fmt: skip
def test_render_constructs(markdown: str, expected: str) -> None:
    html = html_of(render(markdown))
    assert html == expected
    check_telegram_html(html)


@pytest.mark.parametrize(
    "text",
    [
        "snake_case_words and __dunder_name_here",
        "2*3*4 = 24",
        "x**2 + y**2 = z**2",
        "a * b * c",
        "price ~5 USD, ~~ alone",
        "file_name.py and my_var_2",
        "**not closed",
        "*not closed",
        "un*frigging*believable",
        "no opener](https://e.com) here",
        "see https://example.com/_private_/a*b*c_d and http://x.io/__init__.py",
    ],
)
def test_literal_text_stays_literal(text: str) -> None:
    assert render(text) == Part(text, [])


def test_raw_html_and_ampersands_are_text() -> None:
    markdown = "<script>alert('x')</script> & <b>hi</b> &amp; &copy;\n\n<div>\nblock\n</div>"
    assert render(markdown) == Part(markdown, [])  # shown exactly as written, nothing parsed
    assert html_of(render("<b>x</b> `<b>`")) == "&lt;b&gt;x&lt;/b&gt; <code>&lt;b&gt;</code>"


@pytest.mark.parametrize(
    "markdown",
    [
        "[click](javascript:alert(1))",
        "[click](JaVaScRiPt:alert(1))",
        "[click](data:text/html,hi)",
        "[click](/relative/path)",
        "[click](vbscript:x)",
    ],
)
def test_unsafe_links_render_as_plain_text(markdown: str) -> None:
    assert render(markdown) == Part("click", [])  # the label, never a link to click


def test_unclosed_fence_is_closed() -> None:
    html = html_of(render("Here:\n```python\ndef f():\n    return 1 < 2"))
    assert html == "Here:\n" + PY + "def f():\n    return 1 &lt; 2</code></pre>"


def test_every_prefix_of_a_streamed_answer_is_valid() -> None:
    answer = (
        "# Plan\n\n**Step 1**: install `pip` & run:\n\n```bash\npip install x<2\n```\n\n"
        "> Note: _careful_ with ~~old~~ [links](https://e.com/a_b).\n\n"
        "| a | b |\n|---|---|\n| 1 | 2 |"
    )
    for end in range(len(answer) + 1):
        check_entities(*render(answer[:end]))


@pytest.mark.parametrize("markdown", ["```", "```python", ">", "> >", "[](javascript:x)"])
def test_markdown_that_would_render_to_nothing_is_shown_as_typed(markdown: str) -> None:
    assert render(markdown) == Part(markdown, [])
    assert render_parts(markdown) == [render(markdown)]


def test_lone_surrogates_and_crlf_are_normalised() -> None:
    assert render("a\r\nb\rc").text == "a\nb\nc"
    assert render("bad \ud800 half").text == "bad \ufffd half"


# --- render_parts ------------------------------------------------------------------------------


def prose(chars: int, seed: str = "word") -> str:
    """Paragraphs of sentences, about `chars` long."""
    sentence = f"The {seed} & <tag> is **important** for snake_case reasons. "
    paragraph = sentence * 6
    return "\n\n".join([paragraph.strip()] * (chars // len(paragraph) + 1))[:chars].rstrip()


def python_code(chars: int) -> str:
    lines, n = [], 0
    while sum(len(line) + 1 for line in lines) < chars:
        lines.append(f"def f_{n}(x):  # a < b & c\n    return x ** {n}")
        n += 1
    return "\n".join(lines)


def test_short_answer_is_one_part_identical_to_render() -> None:
    markdown = "Hello **world**"
    assert render_parts(markdown) == [render(markdown)]
    assert render_parts("") == []
    assert render_parts(" \n\n \t") == []


def test_9000_char_answer_with_code_block_in_the_middle() -> None:
    code = python_code(3000)
    markdown = f"{prose(3000)}\n\n```python\n{code}\n```\n\n{prose(3000, 'thing')}"
    assert 8500 < len(markdown) < 9500
    parts = render_parts(markdown)
    assert len(parts) >= 3
    for part in parts:
        assert utf16_len(part.text) <= TELEGRAM_LIMIT
        check_telegram_html(html_of(part))
    # The block fits in one message, so it is not cut: it arrives whole, with its language.
    blocks = [block for part in parts for block in pre_blocks(part)]
    assert blocks == [(code, "python")]
    assert no_space(visible(parts)) == no_space(render(markdown).text)


def test_code_block_longer_than_a_message_is_reopened_with_its_language() -> None:
    code = python_code(9000)
    markdown = f"Intro.\n\n```python\n{code}\n```\n\nOutro."
    parts = render_parts(markdown)
    code_parts = [part for part in parts if pre_blocks(part)]
    assert len(code_parts) >= 3
    for part in parts:
        assert utf16_len(part.text) <= TELEGRAM_LIMIT
        check_telegram_html(html_of(part))
    pieces = []
    for part in code_parts:
        [(piece, language)] = pre_blocks(part)  # one block per part, each with its language
        assert language == "python"
        pieces.append(piece)
    assert "\n".join(pieces) == code  # cut only between lines, nothing lost or reordered


def test_parts_are_measured_in_visible_text_and_filled() -> None:
    markdown = "<&>" * 3000  # no escaping inflates it: entities are not part of the text
    parts = render_parts(markdown)
    assert all(utf16_len(part.text) <= TELEGRAM_LIMIT for part in parts)
    assert all(utf16_len(part.text) > TELEGRAM_LIMIT - 5 for part in parts[:-1])  # used fully
    assert "".join(part.text for part in parts) == markdown


def test_emoji_are_counted_in_utf16_and_never_split() -> None:
    markdown = "😀" * 3000  # 3000 characters but 6000 UTF-16 units, no spaces to cut at
    parts = render_parts(markdown)
    assert [utf16_len(part.text) for part in parts] == [4096, 6000 - 4096]
    families = "👨‍👩‍👧🇺🇦" * 700
    for part in render_parts(families, limit=1000):
        assert utf16_len(part.text) <= 1000
        assert not part.text.startswith(("\u200d", "\U0001f469", "\U0001f467", "\U0001f1e6"))
        assert not part.text.endswith(("\u200d", "\U0001f1fa"))  # no half family, no half flag


def test_split_prefers_paragraphs_then_lines_then_sentences() -> None:
    paragraphs = "\n\n".join(f"Paragraph {n} " + "x" * 150 + "." for n in range(12))
    for part in render_parts(paragraphs, limit=500):
        assert part.text.startswith("Paragraph") and part.text.endswith(".")
    lines = "\n".join(f"line {n} " + "y" * 40 for n in range(40))
    for part in render_parts(lines, limit=300):
        assert part.text.startswith("line")
    sentences = " ".join(f"Sentence {n} is here." for n in range(60))
    parts = [part.text for part in render_parts(sentences, limit=200)]
    assert all(p.startswith("Sentence") and p.endswith("here.") for p in parts)
    assert all(utf16_len(p) > 100 for p in parts[:-1])  # cutting early doesn't mean cutting tiny


def test_bold_and_links_cut_mid_span_continue_in_the_next_part() -> None:
    markdown = "**" + "bold words " * 100 + "bold** and [" + "link text " * 100 + "](https://e.com)"
    parts = render_parts(markdown, limit=300)
    assert len(parts) > 5
    for part in parts:
        assert utf16_len(part.text) <= 300
        check_telegram_html(html_of(part))
        assert html_of(part).startswith(("<b>", '<a href="https://e.com">', "and"))
    assert no_space(visible(parts)) == no_space(render(markdown).text)


def test_limit_too_small_is_rejected() -> None:
    with pytest.raises(ValueError):
        render_parts("hello", limit=MIN_LIMIT - 1)


def test_huge_link_target_costs_no_room() -> None:
    url = "https://e.com/" + "a" * 2000
    parts = render_parts(f"[label]({url}) tail", limit=200)
    assert parts == [Part("label tail", parts[0].entities)]
    assert [(e.type, e.url) for e in parts[0].entities] == [("text_link", url)]


# --- strip_html (bot-authored HTML, for alerts that take no markup) ----------------------------


def test_strip_html_gives_the_visible_text() -> None:
    html = '<b>a &lt; b</b> &amp; <a href="https://e.com?a=1&amp;b=2">c</a>'
    assert strip_html(html) == "a < b & c"


# --- performance -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "markdown",
    [
        prose(100_000),
        "*a" * 50_000,
        "**a " * 25_000,
        "[" * 100_000,
        "[a](" * 25_000,
        "`" * 3 + "a`" * 50_000,
        "_a" * 50_000,
        "a" * 100_000,
        "# " + " " * 99_990 + "x",
        "- " + " " * 99_990 + "#",
        "```" + "a" * 99_990 + "`",
        "| a |\n|---|\n" + "| x |\n" * 16_000,
        "> " * 50_000,
        "> line\n" * 14_000,
        "~~a " * 25_000,
        "😀 " * 50_000,
        "https://a" + "." * 99_990,
        "**a `b` " * 12_500,
        "> a\n\n" * 16_000,
        "[`x`](https://e.com) " * 5_000,
        "<b>x</b>&amp;" * 8_000,
    ],
    ids=lambda md: repr(md[:12]),
)
@pytest.mark.timeout(30)  # no catastrophic backtracking; speed itself is bench/'s business
def test_100k_characters_render_and_split(markdown: str) -> None:
    parts = render_parts(markdown)
    assert all(utf16_len(part.text) <= TELEGRAM_LIMIT for part in parts)


# --- properties --------------------------------------------------------------------------------

PIECES = [
    "**", "*", "_", "__", "~~", "~", "`", "```", "```python", "\n", "\n\n", "# ", "## ", "> ",
    ">> ", "- ", "* ", "1. ", "  ", "    ", "|", "| a | b |\n|---|---|\n", "---", "[", "]", "(",
    ")", "](https://e.com/x_y)", "](javascript:alert(1))", "![", "<script>", "</b>", "&", "&amp;",
    '"', "\\", "😀", "👨‍👩‍👧", "🇺🇦", "\u200b", "\u200d", "\u202e", "שלום", "مرحبا", "é", "e\u0301",
    "snake_case", "2*3*4", "word", " ", "\t", "\r\n", ".", "x", "\u3000", "\xa0",
]  # fmt: skip
any_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
markdown_text = st.lists(st.one_of(st.sampled_from(PIECES), any_text), max_size=80).map("".join)
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(st.one_of(markdown_text, st.text(st.characters(exclude_categories=("Cs",)))))
def test_render_is_always_valid_for_telegram(markdown: str) -> None:
    check_entities(*render(markdown))


# Without links, code spans, backslash escapes, tables (GFM drops a row's cells beyond the
# header's count), ordered lists (which number themselves: "1.\n1." reads "1. 2.") and tilde
# fences (whose info string is the block's language, not its text) no construct hides or
# changes source characters, so every letter and digit must reach the reader, in order.
NO_HIDING = "[`\\|.)~"
content_text = st.lists(
    st.one_of(
        st.sampled_from([p for p in PIECES if not set(p) & set(NO_HIDING)]),
        st.text(
            st.characters(exclude_categories=("Cs",), exclude_characters=NO_HIDING), max_size=12
        ),
    ),
    max_size=80,
).map("".join)


@PROPERTY
@given(content_text)
def test_render_loses_no_letters_or_digits(markdown: str) -> None:
    shown = check_entities(*render(markdown))
    assert [c for c in shown if c.isalnum()] == [c for c in markdown if c.isalnum()]


# Text with no Markdown syntax characters at all must come out exactly ($ opens math).
SYNTAX = "*_~`[]!\\#>|-+.)$"
prose_text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters=SYNTAX))


@PROPERTY
@given(prose_text)
def test_text_without_syntax_renders_exactly(text: str) -> None:
    assert no_space(check_entities(*render(text))) == no_space(text)


@PROPERTY
@given(markdown_text, st.integers(MIN_LIMIT, 600))
def test_render_parts_fit_are_valid_and_lose_nothing(markdown: str, limit: int) -> None:
    parts = render_parts(markdown, limit)
    for part in parts:
        assert utf16_len(part.text) <= limit
        assert check_entities(*part).strip()  # valid and never blank
    assert no_space(visible(parts)) == no_space(render(markdown).text)
    assert bool(parts) == bool(markdown.strip())  # [] only when there is nothing to say


@PROPERTY
@given(markdown_text, st.integers(MIN_LIMIT, 3000))
def test_render_parts_does_not_split_what_fits(markdown: str, limit: int) -> None:
    whole = render(markdown)
    if utf16_len(whole.text) <= limit and whole.text.strip():
        assert render_parts(markdown, limit) == [whole]


def test_checker_rejects_what_telegram_rejects() -> None:
    """The validator above is only worth something if it fails on bad HTML."""
    for bad in [
        "<b>x", "x</b>", "<b><i>x</b></i>", "<br>", "a < b", "a & b", "<b><code>x</code></b>",
        "<pre><b>x</b></pre>", "<blockquote><blockquote>x</blockquote></blockquote>",
        '<pre>t<code class="language-x">y</code></pre>', "&nbsp;", "<!-- c -->",
    ]:  # fmt: skip
        with pytest.raises(TelegramHTMLError):
            check_telegram_html(bad)


def test_entity_checker_rejects_what_telegram_rejects() -> None:
    """Entities are judged as their HTML would be, plus what only entities can get wrong."""
    def e(kind: str, offset: int, length: int) -> dict[str, object]:
        return {"type": kind, "offset": offset, "length": length}

    for text, entities in [
        ("abc", [e("bold", 0, 2), e("italic", 1, 2)]),  # partly overlapping
        ("abc", [e("bold", 2, 5)]),  # past the end
        ("abc", [e("bold", 1, 0)]),  # empty
        ("😀", [e("bold", 0, 1)]),  # half a surrogate pair
        ("abc", [e("code", 0, 3), e("bold", 1, 1)]),  # style inside code
        ("ab", [e("blockquote", 0, 2), e("blockquote", 1, 1)]),  # nested quotes
    ]:
        with pytest.raises(TelegramHTMLError):
            check_entities(text, entities)
