"""Markdown -> Telegram HTML rendering and message splitting (handlers/formatting.py)."""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handlers.formatting import (
    MIN_LIMIT,
    TELEGRAM_LIMIT,
    plain_parts,
    render_html,
    render_parts,
    strip_html,
    utf16_len,
)
from tests.telegram_html import TelegramHTMLError, check_telegram_html

PY = '<pre><code class="language-python">'


def no_space(text: str) -> str:
    """Text with every whitespace character removed: splits may only drop whitespace."""
    return "".join(ch for ch in text if not ch.isspace())


def visible(parts: list[str]) -> str:
    return "".join(check_telegram_html(part) for part in parts)


# --- utf16_len ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "units"),
    [("", 0), ("abc", 3), ("é", 1), ("😀", 2), ("👨‍👩‍👧", 8), ("🇺🇦", 4), ("я😀я", 4)],
)
def test_utf16_len_counts_code_units(text: str, units: int) -> None:
    assert utf16_len(text) == units


# --- render_html: one construct at a time ------------------------------------------------------


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
        ("[site](https://example.com/a_b?x=1&y=2)",
         '<a href="https://example.com/a_b?x=1&amp;y=2">site</a>'),
        ('[q](https://e.com/?a="b")', '<a href="https://e.com/?a=&quot;b&quot;">q</a>'),
        ("[wiki](https://en.wikipedia.org/wiki/Foo_(bar))",
         '<a href="https://en.wikipedia.org/wiki/Foo_(bar)">wiki</a>'),
        ("[mail](mailto:a@b.c) [me](tg://user?id=1)",
         '<a href="mailto:a@b.c">mail</a> <a href="tg://user?id=1">me</a>'),
        ("![cat](https://e.com/cat.png)", '<a href="https://e.com/cat.png">cat</a>'),
        ("[](https://e.com)", '<a href="https://e.com">https://e.com</a>'),
        ("**see [docs](http://u.io) now**", '<b>see <a href="http://u.io">docs</a> now</b>'),
        ("[`x`](https://e.com)", '<a href="https://e.com">x</a>'),  # no <code> inside <a>
        ("**`code` inside**", "<code>code</code><b> inside</b>"),  # no <code> inside <b>
        ("# Title", "<b>Title</b>"),
        ("### Sub ###", "<b>Sub</b>"),
        ("## Use `x`", "<b>Use </b><code>x</code>"),
        ("- a\n- b", "• a\n• b"),
        ("* a\n+ b", "• a\n• b"),
        ("1. one\n2. two", "1. one\n2. two"),
        ("- a\n  - b\n    1. c\n- d", "• a\n  • b\n    1. c\n• d"),
        ("- item\n  continued", "• item\n  continued"),
        ("> quoted\n> **line**", "<blockquote>quoted\n<b>line</b></blockquote>"),
        ("> a\n> > nested", "<blockquote>a\nnested</blockquote>"),  # Telegram can't nest quotes
        ("a\n\n---\n\nb", "a\n\n──────────\n\nb"),
        ("```python\nx = 1 < 2\n```", PY + "x = 1 &lt; 2</code></pre>"),
        ("```\nplain\n```", "<pre>plain</pre>"),
        ("  ```js\n  let a;\n    b();\n  ```",
         '<pre><code class="language-js">let a;\n  b();</code></pre>'),
        ("````md\n```\ninner\n```\n````",
         '<pre><code class="language-md">```\ninner\n```</code></pre>'),
        ("> ```py\n> a = 1\n> ```",
         '<blockquote><pre><code class="language-py">a = 1</code></pre></blockquote>'),
        ("| a | bb |\n|---|:-:|\n| 1 | **2** |", "<pre>a | bb\n--+---\n1 | 2</pre>"),
        ("| site |\n|---|\n| [x](https://e.com) |",
         "<pre>site\n-----------------\nx (https://e.com)</pre>"),
        ("para one\nline two\n\n\n\npara two", "para one\nline two\n\npara two"),
        (r"\*not italic\* and \_no\_", "*not italic* and _no_"),
        ("这是**粗体**文字", "这是<b>粗体</b>文字"),
        ("**https://e.com/a_b_c** and _https://e.com/x_", "<b>https://e.com/a_b_c</b> and <i>https://e.com/x</i>"),
        ("**жирный** и *курсив*", "<b>жирный</b> и <i>курсив</i>"),
    ],
)  # fmt: skip
def test_render_html_constructs(markdown: str, expected: str) -> None:
    html = render_html(markdown)
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
    html = render_html(text)
    assert html == text  # nothing here needs escaping, so "literal" means "unchanged"


def test_raw_html_and_ampersands_are_escaped() -> None:
    html = render_html("<script>alert('x')</script> & <b>hi</b> &amp;")
    assert html == "&lt;script&gt;alert('x')&lt;/script&gt; &amp; &lt;b&gt;hi&lt;/b&gt; &amp;amp;"
    assert strip_html(html) == "<script>alert('x')</script> & <b>hi</b> &amp;"


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
    html = render_html(markdown)
    assert "<a" not in html
    assert check_telegram_html(html) == markdown  # shown exactly as the model wrote it


