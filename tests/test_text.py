"""TextAssembler: incremental UTF-8 decoding and stop strings."""

from pyllama_inf._text import TextAssembler


def feed_all(asm, pieces):
    out = [asm.feed(p) for p in pieces]
    out.append(asm.finish())
    return out


def test_multibyte_character_split_across_pieces():
    euro = "€".encode()  # 3 bytes
    asm = TextAssembler()
    out = feed_all(asm, [b"a", euro[:1], euro[1:2], euro[2:] + b"b"])
    assert "".join(out) == "a€b" == asm.text
    assert out[1] == "" and out[2] == ""  # nothing released mid-character


def test_invalid_bytes_are_replaced():
    asm = TextAssembler()
    assert "".join(feed_all(asm, [b"x\xff", b"y"])) == "x\ufffdy"


def test_stop_string_across_pieces_cuts_text():
    asm = TextAssembler(["STOP"])
    out = feed_all(asm, [b"hello S", b"TO", b"P and more"])
    assert asm.stopped
    assert asm.text == "hello "
    assert "".join(out) == "hello "


def test_held_back_prefix_is_released_when_not_a_stop():
    asm = TextAssembler(["\n\n"])
    first = asm.feed(b"line\n")
    assert first == "line"  # the newline could start the stop string
    assert asm.feed(b"next") == "\nnex"  # one character held back: the longest stop minus one
    assert asm.finish() == "t"
    assert asm.text == "line\nnext" and not asm.stopped


def test_earliest_of_several_stops_wins():
    asm = TextAssembler(["b", "abc"])
    feed_all(asm, [b"xxabcd"])
    assert asm.text == "xx"  # "abc" begins before "b"


def test_no_stop_releases_everything_immediately():
    asm = TextAssembler()
    assert asm.feed(b"abc") == "abc"
    assert asm.finish() == ""
