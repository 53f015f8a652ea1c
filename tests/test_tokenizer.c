/* CLIP BPE tokenizer: goldens on a tiny committed vocabulary (OpenAI .txt/.gz and HF
 * vocab.json formats), the shared goldens and ~2600 open_clip tokenizations on the real
 * vocabulary, decode, and every error path. Fixtures: tests/fixtures/tokenizer/README.md. */
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <zlib.h>

#include "testutil.h"

#define TINY "tokenizer/tiny_merges.txt"

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void write_bytes(const char *path, const void *data, size_t size) {
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    assert_int_equal(fwrite(data, 1, size, fp), size);
    assert_int_equal(fclose(fp), 0);
}

static char *read_all(const char *path, size_t *size) {
    FILE *fp = fopen(path, "rb");
    if (!fp)
        fail_msg("cannot open %s", path);
    fseek(fp, 0, SEEK_END);
    long n = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    assert_non_null(buf);
    assert_int_equal(fread(buf, 1, (size_t)n, fp), (size_t)n);
    fclose(fp);
    buf[n] = '\0';
    if (size)
        *size = (size_t)n;
    return buf;
}

/* ------------------------------------------------------------------ golden files
 * Lines: JSON string, TAB, space-separated ids [, TAB, more ids]. */

typedef struct golden {
    char *text;   /* decoded JSON string (malloc'd) */
    int32_t *ids; /* column `col` */
    size_t n;
} golden;

static size_t parse_ids(const char *s, int32_t *out, size_t cap) {
    size_t n = 0;
    while (*s && *s != '\t' && *s != '\n') {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s)
            break;
        assert_true(n < cap);
        out[n++] = (int32_t)v;
        s = end;
        while (*s == ' ')
            s++;
    }
    return n;
}

/* Parse every line of a golden file; ids from tab-separated column `col` (1 or 2). */
static golden *load_golden(const char *path, int col, size_t *count) {
    char *data = read_all(path, NULL);
    size_t cap = 16, n = 0;
    golden *g = malloc(cap * sizeof *g);
    for (char *line = data; *line;) {
        char *nl = strchr(line, '\n');
        if (nl)
            *nl = '\0';
        if (*line) {
            char *tab = strchr(line, '\t');
            if (!tab)
                fail_msg("%s: line without TAB: %s", path, line);
            cJSON *json = cJSON_ParseWithLength(line, (size_t)(tab - line));
            if (!json || !cJSON_IsString(json))
                fail_msg("%s: bad JSON string: %.*s", path, (int)(tab - line), line);
            const char *ids = tab + 1;
            for (int c = 1; c < col; c++) {
                ids = strchr(ids, '\t');
                assert_non_null(ids);
                ids++;
            }
            if (n == cap)
                g = realloc(g, (cap *= 2) * sizeof *g);
            g[n].text = strdup(json->valuestring);
            g[n].ids = malloc(4096 * sizeof(int32_t));
            g[n].n = parse_ids(ids, g[n].ids, 4096);
            cJSON_Delete(json);
            n++;
        }
        if (!nl)
            break;
        line = nl + 1;
    }
    free(data);
    *count = n;
    return g;
}

static void free_golden(golden *g, size_t n) {
    for (size_t i = 0; i < n; i++) {
        free(g[i].text);
        free(g[i].ids);
    }
    free(g);
}

static void print_ids(const char *label, const int32_t *ids, size_t n) {
    char buf[2048];
    size_t used = 0;
    for (size_t i = 0; i < n && used + 16 < sizeof buf; i++)
        used += (size_t)snprintf(buf + used, sizeof buf - used, " %d", ids[i]);
    print_message("  %s:%s\n", label, buf);
}

/* clh_tokenizer_encode must give exactly the golden ids; returns the mismatch count. */
static size_t check_encode(clh_tokenizer *tok, const golden *g, size_t count) {
    size_t bad = 0;
    for (size_t i = 0; i < count; i++) {
        int32_t *ids;
        size_t n;
        TU_OK(clh_tokenizer_encode(tok, g[i].text, &ids, &n));
        if (n != g[i].n || (n && memcmp(ids, g[i].ids, n * sizeof *ids))) {
            if (bad++ < 5) {
                print_message("mismatch for \"%s\"\n", g[i].text);
                print_ids("want", g[i].ids, g[i].n);
                print_ids("got ", ids, n);
            }
        }
        free(ids);
    }
    return bad;
}

