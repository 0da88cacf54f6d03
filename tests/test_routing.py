"""Prefix-aware routing (serve_app/routing.py): the ranking a Ray Serve router applies, checked
without Ray; the end-to-end effect on the prefix cache is in tests/test_writers.py."""
from __future__ import annotations

import random

from serve_app.routing import OPENING_CHARS, opening, rank

REPLICAS = ["r-aaaa", "r-bbbb"]


def home(prompt, replicas=REPLICAS, lens=None):
    return rank(opening(prompt), replicas, lens or {})[0]


def documents(n, seed=0):
    rng = random.Random(seed)
    words = "the of a dragon court said that love light sea night king law we show".split()
    return [" ".join(rng.choice(words) for _ in range(40)) for _ in range(n)]


def test_a_growing_document_keeps_its_replica():
    doc = documents(1)[0]
    first = home(doc)
    assert len(first) == 1
    for extra in (" and then", " and then the knight", " and then the knight rode away" * 5):
        assert home(doc + extra) == first


def test_every_router_agrees_whatever_order_it_lists_replicas_in():
    for doc in documents(20):
        assert home(doc, REPLICAS) == home(doc, list(reversed(REPLICAS)))


def test_documents_spread_over_the_replicas():
    homes = [home(d)[0] for d in documents(200)]
    share = homes.count(REPLICAS[0]) / len(homes)
    assert 0.35 < share < 0.65


def test_a_new_replica_takes_documents_only_from_others_not_shuffles_them():
    docs = documents(200, seed=1)
    before = {d: home(d)[0] for d in docs}
    after = {d: home(d, REPLICAS + ["r-cccc"])[0] for d in docs}
    moved = [d for d in docs if before[d] != after[d]]
    assert all(after[d] == "r-cccc" for d in moved)
    assert 0.2 < len(moved) / len(docs) < 0.5


def test_a_busy_home_replica_yields_to_the_least_loaded():
    doc = documents(1)[0]
    (mine,) = home(doc)
    other = next(r for r in REPLICAS if r != mine)
    assert rank(opening(doc), REPLICAS, {mine: 5, other: 0})[0] == [mine]  # within the slack
    assert rank(opening(doc), REPLICAS, {mine: 30, other: 2}, imbalance=8) == [[other], [mine]]
    assert rank(opening(doc), REPLICAS, {mine: None, other: 0})[0] == [mine]  # unknown: stay home


def test_prompts_without_an_opening_go_to_the_least_loaded_of_all():
    assert rank(opening(""), REPLICAS, {}) == [REPLICAS]
    assert rank(opening(None), REPLICAS, {}) == [REPLICAS]
    assert rank(opening("x"), ["only"], {}) == [["only"]]


def test_token_prompts_route_on_their_first_tokens():
    ids = list(range(100, 140))
    assert home(ids) == home(ids + [1, 2, 3])
    assert opening("é" * OPENING_CHARS * 2) == ("é" * OPENING_CHARS).encode()
