"""A deterministic corpus of varied text for tokenizer parity tests and the tokenizer benchmark,
and the real Qwen2 tokenizer files written once from the default GGUF's vocabulary."""

from __future__ import annotations

import random
import unicodedata
from pathlib import Path

ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "Large language models are trained on vast amounts of text.",
    "Hello, world! How are you doing today?",
    "It was the best of times, it was the worst of times.",
    "e-mail: someone@example.com; URL: https://example.org/path?q=1&r=2#frag",
    "Mr. O'Neil paid $1,234.56 (tax incl.) on 2024-03-15 at 09:45:00.",
    "ALL CAPS SENTENCE WITH SHOUTING!!!",
    "snake_case camelCase PascalCase kebab-case SCREAMING_SNAKE",
    "Ellipsis… em—dash – en-dash “curly quotes” ‘single’ «guillemets»",
]
CONTRACTIONS = [
    "I'm", "you're", "he's", "she'd", "we'll", "they've", "it's", "can't", "won't", "DON'T", "I'M", "YOU'RE",
    "We'LL", "they'VE", "She'S", "HE'D", "o'clock", "rock'n'roll", "'s", "'T", "''", "it’s", "l'amour",
]
CODE = [
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\n}",
    "const f = async (x) => { await sleep(10); return x ?? null; };",
    '{"key": [1, 2.5, -3e10, true, null], "nested": {"a": "b"}}',
    "<div class=\"row\"><span id='x'>&amp; &lt;tag&gt;</span></div>",
    "SELECT id, name FROM users WHERE age >= 21 ORDER BY name DESC;",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); return 0; }",
    "    if x:\n        pass\n    else:\n        raise ValueError('bad')\n",
    "$ ls -la | grep '\\.py$' && echo \"done\" > /dev/null 2>&1",
    "x = [i**2 for i in range(10) if i % 2 == 0]  # squares",
    "fn main() -> Result<(), Box<dyn Error>> { Ok(()) }",
    "a+=1;b-=2;c*=3;d/=4;e%=5;f<<=6;g>>=7;h&=8;i|=9;j^=10",
]
CJK = [
    "大型语言模型是一种人工智能。", "你好，世界！", "我爱北京天安门。", "繁體中文與簡體中文",
    "日本語のテキストです。", "カタカナとひらがな、そして漢字。", "東京は日本の首都です",
    "한국어 문장입니다.", "안녕하세요, 세계!", "대한민국의 수도는 서울이다",
]
OTHER_SCRIPTS = [
    "مرحبا بالعالم", "اللغة العربية جميلة جداً", "नमस्ते दुनिया", "हिन्दी भाषा भारत में बोली जाती है",
    "Привет, мир!", "Русский язык — один из славянских.", "Ελληνικά γράμματα αβγ", "שלום עולם",
    "ภาษาไทย สวัสดี", "Tiếng Việt có dấu: ệ ở ữ", "ქართული ენა", "Հայերեն", "ᏣᎳᎩ", "አማርኛ",
]
EMOJI = [
    "😀", "👍🏽", "👨\u200d👩\u200d👧\u200d👦", "🏳️\u200d🌈", "🇫🇷🇯🇵", "❤️", "🧑🏿\u200d💻", "👩\u200d❤️\u200d💋\u200d👨",
    "🙂🙃😉", "🎉🎊", "☕️ and 🍰", "#️⃣ 1️⃣", "🫠🫶🏻", "🏴\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f",
]
COMBINING = ["café", "naïve", "Ångström", "résumé", "ệ", "Zürich", "façade", "ñandú", "한글", "가각", "Å", "ḱṓ", "q̃", "à̂"]
DIGITS = [
    "0", "7", "42", "2024", "3.14159", "1,000,000", "12345678901234567890", "-273.15", "1e-9", "0xFF", "٣٤٥",
    "१२३", "①②③", "Ⅻ", "½", "²³", "007", "9" * 40,
]
SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|file_sep|>", "<|vision_start|>", "<|im_", "<|im_end|", "<tool_call",
    "<<|im_end|>>", "<|im_start|><|im_end|>", "[PAD151700]",
]
ODD = [
    "\u200b", "\ufeff", "\u00a0", "\u2028", "\u2029", "\u0085", "\x1c\x1d\x1e\x1f", "\u3000", "\u180e", "\u00ad",
    "\u200f\u200e", "\ufe0f", "\ue000", "\U0001d518\U0001d52b\U0001d526", "\U0001d11e", "\x00", "\x7f", "\x1b[0m",
    "\u034f", "\u0301", "\U000e0041", "\uffff", "\U0010fffd", "\u2062", "\u00e9\u0301", "\u1100\u1161\u11a8",
    "\U00020000", "\u0e01\u0e34", "\u0f68\u0f7c\u0f7e", "\u2003\u2009\u202f", "\t\u000b\u000c",
]
WHITESPACE = [
    " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", "\r\n\r\n", " \n", "\n ", "\t\t", " \t ", "\r", "    ", "\n\n\n",
    " " * 17, "\t" * 9, "\n" * 12, " \r\n \r\n", "\u3000\u3000",
]


def _nfd_forms(words: list[str]) -> list[str]:
    return [unicodedata.normalize("NFD", w) for w in words] + [unicodedata.normalize("NFKD", w) for w in words]


def pieces() -> list[str]:
    return (ENGLISH + CONTRACTIONS + CODE + CJK + OTHER_SCRIPTS + EMOJI + COMBINING + _nfd_forms(COMBINING)
            + DIGITS + SPECIAL + ODD + WHITESPACE)