/* clh_tokenize (context 77) must give the golden ids (with SOT/EOT) then zeros. */
static size_t check_tokenize(clh_tokenizer *tok, const golden *g, size_t count) {
    size_t bad = 0;
    for (size_t i = 0; i < count; i++) {
        int32_t out[CLH_CONTEXT_LENGTH], want[CLH_CONTEXT_LENGTH] = {0};
        assert_true(g[i].n <= CLH_CONTEXT_LENGTH);
        memcpy(want, g[i].ids, g[i].n * sizeof *want);
        TU_OK(clh_tokenize(tok, g[i].text, CLH_CONTEXT_LENGTH, 0, out));
        if (memcmp(out, want, sizeof out)) {
            if (bad++ < 5) {
                print_message("mismatch for \"%s\"\n", g[i].text);
                print_ids("want", want, g[i].n + 2);
                print_ids("got ", out, g[i].n + 2);
            }
        }
    }
    return bad;
}

static clh_tokenizer *load_ok(const char *path) {
    clh_tokenizer *tok = NULL;
    TU_OK(clh_tokenizer_load(path, &tok));
    assert_non_null(tok);
    return tok;
}

/* Vocabulary size implied by an OpenAI-format merges file: 512 + merges + 2. */
static int32_t openai_vocab_size(const char *path) {
    size_t size;
    char *data = read_all(path, &size);
    int32_t lines = 0;
    for (size_t i = 0; i < size; i++)
        lines += data[i] == '\n';
    free(data);
    return 512 + (lines - 1) + 2;
}

/* ------------------------------------------------------------------ tiny vocabulary */

static void check_tiny_openai(const char *path) {
    clh_tokenizer *tok = load_ok(path);
    int32_t size = openai_vocab_size(tu_fixture(TINY));
    assert_int_equal(clh_tokenizer_vocab_size(tok), size);
    assert_int_equal(clh_tokenizer_sot(tok), size - 2);
    assert_int_equal(clh_tokenizer_eot(tok), size - 1);
    size_t count;
    golden *g = load_golden(tu_fixture("tokenizer/tiny_golden.tsv"), 1, &count);
    assert_true(count >= 30);
    assert_int_equal(check_encode(tok, g, count), 0);
    free_golden(g, count);
    clh_tokenizer_free(tok);
}

static void test_tiny_txt(void **state) {
    (void)state;
    check_tiny_openai(tu_fixture(TINY));
}

static void test_tiny_gz(void **state) {
    (void)state;
    check_tiny_openai(tu_fixture(TINY ".gz"));
}

/* The special ids of an HF vocab.json, read independently with cJSON. */
static void hf_special_ids(const char *vocab_path, int32_t *sot, int32_t *eot, int32_t *size) {
    char *data = read_all(vocab_path, NULL);
    cJSON *root = cJSON_Parse(data);
    assert_non_null(root);
    *sot = (int32_t)cJSON_GetObjectItem(root, "<|startoftext|>")->valuedouble;
    *eot = (int32_t)cJSON_GetObjectItem(root, "<|endoftext|>")->valuedouble;
    *size = cJSON_GetArraySize(root);
    cJSON_Delete(root);
    free(data);
}

static void test_tiny_hf(void **state) {
    (void)state;
    int32_t sot, eot, size;
    hf_special_ids(tu_fixture("tokenizer/tiny_hf/vocab.json"), &sot, &eot, &size);
    size_t count;
    golden *g = load_golden(tu_fixture("tokenizer/tiny_hf_golden.tsv"), 1, &count);
    /* The directory, and vocab.json with merges.txt beside it. */
    const char *rel[2] = {"tokenizer/tiny_hf", "tokenizer/tiny_hf/vocab.json"};
    for (int p = 0; p < 2; p++) {
        char dir[1024];
        snprintf(dir, sizeof dir, "%s", tu_fixture(rel[p]));
        clh_tokenizer *tok = load_ok(dir);
        assert_int_equal(clh_tokenizer_sot(tok), sot);
        assert_int_equal(clh_tokenizer_eot(tok), eot);
        assert_int_equal(clh_tokenizer_vocab_size(tok), size);
        assert_int_equal(check_encode(tok, g, count), 0);
        clh_tokenizer_free(tok);
    }
    free_golden(g, count);
}

/* Shuffled HF ids and OpenAI ids must name the same strings. */
static void test_tiny_hf_decodes_like_openai(void **state) {
    (void)state;
    clh_tokenizer *openai = load_ok(tu_fixture(TINY));
    clh_tokenizer *hf = load_ok(tu_fixture("tokenizer/tiny_hf"));
    size_t count;
    golden *g = load_golden(tu_fixture("tokenizer/tiny_golden.tsv"), 1, &count);
    int differing_ids = 0;
    for (size_t i = 0; i < count; i++) {
        int32_t *a, *b;
        size_t na, nb;
        TU_OK(clh_tokenizer_encode(openai, g[i].text, &a, &na));
        TU_OK(clh_tokenizer_encode(hf, g[i].text, &b, &nb));
        assert_int_equal(na, nb);
        differing_ids += na && memcmp(a, b, na * sizeof *a) != 0;
        char *ta, *tb;
        TU_OK(clh_tokenizer_decode(openai, a, na, &ta));
        TU_OK(clh_tokenizer_decode(hf, b, nb, &tb));
        assert_string_equal(ta, tb);
        free(ta);
        free(tb);
        free(a);
        free(b);
    }
    assert_true(differing_ids > 10); /* the fixture really uses other ids */
    free_golden(g, count);
    clh_tokenizer_free(openai);
    clh_tokenizer_free(hf);
}

