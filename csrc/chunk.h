/* chunk.h -- the stored form of a snapshot chunk: encode and decode.
 *
 * This header is also the cffi cdef: plain prototypes, fixed-width types,
 * no macros, no includes (the .c file includes <stdint.h>/<stddef.h> first).
 *
 * A chunk covers chunk_size bytes of the memory file, cut into
 * chunk_size / page_size slots of one page each. With the identity layout,
 * slot s of chunk i holds file page i * (chunk_size / page_size) + s; a page
 * map in the manifest may place any page in any slot instead.
 *
 * Zero bitmap: one bit per slot, bit s in byte s / 8 at position s % 8
 * (least significant first). A set bit means the slot is all zero: it is
 * not stored, and decode fills it with zeros. Slots past the end of the
 * memory file (a short last chunk) are marked zero as well.
 *
 * Stored bytes (the object the store keeps under "chunks/<hex of id>"):
 *
 *   plaintext P = lz4 block of R            when flags & RS_CHUNK_LZ4
 *               = R                         otherwise (R did not compress)
 *   where R     = the non-zero slots of the chunk, back to back, in slot order
 *                 (length = non-zero slots * page_size; no header, no size)
 *
 *   unencrypted:  stored = P
 *   encrypted:    stored = nonce[12] || AES-256-GCM(k_enc, nonce, P) || tag[16]
 *                 with no associated data besides the fixed label
 *                 "restore/chunk/v1",
 *                 k_enc   = HMAC-SHA256(master, "restore/v1/chunk-encryption")
 *                 k_nonce = HMAC-SHA256(master, "restore/v1/chunk-nonce")
 *                 nonce   = HMAC-SHA256(k_nonce, P)[0:12]
 *                 The nonce is a function of the plaintext, so equal chunks
 *                 encrypt to equal objects under one key and still dedup;
 *                 different plaintexts get different nonces.
 *
 *   id = SHA-256(stored)   (32 bytes; the object key is its lowercase hex)
 *
 * Every function returns 0 or a negative errno:
 *   -EINVAL       bad sizes or arguments (a caller bug or a bad manifest)
 *   -ENOBUFS      out_cap is smaller than rs_codec_stored_bound()
 *   -ENOMEM       allocation failed
 *   -EBADMSG      SHA-256 of the stored bytes is not the expected id
 *   -ENOKEY       the chunk is encrypted but the codec has no key
 *   -EKEYREJECTED AES-GCM authentication failed (wrong key, or forged bytes
 *                 whose id was forged with them)
 *   -EPROTO       the verified bytes do not decode to the expected size
 *   -EIO          libcrypto failed unexpectedly
 */

typedef struct rs_codec rs_codec;

/* Bits of the per-chunk flags word kept in the manifest. */
enum {
    RS_CHUNK_LZ4 = 1,       /* plaintext is an lz4 block, not the raw slots */
    RS_CHUNK_ENCRYPTED = 2  /* stored bytes are nonce || ciphertext || tag */
};

/* Sizes of the fixed parts. */
enum {
    RS_ID_BYTES = 32,
    RS_KEY_BYTES = 32,
    RS_GCM_NONCE_BYTES = 12,
    RS_GCM_TAG_BYTES = 16
};

/* Create a codec for one snapshot geometry.
 * chunk_size, page_size: bytes, powers of two, 4096 <= page_size <= chunk_size,
 *                        at most 2^30 bytes (1 GiB) per chunk, so every
 *                        length fits the int that lz4 and OpenSSL take.
 * key: RS_KEY_BYTES of master key, or NULL for an unencrypted snapshot. The
 *      codec keeps only the derived keys. key_len must be 0 or RS_KEY_BYTES.
 * The codec is immutable after creation and may be used by many threads. */
int rs_codec_create(rs_codec **out, size_t chunk_size, size_t page_size,
                    const uint8_t *key, size_t key_len);
void rs_codec_destroy(rs_codec *codec);

/* Largest possible stored size of one chunk (bytes). */
size_t rs_codec_stored_bound(const rs_codec *codec);

/* Bytes in one zero bitmap: chunk_size / page_size / 8, at least 1. */
size_t rs_codec_bitmap_bytes(const rs_codec *codec);

/* Bytes per slot: the page size the codec was created with. */
size_t rs_codec_page_size(const rs_codec *codec);

/* 16-byte key check value, HMAC-SHA256(master, "restore/v1/key-check")[0:16],
 * kept in the manifest so a wrong key is named before any chunk is read.
 * -ENOKEY when the codec has no key. */
int rs_codec_key_check(const rs_codec *codec, uint8_t *out16);

/* 32-byte HMAC-SHA256 of data (a manifest's canonical bytes) under a key
 * derived from the master key (HMAC(master, "restore/v1/manifest-mac")):
 * the manifest's own authentication, so a manifest forged in a shared
 * store cannot send a guest to other chunks. -ENOKEY without a key. */
int rs_codec_manifest_mac(const rs_codec *codec, const uint8_t *data, size_t len,
                          uint8_t *out32);

/* Encode one chunk.
 * raw, raw_len: the chunk's bytes in slot order; raw_len is a multiple of
 *               page_size and at most chunk_size (shorter for the last chunk).
 * out, out_cap: receives the stored bytes; out_cap >= rs_codec_stored_bound().
 * out_len:      stored length (bytes); 0 when every slot is zero.
 * zero_bitmap:  rs_codec_bitmap_bytes() bytes, written.
 * id:           RS_ID_BYTES, written (all zero when every slot is zero).
 * flags:        RS_CHUNK_* bits, written.
 * Encrypts when the codec has a key. Thread-safe. */
int rs_chunk_encode(const rs_codec *codec, const uint8_t *raw, size_t raw_len,
                    uint8_t *out, size_t out_cap, size_t *out_len,
                    uint8_t *zero_bitmap, uint8_t *id, uint32_t *flags);

/* Decode one chunk: verify SHA-256(stored) == id, decrypt when flags say so,
 * decompress, and spread the non-zero slots over out, zero-filling the rest.
 * out receives exactly chunk_size bytes. stored may be NULL when
 * stored_len is 0 (an all-zero chunk; id is then ignored). Thread-safe. */
int rs_chunk_decode(const rs_codec *codec, const uint8_t *stored,
                    size_t stored_len, const uint8_t *id, uint32_t flags,
                    const uint8_t *zero_bitmap, uint8_t *out);
