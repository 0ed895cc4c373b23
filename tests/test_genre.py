"""The genre task's scoring (allmrec_jax/genre.py): names found with their spellings,
golden precision / recall, held-out genres and the history reference on MovieLens-100K."""

import numpy as np
import pytest

from allmrec_jax import genre
from allmrec_jax.data import prepare
from configs import ml100k

VOCAB = ["Action", "Children's", "Comedy", "Drama", "Film-Noir", "Romance", "Sci-Fi", "War"]


def test_named_genres_spellings_and_word_boundaries():
  text = ("They would enjoy science fiction, romantic comedies and film noir; maybe kids' "
          "movies. Not Star Wars, not drama-free dramedy.")
  assert genre.named_genres(text, VOCAB) == {"Sci-Fi", "Romance", "Comedy", "Film-Noir",
                                             "Children's"}
  assert genre.named_genres("ACTION and Drama.", VOCAB) == {"Action", "Drama"}
  assert genre.named_genres("warfare, wars", VOCAB) == set()


def test_genre_metrics_golden():
  texts = ["Action, Comedy and Drama", "nothing here", "Sci-Fi"]
  ref = [{"Action", "War"}, {"Drama"}, set()]
  m = genre.genre_metrics(texts, ref, VOCAB, "g/")
  assert m["g/precision"] == pytest.approx((1 / 3 + 0 + 0) / 3)
  assert m["g/recall"] == pytest.approx((1 / 2 + 0 + 0) / 3)
  assert m["g/named"] == pytest.approx((3 + 0 + 1) / 3)
  with pytest.raises(ValueError, match="2 answers for 3 users"):
    genre.genre_metrics(texts[:2], ref, VOCAB, "g/")


def test_held_out_and_history_reference_on_ml100k():
  ds = prepare.prepare_dataset(ml100k.get_config().data)
  vocab = genre.genre_vocabulary(ds.genres)
  assert len(vocab) == 18 and "unknown" not in vocab
  users = np.array([0, 5])
  ref = genre.held_out_genres(ds, users)
  for u, r in zip(users, ref):
    want = set(ds.genres[ds.valid_item(int(u))]) | set(ds.genres[ds.test_item(int(u))])
    assert r == want - {"unknown"} and r
  # Items 1-3: Kolya (Comedy), L.A. Confidential (Crime, Film-Noir, Mystery, Thriller),
  # Heavyweights (Children's, Comedy); ties go to the genre more frequent overall.
  assert [ds.genres[i] for i in (1, 2, 3)] == [
      ["Comedy"], ["Crime", "Film-Noir", "Mystery", "Thriller"], ["Children's", "Comedy"]]
  hist = np.array([[0, 1, 1, 2], [3, 3, 3, 0]])
  assert genre.history_genres_answer(ds, hist, k=2) == ["Comedy, Thriller",
                                                        "Comedy, Children's"]
