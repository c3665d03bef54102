"""Losses against small independent numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from klip_jax.train import losses


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_itc_matches_numpy_infonce():
  rng = np.random.default_rng(0)
  img, txt = _unit(rng.standard_normal((5, 8))), _unit(rng.standard_normal((5, 8)))
  temp = 0.07
  loss, sim_i2t, sim_t2i = losses.itc(jnp.asarray(img), jnp.asarray(txt), temp)
  s = img @ txt.T / temp
  ref = (-np.mean(np.diag(_log_softmax(s))) - np.mean(np.diag(_log_softmax(s.T)))) / 2
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  np.testing.assert_allclose(sim_i2t, s, rtol=1e-5)
  np.testing.assert_allclose(sim_t2i, s.T, rtol=1e-5)


def test_itc_with_momentum_bank_and_distillation_matches_numpy():
  rng = np.random.default_rng(1)
  b, q, e = 4, 6, 8
  img, txt = _unit(rng.standard_normal((b, e))), _unit(rng.standard_normal((b, e)))
  img_m, txt_m = _unit(rng.standard_normal((b, e))), _unit(rng.standard_normal((b, e)))
  img_q, txt_q = _unit(rng.standard_normal((q, e))), _unit(rng.standard_normal((q, e)))
  temp, alpha = 0.1, 0.4
  image_bank, text_bank = np.concatenate([img_m, img_q]), np.concatenate([txt_m, txt_q])
  loss, sim_i2t, _ = losses.itc(jnp.asarray(img), jnp.asarray(txt), temp,
                                image_bank=jnp.asarray(image_bank), text_bank=jnp.asarray(text_bank),
                                image_feat_m=jnp.asarray(img_m), text_feat_m=jnp.asarray(txt_m), alpha=alpha)
  onehot = np.eye(b, b + q)

  def softmax(x):
    return np.exp(_log_softmax(x))

  t_i2t = alpha * softmax(img_m @ text_bank.T / temp) + (1 - alpha) * onehot
  t_t2i = alpha * softmax(txt_m @ image_bank.T / temp) + (1 - alpha) * onehot
  ref_i2t = -np.mean((t_i2t * _log_softmax(img @ text_bank.T / temp)).sum(-1))
  ref_t2i = -np.mean((t_t2i * _log_softmax(txt @ image_bank.T / temp)).sum(-1))
  np.testing.assert_allclose(loss, (ref_i2t + ref_t2i) / 2, rtol=1e-5)
  assert sim_i2t.shape == (b, b)


def test_itc_accuracy_on_perfect_and_adversarial_rankings():
  perfect = jnp.eye(4) * 10
  assert float(losses.itc_accuracy(perfect, perfect)) == 1.0
  adversarial = perfect[::-1]
  assert float(losses.itc_accuracy(adversarial, adversarial)) == 0.0


def test_hard_negatives_never_pick_the_positive_and_follow_softmax():
  b = 4
  sim = jnp.asarray(np.random.default_rng(2).standard_normal((b, b)) * 2, jnp.float32)
  draws = jax.vmap(lambda k: losses.sample_hard_negatives(k, sim, sim.T))(
      jax.random.split(jax.random.key(0), 20000))
  neg_text, neg_image = (np.asarray(d) for d in draws)
  assert not (neg_text == np.arange(b)).any() and not (neg_image == np.arange(b)).any()
  # Empirical frequencies equal softmax over the off-diagonal similarities.
  s = np.asarray(sim, np.float64)
  expected = np.exp(s) * (1 - np.eye(b))
  expected /= expected.sum(1, keepdims=True)
  observed = np.stack([np.bincount(neg_text[:, i], minlength=b) for i in range(b)]) / len(neg_text)
  np.testing.assert_allclose(observed, expected, atol=0.015)


def test_itm_cross_entropy_matches_numpy():
  logits = np.array([[2.0, -1.0], [0.5, 0.5], [-3.0, 1.0]], np.float32)
  labels = np.array([1, 0, 0])
  loss, acc = losses.itm(jnp.asarray(logits), jnp.asarray(labels))
  ref = -np.mean(_log_softmax(logits)[np.arange(3), labels])
  np.testing.assert_allclose(loss, ref, rtol=1e-6)
  np.testing.assert_allclose(acc, 1 / 3)  # argmax: 0 (wrong), 0 (tie -> 0, right), 1 (wrong)


def test_corruption_proportions_and_untouched_positions():
  ids = jnp.full((200, 100), 7, jnp.int32)
  selected = jnp.zeros((200, 100), bool).at[:, ::2].set(True)
  out = np.asarray(losses.corrupt(jax.random.key(3), ids, selected, mask_id=1, vocab_size=50,
                                  mask_prob=0.5, random_prob=0.1))
  chosen = out[:, ::2]
  assert (out[:, 1::2] == 7).all()
  masked = (chosen == 1).mean()
  changed_randomly = ((chosen != 1) & (chosen != 7)).mean()
  kept = (chosen == 7).mean()
  assert abs(masked - 0.5) < 0.02
  # A random draw lands on 7 itself 1/50 of the time, so "kept" gains 0.1 / 50.
  assert abs(changed_randomly - 0.1 * 49 / 50) < 0.01
  assert abs(kept - (0.4 + 0.1 / 50)) < 0.02


def test_extra_masking_selects_the_requested_rate_of_ordinary_tokens():
  keyword = jnp.zeros((100, 200), jnp.int32).at[:, :10].set(1)
  ordinary = jnp.ones((100, 200), bool).at[:, :10].set(False)
  selected = np.asarray(losses.select_positions(jax.random.key(4), keyword, ordinary, 0.05))
  assert selected[:, :10].all()
  assert abs(selected[:, 10:].mean() - 0.05) < 0.005
  none = np.asarray(losses.select_positions(jax.random.key(4), keyword, ordinary, 0.0))
  assert none.sum() == 100 * 10


def test_extra_positions_follow_each_rows_rate():
  """select_positions with one rate per row: every keyword, then about that row's share of
  ordinary tokens (0 and 1 exactly; 0.5 within 5 standard errors of 2,000 draws)."""
  keywords = np.zeros((3, 2000), np.int32)
  keywords[:, :10] = 1
  selected = np.asarray(losses.select_positions(jax.random.key(0), jnp.asarray(keywords), jnp.ones((3, 2000), bool),
                                                jnp.asarray([[0.0], [0.5], [1.0]])))
  assert selected[:, :10].all()
  assert selected[0, 10:].sum() == 0 and selected[2, 10:].all()
  assert abs(selected[1, 10:].mean() - 0.5) < 5 * np.sqrt(0.25 / 1990)


def test_reconstruction_counts_only_selected_positions_with_causal_shift():
  rng = np.random.default_rng(5)
  logits = rng.standard_normal((2, 6, 11)).astype(np.float32)
  targets = rng.integers(0, 11, (2, 6))
  selected = np.zeros((2, 6), bool)
  selected[0, 2] = selected[0, 3] = selected[1, 5] = True
  loss, acc, count = losses.reconstruction(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(selected))
  lp = _log_softmax(logits)
  picks = [(0, 2), (0, 3), (1, 5)]
  ref = -np.mean([lp[b, t - 1, targets[b, t]] for b, t in picks])
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  assert int(count) == 3
  ref_acc = np.mean([logits[b, t - 1].argmax() == targets[b, t] for b, t in picks])
  np.testing.assert_allclose(acc, ref_acc)
  # Changing logits at unselected positions changes nothing.
  other = logits.copy()
  other[0, 4] += 5.0
  np.testing.assert_allclose(
      losses.reconstruction(jnp.asarray(other), jnp.asarray(targets), jnp.asarray(selected))[0], loss)


@pytest.mark.parametrize("crowded_row", [False, True])
def test_reconstruction_at_selected_positions_is_the_full_loss(crowded_row):
  """The vocabulary projection run only at the selected positions gives numpy's loss over the
  full logits, and the same gradients as projecting every position: with each row selecting at
  most half its positions (gathered) and with one row selecting more (the full projection)."""
  rng = np.random.default_rng(6)
  hidden = rng.standard_normal((3, 9, 4)).astype(np.float32)
  weights = rng.standard_normal((4, 13)).astype(np.float32)
  targets = rng.integers(0, 13, (3, 9))
  selected = rng.random((3, 9)) < 0.4
  selected[:, 1:] &= np.cumsum(selected[:, 1:], axis=1) <= 4  # at most half of the 8 scored positions
  selected[2, 1:] = crowded_row  # a row of 8 selected positions, or none
  project = lambda h: h @ jnp.asarray(weights)

  loss, acc, count = losses.reconstruction_at_selected(jnp.asarray(hidden), project, jnp.asarray(targets),
                                                       jnp.asarray(selected))
  logits = hidden @ weights
  lp = _log_softmax(logits)
  picks = [(b, t) for b in range(3) for t in range(1, 9) if selected[b, t]]
  np.testing.assert_allclose(loss, -np.mean([lp[b, t - 1, targets[b, t]] for b, t in picks]), rtol=1e-5)
  np.testing.assert_allclose(acc, np.mean([logits[b, t - 1].argmax() == targets[b, t] for b, t in picks]))
  assert int(count) == len(picks)

  def at_selected(h, w):
    return losses.reconstruction_at_selected(h, lambda x: x @ w, jnp.asarray(targets), jnp.asarray(selected))[0]

  def everywhere(h, w):
    return losses.reconstruction(h @ w, jnp.asarray(targets), jnp.asarray(selected))[0]

  for got, want in zip(jax.grad(at_selected, (0, 1))(jnp.asarray(hidden), jnp.asarray(weights)),
                       jax.grad(everywhere, (0, 1))(jnp.asarray(hidden), jnp.asarray(weights))):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_random_replacements_never_draw_a_special_token():
  special = (0, 2, 3, 4, 5, 6, 7, 19)  # [PAD], [DEC], [SEP], [CLS], [ENC], [MASK], "$", and one past them
  ids = jnp.full((400, 100), 30, jnp.int32)
  selected = jnp.ones((400, 100), bool)
  out = np.asarray(losses.corrupt(jax.random.key(5), ids, selected, mask_id=6, vocab_size=20,
                                  mask_prob=0.0, random_prob=1.0, special_ids=special))
  counts = np.bincount(out.ravel(), minlength=20)
  assert counts[list(special)].sum() == 0
  ordinary = [i for i in range(20) if i not in special]  # 12 ids, each 1/12 of 40000 draws
  assert np.allclose(counts[ordinary] / out.size, 1 / len(ordinary), atol=0.005)


def test_itm_auc_and_balanced_accuracy_match_scikit_learn():
  from sklearn import metrics as skm

  rng = np.random.default_rng(4)
  labels = np.concatenate([np.ones(8, np.int32), np.zeros(16, np.int32)])
  logits = rng.normal(size=(24, 2)).astype(np.float32)
  logits[:3] = logits[3]  # ties between positives, and a tied positive/negative pair below
  logits[10] = logits[3]
  out = jax.device_get(losses.itm_metrics(jnp.asarray(logits), jnp.asarray(labels)))
  margin = logits[:, 1] - logits[:, 0]
  assert out["itm_auc"] == pytest.approx(skm.roc_auc_score(labels, margin), abs=1e-6)
  assert out["itm_balanced_acc"] == pytest.approx(skm.balanced_accuracy_score(labels, logits.argmax(-1)))
  # A head at its prior (always "no match") is 2/3 accurate on 1:2 batches but 0.5 balanced.
  prior = jnp.asarray(np.tile([2.0, -1.0], (24, 1)), jnp.float32)
  out = jax.device_get(losses.itm_metrics(prior, jnp.asarray(labels)))
  assert out["itm_balanced_acc"] == 0.5 and out["itm_auc"] == 0.5


def test_keyword_ends_mark_the_token_after_each_keyword_span():
  keyword_mask = jnp.asarray([[0, 1, 1, 0, 0, 1, 0], [0, 0, 1, 0, 1, 1, 1]])
  ends = np.asarray(losses.keyword_ends(keyword_mask)).astype(int)
  assert ends.tolist() == [[0, 0, 0, 1, 0, 0, 1], [0, 0, 0, 1, 0, 0, 0]]


def test_random_share_of_negatives_ignores_similarity():
  b = 8
  # Similarities that make the hard negative of row i always row (i + 1) % b.
  sim = jnp.where(jnp.roll(jnp.eye(b, dtype=bool), 1, axis=1), 100.0, 0.0)
  keys = jax.random.split(jax.random.key(0), 2000)
  hard = jax.vmap(lambda k: losses.sample_hard_negatives(k, sim, sim)[0])(keys)
  mixed = jax.vmap(lambda k: losses.sample_hard_negatives(k, sim, sim, 0.5)[0])(keys)
  nxt = (jnp.arange(b) + 1) % b
  assert float(jnp.mean(hard == nxt)) == 1.0
  # Half the rows draw uniformly over the 7 others: P(next) = 0.5 + 0.5 / 7.
  assert float(jnp.mean(mixed == nxt)) == pytest.approx(0.5 + 0.5 / 7, abs=0.02)
  assert not bool(jnp.any(mixed == jnp.arange(b)))
