/* chunk_selftest.c -- exercise every entry point of csrc/chunk.h, many times.
 *
 * Built together with csrc/chunk.c (-llz4 -lcrypto -pthread) and run by
 * tests/test_chunk_sanitizers.py under AddressSanitizer + UBSan and under
 * valgrind, so that memory errors, leaks and undefined behaviour in the codec
 * show up as a failed test.
 *
 *   usage: chunk_selftest [quick]
 *
 * "quick" cuts the iteration counts (for valgrind); the set of checks is the
 * same. On the first failed check the program prints
 * "FAIL file:line: what" to stderr and exits 1; on success it prints
 * "chunk_selftest: N checks passed" and exits 0.
 *
 * Every buffer handed to the codec is a heap block of exactly the documented
 * size, so that a read or write past its end is caught by the sanitizer. The
 * stored format is checked against an independent reading of chunk.h's
 * header comment (SHA-256 id, AES-256-GCM with derived keys, lz4 block).
 */
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lz4.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "chunk.h"

/* ---- checks ------------------------------------------------------------ */

static atomic_ulong n_checks;   /* checks passed so far, all threads */
static int quick;               /* 1: reduced iteration counts (valgrind) */

static void fail(const char *file, int line, const char *fmt, ...)
    __attribute__((noreturn, format(printf, 3, 4)));

static void fail(const char *file, int line, const char *fmt, ...)
{
    va_list ap;

    fprintf(stderr, "FAIL %s:%d: ", file, line);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(1);
}

/* CHECK_AT reports the caller's line; helpers take it as their first arg. */
#define CHECK_AT(line, cond, ...)                                         \
    do {                                                                  \
        if (!(cond))                                                      \
            fail(__FILE__, (line), __VA_ARGS__);                          \
        atomic_fetch_add(&n_checks, 1);                                   \
    } while (0)
#define CHECK(cond, ...) CHECK_AT(__LINE__, cond, __VA_ARGS__)

static const char *errname(int rc)
{
    switch (rc) {
    case 0: return "0";
    case -EINVAL: return "-EINVAL";
    case -ENOBUFS: return "-ENOBUFS";
    case -ENOMEM: return "-ENOMEM";
    case -EBADMSG: return "-EBADMSG";
    case -ENOKEY: return "-ENOKEY";
    case -EKEYREJECTED: return "-EKEYREJECTED";
    case -EPROTO: return "-EPROTO";
    case -EIO: return "-EIO";
    default: return "unexpected";
    }
}

#define CHECK_RC_AT(line, what, expr, want)                               \
    do {                                                                  \
        int rc_ = (expr), want_ = (want);                                 \
        CHECK_AT(line, rc_ == want_, "%s: %s returned %d (%s), want %s",  \
                 (what), #expr, rc_, errname(rc_), errname(want_));       \
    } while (0)
#define CHECK_RC(what, expr, want) CHECK_RC_AT(__LINE__, what, expr, want)

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);

    CHECK(p != NULL, "malloc(%zu) failed", n);
    return p;
}

static uint8_t *dup_bytes(const uint8_t *p, size_t n)
{
    uint8_t *q = xmalloc(n);

    if (n)
        memcpy(q, p, n);
    return q;
}

/* ---- data -------------------------------------------------------------- */

typedef struct {
    uint64_t s;   /* xorshift64* state, never 0 */
} prng;