/* Decode goldens: ids TAB JSON string, from Python's decode (bytes.decode errors=replace). */
static void test_tiny_decode(void **state) {
    (void)state;
    clh_tokenizer *tok = load_ok(tu_fixture(TINY));
    char *data = read_all(tu_fixture("tokenizer/tiny_decode.tsv"), NULL);
    int cases = 0;
    for (char *line = strtok(data, "\n"); line; line = strtok(NULL, "\n")) {
        char *tab = strchr(line, '\t');
        assert_non_null(tab);
        int32_t ids[256];
        size_t n = parse_ids(line, ids, 256);
        cJSON *want = cJSON_Parse(tab + 1);
        assert_true(cJSON_IsString(want));
        char *text;
        TU_OK(clh_tokenizer_decode(tok, ids, n, &text));
        if (strcmp(text, want->valuestring))
            fail_msg("decode of '%.*s': got \"%s\" want \"%s\"", (int)(tab - line), line, text,
                     want->valuestring);
        free(text);
        cJSON_Delete(want);
        cases++;
    }
    assert_true(cases >= 20);
    free(data);
    clh_tokenizer_free(tok);
}

/* ------------------------------------------------------------------ tokenize behaviour */

static void test_tokenize_padding_and_limits(void **state) {
    (void)state;
    clh_tokenizer *tok = load_ok(tu_fixture(TINY));
    int32_t sot = clh_tokenizer_sot(tok), eot = clh_tokenizer_eot(tok);
    int32_t out[CLH_CONTEXT_LENGTH], *ids;
    size_t n;

    TU_OK(clh_tokenize(tok, "a photo of a cat", CLH_CONTEXT_LENGTH, 0, out));
    TU_OK(clh_tokenizer_encode(tok, "a photo of a cat", &ids, &n));
    assert_true(n > 0);
    assert_int_equal(out[0], sot);
    assert_memory_equal(out + 1, ids, n * sizeof *ids);
    assert_int_equal(out[n + 1], eot);
    for (size_t i = n + 2; i < CLH_CONTEXT_LENGTH; i++)
        assert_int_equal(out[i], 0);
    free(ids);

    /* "a" is one token, so 75 of them fill the context exactly; 76 do not fit. */
    char text[400] = "";
    for (int i = 0; i < 75; i++)
        strcat(text, "a ");
    TU_OK(clh_tokenize(tok, text, CLH_CONTEXT_LENGTH, 0, out));
    assert_int_equal(out[CLH_CONTEXT_LENGTH - 1], eot);
    strcat(text, "a");
    TU_FAILS(clh_tokenize(tok, text, CLH_CONTEXT_LENGTH, 0, out), CLH_ERR_TOO_LONG,
             "needs 78 tokens");
    assert_non_null(strstr(clh_last_error(), "context length is 77"));

    /* Truncation keeps the first 75 text tokens and EOT in the last slot. */
    const char *sentence = "a photo of the small cat in the scene there is a dog a horse and a "
                           "bird on the grass the sky is blue photography photographer "
                           "photographic catalog cathedral dogma horseshoe skyline it's a car "
                           "we're here they've gone the building the road the sidewalk and the "
                           "streetlight at night numbers 0 1 2 3 4 5 6 7 8 9 2025 1999 3.14";
    char long_text[2048];
    snprintf(long_text, sizeof long_text, "%s %s", sentence, sentence);
    TU_OK(clh_tokenizer_encode(tok, long_text, &ids, &n));
    assert_true(n > 100);
    char needle[64];
    snprintf(needle, sizeof needle, "needs %zu tokens", n + 2);
    TU_FAILS(clh_tokenize(tok, long_text, CLH_CONTEXT_LENGTH, 0, out), CLH_ERR_TOO_LONG, needle);
    TU_OK(clh_tokenize(tok, long_text, CLH_CONTEXT_LENGTH, 1, out));
    assert_int_equal(out[0], sot);
    assert_memory_equal(out + 1, ids, (CLH_CONTEXT_LENGTH - 2) * sizeof *ids);
    assert_int_equal(out[CLH_CONTEXT_LENGTH - 1], eot);

    /* Other context lengths. */
    int32_t small[8];
    TU_OK(clh_tokenize(tok, long_text, 8, 1, small));
    assert_int_equal(small[0], sot);
    assert_memory_equal(small + 1, ids, 6 * sizeof *ids);
    assert_int_equal(small[7], eot);
    TU_FAILS(clh_tokenize(tok, "a", 1, 1, small), CLH_ERR_INVALID_ARGUMENT, "context_length 1");
    TU_FAILS(clh_tokenize(tok, "a a", 2, 0, small), CLH_ERR_TOO_LONG, "needs 4 tokens");
    TU_OK(clh_tokenize(tok, "a a", 2, 1, small));
    assert_int_equal(small[0], sot);
    assert_int_equal(small[1], eot);
    free(ids);
    clh_tokenizer_free(tok);
}

