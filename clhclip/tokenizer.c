/* CLIP byte-level BPE tokenizer: OpenAI CLIP's simple_tokenizer.py (= open_clip's
 * SimpleTokenizer) without ftfy.
 *
 * Pipeline of clh_tokenizer_encode, in OpenAI's order:
 *   1. UTF-8 check, then NFC (utf8proc; the one ftfy step kept, see below).
 *   2. html.unescape twice (Python semantics; entity coverage is listed at html_entities).
 *   3. Runs of regex-module \s collapsed to one space, then Python str.strip().
 *   4. Python str.lower(): simple lowercase mapping, U+0130 -> "i\u0307", final sigma.
 *   5. Pre-tokenization as the regex
 *        <\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+
 *      with IGNORECASE (regex module): alternatives are tried in order at each position;
 *      U+0345 matches no alternative under IGNORECASE and is skipped like whitespace.
 *   6. Byte-level BPE of each piece with "</w>" on its last symbol; a per-word cache.
 *
 * Not implemented: ftfy.fix_text (mojibake repair, quote uncurling, width folding, ...);
 * open_clip applies it, so texts that ftfy rewrites can tokenize differently.
 * Character properties come from utf8proc 2.8 (Unicode 15.0); Python 3.11 and its regex
 * module use other Unicode versions, which only matters for code points assigned since.
 *
 * Internally a symbol is a byte string plus an end-of-word flag. That is equivalent to
 * OpenAI's strings of byte-mapped characters because a pre-token can never contain "</w>"
 * ('w' is a letter, '<' and '/' are not). BPE works on symbol indices; merges live in an
 * open-addressing hash table keyed by the symbol pair.
 *
 * A tokenizer is not thread-safe: encoding fills its word cache. */
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <cjson/cJSON.h>
#include <utf8proc.h>
#include <zlib.h>

#include "internal.h"

/* OpenAI keeps lines 1..49152-256-2 of bpe_simple_vocab_16e6.txt(.gz). */
#define OPENAI_MERGES   (49152 - 256 - 2)
#define NO_SYMBOL       UINT32_MAX
#define MAX_VOCAB_ID    (1 << 24)
#define CACHE_MAX_BYTES (8u << 20)
#define SOT_TEXT        "<|startoftext|>"
#define EOT_TEXT        "<|endoftext|>"

typedef struct tok_symbol {
    uint32_t off, len; /* bytes in tok->bytes */
    int32_t id;        /* vocabulary id; -1 when the string has none */
    uint8_t eow;       /* ends a word ("</w>") */
} tok_symbol;

typedef struct merge_slot {
    uint32_t first, second; /* symbol pair; first == NO_SYMBOL marks an empty slot */
    uint32_t result;        /* symbol of the concatenation */
    int32_t rank;           /* merge priority: lower merges first */
} merge_slot;

typedef struct cache_slot {
    uint32_t hash, key_off, key_len; /* key_len == 0 marks an empty slot */
    uint32_t ids_off, ids_len;
} cache_slot;

typedef struct id_list {
    int32_t *v;
    size_t n, cap;
} id_list;

struct clh_tokenizer {
    uint8_t *bytes; /* symbol strings */
    size_t n_bytes, cap_bytes;
    tok_symbol *syms;
    uint32_t n_syms, cap_syms;
    uint32_t *sym_slots; /* symbol index + 1; 0 = empty */
    uint32_t sym_slot_cap;
    uint32_t base[256][2]; /* symbol of byte b, without / with "</w>" */

    int32_t *id_sym; /* vocabulary id -> symbol (-1: unused id) */
    int32_t vocab_size, sot, eot;

    merge_slot *merges;
    uint32_t merge_cap, n_merges;

    cache_slot *cache;
    uint32_t cache_cap, cache_count;
    uint8_t *cache_bytes;
    size_t cache_n_bytes, cache_cap_bytes;
    int32_t *cache_ids;
    size_t cache_n_ids, cache_cap_ids;

    uint32_t *word; /* BPE scratch */
    size_t word_cap;
    uint8_t *scratch; /* symbol-string scratch */
    size_t scratch_cap;
};

/* ------------------------------------------------------------------ small helpers */

/* Grow *p (elements of `elem` bytes) to hold at least `need`; 0 on success. */
static int grow(void **p, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap)
        return 0;
    size_t n = *cap ? *cap : 16;
    while (n < need)
        n *= 2;
    void *q = realloc(*p, n * elem);
    if (!q)
        return -1;
    *p = q;
    *cap = n;
    return 0;
}

static clh_status oom(const char *what) {
    return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "tokenizer: out of host memory (%s)", what);
}

static clh_status ids_push(id_list *l, int32_t id) {
    if (grow((void **)&l->v, &l->cap, l->n + 1, sizeof *l->v))
        return oom("token ids");
    l->v[l->n++] = id;
    return CLH_OK;
}

static uint32_t hash_bytes(const uint8_t *b, size_t n, uint32_t seed) {
    uint32_t h = 2166136261u ^ seed; /* FNV-1a */
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 16777619u;
    }
    return h ^ (h >> 15);
}

static uint32_t hash_pair(uint32_t a, uint32_t b) {
    uint32_t h = a * 0x9E3779B1u ^ (b + 0x7F4A7C15u) * 0x85EBCA77u;
    return h ^ (h >> 16);
}

static uint32_t pow2_at_least(size_t n) {
    uint32_t c = 16;
    while (c < n)
        c *= 2;
    return c;
}

/* ------------------------------------------------------------------ UTF-8 */

/* Length of the valid UTF-8 sequence at s[0..n) and its code point, or 0 when it is not
 * valid (overlong forms, surrogates and values above U+10FFFF are invalid). */
static size_t utf8_next(const uint8_t *s, size_t n, uint32_t *cp) {
    uint8_t b = s[0];
    if (b < 0x80) {
        *cp = b;
        return 1;
    }
    size_t len;
    uint32_t c, min;
    if (b >= 0xC2 && b <= 0xDF) {
        len = 2, c = b & 0x1F, min = 0x80;
    } else if (b >= 0xE0 && b <= 0xEF) {
        len = 3, c = b & 0x0F, min = 0x800;
    } else if (b >= 0xF0 && b <= 0xF4) {
        len = 4, c = b & 0x07, min = 0x10000;
    } else {
        return 0;
    }
    if (n < len)
        return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        c = (c << 6) | (s[i] & 0x3F);
    }
    if (c < min || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF))
        return 0;
    *cp = c;
    return len;
}

/* Offset of the first invalid byte, or SIZE_MAX when s[0..n) is valid UTF-8. */
static size_t utf8_invalid_at(const uint8_t *s, size_t n) {
    size_t i = 0;
    uint32_t cp;
    while (i < n) {
        if (s[i] < 0x80) {
            i++;
            continue;
        }
        size_t len = utf8_next(s + i, n - i, &cp);
        if (!len)
            return i;
        i += len;
    }
    return SIZE_MAX;
}

static size_t utf8_put(uint32_t c, uint8_t *out) {
    if (c < 0x80) {
        out[0] = (uint8_t)c;
        return 1;
    }
    if (c < 0x800) {
        out[0] = (uint8_t)(0xC0 | (c >> 6));
        out[1] = (uint8_t)(0x80 | (c & 0x3F));
        return 2;
    }
    if (c < 0x10000) {
        out[0] = (uint8_t)(0xE0 | (c >> 12));
        out[1] = (uint8_t)(0x80 | ((c >> 6) & 0x3F));
        out[2] = (uint8_t)(0x80 | (c & 0x3F));
        return 3;
    }
    out[0] = (uint8_t)(0xF0 | (c >> 18));
    out[1] = (uint8_t)(0x80 | ((c >> 12) & 0x3F));
    out[2] = (uint8_t)(0x80 | ((c >> 6) & 0x3F));
    out[3] = (uint8_t)(0x80 | (c & 0x3F));
    return 4;
}

/* ------------------------------------------------------------------ byte <-> character map
 * OpenAI's bytes_to_unicode: printable Latin-1 bytes map to themselves, the other 68 bytes
 * to U+0100.. in increasing byte order. Vocabulary ids 0..255 follow the same order. */

static int byte_is_printable(int b) {
    return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
}

/* byte_order[i]: the byte of vocabulary id i; char_byte[c]: byte of mapped character c. */
static void byte_tables(uint8_t byte_order[256], int16_t char_byte[0x144]) {
    int n = 0, extra = 0;
    for (int c = 0; c < 0x144; c++)
        char_byte[c] = -1;
    for (int b = 0; b < 256; b++)
        if (byte_is_printable(b)) {
            byte_order[n++] = (uint8_t)b;
            char_byte[b] = (int16_t)b;
        }
    for (int b = 0; b < 256; b++)
        if (!byte_is_printable(b)) {
            byte_order[n++] = (uint8_t)b;
            char_byte[256 + extra++] = (int16_t)b;
        }
}