static uint64_t next(prng *r)
{
    uint64_t x = r->s;

    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    r->s = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static size_t below(prng *r, size_t n)
{
    return (size_t)(next(r) % n);
}

static void fill_random(prng *r, uint8_t *p, size_t len)
{
    for (size_t i = 0; i < len; i += 8) {
        uint64_t v = next(r);
        size_t n = len - i < 8 ? len - i : 8;

        memcpy(p + i, &v, n);
    }
}

static const char TEXT[] =
    "restore maps the snapshot memory file lazily; each fault fetches one "
    "chunk from the store, verifies it, decodes it and copies the page in. ";

/* Compressible text with an occasional random byte. */
static void fill_text(prng *r, uint8_t *p, size_t len)
{
    size_t pos = below(r, sizeof(TEXT) - 1), noise = below(r, 200);

    for (size_t i = 0; i < len; i++) {
        p[i] = (uint8_t)TEXT[pos];
        pos = (pos + 1) % (sizeof(TEXT) - 1);
        if (i == noise) {
            p[i] = (uint8_t)next(r);
            noise += 1 + below(r, 200);
        }
    }
}

enum page_kind { PAGE_ZERO, PAGE_RANDOM, PAGE_TEXT, PAGE_ONE_BYTE,
                 PAGE_LAST_BYTE, PAGE_KINDS };

static void fill_page(prng *r, uint8_t *p, size_t ps, enum page_kind kind)
{
    memset(p, 0, ps);
    switch (kind) {
    case PAGE_ZERO:
        break;
    case PAGE_RANDOM:
        fill_random(r, p, ps);
        break;
    case PAGE_TEXT:
        fill_text(r, p, ps);
        break;
    case PAGE_ONE_BYTE:   /* one non-zero byte anywhere */
        p[below(r, ps)] = (uint8_t)(1 + below(r, 255));
        break;
    case PAGE_LAST_BYTE:  /* zero but for its very last byte */
        p[ps - 1] = (uint8_t)(1 + below(r, 255));
        break;
    default:
        break;
    }
}

enum shape { SHAPE_ZERO, SHAPE_RANDOM, SHAPE_TEXT, SHAPE_MIXED, SHAPE_SPARSE,
             SHAPES };
static const char *const SHAPE_NAMES[SHAPES] = {
    "zero", "random", "text", "mixed", "sparse"
};

/* A heap block of exactly npages pages of the given shape. */
static uint8_t *make_chunk(prng *r, size_t ps, size_t npages, enum shape sh)
{
    uint8_t *raw = xmalloc(npages * ps);

    for (size_t s = 0; s < npages; s++) {
        enum page_kind k;

        switch (sh) {
        case SHAPE_ZERO: k = PAGE_ZERO; break;
        case SHAPE_RANDOM: k = PAGE_RANDOM; break;
        case SHAPE_TEXT: k = PAGE_TEXT; break;
        case SHAPE_SPARSE:
            k = below(r, 2) ? PAGE_LAST_BYTE : PAGE_ZERO;
            break;
        default:
            k = (enum page_kind)below(r, PAGE_KINDS);
            break;
        }
        fill_page(r, raw + s * ps, ps, k);
    }
    return raw;
}

/* ---- reference implementation of the format (from chunk.h) ------------- */

static const uint8_t KEY1[RS_KEY_BYTES] = {
    0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x10, 0x32, 0x54,
    0x76, 0x98, 0xba, 0xdc, 0xfe, 0x00, 0x11, 0x22, 0x33, 0x44, 0x55,
    0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff
};
static const uint8_t KEY2[RS_KEY_BYTES] = {
    0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x10, 0x32, 0x54,
    0x76, 0x98, 0xba, 0xdc, 0xfe, 0x00, 0x11, 0x22, 0x33, 0x44, 0x55,
    0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xfe
};

static void ref_sha256(const uint8_t *p, size_t len, uint8_t *md32)
{
    unsigned int n = 0;

    CHECK(EVP_Digest(p, len, md32, &n, EVP_sha256(), NULL) && n == 32,
          "reference SHA-256 failed");
}

static void ref_hmac(const uint8_t *key, const void *data, size_t len,
                     uint8_t *mac32)
{
    unsigned int n = 0;

    CHECK(HMAC(EVP_sha256(), key, RS_KEY_BYTES, data, len, mac32, &n) &&
              n == 32,
          "reference HMAC-SHA256 failed");
}

static int page_zero(const uint8_t *p, size_t ps)
{
    for (size_t i = 0; i < ps; i++)
        if (p[i])
            return 0;
    return 1;
}

static int bm_get(const uint8_t *bm, size_t s)
{
    return (bm[s / 8] >> (s % 8)) & 1;
}

static void bm_flip(uint8_t *bm, size_t s)
{
    bm[s / 8] ^= (uint8_t)(1u << (s % 8));
}

/* ---- one geometry: codecs with and without keys ------------------------ */

struct geom {
    size_t chunk;       /* chunk_size, bytes */
    size_t page;        /* page_size, bytes */
    size_t slots;       /* chunk / page */
    size_t bm_bytes;    /* rs_codec_bitmap_bytes() */
    size_t bound;       /* rs_codec_stored_bound() */
    rs_codec *plain;    /* no key */
    rs_codec *key1;     /* KEY1 */
    rs_codec *key1b;    /* KEY1 again, a separate codec */
    rs_codec *key2;     /* KEY2 */
};

static void geom_open(struct geom *g, size_t chunk, size_t page)
{
    char what[96];
    rs_codec *cs[4];
    const uint8_t *keys[4] = { NULL, KEY1, KEY1, KEY2 };

    snprintf(what, sizeof(what), "create chunk=%zu page=%zu", chunk, page);
    memset(g, 0, sizeof(*g));
    g->chunk = chunk;
    g->page = page;
    g->slots = chunk / page;
    for (int i = 0; i < 4; i++) {
        cs[i] = NULL;
        CHECK_RC(what, rs_codec_create(&cs[i], chunk, page, keys[i],
                                       keys[i] ? RS_KEY_BYTES : 0),
                 0);
        CHECK(cs[i] != NULL, "%s: rc 0 but no codec", what);
    }
    g->plain = cs[0];
    g->key1 = cs[1];
    g->key1b = cs[2];
    g->key2 = cs[3];
    g->bm_bytes = rs_codec_bitmap_bytes(g->plain);
    g->bound = rs_codec_stored_bound(g->plain);
    {
        size_t want = g->slots / 8 ? g->slots / 8 : 1;

        for (int i = 0; i < 4; i++) {
            CHECK(rs_codec_bitmap_bytes(cs[i]) == want,
                  "%s: bitmap_bytes %zu, want %zu", what,
                  rs_codec_bitmap_bytes(cs[i]), want);
            CHECK(rs_codec_stored_bound(cs[i]) == g->bound,
                  "%s: codecs of one geometry disagree on the bound", what);
        }
    }
    /* Encrypted incompressible chunks need the nonce and the tag on top. */
    CHECK(g->bound >= chunk + RS_GCM_NONCE_BYTES + RS_GCM_TAG_BYTES,
          "%s: stored_bound %zu < chunk + nonce + tag", what, g->bound);
}

static void geom_close(struct geom *g)
{
    rs_codec_destroy(g->plain);
    rs_codec_destroy(g->key1);
    rs_codec_destroy(g->key1b);
    rs_codec_destroy(g->key2);
    memset(g, 0, sizeof(*g));
}

/* ---- encode / decode helpers ------------------------------------------- */

struct enc {
    uint8_t *stored;            /* heap, exactly slen bytes; NULL if 0 */
    size_t slen;                /* stored length, bytes */
    uint8_t id[RS_ID_BYTES];
    uint32_t flags;
    uint8_t *bm;                /* heap, exactly bm_bytes */
};

static void enc_free(struct enc *e)
{
    free(e->stored);
    free(e->bm);
    memset(e, 0, sizeof(*e));
}

static void enc_clone(const struct geom *g, const struct enc *e,
                      struct enc *c)
{
    *c = *e;
    c->stored = e->stored ? dup_bytes(e->stored, e->slen) : NULL;
    c->bm = dup_bytes(e->bm, g->bm_bytes);
}

/* Encode raw with c; out, bitmap and id are exact-size heap blocks. */
static int encode_raw(const struct geom *g, const rs_codec *c,
                      const uint8_t *raw, size_t raw_len, size_t out_cap,
                      struct enc *e)
{
    uint8_t *out = xmalloc(out_cap);
    uint8_t *id = xmalloc(RS_ID_BYTES);
    int rc;

    memset(e, 0, sizeof(*e));
    e->bm = xmalloc(g->bm_bytes);
    memset(out, 0xcc, out_cap);
    memset(id, 0xcc, RS_ID_BYTES);
    memset(e->bm, 0xcc, g->bm_bytes);
    e->flags = 0xccccccccu;
    e->slen = (size_t)-1;
    rc = rs_chunk_encode(c, raw, raw_len, out, out_cap, &e->slen, e->bm, id,
                         &e->flags);
    memcpy(e->id, id, RS_ID_BYTES);
    if (rc == 0 && e->slen <= out_cap && e->slen > 0)
        e->stored = dup_bytes(out, e->slen);
    free(out);
    free(id);
    return rc;
}

static void encode_ok(int line, const char *label, const struct geom *g,
                      const rs_codec *c, const uint8_t *raw, size_t raw_len,
                      struct enc *e)
{
    CHECK_RC_AT(line, label, encode_raw(g, c, raw, raw_len, g->bound, e), 0);
    CHECK_AT(line, e->slen <= g->bound, "%s: stored %zu bytes > bound %zu",
             label, e->slen, g->bound);
}

/* Decode e with c into an exact chunk-size buffer; when want is 0 and raw is
 * given, the result must be raw followed by zeros. */
static void decode_expect(int line, const char *label, const char *what,
                          const struct geom *g, const rs_codec *c,
                          const struct enc *e, int want, const uint8_t *raw,
                          size_t raw_len)
{
    uint8_t *out = xmalloc(g->chunk);
    uint8_t *id = dup_bytes(e->id, RS_ID_BYTES);
    int rc;

    memset(out, 0xa5, g->chunk);
    rc = rs_chunk_decode(c, e->stored, e->slen, id, e->flags, e->bm, out);
    CHECK_AT(line, rc == want, "%s: decode (%s) returned %d (%s), want %s",
             label, what, rc, errname(rc), errname(want));
    if (want == 0) {
        CHECK_AT(line, raw_len == 0 || memcmp(out, raw, raw_len) == 0,
                 "%s: decode (%s) does not give back the raw bytes", label,
                 what);
        CHECK_AT(line, page_zero(out + raw_len, g->chunk - raw_len),
                 "%s: decode (%s) left the tail past %zu bytes non-zero",
                 label, what, raw_len);
    }
    free(out);
    free(id);
}
#define DECODE_EXPECT(...) decode_expect(__LINE__, __VA_ARGS__)

static int decode_rc(const struct geom *g, const rs_codec *c,
                     const struct enc *e)
{
    uint8_t *out = xmalloc(g->chunk);
    int rc = rs_chunk_decode(c, e->stored, e->slen, e->id, e->flags, e->bm,
                             out);

    free(out);
    return rc;
}

/* Check the stored bytes against chunk.h's description of the format.
 * R/rlen: the non-zero slots back to back. */
static void check_format(const char *label, const struct enc *e, int keyed,
                         const uint8_t *R, size_t rlen)
{
    uint8_t md[32];
    const uint8_t *P = e->stored;
    size_t plen = e->slen;
    uint8_t *plain = NULL;

    ref_sha256(e->stored, e->slen, md);
    CHECK(memcmp(md, e->id, 32) == 0, "%s: id is not SHA-256(stored)", label);
    CHECK((e->flags & ~(uint32_t)(RS_CHUNK_LZ4 | RS_CHUNK_ENCRYPTED)) == 0,
          "%s: unknown flags 0x%x", label, e->flags);
    CHECK(!!(e->flags & RS_CHUNK_ENCRYPTED) == keyed,
          "%s: flags 0x%x, encrypted must be %d", label, e->flags, keyed);

    if (keyed) {
        uint8_t k_enc[32], k_nonce[32], mac[32];
        static const char aad[] = "restore/chunk/v1";
        EVP_CIPHER_CTX *ctx;
        int n = 0, ok;

        CHECK(e->slen > RS_GCM_NONCE_BYTES + RS_GCM_TAG_BYTES,
              "%s: encrypted chunk of %zu bytes", label, e->slen);
        plen = e->slen - RS_GCM_NONCE_BYTES - RS_GCM_TAG_BYTES;
        ref_hmac(KEY1, "restore/v1/chunk-encryption", 27, k_enc);
        ref_hmac(KEY1, "restore/v1/chunk-nonce", 22, k_nonce);
        plain = xmalloc(plen);
        ctx = EVP_CIPHER_CTX_new();
        CHECK(ctx != NULL, "EVP_CIPHER_CTX_new failed");
        ok = EVP_DecryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, k_enc,
                                e->stored) &&
             EVP_DecryptUpdate(ctx, NULL, &n, (const uint8_t *)aad,
                               (int)sizeof(aad) - 1) &&
             EVP_DecryptUpdate(ctx, plain, &n,
                               e->stored + RS_GCM_NONCE_BYTES, (int)plen) &&
             EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, RS_GCM_TAG_BYTES,
                                 e->stored + RS_GCM_NONCE_BYTES + plen) &&
             EVP_DecryptFinal_ex(ctx, plain + plen, &n) > 0;
        EVP_CIPHER_CTX_free(ctx);
        CHECK(ok, "%s: reference AES-256-GCM decryption failed", label);
        ref_hmac(k_nonce, plain, plen, mac);
        CHECK(memcmp(mac, e->stored, RS_GCM_NONCE_BYTES) == 0,
              "%s: nonce is not HMAC(k_nonce, P)[0:12]", label);
        P = plain;
    }

    if (e->flags & RS_CHUNK_LZ4) {
        uint8_t *dec = xmalloc(rlen);
        int n = LZ4_decompress_safe((const char *)P, (char *)dec, (int)plen,
                                    (int)rlen);

        CHECK(plen < rlen, "%s: lz4 used but %zu >= %zu raw bytes", label,
              plen, rlen);
        CHECK(n >= 0 && (size_t)n == rlen && memcmp(dec, R, rlen) == 0,
              "%s: plaintext is not an lz4 block of the non-zero slots",
              label);
        free(dec);
    } else {
        CHECK(plen == rlen && memcmp(P, R, rlen) == 0,
              "%s: plaintext is not the non-zero slots back to back", label);
    }
    free(plain);
}

