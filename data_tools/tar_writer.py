"""A tar file written a member at a time: the bytes `tarfile` writes in USTAR format with fixed metadata.

webdataset's TarWriter goes through `tarfile.TarInfo` for every member (~70 us each, a tenth of a build's CPU
at 16-token segments); here a header is a template made once by tarfile itself, with the name, size and checksum
filled in. The sha256 of the file is taken as it is written. Member names must be ASCII of at most 100 bytes (no
long-name or PAX records; sample keys are ~20 characters).
"""

import hashlib
import os
import tarfile
from pathlib import Path

BLOCK = tarfile.BLOCKSIZE  # 512: a header, and the unit data is padded to
RECORD = tarfile.RECORDSIZE  # tarfile pads a closed archive to whole records of 20 blocks
NAME, SIZE, CHKSUM = slice(0, 100), slice(124, 136), slice(148, 156)  # USTAR header fields


def _template(mtime: int, user: str, group: str, mode: int) -> bytearray:
    """tarfile's USTAR header of an empty member named "" with this metadata, its checksum field blank."""
    info = tarfile.TarInfo("")
    info.mtime, info.uname, info.gname, info.mode = mtime, user, group, mode
    header = bytearray(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
    header[CHKSUM] = b" " * 8
    return header


class TarWriter:
    def __init__(self, path: str | Path, mtime: int, user: str, group: str, mode: int):
        self.header = _template(mtime, user, group, mode)
        self.file = open(path, "wb")
        self.sha256 = hashlib.sha256()
        self.offset = 0  # bytes written so far: where the next header goes

    @classmethod
    def reopen(cls, path: str | Path, offset: int, mtime: int, user: str, group: str, mode: int) -> "TarWriter":
        """An unfinished tar cut back to `offset` (a sample boundary), to write on (arc-data build --resume)."""
        writer = cls.__new__(cls)
        writer.header = _template(mtime, user, group, mode)
        writer.file = open(path, "r+b")  # noqa: SIM115 (closed by close())
        writer.file.truncate(offset)
        writer.sha256, writer.offset = hashlib.sha256(), offset
        while block := writer.file.read(1 << 20):
            writer.sha256.update(block)
        writer.file.seek(offset)
        return writer

    def sync(self) -> int:
        """Flush what was written to the disk; returns the offset it reaches."""
        self.file.flush()
        os.fsync(self.file.fileno())
        return self.offset

    def add(self, name: str, data: bytes) -> None:
        raw = name.encode("ascii")
        assert len(raw) <= 100 and len(data) < 8**11, (name, len(data))
        header = self.header
        header[NAME] = raw.ljust(100, b"\0")
        header[SIZE] = b"%011o\0" % len(data)
        header[CHKSUM] = b"%06o\0 " % sum(header)  # the checksum field counts as spaces while summing
        pad = -len(data) % BLOCK
        self._write(bytes(header), data, b"\0" * pad)
        header[CHKSUM] = b" " * 8

    def close(self) -> None:
        end = self.offset + 2 * BLOCK  # two zero blocks end the archive
        self._write(b"\0" * (2 * BLOCK + -end % RECORD))
        self.file.close()

    def _write(self, *parts: bytes) -> None:
        for part in parts:
            self.file.write(part)
            self.sha256.update(part)
            self.offset += len(part)