static void test_empty_text(void **state) {
    (void)state;
    clh_tokenizer *tok = load_ok(tu_fixture(TINY));
    int32_t out[CLH_CONTEXT_LENGTH];
    const char *empties[] = {"", "   ", " \t\n\r\v\f ", "\xe3\x80\x80\xc2\xa0", "&#1;", "&nbsp;"};
    for (size_t i = 0; i < sizeof empties / sizeof empties[0]; i++) {
        TU_FAILS(clh_tokenize(tok, empties[i], CLH_CONTEXT_LENGTH, 0, out),
                 CLH_ERR_INVALID_ARGUMENT, "empty");
        int32_t *ids = NULL;
        size_t n = 99;
        TU_OK(clh_tokenizer_encode(tok, empties[i], &ids, &n));
        assert_int_equal(n, 0);
        assert_non_null(ids);
        free(ids);
    }
    clh_tokenizer_free(tok);
}

static void test_bad_utf8(void **state) {
    (void)state;
    clh_tokenizer *tok = load_ok(tu_fixture(TINY));
    const char *bad[] = {
        "\xff",             /* never valid */
        "cat \x80",         /* lone continuation byte */
        "\xc0\xaf",         /* overlong '/' */
        "\xe0\x80\xaf",     /* overlong, 3 bytes */
        "\xed\xa0\x80",     /* UTF-16 surrogate */
        "\xf4\x90\x80\x80", /* above U+10FFFF */
        "cat \xe4\xb8",     /* truncated sequence */
        "\xe4\xb8"
        "a", /* lead byte followed by ASCII */
    };
    int32_t out[CLH_CONTEXT_LENGTH], *ids;
    size_t n;
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        TU_FAILS(clh_tokenize(tok, bad[i], CLH_CONTEXT_LENGTH, 0, out), CLH_ERR_INVALID_ARGUMENT,
                 "UTF-8");
        TU_FAILS(clh_tokenizer_encode(tok, bad[i], &ids, &n), CLH_ERR_INVALID_ARGUMENT, "UTF-8");
    }
    /* Boundary values that are valid. */
    TU_OK(clh_tokenize(tok, "\xf4\x8f\xbf\xbd \xef\xbf\xbf \xc2\x80x", CLH_CONTEXT_LENGTH, 0, out));
    clh_tokenizer_free(tok);
}

static void test_null_arguments(void **state) {
    (void)state;
    clh_tokenizer *tok = load_ok(tu_fixture(TINY));
    int32_t out[CLH_CONTEXT_LENGTH], *ids;
    size_t n;
    char *text;
    clh_tokenizer *none = (clh_tokenizer *)1;
    TU_FAILS(clh_tokenizer_load(NULL, &none), CLH_ERR_INVALID_ARGUMENT, "path");
    assert_null(none); /* out is cleared on failure */
    TU_FAILS(clh_tokenizer_load(tu_fixture(TINY), NULL), CLH_ERR_INVALID_ARGUMENT, "out");
    TU_FAILS(clh_tokenize(NULL, "a", 77, 0, out), CLH_ERR_INVALID_ARGUMENT, NULL);
    TU_FAILS(clh_tokenize(tok, NULL, 77, 0, out), CLH_ERR_INVALID_ARGUMENT, NULL);
    TU_FAILS(clh_tokenize(tok, "a", 77, 0, NULL), CLH_ERR_INVALID_ARGUMENT, NULL);
    TU_FAILS(clh_tokenizer_encode(tok, NULL, &ids, &n), CLH_ERR_INVALID_ARGUMENT, NULL);
    TU_FAILS(clh_tokenizer_decode(tok, NULL, 3, &text), CLH_ERR_INVALID_ARGUMENT, NULL);
    assert_int_equal(clh_tokenizer_sot(NULL), -1);
    assert_int_equal(clh_tokenizer_vocab_size(NULL), 0);
    clh_tokenizer_free(NULL);
    clh_tokenizer_free(tok);
}

