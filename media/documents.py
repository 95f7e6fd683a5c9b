"""The text of a document a user sends: PDF (pypdf), DOCX (python-docx), plain text, Markdown
and code. What the model is given is bounded in tokens; the rest is cut with a note."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import PurePosixPath

from graph.tokens import count_tokens

DOCUMENT_TOKENS = 6_000  # of a document's text in one question; the rest is cut with a note
PDF_MAX_PAGES = 200  # beyond that the text would be cut anyway: pages are not read

TEXT_SUFFIXES = {
    ".txt", ".md", ".markdown", ".rst", ".csv", ".tsv", ".json", ".yaml", ".yml", ".toml", ".ini",
    ".cfg", ".log", ".xml", ".html", ".htm", ".py", ".js", ".ts", ".tsx", ".jsx", ".java", ".kt",
    ".go", ".rs", ".c", ".h", ".cpp", ".hpp", ".cs", ".rb", ".php", ".swift", ".sql", ".sh",
    ".bash", ".ps1", ".r", ".scala", ".lua", ".pl", ".css", ".scss", ".vue", ".svelte", ".tex",
}
DOCX_MIME = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"


class Unreadable(Exception):
    """A document whose text cannot be read; `reason` is a key of the `media` texts."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason  # unsupported | corrupt | empty


@dataclass(frozen=True)
class DocumentText:
    name: str
    text: str
    cut: bool  # the text was longer than DOCUMENT_TOKENS: what is here is its beginning


def kind_of(name: str | None, mime: str | None) -> str | None:
    """pdf | docx | text, or None for a document the bot cannot read."""
    suffix = PurePosixPath(name or "").suffix.lower()
    if suffix == ".pdf" or mime == "application/pdf":
        return "pdf"
    if suffix == ".docx" or mime == DOCX_MIME:
        return "docx"
    if suffix in TEXT_SUFFIXES or (mime or "").startswith("text/"):
        return "text"
    return None


def read(name: str, mime: str | None, data: bytes, model: str) -> DocumentText:
    """The document's text, cut to DOCUMENT_TOKENS; Unreadable with a reason otherwise."""
    kind = kind_of(name, mime)
    if kind is None:
        raise Unreadable("unsupported")
    text = {"pdf": _pdf, "docx": _docx, "text": _plain}[kind](data).strip()
    if not text:
        raise Unreadable("empty")  # a scanned PDF has pictures of text, not text
    if count_tokens(text, model) <= DOCUMENT_TOKENS:
        return DocumentText(name, text, cut=False)
    # Cut by characters first (about four a token), then trimmed to the bound exactly.
    head = text[: DOCUMENT_TOKENS * 4]
    while count_tokens(head, model) > DOCUMENT_TOKENS:
        head = head[: int(len(head) * 0.9)]
    return DocumentText(name, head.rstrip(), cut=True)


def _pdf(data: bytes) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise Unreadable("corrupt")  # a password-protected PDF: its text is not readable
        return "\n\n".join(page.extract_text() or "" for page in reader.pages[:PDF_MAX_PAGES])
    except (PdfReadError, ValueError, KeyError, TypeError) as exc:
        raise Unreadable("corrupt") from exc


def _docx(data: bytes) -> str:
    from zipfile import BadZipFile

    import docx

    try:
        document = docx.Document(io.BytesIO(data))
    except (BadZipFile, KeyError, ValueError) as exc:
        raise Unreadable("corrupt") from exc
    return "\n".join(paragraph.text for paragraph in document.paragraphs)


def _plain(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        from charset_normalizer import from_bytes

        best = from_bytes(data).best()
        if best is None:
            raise Unreadable("corrupt") from None
        return str(best)
