"""Key validation and the storage-key encoding."""

from __future__ import annotations

import uuid

import pytest

from keyhive._keys import check_key, decode_storage_key, storage_key, storage_prefix

U = uuid.UUID("12345678-1234-5678-1234-567812345678")


@pytest.mark.parametrize("key", ["a", "", "ü/../\x00", 0, -5, 2**70, b"\x00\xff", U, ("a", 1), (("x", (b"y",)), U), ()])
def test_valid_keys_round_trip(key: object) -> None:
    """Every supported key type encodes into a storage key and decodes back unchanged."""
    check_key(key)
    skey = storage_key("m", None, key)
    assert decode_storage_key(skey) == ("m", None, key)
    assert decode_storage_key(storage_key("m", ("p", 2), key)) == ("m", ("p", 2), key)


@pytest.mark.parametrize("key", [1.0, None, True, [1], {"a": 1}, {1}, object(), ("a", [1]), ("a", 1.5)])
def test_bad_key_types_raise_type_error_naming_the_type(key: object) -> None:
    """Unsupported key types raise TypeError with the offending type's name."""
    with pytest.raises(TypeError) as info:
        check_key(key)
    assert "must be str, int, bytes, uuid.UUID or a tuple" in str(info.value)


def test_oversized_and_deep_keys_raise_value_error() -> None:
    """Keys over 1024 encoded bytes or nested too deep raise ValueError."""
    check_key("x" * 1022)  # 1024 bytes with its quotes
    with pytest.raises(ValueError, match="1024"):
        check_key("x" * 1023)
    with pytest.raises(ValueError, match="1024"):
        check_key("é" * 600)  # 1200 bytes of UTF-8
    deep: object = "x"
    for _ in range(20):
        deep = (deep,)
    with pytest.raises(ValueError, match="deeper"):
        check_key(deep)


def test_encoding_is_injective_across_types() -> None:
    """1, '1', b'1', (1,) and ('1',) are five different storage keys."""
    keys = [1, "1", b"1", (1,), ("1",), ("a", "b"), "a,b", '["a","b"]']
    encoded = {storage_key("m", None, k) for k in keys}
    assert len(encoded) == len(keys)


def test_scoping_by_manager_and_partition() -> None:
    """The same key in another manager or partition is another storage key, and prefixes select them."""
    a = storage_key("m1", None, "k")
    b = storage_key("m2", None, "k")
    c = storage_key("m1", "p", "k")
    assert len({a, b, c}) == 3
    assert a.startswith(storage_prefix("m1")) and c.startswith(storage_prefix("m1"))
    assert not b.startswith(storage_prefix("m1"))
    assert c.startswith(storage_prefix("m1", "p")) and not a.startswith(storage_prefix("m1", "p"))
    assert not storage_key("m1x", None, "k").startswith(storage_prefix("m1"))


def test_decode_rejects_foreign_keys() -> None:
    """decode_storage_key refuses strings keyhive did not build."""
    for bad in ["plain", "[1,2,3]", "{}", '["m",null]']:
        with pytest.raises(ValueError):
            decode_storage_key(bad)


def _digits(n: int) -> int:
    """The smallest positive int with n decimal digits."""
    return 10 ** (n - 1)


@pytest.mark.parametrize("where", ["key", "in a tuple", "partition", "partition tuple"])
def test_int_keys_and_partitions_at_and_over_the_limit(where: str) -> None:
    """An int of 1024 digits is a key; 1025 digits, 9**1200 or 10**5000 raise the same ValueError as other long keys."""
    def wrap(n: int) -> object:
        return (n,) if "tuple" in where else n

    at_limit = [_digits(1024), -_digits(1023), 2**3398 - 1]
    over = [_digits(1025), -_digits(1024), 9**1200, 10**5000, -(10**100_000)]
    if "tuple" in where:  # the brackets take 2 of the 1024 bytes
        at_limit, over = [_digits(1022)], [_digits(1023), *over]
    what = "partition" if where.startswith("partition") else "key"
    for n in at_limit:
        assert check_key(wrap(n), what) == ([n] if "tuple" in where else n)
        if what == "key":
            assert decode_storage_key(storage_key("m", None, wrap(n)))[2] == wrap(n)
        else:
            assert decode_storage_key(storage_key("m", wrap(n), "k"))[1] == wrap(n)
    for n in over:
        with pytest.raises(ValueError, match=f"{what} encodes to .*bytes; the limit is 1024"):
            check_key(wrap(n), what)
        if n == _digits(1023):
            continue  # storage_key measures ints only; the whole key is check_key's (run first by get)
        args = ("m", None, wrap(n)) if what == "key" else ("m", wrap(n), "k")
        with pytest.raises(ValueError, match="the limit is 1024"):
            storage_key(*args)


def test_long_int_check_is_cheap() -> None:
    """A key of a million digits is refused from its bit length, without converting it to str."""
    huge = 1 << 3_400_000  # about 1,023,000 digits: str() would take seconds, if allowed at all
    with pytest.raises(ValueError, match="at least 1023"):
        check_key(huge)
    with pytest.raises(ValueError, match="the limit is 1024"):
        storage_key("m", None, huge)