/* Bad inputs to decode that must be refused; e is a valid encoding of raw. */
static void decode_negatives(const char *label, const struct geom *g,
                             int keyed, const struct enc *e,
                             const uint8_t *raw, size_t raw_len, prng *r)
{
    const rs_codec *c = keyed ? g->key1 : g->plain;
    struct enc m;
    size_t nz = 0, zslots = 0, pick;
    char what[128];

    for (size_t s = 0; s < g->slots; s++) {
        if (bm_get(e->bm, s))
            zslots++;
        else
            nz++;
    }

    /* One bit of the stored bytes flipped: the id no longer matches. */
    enc_clone(g, e, &m);
    pick = below(r, m.slen * 8);
    m.stored[pick / 8] ^= (uint8_t)(1u << (pick % 8));
    snprintf(what, sizeof(what), "stored bit %zu flipped", pick);
    DECODE_EXPECT(label, what, g, c, &m, -EBADMSG, NULL, 0);
    /* The same with the last and the first bit. */
    m.stored[pick / 8] ^= (uint8_t)(1u << (pick % 8));
    m.stored[m.slen - 1] ^= 0x80;
    DECODE_EXPECT(label, "last stored bit flipped", g, c, &m, -EBADMSG,
                  NULL, 0);
    m.stored[m.slen - 1] ^= 0x80;
    m.stored[0] ^= 1;
    DECODE_EXPECT(label, "first stored bit flipped", g, c, &m, -EBADMSG,
                  NULL, 0);
    m.stored[0] ^= 1;
    /* Truncated by one byte, or extended by one. */
    m.slen--;
    DECODE_EXPECT(label, "stored truncated", g, c, &m, -EBADMSG, NULL, 0);
    enc_free(&m);

    /* Wrong id. */
    enc_clone(g, e, &m);
    pick = below(r, RS_ID_BYTES * 8);
    m.id[pick / 8] ^= (uint8_t)(1u << (pick % 8));
    snprintf(what, sizeof(what), "id bit %zu flipped", pick);
    DECODE_EXPECT(label, what, g, c, &m, -EBADMSG, NULL, 0);
    enc_free(&m);

    /* Unknown flag bits. */
    enc_clone(g, e, &m);
    m.flags |= 4u << below(r, 30);
    snprintf(what, sizeof(what), "flags 0x%x", m.flags);
    DECODE_EXPECT(label, what, g, c, &m, -EPROTO, NULL, 0);
    m.flags = e->flags | 0x80000000u;
    DECODE_EXPECT(label, "flags | 0x80000000", g, c, &m, -EPROTO, NULL, 0);
    enc_free(&m);

    /* The bitmap claims a non-zero slot is zero: too few bytes expected. */
    enc_clone(g, e, &m);
    pick = below(r, nz);
    for (size_t s = 0; s < g->slots; s++) {
        if (!bm_get(m.bm, s) && pick-- == 0) {
            bm_flip(m.bm, s);
            snprintf(what, sizeof(what), "bitmap marks non-zero slot %zu zero",
                     s);
            break;
        }
    }
    DECODE_EXPECT(label, what, g, c, &m, -EPROTO, NULL, 0);
    enc_free(&m);

    /* The bitmap claims a zero slot holds data: too many bytes expected. */
    if (zslots) {
        enc_clone(g, e, &m);
        pick = below(r, zslots);
        for (size_t s = 0; s < g->slots; s++) {
            if (bm_get(m.bm, s) && pick-- == 0) {
                bm_flip(m.bm, s);
                snprintf(what, sizeof(what),
                         "bitmap marks zero slot %zu non-zero", s);
                break;
            }
        }
        DECODE_EXPECT(label, what, g, c, &m, -EPROTO, NULL, 0);
        enc_free(&m);
    }

    /* Every slot claimed zero, yet bytes are stored. */
    enc_clone(g, e, &m);
    memset(m.bm, 0xff, g->bm_bytes);
    DECODE_EXPECT(label, "all-zero bitmap with stored bytes", g, c, &m,
                  -EPROTO, NULL, 0);
    enc_free(&m);

    /* No stored bytes although slots hold data. */
    enc_clone(g, e, &m);
    free(m.stored);
    m.stored = NULL;
    m.slen = 0;
    DECODE_EXPECT(label, "no stored bytes for non-zero slots", g, c, &m,
                  -EPROTO, NULL, 0);
    enc_free(&m);

    /* stored NULL with a length. */
    enc_clone(g, e, &m);
    free(m.stored);
    m.stored = NULL;
    DECODE_EXPECT(label, "stored NULL, length > 0", g, c, &m, -EINVAL, NULL,
                  0);
    enc_free(&m);

    /* The lz4 flag toggled. */
    enc_clone(g, e, &m);
    m.flags ^= RS_CHUNK_LZ4;
    DECODE_EXPECT(label, "lz4 flag toggled", g, c, &m, -EPROTO, NULL, 0);
    enc_free(&m);

    if (keyed) {
        /* Same key through another codec: fine. */
        DECODE_EXPECT(label, "other codec, same key", g, g->key1b, e, 0, raw,
                      raw_len);
        DECODE_EXPECT(label, "wrong key", g, g->key2, e, -EKEYREJECTED, NULL,
                      0);
        DECODE_EXPECT(label, "codec without key", g, g->plain, e, -ENOKEY,
                      NULL, 0);
        /* Encrypted bytes passed off as plaintext to a keyed codec. */
        enc_clone(g, e, &m);
        m.flags &= ~(uint32_t)RS_CHUNK_ENCRYPTED;
        DECODE_EXPECT(label, "encrypted flag cleared", g, c, &m, -EPROTO,
                      NULL, 0);
        enc_free(&m);
        /* Forged: a bit flipped and the id recomputed to match. */
        enc_clone(g, e, &m);
        pick = below(r, m.slen * 8);
        m.stored[pick / 8] ^= (uint8_t)(1u << (pick % 8));
        ref_sha256(m.stored, m.slen, m.id);
        snprintf(what, sizeof(what), "forged: bit %zu flipped, id recomputed",
                 pick);
        DECODE_EXPECT(label, what, g, c, &m, -EKEYREJECTED, NULL, 0);
        enc_free(&m);
        /* Forged: too short to hold a nonce and a tag. */
        enc_clone(g, e, &m);
        m.slen = 1 + below(r, RS_GCM_NONCE_BYTES + RS_GCM_TAG_BYTES);
        if (m.slen > e->slen)
            m.slen = e->slen;
        ref_sha256(m.stored, m.slen, m.id);
        snprintf(what, sizeof(what), "forged: %zu bytes, id recomputed",
                 m.slen);
        DECODE_EXPECT(label, what, g, c, &m, -EPROTO, NULL, 0);
        enc_free(&m);
    } else {
        /* A plaintext chunk handed to an encrypted snapshot's codec. */
        DECODE_EXPECT(label, "unencrypted chunk, keyed codec", g, g->key1, e,
                      -EPROTO, NULL, 0);
        /* Claims to be encrypted, codec has no key. */
        enc_clone(g, e, &m);
        m.flags |= RS_CHUNK_ENCRYPTED;
        DECODE_EXPECT(label, "encrypted flag set, no key", g, c, &m, -ENOKEY,
                      NULL, 0);
        enc_free(&m);
        /* Forged: a bit flipped, id recomputed. Nothing authenticates the
         * bytes, so any result but a memory error is acceptable; raw slots
         * must decode. */
        enc_clone(g, e, &m);
        pick = below(r, m.slen * 8);
        m.stored[pick / 8] ^= (uint8_t)(1u << (pick % 8));
        ref_sha256(m.stored, m.slen, m.id);
        {
            int rc = decode_rc(g, c, &m);

            if (m.flags & RS_CHUNK_LZ4)
                CHECK(rc == 0 || rc == -EPROTO,
                      "%s: forged lz4 bit %zu: decode returned %d (%s)",
                      label, pick, rc, errname(rc));
            else
                CHECK(rc == 0, "%s: forged raw bit %zu: decode returned %d "
                      "(%s)", label, pick, rc, errname(rc));
        }
        enc_free(&m);
        /* Forged: truncated, id recomputed. */
        enc_clone(g, e, &m);
        m.slen = 1 + below(r, m.slen - 1 ? m.slen - 1 : 1);
        if (m.slen < e->slen) {
            ref_sha256(m.stored, m.slen, m.id);
            snprintf(what, sizeof(what),
                     "forged: truncated to %zu bytes, id recomputed", m.slen);
            DECODE_EXPECT(label, what, g, c, &m, -EPROTO, NULL, 0);
        }
        enc_free(&m);
    }
}

