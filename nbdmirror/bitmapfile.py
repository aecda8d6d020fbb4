"""The persistent bitmap's file: its format, its lock and its checks.

No policy about *when* to write lives here (that is activitylog.py); this
module reads, checks and writes the file, and refuses one that does not fit
with a one-line BitmapFileError that starts with `bitmap: PATH: `.

Format (integers little-endian):

  [0, 4096)   the header: two slots of SLOT bytes, A at 0 and B at SLOT.
              A slot is MAGIC | version u32 | seq u64 | length u32 | JSON
              (length bytes) | zeroes | crc32 u32 of all before it.  The
              valid slot with the higher seq is the header.  A new header
              goes to the other slot, then fdatasync: a torn header write
              leaves the previous one valid.
              JSON: size, granularity, sync, source, target (display form:
              no secrets), job-id, uuid, state.
  [4096, end) the marks, in SECTOR-byte sectors: SECTOR_BITS bits (chunk c
              is bit c % SECTOR_BITS of sector c // SECTOR_BITS, least
              significant bit first), then crc32 of (sector number u64 |
              those bits).  Sectors are written whole; a 512-byte write is
              taken to be atomic (as DRBD's activity log takes it), so a
              power loss leaves each sector old or new, never torn.
  The file is exactly HEADER + SECTOR * ceil(chunks / SECTOR_BITS) bytes.

A set bit means "source and target may differ in this chunk"; a clear bit
means they hold the same data, the target's flushed.  activitylog.py keeps
that true at every moment, also for what is durable on disk.

States: active (resumable), pivoting (the guest is being switched to the
target; the target is complete), pivoted; cancelled and failed (the job
ended without a pivot: the guest stayed on the source, untracked).

Locking: the file is flock()ed (LOCK_EX|LOCK_NB) for as long as it is open;
a second proxy is refused.  The lock belongs to the open file description,
so nbdkit's fork keeps it.

Fault hooks: every write goes through the module's `pwrite(fd, data,
offset)` and every durable point calls its `fsync(fd)`: a test may replace
them to record, delay or fail syncs, and to work out what a power loss
could leave (any sector written since the last sync may be old or new).
"""

import errno
import fcntl
import json
import os
import stat
import struct
import tempfile
import uuid
import zlib

from bitarray import bitarray

MAGIC = b"NBDMIRROR-BITMAP"
VERSION = 1
HEADER = 4096
SLOT = 2048
SECTOR = 512
SECTOR_BITS = (SECTOR - 4) * 8          # 4064 chunks per sector
_SLOT_HEAD = struct.Struct("<16sIQI")   # magic, version, seq, length

ACTIVE, PIVOTING, PIVOTED = "active", "pivoting", "pivoted"
CANCELLED, FAILED = "cancelled", "failed"
STATES = (ACTIVE, PIVOTING, PIVOTED, CANCELLED, FAILED)
SWITCHED = (PIVOTING, PIVOTED)          # the guest belongs on the target
LONG_NAME = 512                         # longer names are kept as a digest

DISCARD_HINT = "bitmap-discard starts over with a full copy"

fsync = os.fdatasync                    # the fault hooks (see above)
pwrite = os.pwrite


class BitmapFileError(Exception):
    """A bitmap file that cannot be used; str() is the one-line reason."""


def file_size(chunks):
    return HEADER + SECTOR * sectors(chunks)


def sectors(chunks):
    return (chunks + SECTOR_BITS - 1) // SECTOR_BITS


def new_image(chunks, value=0):
    """In-memory marks, sector-padded, in the file's bit order."""
    image = bitarray(sectors(chunks) * SECTOR_BITS, endian="little")
    image.setall(0)
    if value:
        image[:chunks] = 1
    return image


def _name(value):
    """A source or target as stored: as is, or a digest when long."""
    if value is not None and len(value) > LONG_NAME:
        import hashlib
        return "sha256:" + hashlib.sha256(value.encode()).hexdigest()
    return value


def identity(size, granularity, sync, source, target, job_id=None):
    """What a file must match: sizes, mode, and the endpoints' names (a
    path, or a URI in display form: endpoints.display_uri)."""
    return {"size": size, "granularity": granularity, "sync": sync,
            "source": _name(source), "target": _name(target),
            "job-id": job_id}


def _sector_bytes(image, s):
    bits = image[s * SECTOR_BITS:(s + 1) * SECTOR_BITS].tobytes()
    crc = zlib.crc32(struct.pack("<Q", s) + bits)
    return bits + struct.pack("<I", crc)