/* ------------------------------------------------------------------ symbol table */

static uint32_t find_symbol(const clh_tokenizer *tok, const uint8_t *b, size_t n, int eow) {
    uint32_t mask = tok->sym_slot_cap - 1;
    for (uint32_t i = hash_bytes(b, n, (uint32_t)eow) & mask;; i = (i + 1) & mask) {
        uint32_t s = tok->sym_slots[i];
        if (!s)
            return NO_SYMBOL;
        const tok_symbol *sym = &tok->syms[s - 1];
        if (sym->len == n && sym->eow == eow && !memcmp(tok->bytes + sym->off, b, n))
            return s - 1;
    }
}

static void slot_symbol(clh_tokenizer *tok, uint32_t index) {
    const tok_symbol *sym = &tok->syms[index];
    uint32_t mask = tok->sym_slot_cap - 1;
    uint32_t i = hash_bytes(tok->bytes + sym->off, sym->len, sym->eow) & mask;
    while (tok->sym_slots[i])
        i = (i + 1) & mask;
    tok->sym_slots[i] = index + 1;
}

static clh_status grow_symbol_slots(clh_tokenizer *tok) {
    uint32_t cap = pow2_at_least(2 * ((size_t)tok->n_syms + 1));
    if (cap <= tok->sym_slot_cap)
        return CLH_OK;
    uint32_t *slots = calloc(cap, sizeof *slots);
    if (!slots)
        return oom("symbol table");
    free(tok->sym_slots);
    tok->sym_slots = slots;
    tok->sym_slot_cap = cap;
    for (uint32_t s = 0; s < tok->n_syms; s++)
        slot_symbol(tok, s);
    return CLH_OK;
}

/* Index of the symbol (b[0..n), eow), created (without vocabulary id) when new.
 * b must not point into tok->bytes (it may move). */
static clh_status intern(clh_tokenizer *tok, const uint8_t *b, size_t n, int eow, uint32_t *out) {
    uint32_t s = find_symbol(tok, b, n, eow);
    if (s != NO_SYMBOL) {
        *out = s;
        return CLH_OK;
    }
    if (tok->n_bytes + n > UINT32_MAX || tok->n_syms >= UINT32_MAX / 4)
        return clh_fail(NULL, CLH_ERR_FORMAT, "tokenizer: vocabulary too large");
    size_t cap_syms = tok->cap_syms;
    if (grow((void **)&tok->bytes, &tok->cap_bytes, tok->n_bytes + n, 1) ||
        grow((void **)&tok->syms, &cap_syms, (size_t)tok->n_syms + 1, sizeof *tok->syms))
        return oom("symbols");
    tok->cap_syms = (uint32_t)cap_syms;
    memcpy(tok->bytes + tok->n_bytes, b, n);
    tok->syms[tok->n_syms] = (tok_symbol){(uint32_t)tok->n_bytes, (uint32_t)n, -1, (uint8_t)eow};
    tok->n_bytes += n;
    *out = tok->n_syms++;
    if (2 * (size_t)tok->n_syms > tok->sym_slot_cap)
        return grow_symbol_slots(tok);
    slot_symbol(tok, *out);
    return CLH_OK;
}

/* Give symbol s vocabulary id `id`. As with Python's dicts, a later id for the same
 * string wins for encoding while every id keeps decoding to its string. */
static void assign_id(clh_tokenizer *tok, uint32_t s, int32_t id) {
    tok->syms[s].id = id;
    tok->id_sym[id] = (int32_t)s;
}

static clh_status alloc_ids(clh_tokenizer *tok, size_t vocab_size) {
    tok->id_sym = malloc(vocab_size * sizeof *tok->id_sym);
    if (!tok->id_sym)
        return oom("vocabulary");
    for (size_t i = 0; i < vocab_size; i++)
        tok->id_sym[i] = -1;
    tok->vocab_size = (int32_t)vocab_size;
    return CLH_OK;
}

/* ------------------------------------------------------------------ merge table */

static const merge_slot *find_merge(const clh_tokenizer *tok, uint32_t a, uint32_t b) {
    uint32_t mask = tok->merge_cap - 1;
    for (uint32_t i = hash_pair(a, b) & mask;; i = (i + 1) & mask) {
        const merge_slot *m = &tok->merges[i];
        if (m->first == NO_SYMBOL)
            return NULL;
        if (m->first == a && m->second == b)
            return m;
    }
}

static clh_status alloc_merges(clh_tokenizer *tok, size_t expected) {
    uint32_t cap = pow2_at_least(2 * expected + 16);
    merge_slot *m = malloc(cap * sizeof *m);
    if (!m)
        return oom("merge table");
    for (uint32_t i = 0; i < cap; i++)
        m[i].first = NO_SYMBOL;
    free(tok->merges);
    tok->merges = m;
    tok->merge_cap = cap;
    tok->n_merges = 0;
    return CLH_OK;
}

static void put_merge(clh_tokenizer *tok, uint32_t a, uint32_t b, uint32_t result, int32_t rank) {
    uint32_t mask = tok->merge_cap - 1;
    uint32_t i = hash_pair(a, b) & mask;
    while (tok->merges[i].first != NO_SYMBOL &&
           !(tok->merges[i].first == a && tok->merges[i].second == b))
        i = (i + 1) & mask;
    if (tok->merges[i].first == NO_SYMBOL)
        tok->n_merges++;
    /* A repeated pair takes its later rank, like Python's dict(zip(merges, range(n))). */
    tok->merges[i] = (merge_slot){a, b, result, rank};
}

static clh_status add_merge(clh_tokenizer *tok, uint32_t a, uint32_t b, int32_t rank,
                            uint32_t *result) {
    if (2 * ((size_t)tok->n_merges + 1) > tok->merge_cap) {
        merge_slot *old = tok->merges;
        uint32_t old_cap = tok->merge_cap;
        tok->merges = NULL;
        if (alloc_merges(tok, 2 * (size_t)old_cap) != CLH_OK) {
            tok->merges = old;
            return oom("merge table");
        }
        for (uint32_t i = 0; i < old_cap; i++)
            if (old[i].first != NO_SYMBOL)
                put_merge(tok, old[i].first, old[i].second, old[i].result, old[i].rank);
        free(old);
    }
    const tok_symbol *sa = &tok->syms[a], *sb = &tok->syms[b];
    size_t n = (size_t)sa->len + sb->len;
    if (grow((void **)&tok->scratch, &tok->scratch_cap, n, 1))
        return oom("merge");
    memcpy(tok->scratch, tok->bytes + sa->off, sa->len);
    memcpy(tok->scratch + sa->len, tok->bytes + sb->off, sb->len);
    CLH_TRY(intern(tok, tok->scratch, n, tok->syms[b].eow, result));
    put_merge(tok, a, b, *result, rank);
    return CLH_OK;
}

/* ------------------------------------------------------------------ vocabulary files */

/* Read a file, gunzipping it when it is gzip (zlib reads plain files transparently). */
static clh_status read_maybe_gz(const char *path, char **data, size_t *size) {
    *data = NULL;
    *size = 0;
    errno = 0;
    gzFile f = gzopen(path, "rb");
    if (!f)
        return clh_fail(NULL, CLH_ERR_IO, "cannot open '%s': %s", path,
                        errno ? strerror(errno) : "out of memory");
    size_t cap = 0, len = 0;
    char *buf = NULL;
    clh_status st = CLH_OK;
    for (;;) {
        if (grow((void **)&buf, &cap, len + (1 << 18) + 1, 1)) {
            st = oom(path);
            break;
        }
        size_t want = cap - len - 1;
        int got = gzread(f, buf + len, (unsigned)(want > INT_MAX ? INT_MAX : want));
        int err = Z_OK;
        const char *msg = gzerror(f, &err);
        if (err == Z_BUF_ERROR) { /* zlib's "unexpected end of file" inside a gzip stream */
            st = clh_fail(NULL, CLH_ERR_FORMAT, "'%s' is truncated: %s", path, msg);
            break;
        }
        if (got < 0 || err != Z_OK) {
            st = err == Z_ERRNO
                     ? clh_fail(NULL, CLH_ERR_IO, "cannot read '%s': %s", path, strerror(errno))
                     : clh_fail(NULL, CLH_ERR_FORMAT, "'%s' is corrupt: %s", path, msg);
            break;
        }
        if (got == 0)
            break;
        len += (size_t)got;
    }
    gzclose(f);
    if (st != CLH_OK) {
        free(buf);
        return st;
    }
    buf[len] = '\0';
    *data = buf;
    *size = len;
    return CLH_OK;
}