/* Encode raw, check the result against the format, decode it back, and try
 * the bad inputs. */
static void roundtrip(const char *label, const struct geom *g, int keyed,
                      const uint8_t *raw, size_t raw_len, prng *r)
{
    const rs_codec *c = keyed ? g->key1 : g->plain;
    const size_t ps = g->page, in_slots = raw_len / ps;
    struct enc e, e2;
    uint8_t *R = xmalloc(raw_len);
    size_t nz = 0;

    encode_ok(__LINE__, label, g, c, raw, raw_len, &e);

    /* Zero bitmap: zero pages and slots past raw_len are marked. */
    for (size_t s = 0; s < g->slots; s++) {
        int zero = s >= in_slots || page_zero(raw + s * ps, ps);

        CHECK(bm_get(e.bm, s) == zero, "%s: zero bit of slot %zu is %d",
              label, s, bm_get(e.bm, s));
        if (!zero)
            memcpy(R + nz++ * ps, raw + s * ps, ps);
    }

    if (nz == 0) {
        uint8_t zid[RS_ID_BYTES] = { 0 };

        CHECK(e.slen == 0, "%s: all-zero chunk stored as %zu bytes", label,
              e.slen);
        CHECK(memcmp(e.id, zid, RS_ID_BYTES) == 0,
              "%s: all-zero chunk has a non-zero id", label);
        CHECK(e.flags == 0, "%s: all-zero chunk has flags 0x%x", label,
              e.flags);
        /* Any codec decodes it, with no stored bytes, to zeros. */
        DECODE_EXPECT(label, "all zero", g, g->plain, &e, 0, raw, raw_len);
        DECODE_EXPECT(label, "all zero", g, g->key1, &e, 0, raw, raw_len);
        DECODE_EXPECT(label, "all zero", g, g->key2, &e, 0, raw, raw_len);
        /* id is ignored when nothing is stored. */
        memset(e.id, 0x5a, RS_ID_BYTES);
        DECODE_EXPECT(label, "all zero, junk id", g, c, &e, 0, raw, raw_len);
        /* A slot claiming data that is not there. */
        bm_flip(e.bm, below(r, g->slots));
        DECODE_EXPECT(label, "no stored bytes, a slot claims data", g, c, &e,
                      -EPROTO, NULL, 0);
        enc_free(&e);
        free(R);
        return;
    }

    CHECK(e.slen > 0, "%s: non-zero chunk stored as 0 bytes", label);
    check_format(label, &e, keyed, R, nz * ps);

    /* Deterministic: the same chunk encodes to the same object (dedup). */
    encode_ok(__LINE__, label, g, c, raw, raw_len, &e2);
    CHECK(e2.slen == e.slen && memcmp(e2.stored, e.stored, e.slen) == 0 &&
              memcmp(e2.id, e.id, RS_ID_BYTES) == 0 && e2.flags == e.flags &&
              memcmp(e2.bm, e.bm, g->bm_bytes) == 0,
          "%s: encoding twice gives different results", label);
    enc_free(&e2);
    if (keyed) {
        encode_ok(__LINE__, label, g, g->key1b, raw, raw_len, &e2);
        CHECK(e2.slen == e.slen && memcmp(e2.stored, e.stored, e.slen) == 0,
              "%s: two codecs with one key encode differently", label);
        enc_free(&e2);
        encode_ok(__LINE__, label, g, g->key2, raw, raw_len, &e2);
        CHECK(memcmp(e2.id, e.id, RS_ID_BYTES) != 0,
              "%s: two keys give the same id", label);
        enc_free(&e2);
    }

    DECODE_EXPECT(label, "round trip", g, c, &e, 0, raw, raw_len);
    decode_negatives(label, g, keyed, &e, raw, raw_len, r);

    /* out_cap one byte short of the bound. */
    CHECK_RC(label, encode_raw(g, c, raw, raw_len, g->bound - 1, &e2),
             -ENOBUFS);
    enc_free(&e2);

    enc_free(&e);
    free(R);
}

