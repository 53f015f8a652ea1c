/* safetensors reader/writer: round trips, files written by the Python library, and every
 * malformed-header path. */
#include <errno.h>
#include <stdbool.h>
#include <unistd.h>

#include "testutil.h"

static bool same_bits(float a, float b) {
    return memcmp(&a, &b, sizeof a) == 0;
}

static void write_bytes(const char *path, const void *data, size_t size) {
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    assert_int_equal(fwrite(data, 1, size, fp), size);
    assert_int_equal(fclose(fp), 0);
}

static long file_size(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0 ? (long)sb.st_size : -1;
}

/* ------------------------------------------------------------------ writer round trip */

static void test_round_trip(void **state) {
    (void)state;
    const char *path = tu_tmp_path("round.safetensors");
    float denormal = 1e-40f;
    float a[6] = {1.5f, -2.25f, INFINITY, -0.0f, NAN, denormal};
    int64_t a_shape[2] = {2, 3};
    float scalar = 2.6592f;
    int64_t empty_shape[2] = {0, 4};
    int64_t ids[5] = {INT64_MIN, -1, 0, 49407, INT64_MAX};
    int64_t ids_shape[1] = {5};

    clh_st_writer *w;
    TU_OK(clh_st_writer_new(&w));
    TU_OK(clh_st_writer_add_f32(w, "layer.weight", 2, a_shape, a));
    TU_OK(clh_st_writer_add_f32(w, "logit_scale", 0, NULL, &scalar));
    TU_OK(clh_st_writer_add_f32(w, "empty", 2, empty_shape, NULL));
    TU_OK(clh_st_writer_add_i64(w, "ids", 1, ids_shape, ids));
    TU_OK(clh_st_writer_set_metadata(w, "format", "np"));
    TU_OK(clh_st_writer_set_metadata(w, "note", "first"));
    TU_OK(clh_st_writer_set_metadata(w, "note", "quote \" and \\ and \xc3\xa9"));
    TU_OK(clh_st_writer_save(w, path));
    clh_st_writer_free(w);
    char tmp[600];
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
    assert_int_equal(access(tmp, F_OK), -1);

    /* Layout: 8-byte length, header padded to a multiple of 8, then 24 + 4 + 0 + 40 bytes. */
    FILE *fp = fopen(path, "rb");
    assert_non_null(fp);
    uint8_t len_bytes[8];
    assert_int_equal(fread(len_bytes, 1, 8, fp), 8);
    uint64_t header_len = 0;
    for (int i = 7; i >= 0; i--)
        header_len = header_len << 8 | len_bytes[i];
    char first;
    assert_int_equal(fread(&first, 1, 1, fp), 1);
    fclose(fp);
    assert_int_equal(first, '{');
    assert_int_equal(header_len % 8, 0);
    assert_int_equal(file_size(path), 8 + (long)header_len + 24 + 4 + 0 + 40);

    clh_st_file *f;
    TU_OK(clh_st_open(path, &f));
    assert_int_equal(clh_st_count(f), 4);
    const char *order[4] = {"layer.weight", "logit_scale", "empty", "ids"};
    for (size_t i = 0; i < 4; i++) {
        clh_st_tensor_info info;
        TU_OK(clh_st_info_at(f, i, &info));
        assert_string_equal(info.name, order[i]);
    }
    clh_st_tensor_info info;
    TU_OK(clh_st_info(f, "layer.weight", &info));
    assert_int_equal(info.dtype, CLH_DTYPE_F32);
    assert_int_equal(info.ndim, 2);
    assert_int_equal(info.shape[0], 2);
    assert_int_equal(info.shape[1], 3);
    assert_int_equal(info.numel, 6);
    float back[6];
    TU_OK(clh_st_read_f32(f, "layer.weight", back, 6));
    for (int i = 0; i < 6; i++)
        assert_true(same_bits(back[i], a[i]));

    TU_OK(clh_st_info(f, "logit_scale", &info));
    assert_int_equal(info.ndim, 0);
    assert_int_equal(info.numel, 1);
    float s;
    TU_OK(clh_st_read_f32(f, "logit_scale", &s, 1));
    assert_true(same_bits(s, scalar));

    TU_OK(clh_st_info(f, "empty", &info));
    assert_int_equal(info.numel, 0);
    assert_int_equal(info.shape[1], 4);
    TU_OK(clh_st_read_f32(f, "empty", NULL, 0));

    TU_OK(clh_st_info(f, "ids", &info));
    assert_int_equal(info.dtype, CLH_DTYPE_I64);
    int64_t ids_back[5];
    TU_OK(clh_st_read_i64(f, "ids", ids_back, 5));
    assert_memory_equal(ids_back, ids, sizeof ids);

    assert_string_equal(clh_st_metadata(f, "format"), "np");
    assert_string_equal(clh_st_metadata(f, "note"), "quote \" and \\ and \xc3\xa9");
    assert_null(clh_st_metadata(f, "absent"));
    clh_st_close(f);
}

