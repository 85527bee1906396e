"""Reading one tar shard's headers into its samples, or saying exactly what is wrong with it.

Python's `tarfile` ends an archive quietly at the first header it cannot read: a shard cut
inside a header, a header with a flipped byte or a zeroed one, or two archives joined with
`cat`, would all lose their tail without a word. So after the last member this reader checks
the rest of the file: tar's end-of-archive marker (two zero blocks), then zeros up to the
file's size, and nothing else. Anything else is an error naming the shard, the byte and what
was found there.

Members are grouped into samples by WebDataset's rule: the key of `<path>/<file name>` ends at
the first dot of the file name, and what follows is the extension. Names with more dots
(`n01440764_10026.JPEG.jpg`) therefore make a sample of their own that has no `jpg` member; a
group whose images or class would be lost that way is refused, never dropped. Names are kept
in the operating system's encoding (bytes that are not UTF-8 survive as `os.fsdecode` gives
them).
"""
from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .index_files import IMAGE_EXTENSIONS

BLOCK = tarfile.BLOCKSIZE
END_OF_ARCHIVE = 2 * BLOCK  # two zero blocks
# WebDataset's split of a member's name into key and extension.
MEMBER_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
IMAGE_MEMBERS = tuple(extension[1:] for extension in IMAGE_EXTENSIONS)
CLASS_MEMBER = "cls"
ASCII_NUMBER = re.compile(r"[0-9]+")
COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz",
              b"\x28\xb5\x2f\xfd": "zstd"}
COMPRESSED_SUFFIXES = {".tar.gz": "gunzip", ".tgz": "gunzip", ".tar.bz2": "bunzip2",
                       ".tar.xz": "unxz", ".tar.zst": "unzstd"}


@dataclass(frozen=True)
class Sample:
    name: str  # the image member's name
    start: int  # where its bytes start in the shard
    length: int
    label: int


def compressed_shard_hint(name: str) -> str | None:
    """How to unpack a compressed shard called `name`, or None if the name is not one's."""
    for suffix, tool in COMPRESSED_SUFFIXES.items():
        if name.endswith(suffix):
            return f"{tool} it into a .tar (shards are read by offset, so they cannot be " \
                   f"compressed)"
    return None


def read_samples(path: Path) -> list[Sample]:
    """Every sample of the shard at `path`, in member order."""
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"{path} is empty (0 bytes): a copy that did not finish?")
    try:
        with tarfile.open(path, "r:") as tar:  # reads the headers, seeking over the data
            groups = _grouped_members(path, tar, size)
            _check_tail(path, tar.offset, size)  # where the headers stopped
            return [sample for key, members in groups
                    if (sample := _sample(path, tar, key, members)) is not None]
    except tarfile.TarError as err:
        raise UserError(_not_a_tar(path, err)) from None


def _grouped_members(path: Path, tar: tarfile.TarFile,
                     size: int) -> list[tuple[str, dict[str, tarfile.TarInfo]]]:
    """The file members as (key, {extension: member}), consecutive members of one key
    together."""
    groups: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
    for member in tar:
        match = MEMBER_NAME.match(member.name)
        if not member.isfile():
            if match is not None and _last_extension(match[2]) in (*IMAGE_MEMBERS, CLASS_MEMBER):
                raise UserError(f"{path}: member {member.name} is not a regular file (a link?): "
                                f"a shard must hold each sample's bytes (GNU tar: "
                                f"--hard-dereference)")
            continue
        if member.offset_data + member.size > size:
            raise UserError(f"{path} is cut short inside {member.name} (a copy that did not "
                            f"finish?)")
        if match is None:
            continue
        key, extension = match[1], match[2].lower()
        if not groups or groups[-1][0] != key:
            groups.append((key, {}))
        if extension in groups[-1][1]:
            raise UserError(f"{path}: sample {key!r} has two {extension!r} members (a "
                            f"sample's members must have distinct extensions)")
        groups[-1][1][extension] = member
    return groups


def _last_extension(extension: str) -> str:
    return extension.rpartition(".")[2].lower()