def test_unclosed_fence_is_closed() -> None:
    html = render_html("Here:\n```python\ndef f():\n    return 1 < 2")
    assert html == "Here:\n" + PY + "def f():\n    return 1 &lt; 2</code></pre>"


def test_every_prefix_of_a_streamed_answer_is_valid() -> None:
    answer = (
        "# Plan\n\n**Step 1**: install `pip` & run:\n\n```bash\npip install x<2\n```\n\n"
        "> Note: _careful_ with ~~old~~ [links](https://e.com/a_b).\n\n"
        "| a | b |\n|---|---|\n| 1 | 2 |"
    )
    for end in range(len(answer) + 1):
        check_telegram_html(render_html(answer[:end]))


@pytest.mark.parametrize("markdown", ["```", "```python", ">", "> >", "#", "[](javascript:x)"])
def test_markdown_that_would_render_to_nothing_is_shown_as_typed(markdown: str) -> None:
    assert strip_html(render_html(markdown)) == markdown
    assert render_parts(markdown) == [render_html(markdown)]


def test_lone_surrogates_and_crlf_are_normalised() -> None:
    assert render_html("a\r\nb\rc") == "a\nb\nc"
    assert render_html("bad \ud800 half") == "bad \ufffd half"


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


def test_short_answer_is_one_part_identical_to_render_html() -> None:
    markdown = "Hello **world**"
    assert render_parts(markdown) == [render_html(markdown)]
    assert render_parts("") == []
    assert render_parts(" \n\n \t") == []


def test_9000_char_answer_with_code_block_in_the_middle() -> None:
    code = python_code(3000)
    markdown = f"{prose(3000)}\n\n```python\n{code}\n```\n\n{prose(3000, 'thing')}"
    assert 8500 < len(markdown) < 9500
    parts = render_parts(markdown)
    assert len(parts) >= 3
    for part in parts:
        assert utf16_len(part) <= TELEGRAM_LIMIT
        check_telegram_html(part)
    # The block fits in one message, so it is not cut: it arrives whole, with its language.
    with_code = [part for part in parts if "<pre>" in part]
    assert len(with_code) == 1
    assert PY + code.replace("&", "&amp;").replace("<", "&lt;") + "</code></pre>" in with_code[0]
    assert no_space(visible(parts)) == no_space(strip_html(render_html(markdown)))


def test_code_block_longer_than_a_message_is_reopened_with_its_language() -> None:
    code = python_code(9000)
    markdown = f"Intro.\n\n```python\n{code}\n```\n\nOutro."
    parts = render_parts(markdown)
    code_parts = [part for part in parts if "<pre>" in part]
    assert len(code_parts) >= 3
    for part in parts:
        assert utf16_len(part) <= TELEGRAM_LIMIT
        check_telegram_html(part)
    for part in code_parts:
        assert part.count(PY) == 1 and part.count("</code></pre>") == 1
    pieces = [check_telegram_html(re.search(r"<pre>.*</pre>", p, re.S).group()) for p in code_parts]
    assert "\n".join(pieces) == code  # cut only between lines, nothing lost or reordered


def test_parts_are_measured_after_escaping() -> None:
    markdown = "<&>" * 3000  # 9000 visible characters, 39000 once escaped
    parts = render_parts(markdown)
    assert all(utf16_len(part) <= TELEGRAM_LIMIT for part in parts)
    assert all(utf16_len(part) > TELEGRAM_LIMIT - 5 for part in parts[:-1])  # and used fully
    assert "".join(map(strip_html, parts)) == markdown


def test_emoji_are_counted_in_utf16_and_never_split() -> None:
    markdown = "😀" * 3000  # 3000 characters but 6000 UTF-16 units, no spaces to cut at
    parts = render_parts(markdown)
    assert [utf16_len(part) for part in parts] == [4096, 6000 - 4096]
    families = "👨‍👩‍👧🇺🇦" * 700
    for part in render_parts(families, limit=1000) + plain_parts(families, limit=1000):
        assert utf16_len(part) <= 1000
        assert not part.startswith(("\u200d", "\U0001f469", "\U0001f467", "\U0001f1e6"))
        assert not part.endswith(("\u200d", "\U0001f1fa"))  # no half family, no half flag


def test_split_prefers_paragraphs_then_lines_then_sentences() -> None:
    paragraphs = "\n\n".join(f"Paragraph {n} " + "x" * 150 + "." for n in range(12))
    for part in render_parts(paragraphs, limit=500):
        assert strip_html(part).startswith("Paragraph") and part.endswith(".")
    lines = "\n".join(f"line {n} " + "y" * 40 for n in range(40))
    for part in render_parts(lines, limit=300):
        assert strip_html(part).startswith("line")
    sentences = " ".join(f"Sentence {n} is here." for n in range(60))
    parts = render_parts(sentences, limit=200)
    assert all(p.startswith("Sentence") and p.endswith("here.") for p in parts)
    assert all(utf16_len(p) > 100 for p in parts[:-1])  # cutting early doesn't mean cutting tiny