static int is_ascii_space(uint8_t c) {
    return c == ' ' || c == '\t' || c == '\r' || c == '\v' || c == '\f';
}

/* Turn one vocabulary string (byte-mapped characters, maybe ending in "</w>") into a
 * symbol. The text is valid UTF-8 here. */
static clh_status symbol_from_text(clh_tokenizer *tok, const char *text, size_t n,
                                   const int16_t char_byte[0x144], uint32_t *out, const char *path,
                                   size_t line) {
    int eow = n > 4 && !memcmp(text + n - 4, "</w>", 4);
    size_t len = n - (eow ? 4 : 0), nb = 0;
    if (grow((void **)&tok->scratch, &tok->scratch_cap, len + 1, 1))
        return oom(path);
    for (size_t i = 0; i < len;) {
        uint32_t c = 0;
        size_t k = utf8_next((const uint8_t *)text + i, len - i, &c);
        if (!k || c >= 0x144 || char_byte[c] < 0) {
            char where[32] = "";
            if (line)
                snprintf(where, sizeof where, " line %zu", line);
            return clh_fail(NULL, CLH_ERR_FORMAT,
                            "'%s'%s: \"%.*s\" holds a character outside the 256 byte symbols", path,
                            where, (int)(n > 60 ? 60 : n), text);
        }
        tok->scratch[nb++] = (uint8_t)char_byte[c];
        i += k;
    }
    return intern(tok, tok->scratch, nb, eow, out);
}

static clh_status intern_base_symbols(clh_tokenizer *tok) {
    for (int b = 0; b < 256; b++)
        for (int eow = 0; eow < 2; eow++) {
            uint8_t byte = (uint8_t)b;
            CLH_TRY(intern(tok, &byte, 1, eow, &tok->base[b][eow]));
        }
    return CLH_OK;
}

static clh_status check_utf8_file(const char *path, const char *data, size_t size) {
    size_t bad = utf8_invalid_at((const uint8_t *)data, size);
    if (bad != SIZE_MAX)
        return clh_fail(NULL, CLH_ERR_FORMAT, "'%s' is not UTF-8 text (byte %zu)", path, bad);
    return CLH_OK;
}

/* Parse the two symbols of a merge line; *blank is set for a line holding only spaces. */
static clh_status parse_merge_line(clh_tokenizer *tok, const char *path, size_t lineno,
                                   const char *line, size_t n, const int16_t char_byte[0x144],
                                   uint32_t *a, uint32_t *b, int *blank) {
    const char *part[3];
    size_t plen[3], count = 0;
    for (size_t i = 0; i < n;) {
        while (i < n && is_ascii_space((uint8_t)line[i]))
            i++;
        if (i == n)
            break;
        size_t start = i;
        while (i < n && !is_ascii_space((uint8_t)line[i]))
            i++;
        if (count < 3) {
            part[count] = line + start;
            plen[count] = i - start;
        }
        count++;
    }
    *blank = count == 0;
    if (count == 0)
        return CLH_OK;
    if (count != 2)
        return clh_fail(NULL, CLH_ERR_FORMAT,
                        "'%s' line %zu: a merge needs two symbols, found %zu: \"%.*s\"", path,
                        lineno, count, (int)(n > 80 ? 80 : n), line);
    CLH_TRY(symbol_from_text(tok, part[0], plen[0], char_byte, a, path, lineno));
    CLH_TRY(symbol_from_text(tok, part[1], plen[1], char_byte, b, path, lineno));
    if (tok->syms[*a].eow)
        return clh_fail(NULL, CLH_ERR_FORMAT,
                        "'%s' line %zu: \"%.*s\" ends a word but is the first symbol of a merge",
                        path, lineno, (int)plen[0], part[0]);
    return CLH_OK;
}

/* Next line of [*p, end) into line/len (without the newline); 0 at the end. */
static int next_line(const char **p, const char *end, const char **line, size_t *len) {
    if (*p >= end)
        return 0;
    const char *nl = memchr(*p, '\n', (size_t)(end - *p));
    *line = *p;
    *len = (size_t)((nl ? nl : end) - *p);
    *p = nl ? nl + 1 : end;
    return 1;
}

static clh_status add_special_ids(clh_tokenizer *tok, int32_t first_id) {
    uint32_t s;
    CLH_TRY(intern(tok, (const uint8_t *)SOT_TEXT, strlen(SOT_TEXT), 0, &s));
    assign_id(tok, s, first_id);
    CLH_TRY(intern(tok, (const uint8_t *)EOT_TEXT, strlen(EOT_TEXT), 0, &s));
    assign_id(tok, s, first_id + 1);
    return CLH_OK;
}

/* OpenAI format: header line, then merges; the vocabulary is built from them as
 * simple_tokenizer.py does. A final empty line (the file's last newline) is ignored;
 * Python would turn it into an empty merge when the file has fewer than 48895 lines. */
static clh_status parse_openai(clh_tokenizer *tok, const char *path, const char *data,
                               size_t size) {
    if (size == 0)
        return clh_fail(NULL, CLH_ERR_FORMAT, "'%s' is empty", path);
    CLH_TRY(check_utf8_file(path, data, size));
    uint8_t byte_order[256];
    int16_t char_byte[0x144];
    byte_tables(byte_order, char_byte);

    const char *p = data, *end = data + size, *line;
    size_t len, n_lines = 0;
    next_line(&p, end, &line, &len); /* header */
    for (const char *q = p; q < end && n_lines < OPENAI_MERGES; n_lines++) {
        const char *nl = memchr(q, '\n', (size_t)(end - q));
        q = nl ? nl + 1 : end;
    }
    CLH_TRY(alloc_ids(tok, 512 + n_lines + 2));
    CLH_TRY(alloc_merges(tok, n_lines));
    for (int i = 0; i < 256; i++) {
        assign_id(tok, tok->base[byte_order[i]][0], i);
        assign_id(tok, tok->base[byte_order[i]][1], 256 + i);
    }
    for (size_t i = 0; i < n_lines && next_line(&p, end, &line, &len); i++) {
        uint32_t a, b, r;
        int blank;
        CLH_TRY(parse_merge_line(tok, path, i + 2, line, len, char_byte, &a, &b, &blank));
        if (blank)
            return clh_fail(NULL, CLH_ERR_FORMAT, "'%s' line %zu is empty", path, i + 2);
        CLH_TRY(add_merge(tok, a, b, (int32_t)i, &r));
        assign_id(tok, r, (int32_t)(512 + i));
    }
    CLH_TRY(add_special_ids(tok, (int32_t)(512 + n_lines)));
    tok->sot = (int32_t)(512 + n_lines);
    tok->eot = tok->sot + 1;
    return CLH_OK;
}

static clh_status load_openai(clh_tokenizer *tok, const char *path) {
    char *data;
    size_t size;
    CLH_TRY(read_maybe_gz(path, &data, &size));
    clh_status st = parse_openai(tok, path, data, size);
    free(data);
    return st;
}

static clh_status vocab_entry_id(const cJSON *item, const char *path, int32_t *id) {
    double v = cJSON_IsNumber(item) ? item->valuedouble : -1.0;
    if (!(v >= 0 && v < MAX_VOCAB_ID && v == (double)(int32_t)v))
        return clh_fail(NULL, CLH_ERR_FORMAT,
                        "'%s': entry \"%.60s\" needs an integer id in [0, %d)", path, item->string,
                        MAX_VOCAB_ID);
    *id = (int32_t)v;
    return CLH_OK;
}

static clh_status parse_hf_vocab(clh_tokenizer *tok, const char *path, const cJSON *root) {
    int16_t char_byte[0x144];
    uint8_t byte_order[256];
    byte_tables(byte_order, char_byte);
    if (!cJSON_IsObject(root) || !root->child)
        return clh_fail(NULL, CLH_ERR_FORMAT, "'%s' is not a non-empty JSON object", path);
    int32_t max_id = -1, id;
    for (const cJSON *item = root->child; item; item = item->next) {
        CLH_TRY(vocab_entry_id(item, path, &id));
        if (id > max_id)
            max_id = id;
    }
    CLH_TRY(alloc_ids(tok, (size_t)max_id + 1));
    for (const cJSON *item = root->child; item; item = item->next) {
        uint32_t s;
        CLH_TRY(vocab_entry_id(item, path, &id));
        CLH_TRY(symbol_from_text(tok, item->string, strlen(item->string), char_byte, &s, path, 0));
        assign_id(tok, s, id);
    }
    const char *names[2] = {SOT_TEXT, EOT_TEXT};
    int32_t *ids[2] = {&tok->sot, &tok->eot};
    for (int i = 0; i < 2; i++) {
        uint32_t s = find_symbol(tok, (const uint8_t *)names[i], strlen(names[i]), 0);
        if (s == NO_SYMBOL || tok->syms[s].id < 0)
            return clh_fail(NULL, CLH_ERR_FORMAT, "'%s' has no %s entry", path, names[i]);
        *ids[i] = tok->syms[s].id;
    }
    return CLH_OK;
}