def _sample(path: Path, tar: tarfile.TarFile, key: str,
            members: dict[str, tarfile.TarInfo]) -> Sample | None:
    """One sample; None for a group with no image and no class (metadata, ignored). Members
    with dotted extensions ride along beside an image (`seg.png`), but a group whose only
    images have them, or with a second class (`v2.cls`), is samples whose keys lost their
    dots: refused."""
    images = [extension for extension in members if extension in IMAGE_MEMBERS]
    dotted = [(_last_extension(extension), member) for extension, member in members.items()
              if "." in extension and _last_extension(extension) in (*IMAGE_MEMBERS,
                                                                     CLASS_MEMBER)]
    if dotted and (not images or any(last == CLASS_MEMBER for last, _ in dotted)):
        raise UserError(_dotted_name(path, dotted[0][1], key))
    if not images and CLASS_MEMBER not in members:
        return None
    if len(images) != 1:
        raise UserError(f"{path}: sample {key!r} has {len(images) or 'no'} image members "
                        f"({', '.join(sorted(members))}); each needs exactly one of "
                        f"{', '.join(IMAGE_MEMBERS)}")
    image = members[images[0]]
    if CLASS_MEMBER not in members:
        raise UserError(f"{path}: sample {image.name} has no .cls member (its class number)")
    raw = tar.extractfile(members[CLASS_MEMBER]).read()
    text = raw.decode(errors="replace").strip()
    if ASCII_NUMBER.fullmatch(text) is None:
        raise UserError(f"{path}: {members[CLASS_MEMBER].name} holds {text[:20]!r}, not a class "
                        f"number (decimal digits 0-9)")
    return Sample(image.name, image.offset_data, image.size, int(text))


def _dotted_name(path: Path, member: tarfile.TarInfo, key: str) -> str:
    return (f"{path}: member {member.name} has more than one dot in its file name: WebDataset's "
            f"key ends at the first dot, so it belongs to sample {key!r} as its "
            f"{member.name[len(key) + 1:]!r} member, not as an image or class; rename the "
            f"members so that the key holds no dot (cocord-fast convert turns dots in file "
            f"names into underscores)")


def _not_a_tar(path: Path, err: tarfile.TarError) -> str:
    with open(path, "rb") as f:
        head = f.read(BLOCK)
    for magic, kind in COMPRESSED.items():
        if head.startswith(magic):
            return (f"{path} is a {kind}-compressed file: shards are read by offset, so they "
                    f"must be plain tar files (unpack it)")
    return f"{path} is not a tar file: byte 0: {_describe_block(head)} ({err})"


def _check_tail(path: Path, end: int, size: int) -> None:
    """After the last member's data, at byte `end`: tar's end-of-archive marker, then zeros
    only, up to the file's size."""
    with open(path, "rb") as f:
        f.seek(end)
        position = end
        while chunk := f.read(1 << 20):
            zeros = len(chunk) - len(chunk.lstrip(b"\0"))
            if zeros < len(chunk):
                block = (position + zeros) // BLOCK * BLOCK
                f.seek(block)
                raise UserError(_after_the_last_member(path, end, block, f.read(BLOCK)))
            position += len(chunk)
    if size - end < END_OF_ARCHIVE:
        raise UserError(f"{path} ends at byte {size} without tar's end-of-archive marker (two "
                        f"zero blocks) after its last member: cut short (a copy that did not "
                        f"finish?)")


def _after_the_last_member(path: Path, end: int, block: int, found: bytes) -> str:
    """Why the bytes `found` at `block`, after the members that end at `end`, are an error."""
    what = _describe_block(found)
    if block == end:
        return (f"{path}: byte {block}: {what}, where the next header belongs; the members "
                f"before it are readable, the rest of the shard is not (replace the shard)")
    if block - end >= END_OF_ARCHIVE:
        return (f"{path}: byte {block}: {what}, after the end-of-archive marker at byte {end}: "
                f"a shard must be one tar archive followed by zeros only (two archives joined "
                f"with cat?)")
    return (f"{path}: byte {block}: {what}, after a zero block at byte {end} where the next "
            f"header belongs (a zeroed header?); the members before it are readable, the rest "
            f"of the shard is not (replace the shard)")


def _describe_block(block: bytes) -> str:
    """What a 512-byte block where a tar header belongs holds."""
    if len(block) < BLOCK:
        return f"a header cut short ({len(block)} of {BLOCK} bytes)"
    try:
        info = tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    except tarfile.EOFHeaderError:
        return "a zero block"
    except tarfile.HeaderError as err:
        return f"not a valid tar header ({err})"
    return f"the header of member {info.name!r}"