static void test_decode(void **state) {
    (void)state;
    clh_tokenizer *tok = load_ok(tu_fixture(TINY));
    int32_t out[CLH_CONTEXT_LENGTH], *ids;
    size_t n;
    char *text, *text2;
    TU_OK(clh_tokenizer_encode(tok, "A Photo of a CAT!", &ids, &n));
    TU_OK(clh_tokenizer_decode(tok, ids, n, &text));
    assert_string_equal(text, "a photo of a cat ! ");
    /* SOT, EOT and the zero padding of clh_tokenize are skipped. */
    TU_OK(clh_tokenize(tok, "A Photo of a CAT!", CLH_CONTEXT_LENGTH, 0, out));
    TU_OK(clh_tokenizer_decode(tok, out, CLH_CONTEXT_LENGTH, &text2));
    assert_string_equal(text, text2);
    free(text);
    free(text2);
    TU_OK(clh_tokenizer_decode(tok, ids, 0, &text));
    assert_string_equal(text, "");
    free(text);
    /* Id 0 ("!" without end of word) inside a sequence is kept. */
    int32_t bang[3] = {0, 0, 256};
    TU_OK(clh_tokenizer_decode(tok, bang, 3, &text));
    assert_string_equal(text, "!!! ");
    free(text);

    int32_t bad[2] = {ids[0], -1};
    TU_FAILS(clh_tokenizer_decode(tok, bad, 2, &text), CLH_ERR_INVALID_ARGUMENT, "ids[1] = -1");
    bad[1] = clh_tokenizer_vocab_size(tok);
    TU_FAILS(clh_tokenizer_decode(tok, bad, 2, &text), CLH_ERR_INVALID_ARGUMENT, "ids[1]");
    free(ids);
    clh_tokenizer_free(tok);
}

/* encode(decode(encode(s))) == encode(s): decoding yields the pieces separated by spaces. */
static size_t check_round_trip(clh_tokenizer *tok, const golden *g, size_t count) {
    size_t bad = 0;
    for (size_t i = 0; i < count; i++) {
        int32_t *a, *b;
        size_t na, nb;
        char *text;
        TU_OK(clh_tokenizer_encode(tok, g[i].text, &a, &na));
        TU_OK(clh_tokenizer_decode(tok, a, na, &text));
        TU_OK(clh_tokenizer_encode(tok, text, &b, &nb));
        if (na != nb || memcmp(a, b, na * sizeof *a)) {
            if (bad++ < 5)
                print_message("round trip changed \"%s\" -> \"%s\"\n", g[i].text, text);
        }
        free(text);
        free(a);
        free(b);
    }
    return bad;
}

static void test_tiny_round_trip(void **state) {
    (void)state;
    clh_tokenizer *tok = load_ok(tu_fixture(TINY));
    size_t count;
    golden *g = load_golden(tu_fixture("tokenizer/tiny_golden.tsv"), 1, &count);
    /* Lines with special tokens inside words ("a<|endoftext|>b") do not round-trip: skip. */
    size_t kept = 0;
    for (size_t i = 0; i < count; i++) {
        if (strstr(g[i].text, "<|")) {
            free(g[i].text);
            free(g[i].ids);
        } else {
            g[kept++] = g[i];
        }
    }
    assert_int_equal(check_round_trip(tok, g, kept), 0);
    free_golden(g, kept);
    clh_tokenizer_free(tok);
}

/* The word cache must not change results, and long words must not be slow. */
static void test_cache_and_long_words(void **state) {
    (void)state;
    clh_tokenizer *tok = load_ok(tu_fixture(TINY));
    int32_t *a, *b;
    size_t na, nb;
    TU_OK(clh_tokenizer_encode(tok, "photographic cathedral photographic", &a, &na));
    TU_OK(clh_tokenizer_encode(tok, "photographic cathedral photographic", &b, &nb));
    assert_int_equal(na, nb);
    assert_memory_equal(a, b, na * sizeof *a);
    assert_true(na >= 3);
    assert_int_equal(a[0], a[na - 1]); /* the repeated word, once from the cache */
    free(a);
    free(b);
    char *word = malloc(20001);
    for (int i = 0; i < 20000; i++)
        word[i] = "thecat"[i % 6];
    word[20000] = '\0';
    double t0 = now_ms();
    TU_OK(clh_tokenizer_encode(tok, word, &a, &na));
    double ms = now_ms() - t0;
    print_message("one 20000-letter word: %zu ids in %.1f ms\n", na, ms);
    assert_true(na > 0 && na < 20000);
    free(a);
    free(word);
    clh_tokenizer_free(tok);
}

/* ------------------------------------------------------------------ loader errors */