/* HF merges.txt: "#version: ..." header, then one merge per line; all merges are used. */
static clh_status parse_hf_merges(clh_tokenizer *tok, const char *path, const char *data,
                                  size_t size) {
    CLH_TRY(check_utf8_file(path, data, size));
    int16_t char_byte[0x144];
    uint8_t byte_order[256];
    byte_tables(byte_order, char_byte);
    size_t n_lines = 1;
    for (size_t i = 0; i < size; i++)
        n_lines += data[i] == '\n';
    CLH_TRY(alloc_merges(tok, n_lines));
    const char *p = data, *end = data + size, *line;
    size_t len, lineno = 0;
    int32_t rank = 0;
    while (next_line(&p, end, &line, &len)) {
        lineno++;
        if (lineno == 1 && len >= 8 && !memcmp(line, "#version", 8))
            continue;
        uint32_t a, b, r;
        int blank;
        CLH_TRY(parse_merge_line(tok, path, lineno, line, len, char_byte, &a, &b, &blank));
        if (!blank)
            CLH_TRY(add_merge(tok, a, b, rank++, &r));
    }
    return CLH_OK;
}

static clh_status load_hf(clh_tokenizer *tok, const char *vocab_path, const char *merges_path) {
    char *data;
    size_t size;
    CLH_TRY(clh_read_file(vocab_path, &data, &size));
    cJSON *root = cJSON_ParseWithLength(data, size);
    free(data);
    if (!root)
        return clh_fail(NULL, CLH_ERR_FORMAT, "'%s' is not valid JSON", vocab_path);
    clh_status st = parse_hf_vocab(tok, vocab_path, root);
    cJSON_Delete(root);
    CLH_TRY(st);
    CLH_TRY(read_maybe_gz(merges_path, &data, &size));
    st = parse_hf_merges(tok, merges_path, data, size);
    free(data);
    return st;
}

static int is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

static int exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && !strcmp(s + n - k, suffix);
}

static clh_status load_path(clh_tokenizer *tok, const char *path) {
    char a[4096], b[4096];
    if (!exists(path))
        return clh_fail(NULL, CLH_ERR_IO, "cannot open tokenizer vocabulary '%s': %s", path,
                        strerror(errno));
    if (strlen(path) > sizeof a - 32)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "tokenizer path too long: '%.80s...'",
                        path);
    if (is_dir(path)) {
        snprintf(a, sizeof a, "%s/vocab.json", path);
        snprintf(b, sizeof b, "%s/merges.txt", path);
        if (exists(a))
            return load_hf(tok, a, b);
        snprintf(a, sizeof a, "%s/bpe_simple_vocab_16e6.txt.gz", path);
        if (exists(a))
            return load_openai(tok, a);
        return clh_fail(NULL, CLH_ERR_IO,
                        "directory '%s' holds neither vocab.json + merges.txt nor "
                        "bpe_simple_vocab_16e6.txt.gz",
                        path);
    }
    if (ends_with(path, ".json")) {
        const char *slash = strrchr(path, '/');
        int dir_len = slash ? (int)(slash - path) : 1;
        snprintf(b, sizeof b, "%.*s/merges.txt", dir_len, slash ? path : ".");
        return load_hf(tok, path, b);
    }
    return load_openai(tok, path);
}

clh_status clh_tokenizer_load(const char *path, clh_tokenizer **out) {
    if (!out)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_tokenizer_load: out is NULL");
    *out = NULL;
    if (!path)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_tokenizer_load: path is NULL");
    clh_tokenizer *tok = calloc(1, sizeof *tok);
    if (!tok)
        return oom("tokenizer");
    clh_status st = grow_symbol_slots(tok);
    if (st == CLH_OK)
        st = intern_base_symbols(tok);
    if (st == CLH_OK)
        st = load_path(tok, path);
    if (st != CLH_OK) {
        clh_tokenizer_free(tok);
        return st;
    }
    *out = tok;
    return CLH_OK;
}

void clh_tokenizer_free(clh_tokenizer *tok) {
    if (!tok)
        return;
    free(tok->bytes);
    free(tok->syms);
    free(tok->sym_slots);
    free(tok->id_sym);
    free(tok->merges);
    free(tok->cache);
    free(tok->cache_bytes);
    free(tok->cache_ids);
    free(tok->word);
    free(tok->scratch);
    free(tok);
}

int32_t clh_tokenizer_sot(const clh_tokenizer *tok) {
    return tok ? tok->sot : -1;
}

int32_t clh_tokenizer_eot(const clh_tokenizer *tok) {
    return tok ? tok->eot : -1;
}

int32_t clh_tokenizer_vocab_size(const clh_tokenizer *tok) {
    return tok ? tok->vocab_size : 0;
}

/* ------------------------------------------------------------------ HTML unescape
 * Python's html.unescape. Numeric references (&#NN; &#xHH;, ';' optional) follow it
 * exactly, including its Windows-1252 fix-ups and dropped code points. Named references:
 * the 252 HTML 4 entities (values as in HTML5, so lang/rang are U+27E8/U+27E9), &apos;,
 * and the uppercase legacy names AMP COPY GT LT QUOT REG. Those include all 106 legacy
 * names that HTML5 (and Python) also accept without ';', with Python's longest-prefix
 * rule ("&ampfoo" -> "&foo"). Other HTML5 names ("&NewLine;", "&check;", ...) stay as
 * written, where Python would replace them. */

typedef struct html_entity {
    const char *name;
    uint32_t cp;
    uint8_t legacy; /* also valid without ';' */
} html_entity;

