"""MemPalace's id recipes live on the ground floor (``palace.ids``); this module is the name the
rest of the project imports them by."""
from palace.ids import (  # noqa: F401
    ID_RECIPE,
    MAX_NAME_LENGTH,
    content_sha256,
    drawer_id_from_chunk,
    drawer_id_from_content,
    entity_id,
    is_valid_name,
    normalize_predicate,
    safe_name,
    sha256_file,
    triple_id,
    v3_hash,
)