static void test_save_replaces_existing(void **state) {
    (void)state;
    const char *path = tu_tmp_path("replace.safetensors");
    write_bytes(path, "old contents", 12);
    float v = 7.0f;
    int64_t shape[1] = {1};
    clh_st_writer *w;
    TU_OK(clh_st_writer_new(&w));
    TU_OK(clh_st_writer_add_f32(w, "v", 1, shape, &v));
    TU_OK(clh_st_writer_save(w, path));
    clh_st_writer_free(w);
    clh_st_file *f;
    TU_OK(clh_st_open(path, &f));
    float back = 0;
    TU_OK(clh_st_read_f32(f, "v", &back, 1));
    assert_true(back == 7.0f);
    clh_st_close(f);
    char tmp[600];
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
    assert_int_equal(access(tmp, F_OK), -1);
}

/* A failed save (rename onto a directory) reports IO, keeps the target, removes the temp. */
static void test_save_failure_keeps_target(void **state) {
    (void)state;
    const char *dir = tu_tmp_path("is_a_dir");
    assert_int_equal(mkdir(dir, 0755), 0);
    char keep[600];
    snprintf(keep, sizeof keep, "%s/keep.txt", dir);
    write_bytes(keep, "x", 1);
    float v = 1.0f;
    int64_t shape[1] = {1};
    clh_st_writer *w;
    TU_OK(clh_st_writer_new(&w));
    TU_OK(clh_st_writer_add_f32(w, "v", 1, shape, &v));
    TU_FAILS(clh_st_writer_save(w, dir), CLH_ERR_IO, "is_a_dir");
    assert_int_equal(file_size(keep), 1);
    char tmp[600];
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", dir, (long)getpid());
    assert_int_equal(access(tmp, F_OK), -1);

    TU_FAILS(clh_st_writer_save(w, tu_tmp_path("no/such/dir/x.safetensors")), CLH_ERR_IO,
             "no/such/dir");
    clh_st_writer_free(w);
}

static void test_writer_rejects_bad_input(void **state) {
    (void)state;
    clh_st_writer *w;
    TU_OK(clh_st_writer_new(&w));
    float v[2] = {1, 2};
    int64_t shape[7] = {2, 1, 1, 1, 1, 1, 1};
    int64_t negative[1] = {-2};
    TU_OK(clh_st_writer_add_f32(w, "a", 1, shape, v));
    TU_FAILS(clh_st_writer_add_f32(w, "a", 1, shape, v), CLH_ERR_INVALID_ARGUMENT, "'a'");
    TU_FAILS(clh_st_writer_add_i64(w, "a", 0, NULL, (const int64_t *)v), CLH_ERR_INVALID_ARGUMENT,
             "already");
    TU_FAILS(clh_st_writer_add_f32(w, "__metadata__", 1, shape, v), CLH_ERR_INVALID_ARGUMENT,
             "reserved");
    TU_FAILS(clh_st_writer_add_f32(w, "b", 7, shape, v), CLH_ERR_INVALID_ARGUMENT, "ndim");
    TU_FAILS(clh_st_writer_add_f32(w, "b", 1, negative, v), CLH_ERR_INVALID_ARGUMENT, "-2");
    TU_FAILS(clh_st_writer_add_f32(w, "b", 1, shape, NULL), CLH_ERR_INVALID_ARGUMENT, "NULL");
    TU_FAILS(clh_st_writer_add_f32(w, "", 1, shape, v), CLH_ERR_INVALID_ARGUMENT, "empty");
    TU_FAILS(clh_st_writer_set_metadata(w, "k", NULL), CLH_ERR_INVALID_ARGUMENT, "value");
    TU_FAILS(clh_st_writer_save(w, NULL), CLH_ERR_INVALID_ARGUMENT, "path");
    clh_st_writer_free(w);
    clh_st_writer_free(NULL);
}