/* Sorted by strcmp for bsearch. */
static const html_entity html_entities[] = {
    {"AElig", 0xC6, 1},     {"AMP", 0x26, 1},      {"Aacute", 0xC1, 1},    {"Acirc", 0xC2, 1},
    {"Agrave", 0xC0, 1},    {"Alpha", 0x391, 0},   {"Aring", 0xC5, 1},     {"Atilde", 0xC3, 1},
    {"Auml", 0xC4, 1},      {"Beta", 0x392, 0},    {"COPY", 0xA9, 1},      {"Ccedil", 0xC7, 1},
    {"Chi", 0x3A7, 0},      {"Dagger", 0x2021, 0}, {"Delta", 0x394, 0},    {"ETH", 0xD0, 1},
    {"Eacute", 0xC9, 1},    {"Ecirc", 0xCA, 1},    {"Egrave", 0xC8, 1},    {"Epsilon", 0x395, 0},
    {"Eta", 0x397, 0},      {"Euml", 0xCB, 1},     {"GT", 0x3E, 1},        {"Gamma", 0x393, 0},
    {"Iacute", 0xCD, 1},    {"Icirc", 0xCE, 1},    {"Igrave", 0xCC, 1},    {"Iota", 0x399, 0},
    {"Iuml", 0xCF, 1},      {"Kappa", 0x39A, 0},   {"LT", 0x3C, 1},        {"Lambda", 0x39B, 0},
    {"Mu", 0x39C, 0},       {"Ntilde", 0xD1, 1},   {"Nu", 0x39D, 0},       {"OElig", 0x152, 0},
    {"Oacute", 0xD3, 1},    {"Ocirc", 0xD4, 1},    {"Ograve", 0xD2, 1},    {"Omega", 0x3A9, 0},
    {"Omicron", 0x39F, 0},  {"Oslash", 0xD8, 1},   {"Otilde", 0xD5, 1},    {"Ouml", 0xD6, 1},
    {"Phi", 0x3A6, 0},      {"Pi", 0x3A0, 0},      {"Prime", 0x2033, 0},   {"Psi", 0x3A8, 0},
    {"QUOT", 0x22, 1},      {"REG", 0xAE, 1},      {"Rho", 0x3A1, 0},      {"Scaron", 0x160, 0},
    {"Sigma", 0x3A3, 0},    {"THORN", 0xDE, 1},    {"Tau", 0x3A4, 0},      {"Theta", 0x398, 0},
    {"Uacute", 0xDA, 1},    {"Ucirc", 0xDB, 1},    {"Ugrave", 0xD9, 1},    {"Upsilon", 0x3A5, 0},
    {"Uuml", 0xDC, 1},      {"Xi", 0x39E, 0},      {"Yacute", 0xDD, 1},    {"Yuml", 0x178, 0},
    {"Zeta", 0x396, 0},     {"aacute", 0xE1, 1},   {"acirc", 0xE2, 1},     {"acute", 0xB4, 1},
    {"aelig", 0xE6, 1},     {"agrave", 0xE0, 1},   {"alefsym", 0x2135, 0}, {"alpha", 0x3B1, 0},
    {"amp", 0x26, 1},       {"and", 0x2227, 0},    {"ang", 0x2220, 0},     {"apos", 0x27, 0},
    {"aring", 0xE5, 1},     {"asymp", 0x2248, 0},  {"atilde", 0xE3, 1},    {"auml", 0xE4, 1},
    {"bdquo", 0x201E, 0},   {"beta", 0x3B2, 0},    {"brvbar", 0xA6, 1},    {"bull", 0x2022, 0},
    {"cap", 0x2229, 0},     {"ccedil", 0xE7, 1},   {"cedil", 0xB8, 1},     {"cent", 0xA2, 1},
    {"chi", 0x3C7, 0},      {"circ", 0x2C6, 0},    {"clubs", 0x2663, 0},   {"cong", 0x2245, 0},
    {"copy", 0xA9, 1},      {"crarr", 0x21B5, 0},  {"cup", 0x222A, 0},     {"curren", 0xA4, 1},
    {"dArr", 0x21D3, 0},    {"dagger", 0x2020, 0}, {"darr", 0x2193, 0},    {"deg", 0xB0, 1},
    {"delta", 0x3B4, 0},    {"diams", 0x2666, 0},  {"divide", 0xF7, 1},    {"eacute", 0xE9, 1},
    {"ecirc", 0xEA, 1},     {"egrave", 0xE8, 1},   {"empty", 0x2205, 0},   {"emsp", 0x2003, 0},
    {"ensp", 0x2002, 0},    {"epsilon", 0x3B5, 0}, {"equiv", 0x2261, 0},   {"eta", 0x3B7, 0},
    {"eth", 0xF0, 1},       {"euml", 0xEB, 1},     {"euro", 0x20AC, 0},    {"exist", 0x2203, 0},
    {"fnof", 0x192, 0},     {"forall", 0x2200, 0}, {"frac12", 0xBD, 1},    {"frac14", 0xBC, 1},
    {"frac34", 0xBE, 1},    {"frasl", 0x2044, 0},  {"gamma", 0x3B3, 0},    {"ge", 0x2265, 0},
    {"gt", 0x3E, 1},        {"hArr", 0x21D4, 0},   {"harr", 0x2194, 0},    {"hearts", 0x2665, 0},
    {"hellip", 0x2026, 0},  {"iacute", 0xED, 1},   {"icirc", 0xEE, 1},     {"iexcl", 0xA1, 1},
    {"igrave", 0xEC, 1},    {"image", 0x2111, 0},  {"infin", 0x221E, 0},   {"int", 0x222B, 0},
    {"iota", 0x3B9, 0},     {"iquest", 0xBF, 1},   {"isin", 0x2208, 0},    {"iuml", 0xEF, 1},
    {"kappa", 0x3BA, 0},    {"lArr", 0x21D0, 0},   {"lambda", 0x3BB, 0},   {"lang", 0x27E8, 0},
    {"laquo", 0xAB, 1},     {"larr", 0x2190, 0},   {"lceil", 0x2308, 0},   {"ldquo", 0x201C, 0},
    {"le", 0x2264, 0},      {"lfloor", 0x230A, 0}, {"lowast", 0x2217, 0},  {"loz", 0x25CA, 0},
    {"lrm", 0x200E, 0},     {"lsaquo", 0x2039, 0}, {"lsquo", 0x2018, 0},   {"lt", 0x3C, 1},
    {"macr", 0xAF, 1},      {"mdash", 0x2014, 0},  {"micro", 0xB5, 1},     {"middot", 0xB7, 1},
    {"minus", 0x2212, 0},   {"mu", 0x3BC, 0},      {"nabla", 0x2207, 0},   {"nbsp", 0xA0, 1},
    {"ndash", 0x2013, 0},   {"ne", 0x2260, 0},     {"ni", 0x220B, 0},      {"not", 0xAC, 1},
    {"notin", 0x2209, 0},   {"nsub", 0x2284, 0},   {"ntilde", 0xF1, 1},    {"nu", 0x3BD, 0},
    {"oacute", 0xF3, 1},    {"ocirc", 0xF4, 1},    {"oelig", 0x153, 0},    {"ograve", 0xF2, 1},
    {"oline", 0x203E, 0},   {"omega", 0x3C9, 0},   {"omicron", 0x3BF, 0},  {"oplus", 0x2295, 0},
    {"or", 0x2228, 0},      {"ordf", 0xAA, 1},     {"ordm", 0xBA, 1},      {"oslash", 0xF8, 1},
    {"otilde", 0xF5, 1},    {"otimes", 0x2297, 0}, {"ouml", 0xF6, 1},      {"para", 0xB6, 1},
    {"part", 0x2202, 0},    {"permil", 0x2030, 0}, {"perp", 0x22A5, 0},    {"phi", 0x3C6, 0},
    {"pi", 0x3C0, 0},       {"piv", 0x3D6, 0},     {"plusmn", 0xB1, 1},    {"pound", 0xA3, 1},
    {"prime", 0x2032, 0},   {"prod", 0x220F, 0},   {"prop", 0x221D, 0},    {"psi", 0x3C8, 0},
    {"quot", 0x22, 1},      {"rArr", 0x21D2, 0},   {"radic", 0x221A, 0},   {"rang", 0x27E9, 0},
    {"raquo", 0xBB, 1},     {"rarr", 0x2192, 0},   {"rceil", 0x2309, 0},   {"rdquo", 0x201D, 0},
    {"real", 0x211C, 0},    {"reg", 0xAE, 1},      {"rfloor", 0x230B, 0},  {"rho", 0x3C1, 0},
    {"rlm", 0x200F, 0},     {"rsaquo", 0x203A, 0}, {"rsquo", 0x2019, 0},   {"sbquo", 0x201A, 0},
    {"scaron", 0x161, 0},   {"sdot", 0x22C5, 0},   {"sect", 0xA7, 1},      {"shy", 0xAD, 1},
    {"sigma", 0x3C3, 0},    {"sigmaf", 0x3C2, 0},  {"sim", 0x223C, 0},     {"spades", 0x2660, 0},
    {"sub", 0x2282, 0},     {"sube", 0x2286, 0},   {"sum", 0x2211, 0},     {"sup", 0x2283, 0},
    {"sup1", 0xB9, 1},      {"sup2", 0xB2, 1},     {"sup3", 0xB3, 1},      {"supe", 0x2287, 0},
    {"szlig", 0xDF, 1},     {"tau", 0x3C4, 0},     {"there4", 0x2234, 0},  {"theta", 0x3B8, 0},
    {"thetasym", 0x3D1, 0}, {"thinsp", 0x2009, 0}, {"thorn", 0xFE, 1},     {"tilde", 0x2DC, 0},
    {"times", 0xD7, 1},     {"trade", 0x2122, 0},  {"uArr", 0x21D1, 0},    {"uacute", 0xFA, 1},
    {"uarr", 0x2191, 0},    {"ucirc", 0xFB, 1},    {"ugrave", 0xF9, 1},    {"uml", 0xA8, 1},
    {"upsih", 0x3D2, 0},    {"upsilon", 0x3C5, 0}, {"uuml", 0xFC, 1},      {"weierp", 0x2118, 0},
    {"xi", 0x3BE, 0},       {"yacute", 0xFD, 1},   {"yen", 0xA5, 1},       {"yuml", 0xFF, 1},
    {"zeta", 0x3B6, 0},     {"zwj", 0x200D, 0},    {"zwnj", 0x200C, 0},
};

/* Python maps &#128;..&#159; through Windows-1252 (html._invalid_charrefs). */
static const uint16_t cp1252_c1[32] = {
    0x20AC, 0x81,   0x201A, 0x192,  0x201E, 0x2026, 0x2020, 0x2021, 0x2C6,  0x2030, 0x160,
    0x2039, 0x152,  0x8D,   0x17D,  0x8F,   0x90,   0x2018, 0x2019, 0x201C, 0x201D, 0x2022,
    0x2013, 0x2014, 0x2DC,  0x2122, 0x161,  0x203A, 0x153,  0x9D,   0x17E,  0x178,
};

static int entity_cmp(const void *key, const void *elem) {
    return strcmp((const char *)key, ((const html_entity *)elem)->name);
}

/* Entity named t[0..n) (ASCII letters/digits only can match), or NULL. */
static const html_entity *find_entity(const uint32_t *t, size_t n) {
    char name[40];
    if (n == 0 || n >= sizeof name)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        if (t[i] >= 0x80)
            return NULL;
        name[i] = (char)t[i];
    }
    name[n] = '\0';
    return bsearch(name, html_entities, sizeof html_entities / sizeof html_entities[0],
                   sizeof html_entities[0], entity_cmp);
}

