"""The C split-virtqueue code on synthetic guest memory, including hostile descriptor tables."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stratovirt_py._dataplane import ffi, lib
from tests.virtq_model import F_INDIRECT, F_NEXT, F_WRITE, Queue, SyntheticGuest, new_chain

ERR = {"ring": -1, "avail": -2, "head": -3, "next": -4, "long": -5, "addr": -6,
       "indirect": -7, "order": -8}


@pytest.fixture
def guest():
    return SyntheticGuest()


def segments(guest, chain):
    return [(guest.gpa_of(chain.iov[i].iov_base), chain.iov[i].iov_len)
            for i in range(chain.readable + chain.writable)]


def test_pops_a_chain_in_order(guest):
    q = Queue(guest)
    assert q.activate() == 0
    d = q.data_area
    q.set_desc(3, d, 16, F_NEXT, 7)
    q.set_desc(7, d + 4096, 4096, F_NEXT | F_WRITE, 1)
    q.set_desc(1, d + 8192, 1, F_WRITE)
    q.publish(3)
    chain = new_chain()
    assert lib.svpy_vq_pop(q.vq, guest.mem, chain) == 1
    assert (chain.head, chain.readable, chain.writable) == (3, 1, 2)
    assert (chain.readable_bytes, chain.writable_bytes) == (16, 4097)
    assert segments(guest, chain) == [(d, 16), (d + 4096, 4096), (d + 8192, 1)]
    assert lib.svpy_vq_pop(q.vq, guest.mem, chain) == 0  # nothing more
    lib.svpy_vq_push(q.vq, 3, 4097)
    assert q.used_idx() == 1 and q.used_elem(0) == (3, 4097)


def test_indirect_table(guest):
    q = Queue(guest)
    q.activate()
    table = q.data_area
    q.set_desc(0, table, 48, F_INDIRECT)
    q.set_desc(0, table + 4096, 16, F_NEXT, 2, table=table)
    q.set_desc(2, table + 8192, 512, F_NEXT | F_WRITE, 1, table=table)
    q.set_desc(1, table + 12288, 1, F_WRITE, table=table)
    q.publish(0)
    chain = new_chain()
    assert lib.svpy_vq_pop(q.vq, guest.mem, chain) == 1
    assert segments(guest, chain) == [(table + 4096, 16), (table + 8192, 512), (table + 12288, 1)]


@pytest.mark.parametrize("misalignment", [8, 4, 1, 15])
def test_indirect_table_at_any_alignment(guest, misalignment):
    # The spec asks no alignment of indirect tables; Linux with SLOB hands out
    # 8-byte-aligned ones.
    q = Queue(guest)
    q.activate()
    table = q.data_area + misalignment
    q.set_desc(0, table, 48, F_INDIRECT)
    q.set_desc(0, q.data_area + 4096, 16, F_NEXT, 2, table=table)
    q.set_desc(2, q.data_area + 8192, 512, F_NEXT | F_WRITE, 1, table=table)
    q.set_desc(1, q.data_area + 12288, 1, F_WRITE, table=table)
    q.publish(0)
    chain = new_chain()
    assert lib.svpy_vq_pop(q.vq, guest.mem, chain) == 1
    assert segments(guest, chain) == [(q.data_area + 4096, 16), (q.data_area + 8192, 512),
                                      (q.data_area + 12288, 1)]
    assert (chain.readable, chain.writable) == (1, 2)


def pop_error(q, guest):
    return lib.svpy_vq_pop(q.vq, guest.mem, new_chain())


def test_descriptor_loop(guest):
    q = Queue(guest)
    q.activate()
    q.set_desc(0, q.data_area, 8, F_NEXT, 1)
    q.set_desc(1, q.data_area, 8, F_NEXT, 0)
    q.publish(0)
    assert pop_error(q, guest) == ERR["long"]


@pytest.mark.parametrize(("addr", "length"), [
    (0x7FFF00000000, 16), (0, 16), (0xFFFFFFFFFFFFFFF0, 0x20), (0x10000 + (1 << 20) - 8, 16),
])
def test_buffer_outside_ram(guest, addr, length):
    q = Queue(guest)
    q.activate()
    q.set_desc(0, addr, length)
    q.publish(0)
    assert pop_error(q, guest) == ERR["addr"]


def test_huge_length(guest):
    q = Queue(guest)
    q.activate()
    q.set_desc(0, q.data_area, 0xFFFFFFFF)
    q.publish(0)
    assert pop_error(q, guest) == ERR["addr"]


def test_bad_next_and_head(guest):
    q = Queue(guest, size=8)
    q.activate()
    q.set_desc(0, q.data_area, 8, F_NEXT, 8)
    q.publish(0)
    assert pop_error(q, guest) == ERR["next"]
    q2 = Queue(guest, size=8, at=guest.base + 0x40000)
    q2.activate()
    q2.publish(9)
    assert pop_error(q2, guest) == ERR["head"]


def test_avail_index_jump(guest):
    q = Queue(guest, size=8)
    q.activate()
    q.set_desc(0, q.data_area, 8)
    q.publish(0, advance=9)
    assert pop_error(q, guest) == ERR["avail"]


def test_readable_after_writable(guest):
    q = Queue(guest)
    q.activate()
    q.set_desc(0, q.data_area, 8, F_NEXT | F_WRITE, 1)
    q.set_desc(1, q.data_area + 64, 8)
    q.publish(0)
    assert pop_error(q, guest) == ERR["order"]


@pytest.mark.parametrize("case", ["nested", "bad-len", "zero-len", "oob", "loop", "not-negotiated",
                                  "with-next", "next-out"])
def test_bad_indirect_tables(guest, case):
    q = Queue(guest, indirect=case != "not-negotiated")
    q.activate()
    table = q.data_area
    length = {"bad-len": 40, "zero-len": 0}.get(case, 32)
    addr = 0x7FFF0000 if case == "oob" else table
    q.set_desc(0, addr, length, F_INDIRECT | (F_NEXT if case == "with-next" else 0), 1)
    q.set_desc(1, table + 512, 8)
    if case == "nested":
        q.set_desc(0, table, 32, F_INDIRECT, table=table)
    elif case == "loop":
        q.set_desc(0, table + 512, 8, F_NEXT, 1, table=table)
        q.set_desc(1, table + 512, 8, F_NEXT, 0, table=table)
    elif case == "next-out":
        q.set_desc(0, table + 512, 8, F_NEXT, 2, table=table)
    else:
        q.set_desc(0, table + 512, 8, table=table)
    q.publish(0)
    expected = {"loop": ERR["long"], "next-out": ERR["next"]}.get(case, ERR["indirect"])
    assert pop_error(q, guest) == expected


@pytest.mark.parametrize(("size", "desc", "message"), [
    (0, 0x10000, "zero size"), (12, 0x10000, "not a power of two"), (2048, 0x10000, "too big"),
    (16, 0x10008, "misaligned"), (16, 0x7FFF0000, "outside RAM"),
])
def test_bad_rings_are_refused(guest, size, desc, message):
    q = Queue(guest, size=16)
    q.vq.size = size
    q.vq.desc_gpa = desc
    assert q.activate() == -ERR["ring"], message
    assert not q.vq.active


def test_event_idx_suppression(guest):
    q = Queue(guest, event_idx=True)
    q.activate()
    for head in range(4):
        q.set_desc(head, q.data_area + 64 * head, 8, F_WRITE)
        q.publish(head)
    chain = new_chain()
    q.set_used_event(2)  # the driver wants an interrupt once entry 2 is used
    for expected in (False, False, True, False):
        assert lib.svpy_vq_pop(q.vq, guest.mem, chain) == 1
        lib.svpy_vq_push(q.vq, chain.head, 1)
        # The first check always signals (nothing signalled yet).
        if chain.head == 0:
            assert lib.svpy_vq_should_interrupt(q.vq)
        else:
            assert lib.svpy_vq_should_interrupt(q.vq) == expected
    # Device side: enabling notifications publishes avail_event = next index.
    assert not lib.svpy_vq_enable_notify(q.vq)
    assert q.avail_event() == 4
    q.set_desc(4, q.data_area, 8, F_WRITE)
    q.publish(4)
    assert lib.svpy_vq_enable_notify(q.vq)  # buffers arrived meanwhile


def test_no_interrupt_flag_without_event_idx(guest):
    q = Queue(guest)
    q.activate()
    lib.svpy_vq_push(q.vq, 0, 1)
    assert lib.svpy_vq_should_interrupt(q.vq)
    guest.write(q.layout.avail, b"\x01\x00")  # VIRTQ_AVAIL_F_NO_INTERRUPT
    assert not lib.svpy_vq_should_interrupt(q.vq)


descriptor = st.tuples(
    st.one_of(st.integers(0, (1 << 20) + 0x20000), st.integers(0, (1 << 64) - 1)),
    st.one_of(st.integers(0, 9000), st.integers(0, (1 << 32) - 1)),
    st.integers(0, 7),
    st.integers(0, 40),
)


@settings(max_examples=400, deadline=None)
@given(size=st.sampled_from([1, 2, 4, 16, 32]), table=st.lists(descriptor, min_size=32,
                                                               max_size=32),
       indirect_table=st.lists(descriptor, min_size=8, max_size=8),
       heads=st.lists(st.integers(0, 40), min_size=1, max_size=20),
       advance=st.integers(0, 40), indirect=st.booleans())
def test_hostile_tables_never_escape_guest_ram(size, table, indirect_table, heads, advance,
                                               indirect):
    guest = SyntheticGuest(size=1 << 17)
    q = Queue(guest, size=size, indirect=indirect)
    assert q.activate() == 0
    table_addr = q.data_area
    for index in range(size):
        addr, length, flags, next_ = table[index]
        q.set_desc(index, addr, length, flags, next_)
    for index, (addr, length, flags, next_) in enumerate(indirect_table):
        q.set_desc(index, addr, length, flags, next_, table=table_addr)
    for head in heads:
        q.publish(head)
    q.avail_idx = (q.avail_idx + advance) & 0xFFFF
    q.publish(heads[0], advance=0)
    chain = new_chain()
    for _ in range(len(heads) + 2):
        ret = lib.svpy_vq_pop(q.vq, guest.mem, chain)
        if ret <= 0:
            assert ret in (0, *ERR.values())
            assert ffi.string(lib.svpy_vq_error_name(ret)) != b"unknown error"
            break
        assert chain.readable + chain.writable <= lib.SVPY_CHAIN_MAX_SEGMENTS
        for i in range(chain.readable + chain.writable):
            assert guest.iov_inside(chain.iov[i])
        lib.svpy_vq_push(q.vq, chain.head, 0)
    assert guest.guards_intact()