/* ------------------------------------------------------------------ Python-written file
 * Expected values are recomputed here from the formulas in
 * tests/reference/make_safetensors_fixtures.py. */

/* Independent decoders: value = sign * 2^(e - bias) * (1 + m / 2^mbits), subnormals
 * sign * 2^(1 - bias - mbits) * m, all-ones exponent inf/NaN. */
static float decode_minifloat(uint32_t bits, int mbits, int ebits) {
    int bias = (1 << (ebits - 1)) - 1;
    uint32_t m = bits & ((1u << mbits) - 1);
    uint32_t e = (bits >> mbits) & ((1u << ebits) - 1);
    double sign = (bits >> (mbits + ebits)) & 1 ? -1.0 : 1.0;
    if (e == (1u << ebits) - 1)
        return m ? NAN : (float)(sign * INFINITY);
    if (e == 0)
        return (float)(sign * ldexp((double)m, 1 - bias - mbits));
    return (float)(sign * ldexp(1.0 + (double)m / (1 << mbits), (int)e - bias));
}

static void check_patterns(const clh_st_file *f, const char *name, int mbits, int ebits) {
    const size_t n = (65535 / 7) + 1;
    clh_st_tensor_info info;
    TU_OK(clh_st_info(f, name, &info));
    assert_int_equal(info.numel, n);
    float *got = malloc(n * sizeof *got);
    assert_non_null(got);
    TU_OK(clh_st_read_f32(f, name, got, n));
    size_t subnormals = 0, specials = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t bits = (uint32_t)(i * 7);
        float want = decode_minifloat(bits, mbits, ebits);
        if (isnan(want)) {
            specials++;
            if (!isnan(got[i]))
                fail_msg("%s pattern 0x%04x: got %g, want NaN", name, bits, got[i]);
            continue;
        }
        if (isinf(want))
            specials++;
        if (want != 0 && fabsf(want) < ldexpf(1.0f, 2 - (1 << (ebits - 1))))
            subnormals++;
        if (!same_bits(got[i], want) &&
            !(got[i] == 0 && want == 0 && signbit(got[i]) == signbit(want)))
            fail_msg("%s pattern 0x%04x: got %.9g, want %.9g", name, bits, got[i], want);
    }
    assert_true(subnormals > 10); /* the fixture really exercises these paths */
    assert_true(specials > 10);
    free(got);
}

static void test_python_fixture(void **state) {
    (void)state;
    clh_st_file *f;
    TU_OK(clh_st_open(tu_fixture("safetensors/python_dtypes.safetensors"), &f));
    assert_int_equal(clh_st_count(f), 12);
    assert_string_equal(clh_st_metadata(f, "format"), "pt");
    assert_string_equal(clh_st_metadata(f, "note"), "clhclip fixture");

    clh_st_tensor_info info;
    TU_OK(clh_st_info(f, "f32", &info));
    assert_int_equal(info.dtype, CLH_DTYPE_F32);
    assert_int_equal(info.ndim, 3);
    assert_int_equal(info.shape[0] * 100 + info.shape[1] * 10 + info.shape[2], 345);
    float f32[60];
    TU_OK(clh_st_read_f32(f, "f32", f32, 60));
    for (int i = 0; i < 60; i++)
        assert_true(same_bits(f32[i], (float)((i - 50) * 1.7 + i * i * 0.013)));

    float f64[7];
    TU_OK(clh_st_info(f, "f64", &info));
    assert_int_equal(info.dtype, CLH_DTYPE_F64);
    TU_OK(clh_st_read_f32(f, "f64", f64, 7));
    for (int i = 0; i < 7; i++)
        assert_true(same_bits(f64[i], (float)((i - 3) * 1e10 / 7.0 + 0.1 * i)));

    check_patterns(f, "f16_patterns", 10, 5);
    check_patterns(f, "bf16_patterns", 7, 8);

    int64_t i64[10];
    TU_OK(clh_st_read_i64(f, "i64", i64, 10));
    for (int i = 0; i < 10; i++)
        assert_true(i64[i] == (i % 2 ? -1 : 1) * (int64_t)i * 123456789013LL);

    static const struct {
        const char *name;
        clh_dtype dtype;
        int64_t lo, hi;
    } ints[] = {{"i32", CLH_DTYPE_I32, INT32_MIN, INT32_MAX},
                {"i16", CLH_DTYPE_I16, INT16_MIN, INT16_MAX},
                {"i8", CLH_DTYPE_I8, INT8_MIN, INT8_MAX},
                {"u8", CLH_DTYPE_U8, 0, UINT8_MAX}};
    for (size_t t = 0; t < sizeof ints / sizeof ints[0]; t++) {
        int64_t v[6];
        TU_OK(clh_st_info(f, ints[t].name, &info));
        assert_int_equal(info.dtype, ints[t].dtype);
        TU_OK(clh_st_read_i64(f, ints[t].name, v, 6));
        for (int i = 0; i < 6; i++)
            assert_true(v[i] == ints[t].lo + (ints[t].hi - ints[t].lo) * i / 5);
    }

    TU_OK(clh_st_info(f, "scalar", &info));
    assert_int_equal(info.ndim, 0);
    float scalar;
    TU_OK(clh_st_read_f32(f, "scalar", &scalar, 1));
    assert_true(scalar == 2.6592f);
    TU_OK(clh_st_info(f, "empty", &info));
    assert_int_equal(info.numel, 0);
    TU_OK(clh_st_info(f, "bool", &info));
    assert_int_equal(info.dtype, CLH_DTYPE_BOOL);
    assert_string_equal(clh_dtype_name(info.dtype), "BOOL");
    clh_st_close(f);
}