/* ---- tests ------------------------------------------------------------- */

static void test_create_invalid(void)
{
    static const struct {
        size_t chunk, page;
        int key;            /* 0: NULL, 1: KEY1 */
        size_t key_len;
        const char *why;
    } bad[] = {
        { 0, 4096, 0, 0, "chunk 0" },
        { 65536, 0, 0, 0, "page 0" },
        { 3 * 4096, 4096, 0, 0, "chunk not a power of two" },
        { 65536 + 4096, 4096, 1, 32, "chunk not a power of two, keyed" },
        { 65536, 3 * 4096, 0, 0, "page not a power of two" },
        { 65536, 2048, 0, 0, "page < 4096" },
        { 4096, 1024, 0, 0, "page < 4096" },
        { 4096, 1, 0, 0, "page 1" },
        { 4096, 8192, 0, 0, "page > chunk" },
        { 65536, 1 << 20, 1, 32, "page > chunk, keyed" },
        { (size_t)1 << 32, 4096, 0, 0, "chunk > 2^30" },
        { (size_t)1 << 31, 4096, 0, 0, "chunk 2^31 > 2^30" },
        { (size_t)1 << 31, (size_t)1 << 31, 1, 32, "chunk 2^31, keyed" },
        { 65536, 4096, 1, 16, "key_len 16" },
        { 65536, 4096, 1, 31, "key_len 31" },
        { 65536, 4096, 1, 33, "key_len 33" },
        { 65536, 4096, 1, 0, "key with key_len 0" },
        { 65536, 4096, 0, 32, "key NULL with key_len 32" },
    };

    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        rs_codec *c = NULL;
        int rc = rs_codec_create(&c, bad[i].chunk, bad[i].page,
                                 bad[i].key ? KEY1 : NULL, bad[i].key_len);

        CHECK(rc == -EINVAL,
              "create chunk=%zu page=%zu key_len=%zu (%s) returned %d (%s), "
              "want -EINVAL", bad[i].chunk, bad[i].page, bad[i].key_len,
              bad[i].why, rc, errname(rc));
        if (rc == 0)
            rs_codec_destroy(c);
    }
    rs_codec_destroy(NULL);
}

