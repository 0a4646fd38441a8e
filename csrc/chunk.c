/* chunk.c -- encode and decode the stored form of a chunk (see chunk.h). */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <lz4.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "chunk.h"

static const char LABEL_ENC[] = "restore/v1/chunk-encryption";
static const char LABEL_NONCE[] = "restore/v1/chunk-nonce";
static const char LABEL_CHECK[] = "restore/v1/key-check";
static const char LABEL_MANIFEST[] = "restore/v1/manifest-mac";
static const char CHUNK_AAD[] = "restore/chunk/v1";

struct rs_codec {
    size_t chunk_size;      /* bytes per chunk */
    size_t page_size;       /* bytes per slot */
    size_t slots;           /* chunk_size / page_size */
    size_t bitmap_bytes;    /* bytes in one zero bitmap */
    int has_key;            /* 1 when the snapshot is encrypted */
    uint8_t k_enc[32];      /* AES-256-GCM key, derived from the master key */
    uint8_t k_nonce[32];    /* HMAC key for the synthetic nonce */
    uint8_t key_check[16];  /* key check value kept in the manifest */
    uint8_t k_manifest[32]; /* HMAC key authenticating the manifest */
    EVP_MD *sha256;         /* fetched once; shared read-only by threads */
    EVP_CIPHER *gcm;        /* fetched once; NULL without a key */
};

static int is_pow2(size_t v)
{
    return v != 0 && (v & (v - 1)) == 0;
}

static int derive(const EVP_MD *md, const uint8_t *key, const char *label,
                  uint8_t *out, size_t out_len)
{
    uint8_t mac[32];
    unsigned int mac_len = 0;

    if (!HMAC(md, key, RS_KEY_BYTES, (const uint8_t *)label, strlen(label),
              mac, &mac_len) || mac_len != sizeof(mac))
        return -EIO;
    memcpy(out, mac, out_len);
    return 0;
}

int rs_codec_create(rs_codec **out, size_t chunk_size, size_t page_size,
                    const uint8_t *key, size_t key_len)
{
    rs_codec *c;
    int rc;

    *out = NULL;
    if (!is_pow2(chunk_size) || !is_pow2(page_size) || page_size < 4096 ||
        page_size > chunk_size || chunk_size > ((size_t)1 << 30))
        return -EINVAL;
    if ((key == NULL) != (key_len == 0) || (key && key_len != RS_KEY_BYTES))
        return -EINVAL;

    c = calloc(1, sizeof(*c));
    if (!c)
        return -ENOMEM;
    c->chunk_size = chunk_size;
    c->page_size = page_size;
    c->slots = chunk_size / page_size;
    c->bitmap_bytes = (c->slots + 7) / 8;
    c->sha256 = EVP_MD_fetch(NULL, "SHA256", NULL);
    if (!c->sha256) {
        rc = -EIO;
        goto fail;
    }
    if (key) {
        c->has_key = 1;
        c->gcm = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL);
        if (!c->gcm) {
            rc = -EIO;
            goto fail;
        }
        if ((rc = derive(c->sha256, key, LABEL_ENC, c->k_enc, 32)) ||
            (rc = derive(c->sha256, key, LABEL_NONCE, c->k_nonce, 32)) ||
            (rc = derive(c->sha256, key, LABEL_CHECK, c->key_check, 16)) ||
            (rc = derive(c->sha256, key, LABEL_MANIFEST, c->k_manifest, 32)))
            goto fail;
    }
    *out = c;
    return 0;
fail:
    rs_codec_destroy(c);
    return rc;
}

void rs_codec_destroy(rs_codec *codec)
{
    if (!codec)
        return;
    EVP_MD_free(codec->sha256);
    EVP_CIPHER_free(codec->gcm);
    memset(codec, 0, sizeof(*codec)); /* wipe the derived keys */
    free(codec);
}

size_t rs_codec_stored_bound(const rs_codec *codec)
{
    /* Incompressible slots are stored raw, so the plaintext never exceeds
     * chunk_size; encryption adds the nonce and the tag. */
    return codec->chunk_size + RS_GCM_NONCE_BYTES + RS_GCM_TAG_BYTES;
}

size_t rs_codec_bitmap_bytes(const rs_codec *codec)
{
    return codec->bitmap_bytes;
}

size_t rs_codec_page_size(const rs_codec *codec)
{
    return codec->page_size;
}

int rs_codec_key_check(const rs_codec *codec, uint8_t *out16)
{
    if (!codec->has_key)
        return -ENOKEY;
    memcpy(out16, codec->key_check, 16);
    return 0;
}