/* Python's replacement for the numeric reference value v (saturated above U+10FFFF);
 * returns 0 when the reference is dropped. */
static int numeric_ref_value(uint32_t v, uint32_t *out) {
    if (v == 0)
        *out = 0xFFFD;
    else if (v == 0x0D)
        *out = 0x0D;
    else if (v >= 0x80 && v <= 0x9F)
        *out = cp1252_c1[v - 0x80];
    else if ((v >= 0xD800 && v <= 0xDFFF) || v > 0x10FFFF)
        *out = 0xFFFD;
    else if ((v >= 0x01 && v <= 0x08) || v == 0x0B || (v >= 0x0E && v <= 0x1F) ||
             (v >= 0x7F && v <= 0x9F) || (v >= 0xFDD0 && v <= 0xFDEF) || (v & 0xFFFE) == 0xFFFE)
        return 0;
    else
        *out = v;
    return 1;
}

static int hex_value(uint32_t c) {
    if (c >= '0' && c <= '9')
        return (int)(c - '0');
    if (c >= 'a' && c <= 'f')
        return (int)(c - 'a' + 10);
    if (c >= 'A' && c <= 'F')
        return (int)(c - 'A' + 10);
    return -1;
}

/* A numeric reference at t[0] == '&', t[1] == '#'. Returns the characters consumed (0: no
 * reference); *emit says whether *cp is output. */
static size_t numeric_ref(const uint32_t *t, size_t n, uint32_t *cp, int *emit) {
    int hex = n > 2 && (t[2] == 'x' || t[2] == 'X');
    size_t i = hex ? 3 : 2, start = i;
    uint32_t v = 0;
    for (; i < n; i++) {
        int d = hex ? hex_value(t[i]) : (t[i] >= '0' && t[i] <= '9') ? (int)(t[i] - '0') : -1;
        if (d < 0)
            break;
        v = v > 0x10FFFF ? 0x110000 : v * (hex ? 16u : 10u) + (uint32_t)d;
    }
    if (i == start)
        return 0;
    if (i < n && t[i] == ';')
        i++;
    *emit = numeric_ref_value(v > 0x10FFFF ? 0x110000 : v, cp);
    return i;
}

static int entity_name_char(uint32_t c) {
    return c != '\t' && c != '\n' && c != '\f' && c != ' ' && c != '<' && c != '&' && c != '#' &&
           c != ';';
}

/* A named reference at t[0] == '&'. Returns the characters consumed (0: none). */
static size_t named_ref(const uint32_t *t, size_t n, uint32_t *cp) {
    size_t len = 0;
    while (1 + len < n && len < 32 && entity_name_char(t[1 + len]))
        len++;
    if (len == 0)
        return 0;
    int semicolon = 1 + len < n && t[1 + len] == ';';
    const html_entity *e = find_entity(t + 1, len);
    if (e && (semicolon || e->legacy)) {
        *cp = e->cp;
        return 1 + len + (size_t)semicolon;
    }
    /* Longest legacy name that is a proper prefix of the matched text (Python's loop over
     * s[:x] for x = len(s)-1 .. 2, where s includes the ';'). */
    for (size_t x = semicolon ? len : len - 1; x >= 2; x--) {
        e = find_entity(t + 1, x);
        if (e && e->legacy) {
            *cp = e->cp;
            return 1 + x;
        }
    }
    return 0;
}

/* One pass of html.unescape over t[0..n), in place (output never grows). */
static size_t html_unescape(uint32_t *t, size_t n) {
    size_t r = 0, w = 0;
    while (r < n) {
        if (t[r] != '&') {
            t[w++] = t[r++];
            continue;
        }
        uint32_t cp = 0;
        int emit = 1;
        size_t used = r + 1 < n && t[r + 1] == '#' ? numeric_ref(t + r, n - r, &cp, &emit)
                                                   : named_ref(t + r, n - r, &cp);
        if (!used) {
            t[w++] = t[r++];
            continue;
        }
        if (emit)
            t[w++] = cp;
        r += used;
    }
    return w;
}

/* ------------------------------------------------------------------ whitespace, case */

/* \s of Python's regex module on str (Unicode White_Space). */
static int is_regex_space(uint32_t c) {
    if (c < 0x80)
        return c == ' ' || (c >= 0x09 && c <= 0x0D);
    return c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 ||
           c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

/* Python str.isspace(): also the separators U+001C..U+001F. */
static int is_py_space(uint32_t c) {
    return is_regex_space(c) || (c >= 0x1C && c <= 0x1F);
}

/* re.sub(r'\s+', ' ', t) then t.strip(), in place. */
static size_t clean_whitespace(uint32_t *t, size_t n) {
    size_t w = 0;
    for (size_t r = 0; r < n;) {
        if (is_regex_space(t[r])) {
            while (r < n && is_regex_space(t[r]))
                r++;
            t[w++] = ' ';
        } else {
            t[w++] = t[r++];
        }
    }
    size_t start = 0;
    while (start < w && is_py_space(t[start]))
        start++;
    while (w > start && is_py_space(t[w - 1]))
        w--;
    memmove(t, t + start, (w - start) * sizeof *t);
    return w - start;
}

/* Unicode Case_Ignorable and Cased, as CPython's lower() uses them for the final sigma.
 * Derived from utf8proc; checked against Python 3.11 over every code point of Unicode 14. */
static int is_case_ignorable(uint32_t c) {
    switch (utf8proc_category((utf8proc_int32_t)c)) {
        case UTF8PROC_CATEGORY_MN:
        case UTF8PROC_CATEGORY_ME:
        case UTF8PROC_CATEGORY_CF:
        case UTF8PROC_CATEGORY_LM:
        case UTF8PROC_CATEGORY_SK:
            return 1;
        default:
            break;
    }
    /* Word_Break MidLetter, MidNumLet, Single_Quote */
    static const uint32_t mid[] = {0x27,   0x2E,   0x3A,   0xB7,   0x387,  0x55F,
                                   0x5F4,  0x2018, 0x2019, 0x2024, 0x2027, 0xFE13,
                                   0xFE52, 0xFE55, 0xFF07, 0xFF0E, 0xFF1A};
    for (size_t i = 0; i < sizeof mid / sizeof mid[0]; i++)
        if (c == mid[i])
            return 1;
    return 0;
}

static int is_cased(uint32_t c) {
    utf8proc_category_t cat = utf8proc_category((utf8proc_int32_t)c);
    return cat == UTF8PROC_CATEGORY_LU || cat == UTF8PROC_CATEGORY_LL ||
           cat == UTF8PROC_CATEGORY_LT || utf8proc_islower((utf8proc_int32_t)c) ||
           utf8proc_isupper((utf8proc_int32_t)c);
}

/* U+03A3 at t[i] lowercases to final sigma when a cased letter precedes it and none
 * follows, skipping case-ignorable characters on both sides. */
static int is_final_sigma(const uint32_t *t, size_t n, size_t i) {
    size_t j = i;
    while (j > 0 && is_case_ignorable(t[j - 1]))
        j--;
    if (j == 0 || !is_cased(t[j - 1]))
        return 0;
    j = i + 1;
    while (j < n && is_case_ignorable(t[j]))
        j++;
    return j == n || !is_cased(t[j]);
}

/* Python str.lower() of t[0..n) into out (room for 2n). */
static size_t python_lower(const uint32_t *t, size_t n, uint32_t *out) {
    size_t w = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t c = t[i];
        if (c < 0x80) {
            out[w++] = c >= 'A' && c <= 'Z' ? c + 32 : c;
        } else if (c == 0x130) { /* full lowercase mapping (SpecialCasing.txt) */
            out[w++] = 'i';
            out[w++] = 0x307;
        } else if (c == 0x3A3) {
            out[w++] = is_final_sigma(t, n, i) ? 0x3C2 : 0x3C3;
        } else {
            out[w++] = (uint32_t)utf8proc_tolower((utf8proc_int32_t)c);
        }
    }
    return w;
}

/* ------------------------------------------------------------------ text cleanup */