/* Valid extremes of the geometry, and many create/destroy cycles (leaks). */
static void test_create_destroy(void)
{
    static const size_t geoms[][2] = {
        { 4096, 4096 }, { 8192, 4096 }, { 65536, 4096 },
        { (size_t)1 << 30, 4096 }, { (size_t)1 << 30, (size_t)1 << 30 },
    };
    int rounds = quick ? 20 : 2000;

    for (int i = 0; i < rounds; i++) {
        size_t chunk = geoms[i % 5][0], page = geoms[i % 5][1];
        int keyed = (i / 5) % 2;
        size_t slots = chunk / page;
        rs_codec *c = NULL;

        CHECK_RC("create/destroy cycle",
                 rs_codec_create(&c, chunk, page, keyed ? KEY1 : NULL,
                                 keyed ? RS_KEY_BYTES : 0),
                 0);
        CHECK(rs_codec_bitmap_bytes(c) == (slots / 8 ? slots / 8 : 1),
              "chunk=%zu page=%zu: bitmap_bytes %zu", chunk, page,
              rs_codec_bitmap_bytes(c));
        CHECK(rs_codec_stored_bound(c) >= chunk,
              "chunk=%zu: bound %zu < chunk", chunk,
              rs_codec_stored_bound(c));
        rs_codec_destroy(c);
    }
}