def test_bold_and_links_cut_mid_span_are_closed_and_reopened() -> None:
    markdown = "**" + "bold words " * 100 + "bold** and [" + "link text " * 100 + "](https://e.com)"
    parts = render_parts(markdown, limit=300)
    assert len(parts) > 5
    for part in parts:
        assert utf16_len(part) <= 300
        check_telegram_html(part)
        assert part.startswith(("<b>", '<a href="https://e.com">', "and"))
    assert no_space(visible(parts)) == no_space(strip_html(render_html(markdown)))


def test_limit_too_small_is_rejected() -> None:
    with pytest.raises(ValueError):
        render_parts("hello", limit=MIN_LIMIT - 1)


def test_huge_link_target_degrades_to_text_instead_of_overflowing() -> None:
    url = "https://e.com/" + "a" * 2000
    parts = render_parts(f"[label]({url}) tail", limit=200)
    assert all(utf16_len(p) <= 200 for p in parts)
    assert strip_html("".join(parts)) == "label tail"


# --- plain_parts and strip_html ----------------------------------------------------------------


def test_plain_parts_split_plain_text_without_escaping() -> None:
    text = prose(10000)
    parts = plain_parts(text)
    assert len(parts) == 3
    assert all(utf16_len(part) <= TELEGRAM_LIMIT and part in text for part in parts)
    assert no_space("".join(parts)) == no_space(text)
    assert plain_parts("<b>not a tag</b> & co") == ["<b>not a tag</b> & co"]
    assert plain_parts("\n \n") == []


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
    ],
    ids=lambda md: repr(md[:12]),
)
def test_100k_characters_render_and_split_fast(markdown: str) -> None:
    started = time.perf_counter()
    parts = render_parts(markdown)
    assert time.perf_counter() - started < 1.0
    assert all(utf16_len(part) <= TELEGRAM_LIMIT for part in parts)


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
def test_render_html_is_always_valid_telegram_html(markdown: str) -> None:
    check_telegram_html(render_html(markdown))


# Without links, code spans and backslash escapes no construct hides source characters, so every
# letter and digit must reach the reader, in order.
NO_HIDING = "[`\\"
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
def test_render_html_loses_no_letters_or_digits(markdown: str) -> None:
    shown = check_telegram_html(render_html(markdown))
    assert [c for c in shown if c.isalnum()] == [c for c in markdown if c.isalnum()]


# Text with no Markdown syntax characters at all must come out exactly, escaped and unescaped.
SYNTAX = "*_~`[]!\\#>|-+.)"
prose_text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters=SYNTAX))


@PROPERTY
@given(prose_text)
def test_text_without_syntax_renders_exactly(text: str) -> None:
    assert no_space(check_telegram_html(render_html(text))) == no_space(text)


@PROPERTY
@given(markdown_text, st.integers(MIN_LIMIT, 600))
def test_render_parts_fit_are_valid_and_lose_nothing(markdown: str, limit: int) -> None:
    parts = render_parts(markdown, limit)
    for part in parts:
        assert utf16_len(part) <= limit
        assert check_telegram_html(part).strip()  # valid and never blank
    assert no_space(visible(parts)) == no_space(strip_html(render_html(markdown)))
    assert bool(parts) == bool(markdown.strip())  # [] only when there is nothing to say


@PROPERTY
@given(markdown_text, st.integers(MIN_LIMIT, 3000))
def test_render_parts_does_not_split_what_fits(markdown: str, limit: int) -> None:
    whole = render_html(markdown)
    if utf16_len(whole) <= limit and strip_html(whole).strip():
        assert render_parts(markdown, limit) == [whole]


@PROPERTY
@given(st.one_of(markdown_text, st.text(st.characters(exclude_categories=("Cs",)))),
       st.integers(MIN_LIMIT, 300))  # fmt: skip
def test_plain_parts_fit_and_lose_nothing(text: str, limit: int) -> None:
    parts = plain_parts(text, limit)
    normalised = text.replace("\r\n", "\n").replace("\r", "\n")
    for part in parts:
        assert utf16_len(part) <= limit
        assert part.strip() and part in normalised
    assert no_space("".join(parts)) == no_space(text)


def test_checker_rejects_what_telegram_rejects() -> None:
    """The validator above is only worth something if it fails on bad HTML."""
    for bad in [
        "<b>x", "x</b>", "<b><i>x</b></i>", "<br>", "a < b", "a & b", "<b><code>x</code></b>",
        "<pre><b>x</b></pre>", "<blockquote><blockquote>x</blockquote></blockquote>",
        '<pre>t<code class="language-x">y</code></pre>', "&nbsp;", "<!-- c -->",
    ]:  # fmt: skip
        with pytest.raises(TelegramHTMLError):
            check_telegram_html(bad)
