/* l1.h -- direct reads of the local chunk cache (cdef-clean).
 *
 * The cache layout is restore/tiers/l1.py's: DIR/<hex[0:2]>/<hex>, where
 * <hex> is the lowercase hex SHA-256 of the file's bytes (the stored chunk),
 * written by temp file + rename, LRU by mtime. This is the engine's hit
 * path: read here, verify and decode with rs_chunk_decode, no Python.
 */

/* Read the entry of chunk id (RS_ID_BYTES) under dir into buf (cap bytes).
 * Returns the bytes read, -ENOENT on a miss, -EFBIG when the file is larger
 * than cap, or another -errno. A hit refreshes the entry's mtime (LRU). The
 * bytes are not verified here: the caller's decode does that. */
int64_t rs_l1_read(const char *dir, const uint8_t *id, uint8_t *buf, size_t cap);
