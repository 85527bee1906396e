"""A shard that is damaged, joined, cut short or named against WebDataset's key rule is
refused before training starts, naming the shard, the byte and what was found there: never
indexed up to the damage, never a sample dropped."""
import io
import re
import tarfile
from pathlib import Path

import pytest

from cocord_fast.data.sources import open_source
from cocord_fast.errors import UserError

JPEG = b"\xff\xd8\xff" + bytes(700)  # bytes enough to span a block: members end mid-block


def tar_bytes(contents: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in contents:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def samples(count: int, start: int = 0) -> list[tuple[str, bytes]]:
    return [member for i in range(start, start + count)
            for member in ((f"{i:03d}.jpg", JPEG), (f"{i:03d}.cls", str(i % 3).encode()))]


def header_offsets(data: bytes) -> list[int]:
    """Where each member's header starts."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [member.offset for member in tar]


def end_of_members(data: bytes) -> int:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        last = tar.getmembers()[-1]
    return last.offset_data + (last.size + 511) // 512 * 512


def opened(tmp_path: Path, data: bytes):
    shard = tmp_path / "data" / "train" / "shard-000000.tar"
    shard.parent.mkdir(parents=True, exist_ok=True)
    shard.write_bytes(data)
    return open_source("shards", tmp_path / "data", train=True)


def refused(tmp_path: Path, data: bytes) -> str:
    with pytest.raises(UserError) as err:
        opened(tmp_path, data)
    message = str(err.value)
    assert message.startswith(str(tmp_path / "data" / "train" / "shard-000000.tar"))
    return message


def test_an_intact_shard_is_read_whole(tmp_path):
    assert len(opened(tmp_path, tar_bytes(samples(4)))) == 4


def test_a_shard_cut_inside_a_header_is_named_with_the_byte(tmp_path):
    whole = tar_bytes(samples(4))
    third = header_offsets(whole)[4]  # sample 2's image header
    message = refused(tmp_path, whole[:third + 100])
    assert f"byte {third}: a header cut short (100 of 512 bytes), where the next header " \
           f"belongs; the members before it are readable" in message


def test_a_header_with_one_flipped_byte_is_named_with_the_byte(tmp_path):
    data = bytearray(tar_bytes(samples(4)))
    third = header_offsets(bytes(data))[4]
    data[third + 1] ^= 0x20  # a letter of the member's name
    message = refused(tmp_path, bytes(data))
    assert f"byte {third}: not a valid tar header (bad checksum), where the next header " \
           f"belongs" in message


def test_a_zeroed_header_is_named_with_the_bytes_after_it(tmp_path):
    data = bytearray(tar_bytes(samples(4)))
    third = header_offsets(bytes(data))[4]
    data[third:third + 512] = bytes(512)
    message = refused(tmp_path, bytes(data))
    assert re.search(f"byte {third + 512}: not a valid tar header .*, after a zero block at "
                     f"byte {third} where the next header belongs \\(a zeroed header\\?\\)",
                     message)


def test_two_shards_joined_with_cat_are_refused(tmp_path):
    first, second = tar_bytes(samples(2)), tar_bytes(samples(2, start=2))
    message = refused(tmp_path, first + second)
    assert f"byte {len(first)}: the header of member '002.jpg', after the end-of-archive " \
           f"marker at byte {end_of_members(first)}" in message
    assert "two archives joined with cat?" in message


def test_a_shard_cut_between_members_is_refused_for_its_missing_end_marker(tmp_path):
    whole = tar_bytes(samples(4))
    cut = header_offsets(whole)[4]  # right after sample 1's class member
    message = refused(tmp_path, whole[:cut])
    assert f"ends at byte {cut} without tar's end-of-archive marker" in message


def test_bytes_appended_after_the_end_marker_are_refused(tmp_path):
    whole = tar_bytes(samples(2))
    message = refused(tmp_path, whole + b"junk")
    assert f"byte {len(whole)}: a header cut short (4 of 512 bytes), after the " \
           f"end-of-archive marker" in message


@pytest.mark.parametrize("contents, member, key", [
    ([("a.b.c.jpg", JPEG), ("a.b.c.cls", b"1")], "a.b.c.jpg", "a"),
    ([("a.1.jpg", JPEG), ("a.1.cls", b"1"), ("a.2.jpg", JPEG), ("a.2.cls", b"2")], "a.1.jpg",
     "a"),
    ([("n01440764_10026.JPEG.jpg", JPEG), ("n01440764_10026.cls", b"0")],
     "n01440764_10026.JPEG.jpg", "n01440764_10026"),
    ([("x.jpg", JPEG), ("x.cls", b"0"), ("d/y.z.png", JPEG)], "d/y.z.png", "d/y"),
    ([("x.jpg", JPEG), ("x.cls", b"0"), ("x.v2.jpg", JPEG), ("x.v2.cls", b"1")], "x.v2.jpg",
     "x"),
])
def test_a_key_with_dots_is_refused_with_webdatasets_rule(tmp_path, contents, member, key):
    message = refused(tmp_path, tar_bytes(contents))
    assert f"member {member} has more than one dot in its file name: WebDataset's key ends at " \
           f"the first dot, so it belongs to sample {key!r}" in message


def test_a_sample_may_carry_extra_members_with_dotted_extensions(tmp_path):
    source = opened(tmp_path, tar_bytes([("a.jpg", JPEG), ("a.seg.png", JPEG), ("a.cls", b"2"),
                                          ("a.json", b"{}")]))
    assert len(source) == 1 and source.where(0).endswith(":a.jpg")


def test_an_image_stored_as_a_link_is_refused(tmp_path):
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in samples(1):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("001.jpg")
        link.type, link.linkname = tarfile.LNKTYPE, "000.jpg"
        tar.addfile(link)
        cls = tarfile.TarInfo("001.cls")
        cls.size = 1
        tar.addfile(cls, io.BytesIO(b"1"))
    assert "member 001.jpg is not a regular file (a link?)" in refused(tmp_path, out.getvalue())


def test_an_empty_shard_is_named_as_empty(tmp_path):
    message = refused(tmp_path, b"")
    assert message.endswith("is empty (0 bytes): a copy that did not finish?")


def test_a_class_number_in_other_digits_is_refused(tmp_path):
    message = refused(tmp_path, tar_bytes([("a.jpg", JPEG), ("a.cls", "²".encode())]))
    assert "a.cls holds '²', not a class number (decimal digits 0-9)" in message


def test_compressed_shards_beside_plain_ones_are_refused_with_how_to_unpack(tmp_path):
    split = tmp_path / "data" / "train"
    split.mkdir(parents=True)
    (split / "shard-000000.tar").write_bytes(tar_bytes(samples(2)))
    (split / "shard-000001.tar.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(UserError, match=r"shard-000001\.tar\.gz is compressed: gunzip it into "
                                        r"a \.tar \(shards are read by offset"):
        open_source("shards", tmp_path / "data", train=True)