static void test_key_check(const struct geom *g)
{
    uint8_t *a = xmalloc(16), *b = xmalloc(16), mac[32];

    CHECK_RC("key_check without key", rs_codec_key_check(g->plain, a),
             -ENOKEY);
    CHECK_RC("key_check", rs_codec_key_check(g->key1, a), 0);
    ref_hmac(KEY1, "restore/v1/key-check", 20, mac);
    CHECK(memcmp(a, mac, 16) == 0,
          "key check is not HMAC-SHA256(master, label)[0:16]");
    for (int i = 0; i < 3; i++) {
        CHECK_RC("key_check again", rs_codec_key_check(g->key1, b), 0);
        CHECK(memcmp(a, b, 16) == 0, "key check changes between calls");
    }
    CHECK_RC("key_check, 2nd codec", rs_codec_key_check(g->key1b, b), 0);
    CHECK(memcmp(a, b, 16) == 0, "two codecs with one key disagree");
    CHECK_RC("key_check, key 2", rs_codec_key_check(g->key2, b), 0);
    CHECK(memcmp(a, b, 16) != 0, "two keys give the same key check");
    free(a);
    free(b);
}

/* The manifest MAC: HMAC-SHA256 under HMAC(master, label), none without a key. */
static void test_manifest_mac(const struct geom *g)
{
    static const char doc[] = "{\"format\":\"restore-snapshot\"}";
    uint8_t *got = xmalloc(32), k[32], want[32], other[32];
    unsigned int n = 0;

    CHECK_RC("manifest mac without key",
             rs_codec_manifest_mac(g->plain, (const uint8_t *)doc, strlen(doc), got), -ENOKEY);
    CHECK_RC("manifest mac", rs_codec_manifest_mac(g->key1, (const uint8_t *)doc, strlen(doc), got), 0);
    ref_hmac(KEY1, "restore/v1/manifest-mac", 23, k);
    CHECK(HMAC(EVP_sha256(), k, 32, (const uint8_t *)doc, strlen(doc), want, &n) && n == 32,
          "reference HMAC-SHA256 failed");
    CHECK(memcmp(got, want, 32) == 0, "manifest mac is not HMAC(HMAC(master, label), doc)");
    CHECK_RC("manifest mac, empty", rs_codec_manifest_mac(g->key1, (const uint8_t *)doc, 0, other), 0);
    CHECK(memcmp(got, other, 32) != 0, "the manifest mac ignores its input");
    CHECK_RC("manifest mac, key 2",
             rs_codec_manifest_mac(g->key2, (const uint8_t *)doc, strlen(doc), other), 0);
    CHECK(memcmp(got, other, 32) != 0, "two keys give the same manifest mac");
    free(got);
}

/* Argument errors of encode. */
static void test_encode_args(const struct geom *g, prng *r)
{
    const size_t ps = g->page;
    struct enc e;
    uint8_t *raw;

    for (int keyed = 0; keyed < 2; keyed++) {
        const rs_codec *c = keyed ? g->key1 : g->plain;

        /* raw_len not a multiple of the page size. */
        raw = make_chunk(r, ps, 1, SHAPE_RANDOM);
        CHECK_RC("encode raw_len = page/2",
                 encode_raw(g, c, raw, ps / 2, g->bound, &e), -EINVAL);
        enc_free(&e);
        CHECK_RC("encode raw_len = page - 1",
                 encode_raw(g, c, raw, ps - 1, g->bound, &e), -EINVAL);
        enc_free(&e);
        free(raw);
        /* raw_len past the chunk (only cheap geometries). */
        if (g->chunk <= ((size_t)1 << 19)) {
            raw = make_chunk(r, ps, g->slots + 1, SHAPE_RANDOM);
            CHECK_RC("encode raw_len = chunk + page",
                     encode_raw(g, c, raw, g->chunk + ps, g->bound, &e),
                     -EINVAL);
            enc_free(&e);
            free(raw);
        }
        /* raw NULL with a length. */
        CHECK_RC("encode raw NULL", encode_raw(g, c, NULL, ps, g->bound, &e),
                 -EINVAL);
        enc_free(&e);
        /* raw NULL, length 0: an all-zero chunk. */
        CHECK_RC("encode raw NULL, raw_len 0",
                 encode_raw(g, c, NULL, 0, g->bound, &e), 0);
        CHECK(e.slen == 0 && e.flags == 0, "empty chunk: %zu bytes, flags %x",
              e.slen, e.flags);
        for (size_t s = 0; s < g->slots; s++)
            CHECK(bm_get(e.bm, s), "empty chunk: slot %zu not zero", s);
        DECODE_EXPECT("empty chunk", "round trip", g, c, &e, 0, NULL, 0);
        enc_free(&e);

        /* raw at an odd address encodes like the same bytes aligned. */
        {
            size_t n = g->slots < 4 ? g->slots : 4;
            uint8_t *aligned = make_chunk(r, ps, n, SHAPE_SPARSE);
            uint8_t *odd = xmalloc(n * ps + 1);
            struct enc e2;

            memcpy(odd + 1, aligned, n * ps);
            CHECK_RC("encode aligned", encode_raw(g, c, aligned, n * ps, g->bound, &e), 0);
            CHECK_RC("encode misaligned", encode_raw(g, c, odd + 1, n * ps, g->bound, &e2), 0);
            CHECK(e.slen == e2.slen && memcmp(e.id, e2.id, RS_ID_BYTES) == 0 &&
                      memcmp(e.bm, e2.bm, g->bm_bytes) == 0,
                  "misaligned raw encodes differently");
            enc_free(&e);
            enc_free(&e2);
            free(odd);
            free(aligned);
        }
    }
}

