"""Stable ids and hash splits: the same key always lands on the same side, in the asked fraction."""

from raydistill.ids import hash_bucket, text_id


def test_text_id_is_stable_and_short():
    assert text_id("bonjour") == text_id("bonjour") != text_id("bonjour ")
    assert len(text_id("bonjour")) == 16 and int(text_id("bonjour"), 16) >= 0


def test_hash_bucket_splits_in_the_asked_fraction():
    buckets = [hash_bucket(f"val:q{i}") for i in range(10_000)]
    assert all(0.0 <= b <= 1.0 for b in buckets)
    assert abs(sum(b < 0.2 for b in buckets) / len(buckets) - 0.2) < 0.015
    assert hash_bucket("val:q1") == buckets[1]  # a function of the key alone