static void test_read_errors(void **state) {
    (void)state;
    clh_st_file *f;
    TU_OK(clh_st_open(tu_fixture("safetensors/python_dtypes.safetensors"), &f));
    float buf[64];
    int64_t ibuf[64];
    TU_FAILS(clh_st_read_f32(f, "i64", buf, 10), CLH_ERR_FORMAT, "I64");
    TU_FAILS(clh_st_read_f32(f, "bool", buf, 4), CLH_ERR_FORMAT, "bool");
    TU_FAILS(clh_st_read_i64(f, "f32", ibuf, 60), CLH_ERR_FORMAT, "F32");
    TU_FAILS(clh_st_read_i64(f, "bool", ibuf, 4), CLH_ERR_FORMAT, "BOOL");
    TU_FAILS(clh_st_read_f32(f, "f32", buf, 59), CLH_ERR_INVALID_ARGUMENT, "60");
    TU_FAILS(clh_st_read_f32(f, "f32", buf, 61), CLH_ERR_INVALID_ARGUMENT, "61");
    TU_FAILS(clh_st_read_i64(f, "i64", ibuf, 11), CLH_ERR_INVALID_ARGUMENT, "i64");
    TU_FAILS(clh_st_read_f32(f, "f32", NULL, 60), CLH_ERR_INVALID_ARGUMENT, "NULL");
    TU_FAILS(clh_st_read_f32(f, "no.such.tensor", buf, 1), CLH_ERR_NOT_FOUND, "no.such.tensor");
    clh_st_tensor_info info;
    TU_FAILS(clh_st_info(f, "missing_name", &info), CLH_ERR_NOT_FOUND, "missing_name");
    TU_FAILS(clh_st_info_at(f, 12, &info), CLH_ERR_INVALID_ARGUMENT, "12");
    clh_st_close(f);
    clh_st_close(NULL);
}

static void test_missing_file(void **state) {
    (void)state;
    clh_st_file *f = (clh_st_file *)1;
    TU_FAILS(clh_st_open("tests/fixtures/safetensors/does_not_exist.safetensors", &f), CLH_ERR_IO,
             "does_not_exist.safetensors");
    assert_null(f);
    assert_non_null(strstr(clh_last_error(), strerror(ENOENT)));
    TU_FAILS(clh_st_open("tests/fixtures", &f), CLH_ERR_IO, "tests/fixtures");
}

/* ------------------------------------------------------------------ malformed files */

/* File = u64 header length (`len`, or the real length when len < 0) + header + data. */
static void write_st(const char *path, long long len, const char *header, size_t data_bytes) {
    size_t hlen = strlen(header);
    uint64_t stored = len < 0 ? hlen : (uint64_t)len;
    size_t total = 8 + hlen + data_bytes;
    uint8_t *buf = calloc(1, total);
    assert_non_null(buf);
    for (int i = 0; i < 8; i++)
        buf[i] = (uint8_t)(stored >> (8 * i));
    memcpy(buf + 8, header, hlen);
    write_bytes(path, buf, total);
    free(buf);
}