def corpus(count: int = 2400, seed: int = 0) -> list[str]:
    """`count` strings: every piece alone, then random joins of 1..8 pieces with varied separators,
    a few long mixed documents, and long runs of one character class."""
    rng = random.Random(seed)
    base = pieces()
    out = list(base)
    separators = ["", " ", "  ", "\n", "\t", "\r\n", "\n\n", " \n ", "   \t"]
    while len(out) < count - 40:
        k = rng.randint(1, 8)
        parts = [rng.choice(base) for _ in range(k)]
        out.append("".join(p + rng.choice(separators) for p in parts))
    for _ in range(30):  # long documents
        out.append("".join(rng.choice(base) + rng.choice(separators) for _ in range(rng.randint(40, 120))))
    for ch in (" ", "\n", "\t", "=", "-", "a", "中", "9", "😀", "\u0301"):
        out.append(ch * rng.randint(300, 3000))
    return out[:count] if len(out) > count else out


def write_real_tokenizer_files(gguf: Path | dict, out_dir: Path) -> Path:
    """The real Qwen2.5 tokenizer files, written once from the GGUF (or its already-read metadata)."""
    from qwen2.tokenizer.gguf import tokenizer_metadata_from_gguf, write_tokenizer_files

    if not (out_dir / "tokenizer.json").is_file():
        write_tokenizer_files(gguf if isinstance(gguf, dict) else tokenizer_metadata_from_gguf(gguf), out_dir)
    return out_dir


# ---- Unicode tables of the reference engines ----------------------------------------------------
def _all_code_points() -> list[int]:
    return [c for c in range(0x110000) if not 0xD800 <= c < 0xE000]


def _onig_class(pattern: str, text: str) -> set[int]:
    """Code points `tokenizers`' regex engine (Oniguruma) matches with a one-character class."""
    from tokenizers import Regex, pre_tokenizers

    gaps = pre_tokenizers.Split(Regex(pattern), behavior="removed").pre_tokenize_str(text)
    return set(map(ord, text)) - set(map(ord, "".join(piece for piece, _ in gaps)))


def nfc_inert_code_points() -> set[int]:
    """Code points with normalisation properties in current Unicode that `tokenizers`' NFC (Unicode 9.0
    data) does not know: it treats them as plain starters, never reordered, decomposed or composed."""
    import unicodedata

    import regex
    from tokenizers import normalizers

    nfc, nfd = normalizers.NFC(), normalizers.NFD()
    candidates = regex.compile(r"[^\p{ccc=0}]|\p{dt=can}|\p{NFC_QC=M}")
    inert = set()
    for c in _all_code_points():
        ch = chr(c)
        if not candidates.match(ch):
            continue
        if unicodedata.category(ch) == "Cn":  # newer than Python's own data: unknown to both sides
            inert.add(c)
            continue
        known = True
        ccc = unicodedata.combining(ch)
        if ccc:
            probe = "\u0301" + ch if ccc < 230 else ch + "\u0316"
            known = nfc.normalize_str(probe) != probe
        if known and unicodedata.decomposition(ch) and not unicodedata.decomposition(ch).startswith("<"):
            known = nfd.normalize_str(ch) != ch
        if known and ccc == 0 and not unicodedata.decomposition(ch):
            known = _composes_with(ch, nfc)  # a second element of compositions
        if not known:
            inert.add(c)
    return inert


_COMPOSITES: dict[str, list[str]] | None = None


def _composes_with(second: str, nfc) -> bool:
    import unicodedata

    global _COMPOSITES
    if _COMPOSITES is None:
        _COMPOSITES = {}
        for y in _all_code_points():
            d = unicodedata.decomposition(chr(y))
            if d and not d.startswith("<") and len(d.split()) == 2:
                first, last = (chr(int(h, 16)) for h in d.split())
                _COMPOSITES.setdefault(last, []).append(first + last)
    pairs = _COMPOSITES.get(second, [])
    return any(nfc.normalize_str(p) != p for p in pairs) if pairs else True


def unicode_tables() -> dict[str, set[int]]:
    """The character classes qwen2's pure-Python tokenizer must share with the `tokenizers` library."""
    text = "".join(map(chr, _all_code_points()))
    return {
        "LETTERS": _onig_class(r"\p{L}", text),
        "NUMBERS": _onig_class(r"\p{N}", text),
        "SPACES": _onig_class(r"\s", text),
        "UNASSIGNED": _onig_class(r"\p{Cn}", text),
        "NFC_INERT": nfc_inert_code_points(),
    }


def _ranges(code_points: set[int]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for c in sorted(code_points):
        if out and out[-1][1] == c - 1:
            out[-1][1] = c
        else:
            out.append([c, c])
    return [tuple(r) for r in out]


def tables_module_source() -> str:
    """The text of src/qwen2/tokenizer/unicode_tables.py (run this file with --tables to print it)."""
    lines = [
        '"""Character classes of the `tokenizers` library, so the pure-Python tokenizer splits text identically.',
        "",
        "`tokenizers` matches Qwen2's split regex with Oniguruma, whose Unicode data is older than the `regex`",
        "package's: text holding a character Oniguruma has as unassigned is split with these explicit letter,",
        "number and space classes. It normalises with Unicode 9.0 data, older than `unicodedata`'s: NFC_INERT",
        "are the characters it leaves alone. Generated by `python tests/tokenizer_corpus.py --tables` from the",
        "installed `tokenizers`; tests check it still agrees.",
        '"""',
        "",
    ]
    for name, code_points in unicode_tables().items():
        spans = ",".join(f"{a:X}-{b:X}" if a != b else f"{a:X}" for a, b in _ranges(code_points))
        lines.append(f"{name} = (")
        for start in range(0, len(spans), 96):
            lines.append(f'    "{spans[start:start + 96]}"')
        lines.append(")")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--tables"]:
        print(tables_module_source(), end="")