int rs_codec_manifest_mac(const rs_codec *codec, const uint8_t *data, size_t len,
                          uint8_t *out32)
{
    unsigned int mac_len = 0;

    if (!codec->has_key)
        return -ENOKEY;
    if (!HMAC(codec->sha256, codec->k_manifest, 32, data, len, out32, &mac_len) || mac_len != 32)
        return -EIO;
    return 0;
}

static int page_is_zero(const uint8_t *p, size_t len)
{
    /* 64 bytes at a time: random pages exit on the first block, zero pages
     * run at memory bandwidth. memcpy loads are alignment- and
     * aliasing-safe and compile to plain (vector) loads. */
    for (size_t i = 0; i < len; i += 64) {
        uint64_t w[8], acc = 0;

        memcpy(w, p + i, sizeof(w));
        for (int k = 0; k < 8; k++)
            acc |= w[k];
        if (acc)
            return 0;
    }
    return 1;
}

static int bit_get(const uint8_t *bm, size_t i)
{
    return (bm[i / 8] >> (i % 8)) & 1;
}

static int sha256(const rs_codec *c, const uint8_t *p, size_t len,
                  uint8_t *md32)
{
    unsigned int n = 0;

    if (!EVP_Digest(p, len, md32, &n, c->sha256, NULL) || n != 32)
        return -EIO;
    return 0;
}

/* AES-256-GCM over buf[0:len) in place. enc=1 writes the tag (the pointer is
 * then writable), enc=0 checks it. */
static int gcm(const rs_codec *c, int enc, const uint8_t *nonce, uint8_t *buf,
               size_t len, const uint8_t *tag)
{
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    int n = 0, rc = -EIO;

    if (!ctx)
        return -ENOMEM;
    if (!EVP_CipherInit_ex2(ctx, c->gcm, c->k_enc, nonce, enc, NULL))
        goto out;
    if (!EVP_CipherUpdate(ctx, NULL, &n, (const uint8_t *)CHUNK_AAD,
                          sizeof(CHUNK_AAD) - 1))
        goto out;
    if (!EVP_CipherUpdate(ctx, buf, &n, buf, (int)len) || (size_t)n != len)
        goto out;
    if (enc) {
        if (!EVP_CipherFinal_ex(ctx, buf + len, &n) ||
            !EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, RS_GCM_TAG_BYTES,
                                 (void *)tag))
            goto out;
    } else {
        if (!EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, RS_GCM_TAG_BYTES,
                                 (void *)tag))
            goto out;
        if (EVP_CipherFinal_ex(ctx, buf + len, &n) <= 0) {
            rc = -EKEYREJECTED;
            goto out;
        }
    }
    rc = 0;
out:
    EVP_CIPHER_CTX_free(ctx);
    return rc;
}

int rs_chunk_encode(const rs_codec *codec, const uint8_t *raw, size_t raw_len,
                    uint8_t *out, size_t out_cap, size_t *out_len,
                    uint8_t *zero_bitmap, uint8_t *id, uint32_t *flags)
{
    const size_t ps = codec->page_size;
    const size_t head = codec->has_key ? RS_GCM_NONCE_BYTES : 0;
    size_t in_slots, nz = 0, plen;
    uint8_t *scratch = NULL;
    const uint8_t *r = raw;
    int clen, rc = 0;

    *out_len = 0;
    *flags = 0;
    if (raw_len % ps || raw_len > codec->chunk_size || (raw_len && !raw))
        return -EINVAL;
    if (out_cap < rs_codec_stored_bound(codec))
        return -ENOBUFS;

    /* Zero bitmap; slots past the end of a short chunk count as zero. */
    in_slots = raw_len / ps;
    memset(zero_bitmap, 0, codec->bitmap_bytes);
    for (size_t s = 0; s < codec->slots; s++) {
        if (s >= in_slots || page_is_zero(raw + s * ps, ps))
            zero_bitmap[s / 8] |= (uint8_t)(1u << (s % 8));
        else
            nz++;
    }
    memset(id, 0, RS_ID_BYTES);
    if (nz == 0)
        return 0;

    /* R: the non-zero slots back to back. */
    if (nz != in_slots) {
        uint8_t *d;

        scratch = malloc(nz * ps);
        if (!scratch)
            return -ENOMEM;
        d = scratch;
        for (size_t s = 0; s < in_slots; s++) {
            if (!bit_get(zero_bitmap, s)) {
                memcpy(d, raw + s * ps, ps);
                d += ps;
            }
        }
        r = scratch;
    }
    plen = nz * ps;

    /* lz4 only when it saves bytes: capping the output one byte below the
     * input makes lz4 give up early on incompressible data. */
    clen = LZ4_compress_default((const char *)r, (char *)out + head, (int)plen,
                                (int)plen - 1);
    if (clen > 0) {
        plen = (size_t)clen;
        *flags |= RS_CHUNK_LZ4;
    } else {
        memcpy(out + head, r, plen);
    }

    if (codec->has_key) {
        uint8_t mac[32];
        unsigned int mac_len = 0;

        if (!HMAC(codec->sha256, codec->k_nonce, 32, out + head, plen, mac,
                  &mac_len)) {
            rc = -EIO;
            goto out;
        }
        memcpy(out, mac, RS_GCM_NONCE_BYTES);
        rc = gcm(codec, 1, out, out + head, plen, out + head + plen);
        if (rc)
            goto out;
        plen += RS_GCM_NONCE_BYTES + RS_GCM_TAG_BYTES;
        *flags |= RS_CHUNK_ENCRYPTED;
    }

    rc = sha256(codec, out, plen, id);
    if (!rc)
        *out_len = plen;
out:
    free(scratch);
    return rc;
}