static void test_malformed_headers(void **state) {
    (void)state;
    static const struct {
        long long len; /* -1: the real header length */
        const char *header;
        size_t data;
        const char *needle;
    } cases[] = {
        {1000, "{}", 0, "header length 1000"},
        {(long long)1 << 62, "{}", 0, "header length"},
        {-1, "{\"a\": ", 0, "not valid JSON"},
        {-1, "[1, 2]", 0, "does not start with a JSON object"},
        {-1, "{} x", 0, "trailing"},
        {-1, "{\"a\":{\"dtype\":\"F8\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1, "dtype 'F8'"},
        {-1, "{\"a\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "\"dtype\""},
        {-1, "{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4, "shape"},
        {-1, "{\"a\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}", 4, "shape"},
        {-1, "{\"a\":{\"dtype\":\"F32\",\"shape\":\"4\",\"data_offsets\":[0,16]}}", 16, "shape"},
        {-1, "{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}", 4,
         "7 dimensions"},
        {-1, "{\"a\":{\"dtype\":\"F32\",\"shape\":[100],\"data_offsets\":[0,400]}}", 16,
         "out of range"},
        {-1, "{\"a\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,4]}}", 16,
         "out of range"},
        {-1, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,12]}}", 16, "need 8"},
        {-1, "{\"a\":{\"dtype\":\"F16\",\"shape\":[3],\"data_offsets\":[0,12]}}", 16, "need 6"},
        {-1, "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4,8]}}", 16,
         "data_offsets"},
        {-1, "{\"a\":{\"dtype\":\"F32\",\"shape\":[1]}}", 16, "data_offsets"},
        {-1,
         "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
         "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
         8, "duplicate tensor name"},
        {-1, "{\"__metadata__\":{\"k\":1}}", 0, "__metadata__"},
        {-1, "{\"__metadata__\":[]}", 0, "__metadata__"},
        {-1, "{\"a\":[1]}", 0, "not a JSON object"},
    };
    const char *path = tu_tmp_path("bad.safetensors");
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        write_st(path, cases[i].len, cases[i].header, cases[i].data);
        clh_st_file *f = (clh_st_file *)1;
        clh_status st = clh_st_open(path, &f);
        if (st != CLH_ERR_FORMAT || !strstr(clh_last_error(), cases[i].needle) ||
            !strstr(clh_last_error(), "bad.safetensors"))
            fail_msg("case %zu (%s): %s '%s', expected CLH_ERR_FORMAT with '%s'", i,
                     cases[i].header, clh_status_name(st), clh_last_error(), cases[i].needle);
        assert_null(f);
    }
    /* A valid header with spaces as padding (as Python writes) opens. */
    write_st(path, -1, "{\"a\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]}}    ", 2);
    clh_st_file *f;
    TU_OK(clh_st_open(path, &f));
    clh_st_close(f);
}

static void test_truncated_files(void **state) {
    (void)state;
    const char *path = tu_tmp_path("short.safetensors");
    write_bytes(path, "", 0);
    clh_st_file *f;
    TU_FAILS(clh_st_open(path, &f), CLH_ERR_FORMAT, "truncated");
    write_bytes(path, "\x10\0\0", 3);
    TU_FAILS(clh_st_open(path, &f), CLH_ERR_FORMAT, "truncated");

    /* Cut a valid file: inside the data, then inside the header. */
    FILE *fp = fopen(tu_fixture("safetensors/python_dtypes.safetensors"), "rb");
    assert_non_null(fp);
    static uint8_t full[1 << 16];
    size_t size = fread(full, 1, sizeof full, fp);
    fclose(fp);
    assert_true(size > 1000 && size < sizeof full);
    write_bytes(path, full, size - 1);
    TU_FAILS(clh_st_open(path, &f), CLH_ERR_FORMAT, "out of range");
    write_bytes(path, full, 100);
    TU_FAILS(clh_st_open(path, &f), CLH_ERR_FORMAT, "header length");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_save_replaces_existing),
        cmocka_unit_test(test_save_failure_keeps_target),
        cmocka_unit_test(test_writer_rejects_bad_input),
        cmocka_unit_test(test_python_fixture),
        cmocka_unit_test(test_read_errors),
        cmocka_unit_test(test_missing_file),
        cmocka_unit_test(test_malformed_headers),
        cmocka_unit_test(test_truncated_files),
    };
    return cmocka_run_group_tests(tests, tu_setup_tmp, tu_teardown_tmp);
}