static void test_missing_files(void **state) {
    (void)state;
    clh_tokenizer *tok = (clh_tokenizer *)1;
    TU_FAILS(clh_tokenizer_load("no/such/bpe.txt.gz", &tok), CLH_ERR_IO, "no/such/bpe.txt.gz");
    assert_null(tok);
    TU_FAILS(clh_tokenizer_load(tu_tmp_dir_, &tok), CLH_ERR_IO, tu_tmp_dir_);
    assert_non_null(strstr(clh_last_error(), "vocab.json"));

    /* vocab.json without merges.txt beside it, as a directory and as a file path. */
    char dir[600], vocab[700];
    snprintf(dir, sizeof dir, "%s/hf_no_merges", tu_tmp_dir_);
    assert_int_equal(mkdir(dir, 0700), 0);
    size_t size;
    char *json = read_all(tu_fixture("tokenizer/tiny_hf/vocab.json"), &size);
    snprintf(vocab, sizeof vocab, "%s/vocab.json", dir);
    write_bytes(vocab, json, size);
    free(json);
    TU_FAILS(clh_tokenizer_load(dir, &tok), CLH_ERR_IO, "merges.txt");
    TU_FAILS(clh_tokenizer_load(vocab, &tok), CLH_ERR_IO, "hf_no_merges/merges.txt");
}

static void expect_format_error(const char *name, const void *data, size_t size,
                                const char *needle) {
    const char *path = tu_tmp_path(name);
    write_bytes(path, data, size);
    clh_tokenizer *tok = NULL;
    TU_FAILS(clh_tokenizer_load(path, &tok), CLH_ERR_FORMAT, needle);
    assert_non_null(strstr(clh_last_error(), name));
    assert_null(tok);
}

static void test_corrupt_openai_files(void **state) {
    (void)state;
    size_t size;
    char *gz = read_all(tu_fixture(TINY ".gz"), &size);
    expect_format_error("half.txt.gz", gz, size / 2, "truncated");
    expect_format_error("no_trailer.txt.gz", gz, size - 4, "truncated");
    gz[size / 2] ^= 0x55;
    gz[size / 2 + 1] ^= 0xAA;
    expect_format_error("flipped.txt.gz", gz, size, "corrupt");
    free(gz);

    expect_format_error("empty.txt", "", strlen(""), "empty");
    expect_format_error("three.txt", "#version: 0.2\nt h\na b c\n",
                        strlen("#version: 0.2\nt h\na b c\n"), "line 3");
    expect_format_error("one.txt", "#version: 0.2\nth\n", strlen("#version: 0.2\nth\n"),
                        "two symbols");
    expect_format_error("blank.txt", "#version: 0.2\nt h\n\na b\n",
                        strlen("#version: 0.2\nt h\n\na b\n"), "line 3 is empty");
    expect_format_error("latin1.txt", "#version: 0.2\n\xe9 t\n", strlen("#version: 0.2\n\xe9 t\n"),
                        "not UTF-8");
    expect_format_error("unmapped.txt", "#version: 0.2\n\xe2\x82\xac t\n",
                        strlen("#version: 0.2\n\xe2\x82\xac t\n"), "byte symbols");
    expect_format_error("eow_first.txt", "#version: 0.2\nt</w> h\n",
                        strlen("#version: 0.2\nt</w> h\n"), "ends a word");
}

