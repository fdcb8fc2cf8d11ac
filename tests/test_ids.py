"""Our ids and names are MemPalace 3.11's, checked against the mempalace package itself."""
from hypothesis import given, settings
from hypothesis import strategies as st
from mempalace import ids as mp_ids
from mempalace.config import sanitize_name
from mempalace.knowledge_graph import KnowledgeGraph as MpKG

from etl import ids

text = st.text(min_size=0, max_size=60)


@given(text, text, text)
def test_content_id_matches_mempalace(wing, room, content):
    assert ids.drawer_id_from_content(wing, room, content) == mp_ids.make_drawer_id_from_content(wing, room, content)


@given(text, text, text, st.integers(min_value=0, max_value=10**6))
def test_chunk_id_matches_mempalace(wing, room, source, idx):
    assert ids.drawer_id_from_chunk(wing, room, source, idx) == mp_ids.make_drawer_id_from_chunk(wing, room, source, idx)


@settings(max_examples=300)
@given(st.one_of(st.none(), st.text(max_size=200)))
def test_safe_name_always_passes_sanitize_name(value):
    name = ids.safe_name(value)
    assert sanitize_name(name) == name


@given(st.text(max_size=80))
def test_valid_names_are_kept(value):
    try:
        ok = sanitize_name(value) == value
    except ValueError:
        ok = False
    assert ids.is_valid_name(value) == ok
    if ok:
        assert ids.safe_name(value) == value


def test_slugs_of_dirty_names():
    assert ids.safe_name("meeting note") == "meeting note"  # spaces are allowed by MemPalace
    assert ids.safe_name("../etc/passwd") == "etc_passwd"
    assert ids.safe_name("_private_") == "private"
    assert ids.safe_name("東京 メモ") == "東京 メモ"
    assert ids.safe_name("🎉") == "general"
    assert ids.safe_name("x" * 300) == "x" * 128


@given(st.text(min_size=1, max_size=40))
def test_entity_id_and_predicate_match_mempalace(name):
    kg = MpKG.__new__(MpKG)  # _entity_id needs no connection
    assert ids.entity_id(name) == kg._entity_id(name)
    assert ids.normalize_predicate(name) == name.lower().replace(" ", "_")


def test_triple_ids_are_deterministic_and_shaped_like_mempalace():
    a = ids.triple_id("D3.js", "created by", "Mike Bostock", None, "mcp-memory")
    assert a == ids.triple_id("D3.js", "created by", "Mike Bostock", None, "mcp-memory")
    assert a.startswith("t_d3.js_created_by_mike_bostock_") and len(a.rsplit("_", 1)[1]) == 12
    assert a != ids.triple_id("D3.js", "created by", "Mike Bostock", "2026-01-01", "mcp-memory")
