"""The model card's scores table, from a hand-written results.json."""

from klip_jax.export import card


def test_the_card_says_when_tasks_were_evaluated_with_other_settings():
  results = {"step": 5, "tasks": {"itm": {"auc": 0.7, "chance_auc": 0.5}, "retrieval": {"r_mean": 0.2}},
             "random_init": {"itm": {"auc": 0.5}},
             "settings": {"itm": {"eval.test_examples": 100, "eval.seed": 0},
                          "retrieval": {"eval.test_examples": 0, "eval.seed": 0}}}
  text = card.results_table(results)
  assert "| itm | auc | 0.700 | 0.500 | 0.500 |" in text and "| retrieval | r_mean | 0.200 |  |  |" in text
  assert text.endswith("Not all tasks were evaluated with the same settings: eval.test_examples: 100 (itm), "
                       "0 (retrieval).")
  results["settings"]["itm"]["eval.test_examples"] = 0
  assert "same settings" not in card.results_table(results)