int rs_chunk_decode(const rs_codec *codec, const uint8_t *stored,
                    size_t stored_len, const uint8_t *id, uint32_t flags,
                    const uint8_t *zero_bitmap, uint8_t *out)
{
    const size_t ps = codec->page_size;
    size_t nz = 0, rlen, plen, k;
    const uint8_t *p;
    uint8_t *plain = NULL;
    uint8_t md[RS_ID_BYTES];
    int rc;

    if (flags & ~(uint32_t)(RS_CHUNK_LZ4 | RS_CHUNK_ENCRYPTED))
        return -EPROTO;
    for (size_t s = 0; s < codec->slots; s++)
        nz += !bit_get(zero_bitmap, s);
    rlen = nz * ps;

    if (stored_len == 0) {
        if (nz)
            return -EPROTO;
        memset(out, 0, codec->chunk_size);
        return 0;
    }
    if (!stored)
        return -EINVAL;
    if ((rc = sha256(codec, stored, stored_len, md)))
        return rc;
    if (memcmp(md, id, RS_ID_BYTES))
        return -EBADMSG;
    if (nz == 0)
        return -EPROTO;

    p = stored;
    plen = stored_len;
    if (flags & RS_CHUNK_ENCRYPTED) {
        if (!codec->has_key)
            return -ENOKEY;
        if (stored_len <= RS_GCM_NONCE_BYTES + RS_GCM_TAG_BYTES)
            return -EPROTO;
        plen = stored_len - RS_GCM_NONCE_BYTES - RS_GCM_TAG_BYTES;
        /* Raw slots decrypt straight into out; lz4 needs a staging copy. */
        if (flags & RS_CHUNK_LZ4) {
            plain = malloc(plen);
            if (!plain)
                return -ENOMEM;
        } else if (plen != rlen) {
            return -EPROTO;
        } else {
            plain = out;
        }
        memcpy(plain, stored + RS_GCM_NONCE_BYTES, plen);
        rc = gcm(codec, 0, stored, plain, plen,
                 stored + RS_GCM_NONCE_BYTES + plen);
        if (rc) {
            /* Never leave unauthenticated plaintext in the caller's buffer. */
            memset(plain, 0, plen);
            goto out;
        }
        p = plain;
    } else if (codec->has_key) {
        /* An encrypted snapshot never holds plaintext chunks. */
        return -EPROTO;
    }

    if (flags & RS_CHUNK_LZ4) {
        int n = LZ4_decompress_safe((const char *)p, (char *)out, (int)plen,
                                    (int)rlen);
        if (n < 0 || (size_t)n != rlen) {
            rc = -EPROTO;
            goto out;
        }
    } else if (plen != rlen) {
        rc = -EPROTO;
        goto out;
    } else if (p != out) {
        memcpy(out, p, rlen);
    }

    /* Spread the packed slots over their places, last first, so a slot is
     * never overwritten before it has moved (packed index k <= slot s). */
    k = nz;
    for (size_t s = codec->slots; s-- > 0;) {
        if (bit_get(zero_bitmap, s)) {
            memset(out + s * ps, 0, ps);
        } else {
            k--;
            if (k != s)
                memmove(out + s * ps, out + k * ps, ps);
        }
    }
    rc = 0;
out:
    if (plain && plain != out)
        free(plain);
    return rc;
}