class BitmapFile:
    """An open, locked bitmap file.  `header` is None for a new (or empty)
    file until create(), and for one whose header is unusable (`problem`
    says why: only create() may replace it).  Not thread-safe:
    activitylog.py serialises."""

    def __init__(self, path, fd):
        self.path, self.fd = path, fd
        self.created = False        # open() made it (empty)
        self.header = None
        self.problem = None         # why the header cannot be used
        self._seq = 0
        self._slot = 1              # the slot the current header is in

    # -- opening ----------------------------------------------------------
    @classmethod
    def open(cls, path):
        """Open (creating it empty if missing) and lock `path`, and read its
        header.  Refuses a file held by another proxy, a file that is not
        ours, and one whose header is unreadable."""
        for _ in range(10):
            fd, created = cls._open_fd(path)
            self = cls(path, fd)
            self.created = created
            try:
                if self._lock():
                    self._read_header()
                    return self
            except BaseException:
                self.close()
                raise
            self.close()            # replaced meanwhile: open the new one
        raise cls._error(path, "keeps being replaced; not using it")

    @classmethod
    def _open_fd(cls, path):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise cls._error(path, "not a regular file; not using it")
        try:
            if st is None:
                try:
                    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL |
                                   os.O_CLOEXEC, 0o600), True
                except FileExistsError:
                    pass
            # O_NONBLOCK: a FIFO put there meanwhile must not hang us.
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            raise cls._error(path, f"cannot open it ({os.strerror(e.errno)})")
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise cls._error(path, "not a regular file; not using it")
        return fd, False

    def _lock(self):
        """Lock; False if `path` no longer names the file we locked (a
        create() of another proxy replaced it)."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise self.error("in use: locked by another process (is a "
                                 "proxy running with it?)") from None
            raise self.error(f"cannot lock it ({os.strerror(e.errno)})") \
                from None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(self.fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    @staticmethod
    def _error(path, why):
        return BitmapFileError(f"bitmap: {path}: {why}")

    def error(self, why, hint=False):
        return self._error(self.path, why + (f" ({DISCARD_HINT})"
                                             if hint else ""))

    def _read_header(self):
        length = os.fstat(self.fd).st_size
        if length == 0:
            return                  # new, or made and never written
        data = os.pread(self.fd, HEADER, 0)
        found, ours = [], False
        for slot in (0, 1):
            raw = data[slot * SLOT:(slot + 1) * SLOT]
            if raw[:len(MAGIC)] != MAGIC:
                continue
            ours = True
            if len(raw) < SLOT:
                continue
            magic, version, seq, n = _SLOT_HEAD.unpack_from(raw)
            crc, = struct.unpack_from("<I", raw, SLOT - 4)
            if zlib.crc32(raw[:SLOT - 4]) != crc or \
                    n > SLOT - 4 - _SLOT_HEAD.size:
                continue
            if version != VERSION:
                self.problem = (f"format version {version}, this nbdmirror "
                                f"reads {VERSION}")
                return
            try:
                header = json.loads(raw[_SLOT_HEAD.size:_SLOT_HEAD.size + n])
                if header.get("state") not in STATES:
                    continue
            except (ValueError, AttributeError):
                continue
            found.append((seq, slot, header))
        if not ours:
            raise self.error("not an nbdmirror bitmap file; not using it")
        if not found:
            self.problem = f"truncated: {length} bytes, not even a header" \
                if length < HEADER else "corrupt header (checksum mismatch)"
            return
        self._seq, self._slot, self.header = max(found)

    # -- reading ----------------------------------------------------------
    @property
    def state(self):
        return None if self.header is None else self.header["state"]

    @property
    def chunks(self):
        h = self.header
        return (h["size"] + h["granularity"] - 1) // h["granularity"]

    def mismatch(self, ident):
        """Why this file is not for the job `ident` (identity()), or None.
        Keys whose value is None in `ident` are not compared."""
        h = self.header
        for key, what in (("size", "disk size"), ("granularity",
                                                   "granularity"),
                          ("sync", "sync mode"), ("source", "source"),
                          ("target", "target")):
            want = ident.get(key)
            if want is not None and h.get(key) != want:
                return (f"made for another {what} ({h.get(key)}, not "
                        f"{want})")
        return None

    def check_length(self):
        length = os.fstat(self.fd).st_size
        want = file_size(self.chunks)
        if length < want:
            raise self.error(f"truncated: {length} bytes, expected {want}",
                             hint=True)
        if length > want:
            raise self.error(f"corrupt: {length} bytes, the header says "
                             f"{want}", hint=True)

    def load(self):
        """The marks (new_image() layout), every sector checked."""
        self.check_length()
        n = sectors(self.chunks)
        body = os.pread(self.fd, n * SECTOR, HEADER)
        if len(body) != n * SECTOR:
            raise self.error("truncated: short read of the marks",
                             hint=True)
        image = bitarray(endian="little")
        for s in range(n):
            raw = body[s * SECTOR:(s + 1) * SECTOR]
            bits = raw[:SECTOR - 4]
            crc, = struct.unpack_from("<I", raw, SECTOR - 4)
            if zlib.crc32(struct.pack("<Q", s) + bits) != crc:
                first = s * SECTOR_BITS
                raise self.error(
                    f"corrupt marks: checksum mismatch in sector {s} "
                    f"(chunks {first}-{first + SECTOR_BITS - 1})", hint=True)
            image.frombytes(bits)
        image[self.chunks:] = 0        # padding bits mean nothing
        return image

    # -- writing ----------------------------------------------------------
    def create(self, ident, image):
        """Make the file anew for the job `ident`, state active, with the
        marks `image`; durable (file and name) on return.  Written whole
        to a temporary file (locked first) that then replaces the path: a
        crash leaves the old file or the new one, never half of one."""
        real = os.path.realpath(self.path)
        folder, base = os.path.split(real)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".new",
                                       dir=folder)
        except OSError as e:
            raise self.error(f"cannot create a file in {folder} "
                             f"({os.strerror(e.errno)})") from None
        new = BitmapFile(self.path, fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            new.header = dict(ident, state=ACTIVE, uuid=uuid.uuid4().hex)
            chunks = new.chunks
            os.posix_fallocate(fd, 0, file_size(chunks))   # no ENOSPC later
            new.write_sectors(image, 0, sectors(chunks))
            new._write_header()             # fsyncs all of it
            os.rename(tmp, real)
        except BaseException:
            new.close()
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        old, self.fd = self.fd, fd
        os.close(old)
        self.header, self._seq, self._slot = new.header, new._seq, new._slot
        self.problem = None
        self._sync_dir()

    def set_state(self, state):
        """Record `state`, durably."""
        self.header = dict(self.header, state=state)
        self._write_header()

    def _write_header(self):
        payload = json.dumps(self.header, sort_keys=True).encode()
        if len(payload) > SLOT - 4 - _SLOT_HEAD.size:
            raise self.error("header too large")
        self._seq += 1
        self._slot ^= 1
        raw = _SLOT_HEAD.pack(MAGIC, VERSION, self._seq, len(payload)) + \
            payload
        raw += bytes(SLOT - 4 - len(raw))
        raw += struct.pack("<I", zlib.crc32(raw))
        self._pwrite(raw, self._slot * SLOT)
        self.sync()

    def write_sectors(self, image, s0, s1):
        """Write sectors [s0, s1) of `image` (not synced)."""
        if s0 < s1:
            self._pwrite(b"".join(_sector_bytes(image, s)
                                  for s in range(s0, s1)),
                         HEADER + s0 * SECTOR)

    def write_chunks(self, image, c0, c1):
        """Write the sectors that hold chunks [c0, c1) (not synced)."""
        if c0 < c1:
            self.write_sectors(image, c0 // SECTOR_BITS,
                               (c1 - 1) // SECTOR_BITS + 1)

    def _pwrite(self, data, offset):
        view = memoryview(data)
        while view:
            n = pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def sync(self):
        """Make every write so far durable (the fault hook)."""
        fsync(self.fd)

    def _sync_dir(self):
        """The file's name is durable too (a pivot must survive)."""
        d = os.open(os.path.dirname(os.path.abspath(self.path)) or ".",
                    os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(d)
        finally:
            os.close(d)

    def abandon(self):
        """A start that failed: remove the file if open() made it and
        nothing was written to it since (a refusal leaves nothing behind);
        then close."""
        try:
            if self.created and self.header is None and self.fd >= 0:
                mine, st = os.fstat(self.fd), os.stat(self.path)
                if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino) and \
                        not st.st_size:
                    os.unlink(self.path)
        except OSError:
            pass
        self.close()

    def close(self):
        """Release the lock (closing the file)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