/* Valid UTF-8 -> NFC code points in a malloc'd array. */
static clh_status nfc_codepoints(const char *utf8, size_t len, uint32_t **out, size_t *n) {
    int ascii = 1;
    for (size_t i = 0; i < len && ascii; i++)
        ascii = (uint8_t)utf8[i] < 0x80;
    if (ascii) { /* NFC leaves ASCII alone */
        uint32_t *t = malloc((len + 1) * sizeof *t);
        if (!t)
            return oom("text");
        for (size_t i = 0; i < len; i++)
            t[i] = (uint8_t)utf8[i];
        *out = t;
        *n = len;
        return CLH_OK;
    }
    const utf8proc_option_t opt = UTF8PROC_STABLE | UTF8PROC_COMPOSE;
    utf8proc_ssize_t need =
        utf8proc_decompose((const utf8proc_uint8_t *)utf8, (utf8proc_ssize_t)len, NULL, 0, opt);
    if (need < 0)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "text: NFC failed: %s",
                        utf8proc_errmsg(need));
    utf8proc_int32_t *t = malloc(((size_t)need + 1) * sizeof *t);
    if (!t)
        return oom("text");
    utf8proc_ssize_t got =
        utf8proc_decompose((const utf8proc_uint8_t *)utf8, (utf8proc_ssize_t)len, t, need, opt);
    if (got >= 0 && got <= need)
        got = utf8proc_normalize_utf32(t, got, opt);
    if (got < 0 || got > need) {
        free(t);
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "text: NFC failed: %s",
                        utf8proc_errmsg(got < 0 ? got : UTF8PROC_ERROR_OVERFLOW));
    }
    *out = (uint32_t *)t;
    *n = (size_t)got;
    return CLH_OK;
}

/* basic_clean (ftfy replaced by NFC) + whitespace_clean + lower. *out: malloc'd. */
static clh_status clean_text(const char *utf8, uint32_t **out, size_t *n) {
    size_t len = strlen(utf8);
    size_t bad = utf8_invalid_at((const uint8_t *)utf8, len);
    if (bad != SIZE_MAX)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT,
                        "tokenizer: text is not valid UTF-8 (byte %zu of %zu)", bad, len);
    uint32_t *t = NULL;
    size_t m = 0;
    CLH_TRY(nfc_codepoints(utf8, len, &t, &m));
    for (int pass = 0; pass < 2; pass++)
        if (memchr(utf8, '&', len))
            m = html_unescape(t, m);
    m = clean_whitespace(t, m);
    uint32_t *lower = malloc((2 * m + 1) * sizeof *lower);
    if (!lower) {
        free(t);
        return oom("text");
    }
    *n = python_lower(t, m, lower);
    free(t);
    *out = lower;
    return CLH_OK;
}

/* ------------------------------------------------------------------ pre-tokenization */

static int is_letter(uint32_t c) {
    if (c < 0x80)
        return (c | 32) >= 'a' && (c | 32) <= 'z';
    utf8proc_category_t cat = utf8proc_category((utf8proc_int32_t)c);
    return cat >= UTF8PROC_CATEGORY_LU && cat <= UTF8PROC_CATEGORY_LO;
}

static int is_number(uint32_t c) {
    if (c < 0x80)
        return c >= '0' && c <= '9';
    utf8proc_category_t cat = utf8proc_category((utf8proc_int32_t)c);
    return cat >= UTF8PROC_CATEGORY_ND && cat <= UTF8PROC_CATEGORY_NO;
}

/* Simple case folding of the regex module for the pattern's literal letters: besides
 * ASCII case, only U+017F (long s) folds onto one of them ('s'). */
static uint32_t fold(uint32_t c) {
    if (c >= 'A' && c <= 'Z')
        return c + 32;
    return c == 0x17F ? 's' : c;
}

static int matches_literal(const uint32_t *t, size_t n, const char *lit) {
    size_t k = strlen(lit);
    if (n < k)
        return 0;
    for (size_t i = 0; i < k; i++)
        if (fold(t[i]) != (uint32_t)lit[i])
            return 0;
    return 1;
}

/* U+0345 (combining ypogegrammeni, Mn) case-folds to iota, so under IGNORECASE the regex
 * module's [^\s\p{L}\p{N}] rejects it while [\p{L}] does not accept it: no alternative
 * matches and it is skipped like whitespace. It is the only such code point. */
static int is_skipped(uint32_t c) {
    return is_regex_space(c) || c == 0x345;
}

/* Length of the regex match at t[0] (t[0] is not skipped). */
static size_t piece_length(const uint32_t *t, size_t n) {
    static const char *const literals[] = {SOT_TEXT, EOT_TEXT, "'s",  "'t", "'re",
                                           "'ve",    "'m",     "'ll", "'d"};
    if (t[0] == '<' || t[0] == '\'')
        for (size_t i = 0; i < sizeof literals / sizeof literals[0]; i++)
            if (matches_literal(t, n, literals[i]))
                return strlen(literals[i]);
    size_t k = 1;
    if (is_letter(t[0])) {
        while (k < n && is_letter(t[k]))
            k++;
    } else if (!is_number(t[0])) {
        while (k < n && !is_skipped(t[k]) && !is_letter(t[k]) && !is_number(t[k]))
            k++;
    }
    return k;
}

/* ------------------------------------------------------------------ BPE and word cache */

static const int32_t *cache_find(const clh_tokenizer *tok, const uint8_t *key, size_t n,
                                 uint32_t hash, size_t *count) {
    if (!tok->cache_cap)
        return NULL;
    uint32_t mask = tok->cache_cap - 1;
    for (uint32_t i = hash & mask;; i = (i + 1) & mask) {
        const cache_slot *s = &tok->cache[i];
        if (!s->key_len)
            return NULL;
        if (s->hash == hash && s->key_len == n && !memcmp(tok->cache_bytes + s->key_off, key, n)) {
            *count = s->ids_len;
            return tok->cache_ids + s->ids_off;
        }
    }
}

static void cache_clear(clh_tokenizer *tok) {
    if (tok->cache)
        memset(tok->cache, 0, tok->cache_cap * sizeof *tok->cache);
    tok->cache_count = 0;
    tok->cache_n_bytes = 0;
    tok->cache_n_ids = 0;
}

static int cache_rehash(clh_tokenizer *tok, uint32_t cap) {
    cache_slot *slots = calloc(cap, sizeof *slots);
    if (!slots)
        return -1;
    for (uint32_t i = 0; i < tok->cache_cap; i++) {
        cache_slot s = tok->cache[i];
        if (!s.key_len)
            continue;
        uint32_t j = s.hash & (cap - 1);
        while (slots[j].key_len)
            j = (j + 1) & (cap - 1);
        slots[j] = s;
    }
    free(tok->cache);
    tok->cache = slots;
    tok->cache_cap = cap;
    return 0;
}

/* Remember ids for a word; failures only mean the word is not cached. */
static void cache_put(clh_tokenizer *tok, const uint8_t *key, size_t n, uint32_t hash,
                      const int32_t *ids, size_t count) {
    if (tok->cache_n_bytes + n + 4 * (tok->cache_n_ids + count) > CACHE_MAX_BYTES)
        cache_clear(tok);
    if (n + 4 * count > CACHE_MAX_BYTES / 4)
        return;
    if (2 * ((size_t)tok->cache_count + 1) > tok->cache_cap &&
        cache_rehash(tok, tok->cache_cap ? 2 * tok->cache_cap : 1024))
        return;
    if (grow((void **)&tok->cache_bytes, &tok->cache_cap_bytes, tok->cache_n_bytes + n, 1) ||
        grow((void **)&tok->cache_ids, &tok->cache_cap_ids, tok->cache_n_ids + count, 4))
        return;
    uint32_t mask = tok->cache_cap - 1, i = hash & mask;
    while (tok->cache[i].key_len)
        i = (i + 1) & mask;
    memcpy(tok->cache_bytes + tok->cache_n_bytes, key, n);
    memcpy(tok->cache_ids + tok->cache_n_ids, ids, count * sizeof *ids);
    tok->cache[i] = (cache_slot){hash, (uint32_t)tok->cache_n_bytes, (uint32_t)n,
                                 (uint32_t)tok->cache_n_ids, (uint32_t)count};
    tok->cache_n_bytes += n;
    tok->cache_n_ids += count;
    tok->cache_count++;
}

/* Byte-level BPE of one pre-token: repeatedly merge every occurrence (left to right) of
 * the adjacent pair with the lowest rank, as simple_tokenizer.py's bpe() does. */
static clh_status bpe_word(clh_tokenizer *tok, const uint8_t *b, size_t n, id_list *out) {
    if (grow((void **)&tok->word, &tok->word_cap, n, sizeof *tok->word))
        return oom("BPE");
    uint32_t *w = tok->word;
    for (size_t i = 0; i < n; i++)
        w[i] = tok->base[b[i]][i + 1 == n];
    while (n > 1) {
        const merge_slot *best = NULL;
        for (size_t i = 0; i + 1 < n; i++) {
            const merge_slot *m = find_merge(tok, w[i], w[i + 1]);
            if (m && (!best || m->rank < best->rank))
                best = m;
        }
        if (!best)
            break;
        size_t j = 0;
        for (size_t i = 0; i < n; j++) {
            if (i + 1 < n && w[i] == best->first && w[i + 1] == best->second) {
                w[j] = best->result;
                i += 2;
            } else {
                w[j] = w[i++];
            }
        }
        n = j;
    }
    for (size_t i = 0; i < n; i++) {
        const tok_symbol *s = &tok->syms[w[i]];
        if (s->id < 0)
            return clh_fail(NULL, CLH_ERR_FORMAT,
                            "tokenizer: BPE produced \"%.*s%s\", which has no vocabulary id",
                            (int)s->len, (const char *)tok->bytes + s->off, s->eow ? "</w>" : "");
        CLH_TRY(ids_push(out, s->id));
    }
    return CLH_OK;
}