static void test_corrupt_hf_files(void **state) {
    (void)state;
    char dir[600], path[700];
    snprintf(dir, sizeof dir, "%s/hf_bad", tu_tmp_dir_);
    assert_int_equal(mkdir(dir, 0700), 0);
    snprintf(path, sizeof path, "%s/merges.txt", dir);
    write_bytes(path, "#version: 0.2\nt h\n", 18);
    snprintf(path, sizeof path, "%s/vocab.json", dir);
    struct {
        const char *json, *needle;
    } cases[] = {
        {"{\"t\": 1,", "not valid JSON"},
        {"[1, 2]", "not a non-empty JSON object"},
        {"{}", "not a non-empty JSON object"},
        {"{\"t\": 1.5}", "integer id"},
        {"{\"t\": -1}", "integer id"},
        {"{\"t\": \"1\"}", "integer id"},
        {"{\"\\u20ac\": 1}", "byte symbols"},
        {"{\"t\": 0, \"<|startoftext|>\": 1}", "<|endoftext|>"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        write_bytes(path, cases[i].json, strlen(cases[i].json));
        clh_tokenizer *tok = NULL;
        TU_FAILS(clh_tokenizer_load(dir, &tok), CLH_ERR_FORMAT, cases[i].needle);
        assert_non_null(strstr(clh_last_error(), "vocab.json"));
    }
    /* Valid vocab.json, bad merges.txt. */
    const char *small = "{\"t\": 0, \"<|startoftext|>\": 1, \"<|endoftext|>\": 2}";
    write_bytes(path, small, strlen(small));
    snprintf(path, sizeof path, "%s/merges.txt", dir);
    write_bytes(path, "#version: 0.2\nt h x\n", strlen("#version: 0.2\nt h x\n"));
    clh_tokenizer *tok = NULL;
    TU_FAILS(clh_tokenizer_load(dir, &tok), CLH_ERR_FORMAT, "merges.txt' line 2");

    /* A merge whose result is missing from vocab.json only fails when BPE produces it. */
    write_bytes(path, "#version: 0.2\nt h\n", 18);
    TU_OK(clh_tokenizer_load(dir, &tok));
    int32_t *ids;
    size_t n;
    TU_FAILS(clh_tokenizer_encode(tok, "tht", &ids, &n), CLH_ERR_FORMAT, "\"th\"");
    clh_tokenizer_free(tok);
}

/* ------------------------------------------------------------------ real vocabulary */

static void check_shared_goldens(clh_tokenizer *tok) {
    char path[1024];
    size_t count;
    TU_SHARED_OR_SKIP(path, "clip_tokenizer_golden.txt");
    golden *g = load_golden(path, 1, &count);
    assert_int_equal(count, 6);
    assert_int_equal(check_tokenize(tok, g, count), 0);
    free_golden(g, count);
    TU_SHARED_OR_SKIP(path, "clip_tokenizer_golden_nospecial.txt");
    g = load_golden(path, 1, &count);
    assert_int_equal(count, 3);
    assert_int_equal(check_encode(tok, g, count), 0);
    free_golden(g, count);
}

static void test_real_vocab_gz(void **state) {
    (void)state;
    char path[1024];
    TU_SHARED_OR_SKIP(path, "bpe_simple_vocab_16e6.txt.gz");
    double best = 1e9;
    clh_tokenizer *tok = NULL;
    for (int rep = 0; rep < 3; rep++) {
        clh_tokenizer_free(tok);
        double t0 = now_ms();
        TU_OK(clh_tokenizer_load(path, &tok));
        double ms = now_ms() - t0;
        best = ms < best ? ms : best;
    }
    print_message("load bpe_simple_vocab_16e6.txt.gz: %.1f ms (best of 3)\n", best);
    assert_int_equal(clh_tokenizer_vocab_size(tok), 49408);
    assert_int_equal(clh_tokenizer_sot(tok), 49406);
    assert_int_equal(clh_tokenizer_eot(tok), 49407);
    check_shared_goldens(tok);
    clh_tokenizer_free(tok);
}

static void test_real_vocab_hf(void **state) {
    (void)state;
    char path[1024];
    TU_SHARED_OR_SKIP(path, "hf_clip-vit-base-patch16");
    double t0 = now_ms();
    clh_tokenizer *tok = load_ok(path);
    print_message("load HF vocab.json + merges.txt: %.1f ms\n", now_ms() - t0);
    assert_int_equal(clh_tokenizer_vocab_size(tok), 49408);
    assert_int_equal(clh_tokenizer_sot(tok), 49406);
    assert_int_equal(clh_tokenizer_eot(tok), 49407);
    check_shared_goldens(tok);
    clh_tokenizer_free(tok);
    TU_SHARED_OR_SKIP(path, "hf_clip-vit-base-patch16/vocab.json");
    tok = load_ok(path);
    check_shared_goldens(tok);
    clh_tokenizer_free(tok);
}

/* The gunzipped .txt loads to the same tokenizer (written at test time: the data files are
 * not copied into the repository). */
static void test_real_vocab_plain_txt(void **state) {
    (void)state;
    char path[1024];
    TU_SHARED_OR_SKIP(path, "bpe_simple_vocab_16e6.txt.gz");
    gzFile in = gzopen(path, "rb");
    assert_non_null(in);
    FILE *out = fopen(tu_tmp_path("bpe_simple_vocab_16e6.txt"), "wb");
    assert_non_null(out);
    char buf[1 << 16];
    int got;
    while ((got = gzread(in, buf, sizeof buf)) > 0)
        assert_int_equal(fwrite(buf, 1, (size_t)got, out), (size_t)got);
    assert_int_equal(got, 0);
    gzclose(in);
    fclose(out);
    clh_tokenizer *tok = load_ok(tu_tmp_path("bpe_simple_vocab_16e6.txt"));
    assert_int_equal(clh_tokenizer_vocab_size(tok), 49408);
    check_shared_goldens(tok);
    clh_tokenizer_free(tok);
}

/* Every open_clip tokenization in the committed fixture, with both vocabulary formats. */
static void test_openclip_generated(void **state) {
    (void)state;
    char gz[1024], hf[1024];
    TU_SHARED_OR_SKIP(gz, "bpe_simple_vocab_16e6.txt.gz");
    TU_SHARED_OR_SKIP(hf, "hf_clip-vit-base-patch16");
    size_t count, n_ex;
    golden *g = load_golden(tu_fixture("tokenizer/openclip_generated.tsv"), 1, &count);
    golden *ex = load_golden(tu_fixture("tokenizer/openclip_ftfy_excluded.tsv"), 2, &n_ex);
    assert_true(count > 2000);
    const char *paths[2] = {gz, hf};
    for (int p = 0; p < 2; p++) {
        clh_tokenizer *tok = load_ok(paths[p]);
        size_t bad = check_tokenize(tok, g, count);
        print_message("%s: %zu of %zu open_clip tokenizations match exactly\n",
                      p ? "HF vocab.json" : ".txt.gz", count - bad, count);
        assert_int_equal(bad, 0);
        /* Strings that ftfy rewrites: clhclip must give the ids without ftfy. */
        size_t bad_ex = check_tokenize(tok, ex, n_ex);
        print_message("%zu ftfy-only differences reproduce the no-ftfy reference: %zu of %zu\n",
                      n_ex, n_ex - bad_ex, n_ex);
        assert_int_equal(bad_ex, 0);
        if (p == 0) {
            size_t bad_rt = check_round_trip(tok, g, count);
            assert_int_equal(bad_rt, 0);
        }
        clh_tokenizer_free(tok);
    }
    free_golden(g, count);
    free_golden(ex, n_ex);
}

/* Random code points, entities and case oddities against the Python reference (no ftfy). */
static void test_reference_fuzz(void **state) {
    (void)state;
    char path[1024];
    TU_SHARED_OR_SKIP(path, "bpe_simple_vocab_16e6.txt.gz");
    clh_tokenizer *tok = load_ok(path);
    size_t count;
    golden *g = load_golden(tu_fixture("tokenizer/reference_fuzz.tsv"), 1, &count);
    assert_true(count >= 400);
    size_t bad = check_encode(tok, g, count);
    print_message("%zu of %zu fuzz strings match the reference\n", count - bad, count);
    assert_int_equal(bad, 0);
    free_golden(g, count);
    clh_tokenizer_free(tok);
}

/* Tokenizing CAT-Seg's 847 ADE class names must take milliseconds. */
static void test_ade847_speed(void **state) {
    (void)state;
    char path[1024], vocab[1024];
    TU_SHARED_OR_SKIP(vocab, "bpe_simple_vocab_16e6.txt.gz");
    TU_SHARED_OR_SKIP(path, "classnames/ade20k_847.txt");
    clh_tokenizer *tok = load_ok(vocab);
    char *data = read_all(path, NULL);
    char *names[1000];
    int count = 0;
    for (char *line = strtok(data, "\n"); line && count < 1000; line = strtok(NULL, "\n"))
        names[count++] = line;
    assert_int_equal(count, 847);
    int32_t out[CLH_CONTEXT_LENGTH];
    double t0 = now_ms();
    for (int i = 0; i < count; i++)
        TU_OK(clh_tokenize(tok, names[i], CLH_CONTEXT_LENGTH, 0, out));
    double cold = now_ms() - t0;
    t0 = now_ms();
    for (int i = 0; i < count; i++)
        TU_OK(clh_tokenize(tok, names[i], CLH_CONTEXT_LENGTH, 0, out));
    double warm = now_ms() - t0;
    print_message("847 ADE class names: %.2f ms cold cache, %.2f ms warm\n", cold, warm);
    assert_true(cold < 200.0);
    free(data);
    clh_tokenizer_free(tok);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tiny_txt),
        cmocka_unit_test(test_tiny_gz),
        cmocka_unit_test(test_tiny_hf),
        cmocka_unit_test(test_tiny_hf_decodes_like_openai),
        cmocka_unit_test(test_tiny_decode),
        cmocka_unit_test(test_tokenize_padding_and_limits),
        cmocka_unit_test(test_empty_text),
        cmocka_unit_test(test_bad_utf8),
        cmocka_unit_test(test_null_arguments),
        cmocka_unit_test(test_decode),
        cmocka_unit_test(test_tiny_round_trip),
        cmocka_unit_test(test_cache_and_long_words),
        cmocka_unit_test(test_missing_files),
        cmocka_unit_test(test_corrupt_openai_files),
        cmocka_unit_test(test_corrupt_hf_files),
        cmocka_unit_test(test_real_vocab_gz),
        cmocka_unit_test(test_real_vocab_hf),
        cmocka_unit_test(test_real_vocab_plain_txt),
        cmocka_unit_test(test_openclip_generated),
        cmocka_unit_test(test_reference_fuzz),
        cmocka_unit_test(test_ade847_speed),
    };
    return cmocka_run_group_tests(tests, tu_setup_tmp, tu_teardown_tmp);
}
