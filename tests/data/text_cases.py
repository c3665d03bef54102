"""Captions that exercise every template of every field (shared by text tests)."""

from klip_jax.data import knowledge

EXAMPLE_KEYWORDS = {
    "landform": ["hilly area", "agricultural production", "water mainly in the upper left",
                 "a regular street grid", "water and vegetation", "densely built",
                 "sparse with a few straight roads", "a winding river"],
    "target": ["3", "upper left, centre and lower right", "northeast-southwest", "185",
               "cargo ships", "arranged in a row", "são paulo, brazil", "a coastal harbour"],
}


def all_template_captions():
  """(caption, spans) for each template choice of each field, keyword included."""
  cases = []
  for scene_type, keywords in EXAMPLE_KEYWORDS.items():
    for choice in range(3):
      caption, spans = knowledge.verbalise(scene_type, keywords, [choice] * len(keywords))
      cases.append((caption, spans))
  return cases