static clh_status encode_piece(clh_tokenizer *tok, const uint8_t *b, size_t n, id_list *out) {
    if (n == strlen(SOT_TEXT) && !memcmp(b, SOT_TEXT, n))
        return ids_push(out, tok->sot);
    if (n == strlen(EOT_TEXT) && !memcmp(b, EOT_TEXT, n))
        return ids_push(out, tok->eot);
    uint32_t hash = hash_bytes(b, n, 0);
    size_t count;
    const int32_t *hit = cache_find(tok, b, n, hash, &count);
    if (hit) {
        if (grow((void **)&out->v, &out->cap, out->n + count, sizeof *out->v))
            return oom("token ids");
        memcpy(out->v + out->n, hit, count * sizeof *hit);
        out->n += count;
        return CLH_OK;
    }
    size_t start = out->n;
    CLH_TRY(bpe_word(tok, b, n, out));
    cache_put(tok, b, n, hash, out->v + start, out->n - start);
    return CLH_OK;
}

static clh_status encode_clean(clh_tokenizer *tok, const uint32_t *t, size_t n, id_list *out) {
    uint8_t *buf = NULL;
    size_t cap = 0;
    clh_status st = CLH_OK;
    for (size_t i = 0; i < n && st == CLH_OK;) {
        if (is_skipped(t[i])) {
            i++;
            continue;
        }
        size_t k = piece_length(t + i, n - i), nb = 0;
        if (grow((void **)&buf, &cap, 4 * k, 1)) {
            st = oom("text");
            break;
        }
        for (size_t j = 0; j < k; j++)
            nb += utf8_put(t[i + j], buf + nb);
        st = encode_piece(tok, buf, nb, out);
        i += k;
    }
    free(buf);
    return st;
}

static clh_status encode_list(clh_tokenizer *tok, const char *utf8, id_list *out) {
    uint32_t *t = NULL;
    size_t n = 0;
    CLH_TRY(clean_text(utf8, &t, &n));
    clh_status st = encode_clean(tok, t, n, out);
    free(t);
    return st;
}

clh_status clh_tokenizer_encode(clh_tokenizer *tok, const char *utf8, int32_t **ids, size_t *n) {
    if (!tok || !utf8 || !ids || !n)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT,
                        "clh_tokenizer_encode: tok, utf8, ids and n must not be NULL");
    *ids = NULL;
    *n = 0;
    id_list list = {0};
    clh_status st = encode_list(tok, utf8, &list);
    if (st == CLH_OK && !list.v && !(list.v = malloc(sizeof *list.v)))
        st = oom("token ids"); /* empty text still hands back a malloc'd array */
    if (st != CLH_OK) {
        free(list.v);
        return st;
    }
    *ids = list.v;
    *n = list.n;
    return CLH_OK;
}

/* Start of s, cut at a character boundary within max bytes, for messages. */
static int excerpt_len(const char *s, int max) {
    int n = 0;
    while (s[n] && n < max)
        n++;
    while (n > 0 && s[n] && ((uint8_t)s[n] & 0xC0) == 0x80)
        n--;
    return n;
}

clh_status clh_tokenize(clh_tokenizer *tok, const char *utf8, int context_length, int truncate,
                        int32_t *out) {
    if (!tok || !utf8 || !out)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT,
                        "clh_tokenize: tok, utf8 and out must not be NULL");
    if (context_length < 2)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT,
                        "clh_tokenize: context_length %d leaves no room for SOT and EOT",
                        context_length);
    id_list l = {0};
    clh_status st = encode_list(tok, utf8, &l);
    if (st == CLH_OK && l.n == 0)
        st = clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT,
                      "clh_tokenize: text \"%.*s\" is empty or only whitespace after cleanup",
                      excerpt_len(utf8, 40), utf8);
    if (st == CLH_OK && l.n + 2 > (size_t)context_length && !truncate)
        st = clh_fail(NULL, CLH_ERR_TOO_LONG,
                      "clh_tokenize: text needs %zu tokens with SOT and EOT but the context length "
                      "is %d (pass truncate to cut it): \"%.*s...\"",
                      l.n + 2, context_length, excerpt_len(utf8, 60), utf8);
    if (st != CLH_OK) {
        free(l.v);
        return st;
    }
    /* Like open_clip's truncation: keep the first context_length - 1 tokens, EOT last. */
    size_t keep = l.n + 2 > (size_t)context_length ? (size_t)context_length - 2 : l.n;
    out[0] = tok->sot;
    memcpy(out + 1, l.v, keep * sizeof *out);
    out[keep + 1] = tok->eot;
    for (size_t i = keep + 2; i < (size_t)context_length; i++)
        out[i] = 0;
    free(l.v);
    return CLH_OK;
}

/* ------------------------------------------------------------------ decode */

/* Append s[0..n) as UTF-8 text, each maximal invalid subpart replaced by U+FFFD, as
 * Python's bytes.decode('utf-8', errors='replace') does. out has room for 3n bytes. */
static size_t utf8_replace_invalid(const uint8_t *s, size_t n, uint8_t *out) {
    size_t w = 0;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        size_t len = utf8_next(s + i, n - i, &cp);
        if (len) {
            memcpy(out + w, s + i, len);
            w += len;
            i += len;
            continue;
        }
        /* Skip the longest prefix of a well-formed sequence: lead byte plus the
         * continuation bytes that fit its allowed ranges. */
        uint8_t b = s[i];
        size_t need = b >= 0xC2 && b <= 0xDF   ? 2
                      : b >= 0xE0 && b <= 0xEF ? 3
                      : b >= 0xF0 && b <= 0xF4 ? 4
                                               : 1;
        uint8_t lo = b == 0xE0 ? 0xA0 : b == 0xF0 ? 0x90 : 0x80;
        uint8_t hi = b == 0xED ? 0x9F : b == 0xF4 ? 0x8F : 0xBF;
        size_t k = 1;
        while (k < need && i + k < n && s[i + k] >= (k == 1 ? lo : 0x80) &&
               s[i + k] <= (k == 1 ? hi : 0xBF))
            k++;
        w += utf8_put(0xFFFD, out + w);
        i += k;
    }
    return w;
}

static int is_padding_id(const clh_tokenizer *tok, int32_t id) {
    /* A word always ends in an end-of-word symbol, so a trailing id that is not one (id 0 is
     * "!" in CLIP's vocabulary) can only be padding. */
    if (id != 0 || tok->vocab_size == 0 || tok->id_sym[0] < 0)
        return 0;
    return !tok->syms[tok->id_sym[0]].eow;
}

clh_status clh_tokenizer_decode(const clh_tokenizer *tok, const int32_t *ids, size_t n,
                                char **text) {
    if (!tok || (!ids && n) || !text)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT,
                        "clh_tokenizer_decode: tok, ids and text must not be NULL");
    *text = NULL;
    while (n > 0 && is_padding_id(tok, ids[n - 1]))
        n--;
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (id < 0 || id >= tok->vocab_size || tok->id_sym[id] < 0)
            return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT,
                            "clh_tokenizer_decode: ids[%zu] = %d is not a vocabulary id "
                            "(0..%d)",
                            i, id, tok->vocab_size - 1);
        total += tok->syms[tok->id_sym[id]].len + 4;
    }
    uint8_t *raw = malloc(total + 1), *res = malloc(3 * total + 1);
    if (!raw || !res) {
        free(raw);
        free(res);
        return oom("decode");
    }
    /* Python joins the strings, decodes the bytes, then replaces "</w>" by a space. */
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        if (ids[i] == tok->sot || ids[i] == tok->eot)
            continue;
        const tok_symbol *s = &tok->syms[tok->id_sym[ids[i]]];
        memcpy(raw + m, tok->bytes + s->off, s->len);
        m += s->len;
        if (s->eow) {
            memcpy(raw + m, "</w>", 4);
            m += 4;
        }
    }
    size_t w = 0;
    for (size_t r = 0; r < m;) {
        if (r + 4 <= m && !memcmp(raw + r, "</w>", 4)) {
            raw[w++] = ' ';
            r += 4;
        } else {
            raw[w++] = raw[r++];
        }
    }
    size_t len = utf8_replace_invalid(raw, w, res);
    res[len] = '\0';
    free(raw);
    *text = (char *)res;
    return CLH_OK;
}
