#!/usr/bin/env python3
"""Reference data for tests/test_tokenizer.c. Run offline from the repository root:

    python3 tests/reference/tokenizer_compare.py

Needs: regex, ftfy, open_clip_torch (+ torch), and ../shared/data/bpe_simple_vocab_16e6.txt.gz
for part 3. Everything is seeded; rerunning rewrites identical files.

1. A tiny byte-level BPE vocabulary, trained here on a built-in corpus, written in OpenAI's
   bpe_simple_vocab format (tiny_merges.txt and .txt.gz) and in HF format with shuffled ids
   (tiny_hf/vocab.json + merges.txt).
2. Goldens on that vocabulary from `RefTokenizer`, an independent reimplementation of OpenAI's
   SimpleTokenizer in which ftfy.fix_text is replaced by NFC normalisation (what clhclip does).
   The reference is cross-checked against open_clip's SimpleTokenizer on the same tiny vocab.
3. Seeded random strings tokenized with open_clip.tokenize on the real vocabulary:
   openclip_generated.tsv holds those that fit 77 tokens and on which open_clip and the
   reference agree; openclip_ftfy_excluded.tsv those where they differ only because ftfy
   rewrote the text (checked: the reference applied to ftfy.fix_text(s) gives open_clip's ids).
4. reference_fuzz.tsv: random code points, entities, special tokens and case oddities on the
   real vocabulary, tokenized by the reference with html.unescape restricted to the named
   entities clhclip knows. Only code points whose category agrees between utf8proc (ctypes),
   unicodedata and the regex module are drawn, as the Unicode versions differ.
"""
import contextlib
import ctypes
import ctypes.util
import html.entities
import gzip
import html
import json
import os
import random
import sys
import unicodedata

import regex

OUT = "tests/fixtures/tokenizer"
REAL_VOCAB = "../shared/data/bpe_simple_vocab_16e6.txt.gz"
N_OPENAI_MERGES = 49152 - 256 - 2  # lines 1..48894 after the header
CONTEXT = 77

# --------------------------------------------------------------------------- reference


def byte_symbols():
    """OpenAI's byte -> printable-character map, in vocabulary order (ids 0..255)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1))
    printable += list(range(0xAE, 0xFF + 1))
    order, chars, extra = list(printable), [chr(b) for b in printable], 0
    for b in range(256):
        if b not in printable:
            order.append(b)
            chars.append(chr(256 + extra))
            extra += 1
    return order, chars


BYTE_ORDER, BYTE_CHARS = byte_symbols()
BYTE_TO_CHAR = dict(zip(BYTE_ORDER, BYTE_CHARS))
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}
SPECIALS = ["<|startoftext|>", "<|endoftext|>"]
PATTERN = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)


def clean(text):
    """basic_clean + whitespace_clean + lower of OpenAI's simple_tokenizer, NFC instead of ftfy."""
    text = unicodedata.normalize("NFC", text)
    text = html.unescape(html.unescape(text)).strip()
    text = regex.sub(r"\s+", " ", text).strip()
    return text.lower()


