/* hostcache.h -- decoded chunks of one snapshot version on local disk,
 * shared by every session of every process on the host (cdef-clean).
 *
 * A version's host cache is a directory (made by restore/tiers/host.py,
 * mode 0700) holding two files, both mode 0600:
 *
 *   data    n_chunks * chunk_size bytes, sparse: chunk c's decoded bytes
 *           at offset c * chunk_size; its all-zero slots are never written
 *           (holes). Every session maps it read-only (MAP_SHARED) and
 *           installs pages straight from the mapping, i.e. from the page
 *           cache: no verify, no decode on the fault path.
 *   state   a header, then one byte per chunk at offset 4096:
 *
 *     offset  0  char[8]  magic "RSHOSTC1"
 *     offset  8  uint32   format (1)
 *     offset 12  uint32   n_chunks
 *     offset 16  uint64   chunk_size, bytes
 *     offset 24  uint8[32] version id (restore/tiers/host.py: SHA-256 over
 *                         the geometry and every chunk's id and flags)
 *     offset 56  char[36] boot id of the kernel that wrote the bytes
 *                         (/proc/sys/kernel/random/boot_id)
 *     offset 4096 uint8[n_chunks] RS_HOST_ABSENT or RS_HOST_PRESENT
 *
 * Filling chunk c: take an open-file-description write lock on state byte
 * 4096 + c (F_OFD_SETLKW: one filler at a time across threads, sessions
 * and processes; the kernel drops it if the filler dies), look again (a
 * filler that got there first leaves it PRESENT), punch out whatever a
 * filler killed mid-way left in the chunk's range, write the non-zero
 * slots with pwrite, then store PRESENT (release) and unlock. A chunk is
 * never PRESENT before its bytes are in, and PRESENT never goes back while
 * the files exist, so bytes a session maps never change under it.
 *
 * Users hold flock(LOCK_SH) on `state` for as long as they use the files;
 * eviction (restore/tiers/host.py) deletes a version only when it gets
 * LOCK_EX. A header that does not match (another geometry or version, a
 * short file, another boot: after a host crash, page-cache bytes that had
 * not reached the disk may be gone while the state byte survived) makes
 * the opener reset the version: both files emptied under LOCK_EX, then
 * filled again as chunks are used.
 */

typedef struct rs_hostcache rs_hostcache;

enum { RS_HOST_ABSENT = 0, RS_HOST_PRESENT = 1 };

/* Open the host cache of one version in dir (which must exist), creating
 * or resetting its files as needed. version_id: 32 bytes. Returns 0,
 * -EBUSY when the files do not match and other users hold them (they
 * cannot be reset under them: serve without the host cache), or -errno. */
int rs_hostcache_open(rs_hostcache **out, const char *dir, uint32_t n_chunks,
                      uint64_t chunk_size, const uint8_t *version_id);
void rs_hostcache_close(rs_hostcache *h);

/* 1 when chunk c's decoded bytes are in (acquire). */
int rs_hostcache_present(const rs_hostcache *h, uint32_t c);

/* Read-only view of chunk c's decoded bytes (chunk_size bytes), valid
 * until rs_hostcache_close; only meaningful once c is present. */
const uint8_t *rs_hostcache_chunk(const rs_hostcache *h, uint32_t c);

/* Become chunk c's filler: 1 when it is present (nothing to do; no lock
 * held), 0 when the caller now holds its fill lock and must call
 * rs_hostcache_fill or rs_hostcache_abandon, -errno on failure. Waits
 * while another filler holds the lock. *waited is set to 1 when it did. */
int rs_hostcache_claim(rs_hostcache *h, uint32_t c, int *waited);

/* Write the decoded chunk (chunk_size bytes; zero_bitmap: the manifest's
 * bitmap of all-zero slots of page_size bytes, which stay holes), mark it
 * present and drop the fill lock. On failure the lock is dropped and the
 * chunk stays absent. Returns 0 or -errno. */
int rs_hostcache_fill(rs_hostcache *h, uint32_t c, const uint8_t *decoded,
                      const uint8_t *zero_bitmap, uint64_t page_size);

/* Drop the fill lock of chunk c without filling it. */
void rs_hostcache_abandon(rs_hostcache *h, uint32_t c);