/* Every shape, full and short, with and without a key, then random rounds. */
static void test_geometry(size_t chunk, size_t page, prng *r)
{
    struct geom g;
    char label[160];
    size_t budget = quick ? ((size_t)1 << 19) : ((size_t)16 << 20);
    size_t rounds = budget / chunk ? budget / chunk : 1;

    if (rounds > (quick ? 32u : 1024u))
        rounds = quick ? 32 : 1024;
    geom_open(&g, chunk, page);
    test_key_check(&g);
    test_manifest_mac(&g);
    test_encode_args(&g, r);

    for (int keyed = 0; keyed < 2; keyed++) {
        for (int sh = 0; sh < SHAPES; sh++) {
            /* Full chunk. */
            uint8_t *raw = make_chunk(r, page, g.slots, (enum shape)sh);

            snprintf(label, sizeof(label), "chunk=%zu page=%zu key=%d %s",
                     chunk, page, keyed, SHAPE_NAMES[sh]);
            roundtrip(label, &g, keyed, raw, chunk, r);
            free(raw);
            /* Short last chunk: raw_len < chunk, the tail decodes to 0. */
            for (size_t n = 0; n < g.slots; n = n ? n * 2 + 1 : 1) {
                if (sh != SHAPE_MIXED && n > 1 && n + 1 < g.slots)
                    continue;   /* every length only for the mixed shape */
                raw = make_chunk(r, page, n, (enum shape)sh);
                snprintf(label, sizeof(label),
                         "chunk=%zu page=%zu key=%d short %s, %zu pages",
                         chunk, page, keyed, SHAPE_NAMES[sh], n);
                roundtrip(label, &g, keyed, raw, n * page, r);
                free(raw);
            }
            if (g.slots > 1) {
                size_t n = g.slots - 1;

                raw = make_chunk(r, page, n, (enum shape)sh);
                snprintf(label, sizeof(label),
                         "chunk=%zu page=%zu key=%d short %s, %zu pages",
                         chunk, page, keyed, SHAPE_NAMES[sh], n);
                roundtrip(label, &g, keyed, raw, n * page, r);
                free(raw);
            }
        }
    }

    /* Random rounds: mixed content, sometimes a short chunk. */
    for (size_t i = 0; i < rounds; i++) {
        int keyed = (int)(i % 2);
        size_t n = below(r, 4) ? g.slots : below(r, g.slots + 1);
        uint8_t *raw = make_chunk(r, page, n, SHAPE_MIXED);

        snprintf(label, sizeof(label),
                 "chunk=%zu page=%zu key=%d random round %zu, %zu pages",
                 chunk, page, keyed, i, n);
        roundtrip(label, &g, keyed, raw, n * page, r);
        free(raw);
    }
    geom_close(&g);
}

struct worker {
    const struct geom *g;   /* shared by both threads */
    uint64_t seed;
    int index;
    int rounds;
};

static void *worker_main(void *arg)
{
    const struct worker *w = arg;
    prng r = { w->seed };
    char label[128];

    for (int i = 0; i < w->rounds; i++) {
        int keyed = i % 2;
        size_t n = below(&r, 3) ? w->g->slots : below(&r, w->g->slots + 1);
        uint8_t *raw = make_chunk(&r, w->g->page, n, SHAPE_MIXED);

        snprintf(label, sizeof(label), "thread %d round %d key=%d %zu pages",
                 w->index, i, keyed, n);
        roundtrip(label, w->g, keyed, raw, n * w->g->page, &r);
        free(raw);
    }
    return NULL;
}

/* Two threads encode and decode through the same codecs at once. */
static void test_threads(size_t chunk, size_t page)
{
    struct geom g;
    struct worker w[2];
    pthread_t t[2];

    geom_open(&g, chunk, page);
    for (int i = 0; i < 2; i++) {
        w[i].g = &g;
        w[i].seed = 0x9e3779b97f4a7c15ULL * (uint64_t)(i + 1);
        w[i].index = i;
        w[i].rounds = quick ? 6 : 200;
        CHECK(pthread_create(&t[i], NULL, worker_main, &w[i]) == 0,
              "pthread_create failed");
    }
    for (int i = 0; i < 2; i++)
        CHECK(pthread_join(t[i], NULL) == 0, "pthread_join failed");
    geom_close(&g);
}

int main(int argc, char **argv)
{
    static const size_t geoms[][2] = {
        { 4096, 4096 },
        { 16384, 4096 },            /* fewer than 8 slots: partial byte */
        { 65536, 4096 },
        { 512 * 1024, 4096 },
        { 2 * 1024 * 1024, 2 * 1024 * 1024 },
    };
    prng r = { 0x243f6a8885a308d3ULL };

    if (argc > 2 || (argc == 2 && strcmp(argv[1], "quick") != 0)) {
        fprintf(stderr, "usage: %s [quick]\n", argv[0]);
        return 2;
    }
    quick = argc == 2;

    test_create_invalid();
    test_create_destroy();
    for (size_t i = 0; i < sizeof(geoms) / sizeof(geoms[0]); i++)
        test_geometry(geoms[i][0], geoms[i][1], &r);
    test_threads(65536, 4096);

    printf("chunk_selftest: %lu checks passed\n",
           (unsigned long)atomic_load(&n_checks));
    return 0;
}