def read_openai_merges(path):
    """Merges of an OpenAI-format file; a final empty line (the file's last newline) is ignored."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        lines = f.read().decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [tuple(line.split()) for line in lines[1 : N_OPENAI_MERGES + 1]]


def openai_vocab(merges):
    vocab = BYTE_CHARS + [c + "</w>" for c in BYTE_CHARS] + ["".join(m) for m in merges]
    vocab += SPECIALS
    return {s: i for i, s in enumerate(vocab)}


class RefTokenizer:
    def __init__(self, merges, vocab):
        self.ranks = {m: r for r, m in enumerate(merges)}
        self.vocab = vocab
        self.inverse = {i: s for s, i in vocab.items()}
        self.cache = {}

    def bpe(self, token):
        if token in self.cache:
            return self.cache[token]
        symbols = list(token[:-1]) + [token[-1] + "</w>"]
        while len(symbols) > 1:
            ranked = [(self.ranks.get(p, None), p) for p in zip(symbols, symbols[1:])]
            ranked = [(r, p) for r, p in ranked if r is not None]
            if not ranked:
                break
            _, (first, second) = min(ranked)
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self.cache[token] = symbols
        return symbols

    def encode(self, text):
        ids = []
        for token in PATTERN.findall(clean(text)):
            if token in SPECIALS:
                ids.append(self.vocab[token])
                continue
            mapped = "".join(BYTE_TO_CHAR[b] for b in token.encode("utf-8"))
            ids.extend(self.vocab[s] for s in self.bpe(mapped))
        return ids

    def decode(self, ids):
        text = "".join(self.inverse[i] for i in ids)
        raw = bytes(CHAR_TO_BYTE[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ")


# HTML entity names clhclip decodes: the HTML 4 set, apos, and the uppercase legacy names.
CLHCLIP_ENTITIES = sorted(set(html.entities.name2codepoint)
                          | {"apos", "AMP", "COPY", "GT", "LT", "QUOT", "REG"})


@contextlib.contextmanager
def clhclip_entity_table():
    """html.unescape limited to the names clhclip knows (numeric references are unchanged)."""
    table = {}
    for name in CLHCLIP_ENTITIES:
        table[name + ";"] = html.entities.html5[name + ";"]
        if name in html.entities.html5:
            table[name] = html.entities.html5[name]
    saved, html._html5 = html._html5, table
    try:
        yield
    finally:
        html._html5 = saved


# --------------------------------------------------------------------------- tiny vocabulary

TINY_CORPUS = """
a photo of a cat. a photo of a dog. a photo of the small cat in the scene.
there is a dog, a horse and a bird on the grass; the sky is blue.
it's a car. we're here. they've gone. i'm fine. you'll see. he'd know. don't stop.
the building, the road, the sidewalk and the streetlight at night!
café naïve résumé crème brûlée façade über straße ångström øre
αβγ ΟΔΟΣ σοφος λογος καλος. москва привет мир.
生活的真谛是 爱 猫 狗 東京 こんにちは 한국어 안녕
numbers 0 1 2 3 4 5 6 7 8 9 2025 1999 3.14 100%
emoji 😊 🐱 👍 ❤ ... !!! ??? --- *** ### $$$ @@ ((( ))) [[ ]] {{ }}
photography photographer photographic catalog cathedral dogma horseshoe skyline
""".strip()


def train_tiny_bpe(corpus, n_merges):
    """Greedy byte-level BPE; ties broken by the smallest pair, so the result is fixed."""
    words = {}
    for token in PATTERN.findall(clean(corpus)):
        mapped = "".join(BYTE_TO_CHAR[b] for b in token.encode("utf-8"))
        key = tuple(mapped[:-1]) + (mapped[-1] + "</w>",)
        words[key] = words.get(key, 0) + 1
    merges = []
    for _ in range(n_merges):
        counts = {}
        for word, freq in words.items():
            for pair in zip(word, word[1:]):
                counts[pair] = counts.get(pair, 0) + freq
        if not counts:
            break
        best = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merges.append(best)
        new_words = {}
        for word, freq in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + freq
        words = new_words
    return merges


TINY_CASES = [
    "a photo of a cat",
    "A Photo Of A CAT in the Scene",
    "photographic cathedral",
    "unseen wordz qqq",
    "it's we're they've I'M you'll he'd don't 's 'S",
    "it'ſ ſtop",
    "rock'n'roll ''s",
    "<|startoftext|>a photo<|endoftext|>",
    "a<|endoftext|>b !<|endoftext|> <|ENDOFTEXT|> <|ſtartoftext|>",
    "café CAFÉ cafe\u0301 naïve",
    "İstanbul İ",
    "ΟΔΟΣ ΣΟΦΟΣ Σ ΑΣ. Σα ΑΣ'Σ",
    "straße ẞ ﬁne",
    "生活的真谛是 東京",
    "\u1100\u1161\u11a8 한국어",
    "😊🐱 👍🏽 👨\u200d👩\u200d👧",
    "2025 3.14 ½ Ⅻ ٣",
    "!!! ??? ... -- ((( ))) #$%",
    "  leading and trailing   spaces  ",
    "tabs\tand\nnewlines\r\nand\u3000ideographic\u00a0nbsp\u2009thin\u0085nel",
    "a\x1cb \x1c\x1dx\x1e \x1f",
    "ctrl\x01\x7fchars\x0b",
    "&amp; &lt;b&gt; &quot;q&quot; &apos;s &nbsp;x",
    "&amp;lt;double&amp;gt; &amp;amp;amp;",
    "&#233; &#xE9; &#XE9 &#x1F60A; &#39;s &#0; &#13; &#128; &#150; &#11; &#55296; &#1114112;",
    "&#99999999999999999999; &#x; &# &#abc;",
    "&ampfoo &copy2025 &notit; &notin; &COPY; &Copy; &bogus; &eacute &EACUTE; & alone",
    "&hellip; &mdash; &ndash; &euro; &trade; &rsquo; &alpha;&Omega; &hearts;",
    "&aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa; &amp",
    "supercalifragilisticexpialidocious" * 3,
    "x" * 300,
    "\u0301 \u0308a e\u0301\u0323",
    "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ",
    "\u00b5 \u212a \u2126 \u0130\u0307",
    "a\u0345b !\u0345! \u1fb3 \u03b1\u0345",
    "",
    "   \t\n ",
]


def tiny_decode_cases(tok, golden_ids):
    """Id lists for decode goldens: some encodings plus arbitrary byte-level sequences."""
    rng = random.Random(7)
    cases = [ids for ids in golden_ids[:12] if ids]
    n = len(tok.vocab) - 2
    for _ in range(20):
        cases.append([rng.randrange(n) for _ in range(rng.randrange(1, 12))])
    cases.append([BYTE_ORDER.index(0xE7), BYTE_ORDER.index(0x8C) + 256])  # cut UTF-8 sequence
    cases.append([BYTE_ORDER.index(ord(c)) for c in "</w>"])  # literal "</w>" bytes
    # clh_tokenizer_decode skips SOT/EOT and treats trailing 0s as padding; NUL bytes cannot
    # be returned in a C string.
    specials = {tok.vocab[s] for s in SPECIALS}
    cases = [[i for i in ids if i not in specials] for ids in cases]
    return [ids for ids in cases if ids and ids[-1] != 0 and "\0" not in tok.decode(ids)]


def write_tsv(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for cols in rows:
            f.write("\t".join(cols) + "\n")


def ids_str(ids):
    return " ".join(str(i) for i in ids)


def open_clip_tokenizer(bpe_path):
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(bpe_path=bpe_path)


def make_tiny():
    os.makedirs(f"{OUT}/tiny_hf", exist_ok=True)
    merges = train_tiny_bpe(TINY_CORPUS, 400)
    text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    with open(f"{OUT}/tiny_merges.txt", "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    with open(f"{OUT}/tiny_merges.txt.gz", "wb") as f:
        f.write(gzip.compress(text.encode("utf-8"), mtime=0))
    merges = read_openai_merges(f"{OUT}/tiny_merges.txt")
    vocab = openai_vocab(merges)
    tok = RefTokenizer(merges, vocab)

    # HF copy: same strings, ids shuffled (clhclip must use vocab.json's ids).
    perm = list(range(len(vocab)))
    random.Random(3).shuffle(perm)
    hf_vocab = {s: perm[i] for s, i in vocab.items()}
    with open(f"{OUT}/tiny_hf/vocab.json", "w", encoding="utf-8") as f:
        json.dump(hf_vocab, f, ensure_ascii=False)
    with open(f"{OUT}/tiny_hf/merges.txt", "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    hf_tok = RefTokenizer(merges, hf_vocab)

    golden = [tok.encode(s) for s in TINY_CASES]
    write_tsv(f"{OUT}/tiny_golden.tsv",
              [(json.dumps(s, ensure_ascii=False), ids_str(ids)) for s, ids in zip(TINY_CASES, golden)])
    write_tsv(f"{OUT}/tiny_hf_golden.tsv",
              [(json.dumps(s, ensure_ascii=False), ids_str(hf_tok.encode(s))) for s in TINY_CASES])
    write_tsv(f"{OUT}/tiny_decode.tsv",
              [(ids_str(ids), json.dumps(tok.decode(ids), ensure_ascii=False))
               for ids in tiny_decode_cases(tok, golden)])
    print(f"tiny vocab: {len(merges)} merges, {len(vocab)} ids, {len(TINY_CASES)} golden cases")
    cross_check_tiny(merges, tok)


def cross_check_tiny(merges, tok):
    """open_clip on the tiny vocab must agree with the reference wherever its pipeline is the same."""
    import ftfy
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tiny.txt.gz")
        body = "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges)  # no final newline
        with open(path, "wb") as f:
            f.write(gzip.compress(body.encode("utf-8")))
        oc = open_clip_tokenizer(path)
    assert oc.sot_token_id == len(tok.vocab) - 2
    same = skipped = 0
    for s in TINY_CASES:
        differs_by_design = (ftfy.fix_text(s) != unicodedata.normalize("NFC", s)
                             or "<|" in s or any("\x1c" <= c <= "\x1f" for c in s))
        if differs_by_design:
            skipped += 1
            continue
        if oc.encode(s) != tok.encode(s):
            sys.exit(f"reference disagrees with open_clip on the tiny vocab: {s!r}")
        same += 1
    print(f"tiny vocab: reference == open_clip on {same} cases ({skipped} differ by design)")


# --------------------------------------------------------------------------- random strings

WORDS = """a an the photo picture image of in on at with and or cat dog horse bird car bus van
person people man woman child tree grass sky building road sidewalk wall floor ceiling window door
table chair bed sofa lamp mountain river sea water sand snow cloud field flower plant potted
kitchen bathroom bedroom street light sign traffic bicycle motorcycle airplane boat train truck
blurry bright dark small large big little old new good bad cropped close-up rendering painting
sculpture drawing sketch origami toy plastic jpeg low resolution pixelated clean dirty weird
scene there is are this that it its our my your their photography skateboard refrigerator""".split()
CONTRACTIONS = ["it's", "It'S", "we're", "they've", "I'm", "you'll", "he'd", "don't", "can't",
                "'s", "'re", "O'Neil", "rock'n'roll", "''s", "'ll", "'D", "'ve'"]
ACCENTED = ["café", "naïve", "résumé", "Ångström", "Ærø", "straße", "façade", "crème brûlée",
            "Zürich", "São Paulo", "Kraków", "Dvořák", "İstanbul", "ĞÜŞÖÇ", "Łódź", "Ñandú",
            "ΟΔΥΣΣΕΥΣ", "σοφός", "ΣΟΦΟΣ Σ", "Москва", "Привет", "ελληνικά", "עברית", "العربية",
            "हिन्दी", "ไทย", "Việt Nam", "Þórr", "œuvre"]
CJK = ["生活的真谛是", "東京", "猫", "犬と猫", "こんにちは", "カタカナ", "한국어", "안녕하세요", "中文字",
       "北京", "漢字"]
EMOJI = ["😊", "🐱", "🐶", "👍", "👍🏽", "❤️", "🔥", "🇯🇵", "👨\u200d👩\u200d👧", "🎉🎉", "☀", "✨"]
COMBINING = ["e\u0301", "a\u0308", "n\u0303", "o\u0302\u0323", "\u0301", "c\u0327", "u\u0308\u0301",
             "\u1100\u1161", "\u1112\u1161\u11ab", "i\u0307"]
SPACES = [" ", "  ", "   ", "\t", "\n", " \n ", "\u3000", "\u00a0", "\u2009", "\r\n", "\u2028"]
ENTITIES = ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;", "&#39;", "&#x27;", "&nbsp;", "&eacute;",
            "&copy;", "&amp;amp;", "&#233;", "&#xE9;", "&hellip;", "&mdash;", "&euro;", "&reg;",
            "&amp;lt;", "&frac12;", "&deg;", "&times;", "&alpha;", "&rarr;", "&hearts;"]
# Texts that ftfy.fix_text rewrites (curly quotes, width, ligatures, mojibake, uppercase
# entities): open_clip and clhclip differ on them by design.
FTFY_AFFECTED = ["it’s", "“quoted”", "ＡＢＣ", "ﬁsh", "cafÃ©",
                 "&EACUTE;", "&amp;amp;amp;"]
PUNCT = list("!\"#$%()*+,-./:;<=>?@[\\]^_`{|}~") + ["...", "!!", "?!", "--", "(", ")", "'", "\"\""]


def random_piece(rng):
    kind = rng.random()
    if kind < 0.40:
        w = rng.choice(WORDS)
        r = rng.random()
        return w.upper() if r < 0.1 else w.capitalize() if r < 0.25 else w
    if kind < 0.47:
        return rng.choice(CONTRACTIONS)
    if kind < 0.55:
        return rng.choice(PUNCT) * rng.choice([1, 1, 1, 2, 3])
    if kind < 0.61:
        return str(rng.choice([0, 7, 42, 1999, 2025, 3.14, 100000]))
    if kind < 0.65:
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(12, 40)))
    if kind < 0.72:
        return rng.choice(ACCENTED)
    if kind < 0.77:
        return rng.choice(CJK)
    if kind < 0.82:
        return rng.choice(EMOJI)
    if kind < 0.87:
        return rng.choice(COMBINING)
    if kind < 0.93:
        return rng.choice(ENTITIES)
    if kind < 0.94:
        return rng.choice(FTFY_AFFECTED)
    return rng.choice(SPACES)


def random_string(rng):
    parts = []
    for _ in range(rng.randint(1, 9)):
        parts.append(random_piece(rng))
        parts.append(rng.choice([" ", " ", " ", "", rng.choice(SPACES)]))
    return "".join(parts)


def make_openclip(n_strings):
    import ftfy
    import open_clip

    merges = read_openai_merges(REAL_VOCAB)
    ref = RefTokenizer(merges, openai_vocab(merges))
    oc_tok = open_clip.tokenizer._tokenizer
    rng = random.Random(20240601)
    seen, kept, excluded, too_long, empty = set(), [], [], 0, 0
    while len(seen) < n_strings:
        s = random_string(rng)
        if s in seen:
            continue
        seen.add(s)
        ids_ref = ref.encode(s)
        ids_oc = oc_tok.encode(s)  # what open_clip.tokenize wraps, before its truncation
        if len(ids_ref) + 2 > CONTEXT or len(ids_oc) + 2 > CONTEXT:
            too_long += 1
            continue
        oc = [49406] + ids_oc + [49407]
        padded = open_clip.tokenize([s])[0].tolist()
        assert padded == oc + [0] * (CONTEXT - len(oc))
        if not ids_ref:
            empty += 1
            continue
        full_ref = [49406] + ids_ref + [49407]
        if oc == full_ref:
            kept.append((json.dumps(s, ensure_ascii=False), ids_str(oc)))
        elif [49406] + ref.encode(ftfy.fix_text(s)) + [49407] == oc:
            excluded.append((json.dumps(s, ensure_ascii=False), ids_str(oc), ids_str(full_ref)))
        else:
            sys.exit(f"unexplained difference between open_clip and the reference: {s!r}")
    write_tsv(f"{OUT}/openclip_generated.tsv", kept)
    write_tsv(f"{OUT}/openclip_ftfy_excluded.tsv", excluded)
    print(f"open_clip: {n_strings} strings, {too_long} over 77 tokens, {empty} empty, "
          f"{len(kept)} equal to the reference, {len(excluded)} differ only through ftfy")


# --------------------------------------------------------------------------- fuzz


def stable_code_points():
    """Code points on which utf8proc (clhclip), unicodedata and the regex module agree."""
    lib = ctypes.CDLL(ctypes.util.find_library("utf8proc") or "libutf8proc.so.2")
    lib.utf8proc_category.restype = ctypes.c_int
    names = "Cn Lu Ll Lt Lm Lo Mn Mc Me Nd Nl No Pc Pd Ps Pe Pi Pf Po Sm Sc Sk So Zs Zl Zp Cc Cf Cs Co"
    names = names.split()
    ranges = [(0x1, 0x24F), (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF),
              (0x900, 0x97F), (0xE00, 0xE7F), (0x1100, 0x11FF), (0x1E00, 0x1FFF), (0x2000, 0x206F),
              (0x2100, 0x218F), (0x2460, 0x24FF), (0x3000, 0x30FF), (0x4E00, 0x4E80),
              (0xAC00, 0xAC40), (0xFB00, 0xFB4F), (0xFF00, 0xFFEF), (0x1F300, 0x1F6FF),
              (0x10400, 0x1044F), (0xE000, 0xE010), (0xFDD0, 0xFDEF), (0xFFFE, 0xFFFF)]
    pool = []
    for a, b in ranges:
        for c in range(a, b + 1):
            ch, cat = chr(c), names[lib.utf8proc_category(c)]
            if (unicodedata.category(ch) == cat
                    and bool(regex.match(r"\p{L}", ch)) == (cat[0] == "L")
                    and bool(regex.match(r"\p{N}", ch)) == (cat[0] == "N")):
                pool.append(c)
    return pool


FUZZ_SPECIAL = list("\u017f\u03a3\u03c3\u03c2'\u0130<|>&#;\u0345") + [
    "<|startoftext|>", "<|endoftext|>", "<|ENDOFTEXT|>", "'s", "'ll", "'\u017f", "'RE", " ", "  ",
    "\t", "\x1c", "\u0307", "\u0301", "\u00a0", "\u3000", "\u0085"]
FUZZ_WORDS = ["hello", "World", "\u039f\u0394\u039f\u03a3", "\u0130stanbul", "stra\u00dfe", "2025",
              "\u1f08\u0345", "\u0391\u0345\u03a3"]


def fuzz_piece(rng, pool):
    r = rng.random()
    if r < 0.35:
        return "".join(chr(rng.choice(pool)) for _ in range(rng.randint(1, 6)))
    if r < 0.55:
        return rng.choice(FUZZ_SPECIAL)
    if r < 0.65:
        return "&" + rng.choice(CLHCLIP_ENTITIES) + rng.choice([";", "", "x", ";;", " "])
    if r < 0.72:
        name = "".join(rng.choice("abcdefgxyzAMPLT") for _ in range(rng.randint(1, 8)))
        return "&" + name + rng.choice([";", ""])
    if r < 0.80:
        value = rng.choice([0, 1, 9, 13, 39, 65, 128, 150, 159, 160, 233, 0xD800, 0xFFFE, 0x10FFFF,
                            0x110000, 99999999999])
        return "&#" + rng.choice(["", "x", "X"]) + str(value) + rng.choice([";", "", "a"])
    if r < 0.85:
        return "&#x" + rng.choice(["e9", "E9;", "1F600;", "zz", "D800;", "110000"])
    if r < 0.90:
        return "&amp;" + rng.choice(["lt;", "amp;lt;", "eacute", "#233;", ""])
    return rng.choice(FUZZ_WORDS + ["x" * rng.randint(1, 50)])


def make_fuzz(n_strings):
    merges = read_openai_merges(REAL_VOCAB)
    ref = RefTokenizer(merges, openai_vocab(merges))
    pool = stable_code_points()
    rng = random.Random(99)
    rows = []
    with clhclip_entity_table():
        while len(rows) < n_strings:
            s = "".join(fuzz_piece(rng, pool) for _ in range(rng.randint(1, 10)))
            if "\0" in s:
                continue
            rows.append((json.dumps(s, ensure_ascii=False), ids_str(ref.encode(s))))
    write_tsv(f"{OUT}/reference_fuzz.tsv", rows)
    print(f"fuzz: {len(rows)} strings from {len(pool)} code points")


def main():
    with clhclip_entity_table():
        make_tiny()
    if not os.path.exists(REAL_VOCAB):
        sys.exit(f"{REAL_VOCAB} is missing: skipped the open_clip comparison")
    make_openclip(2600)
    make_fuzz(400)


if __name__ == "__main__":
    main()
