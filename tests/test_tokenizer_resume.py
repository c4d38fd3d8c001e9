"""REG4Rec's MPQ tokenizer build: resumes an interrupted build to exactly the uninterrupted table, writes its cache
atomically, and never uses a cache (or partial state) written for another dataset or other settings."""

import logging
import os
import shutil

import pytest
import torch
from recbole.data import data_preparation

from conftest import DATA_PATH, tiny_config
from recbole_reason import create_dataset
from recbole_reason.compat import load_checkpoint
from recbole_reason.data import mpq_tokenizer as mpq

# Both stages with several epochs and a batch smaller than the catalogue, so that every epoch draws from the RNG
# (shuffles, dropout, dead-code re-seeding) and a resume that lost any state would show.
SETTINGS = {
    "item_feature_source": "features+cf", "mpq_cf_epochs": 3, "mpq_cf_dim": 8, "mpq_epochs": 4, "mpq_batch_size": 256,
    "mpq_num_codebooks": 3, "mpq_codebook_size": 16, "mpq_hidden_dim": 16, "mpq_latent_dim": 4, "mpq_input_dim": 8,
    "n_pseudo_cat": 8, "d_model": 16, "n_heads": 2, "beam_size": 20, "MAX_ITEM_LIST_LENGTH": 5,
}
AMAZON = {"dataset": "tiny-amazon", "RATING_FIELD": None,
          "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "attributes"]}}


class Interrupted(Exception):
    """Stands for a kill / Ctrl-C in the middle of a build."""


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one intra-op thread for tiny tensors


def _prepare(tmp_path_factory, **overrides):
    config = tiny_config("REG4Rec", {
        "dataset": "tiny", "data_path": DATA_PATH, "checkpoint_dir": str(tmp_path_factory.mktemp("saved")),
        **SETTINGS, **overrides})
    train_data, _, _ = data_preparation(config, create_dataset(config))
    return config, train_data._dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _prepare(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """The uninterrupted build, and its cache file's content."""
    tokens = build(tiny, tmp_path_factory.mktemp("reference"))
    return tokens, load_checkpoint(tokens.cache_file)


def build(data, cache_dir, **overrides):
    config, dataset = data
    saved = {key: config.final_config_dict.get(key) for key in ("tokenizer_cache_dir", *overrides)}
    config.final_config_dict.update({"tokenizer_cache_dir": str(cache_dir), **overrides})
    try:
        return mpq.build_item_tokens(config, dataset)
    finally:
        config.final_config_dict.update(saved)


def interrupt_after(monkeypatch, stage, epoch):
    """Make the build die right after it saved `stage`'s `epoch`; returns the list of (stage, epoch) saves seen."""
    original, saves = mpq.TokenizerProgress.save, []

    def save(self, stage_, epoch_, *args, **kwargs):
        original(self, stage_, epoch_, *args, **kwargs)
        saves.append((stage_, epoch_))
        if (stage_, epoch_) == (stage, epoch):
            raise Interrupted(f"killed after {stage} epoch {epoch}")

    monkeypatch.setattr(mpq.TokenizerProgress, "save", save)
    return saves


def count_saves(monkeypatch):
    original, saves = mpq.TokenizerProgress.save, []

    def save(self, stage, epoch, *args, **kwargs):
        saves.append((stage, epoch))
        original(self, stage, epoch, *args, **kwargs)

    monkeypatch.setattr(mpq.TokenizerProgress, "save", save)
    return saves


def assert_same_build(tokens, reference):
    ref_tokens, ref_file = reference
    assert torch.equal(tokens.item2tokens, ref_tokens.item2tokens)
    assert torch.equal(tokens.item_cat, ref_tokens.item_cat) and torch.equal(tokens.token_cat, ref_tokens.token_cat)
    assert tokens.stats == ref_tokens.stats
    state = load_checkpoint(tokens.cache_file)["mpq_state_dict"]
    assert all(torch.equal(state[name], ref_file["mpq_state_dict"][name]) for name in state)


# ---------------------------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage, epoch, resumed_saves", [
    ("mpq", 1, [("mpq", 2), ("mpq", 3)]),  # mid-MPQ: the ID model stage is not run again
    ("cf", 0, [("cf", 1), ("cf", 2), ("mpq", -1), ("mpq", 0), ("mpq", 1), ("mpq", 2), ("mpq", 3)]),  # mid ID model
    ("mpq", 3, []),  # after the last epoch, before the cache was written
])
def test_interrupted_build_resumes_to_the_identical_table(tiny, reference, tmp_path, monkeypatch, caplog, stage, epoch,
                                                          resumed_saves):
    with monkeypatch.context() as patch:
        interrupt_after(patch, stage, epoch)
        with pytest.raises(Interrupted):
            build(tiny, tmp_path)
    cache_name = os.path.basename(reference[0].cache_file)  # same dataset and settings: same name in any folder
    assert os.listdir(tmp_path) == [cache_name + ".partial"]  # no cache, only the partial state

    caplog.set_level(logging.INFO)
    saves = count_saves(monkeypatch)
    tokens = build(tiny, tmp_path)
    assert f"stage {stage}, {epoch + 1} epoch(s) done" in caplog.text
    assert saves == resumed_saves  # it continued where it stopped, no epoch twice
    assert_same_build(tokens, reference)
    assert os.listdir(tmp_path) == [cache_name]  # the partial state is gone once the cache exists


def test_resume_depends_on_the_saved_rng_state(tiny, reference, tmp_path, monkeypatch):
    """The exactness above is not luck: resuming with another RNG state gives another MPQ."""
    with monkeypatch.context() as patch:
        interrupt_after(patch, "mpq", 0)
        with pytest.raises(Interrupted):
            build(tiny, tmp_path)
    partial = os.path.join(tmp_path, os.listdir(tmp_path)[0])
    state = load_checkpoint(partial)
    state["rng"] = torch.Generator().manual_seed(12345).get_state()
    torch.save(state, partial)
    tokens = build(tiny, tmp_path)
    resumed = load_checkpoint(tokens.cache_file)["mpq_state_dict"]
    assert any(not torch.equal(resumed[name], reference[1]["mpq_state_dict"][name]) for name in resumed)


def test_partial_state_of_other_settings_is_not_resumed(tiny, reference, tmp_path, monkeypatch, caplog):
    with monkeypatch.context() as patch:
        interrupt_after(patch, "mpq", 1)
        with pytest.raises(Interrupted):
            build(tiny, tmp_path, mpq_lambda_orth=0.5)  # another setting: another cache name
    (other,) = os.listdir(tmp_path)
    target = os.path.basename(reference[0].cache_file) + ".partial"
    shutil.move(os.path.join(tmp_path, other), os.path.join(tmp_path, target))  # same name as this build's partial
    caplog.set_level(logging.INFO)
    saves = count_saves(monkeypatch)
    tokens = build(tiny, tmp_path)
    assert "is not this build's: it was built with other tokenizer settings (lambda_orth). Starting over." in caplog.text
    assert saves[0] == ("cf", 0)  # from scratch
    assert_same_build(tokens, reference)


def test_cache_is_written_atomically(tiny, reference, tmp_path, monkeypatch):
    """A failure while the finished cache is written leaves no cache file (no truncated table for the next run)."""
    real_replace = os.replace

    def failing_replace(source, destination):
        if not destination.endswith(".partial"):
            raise OSError("disk full")
        real_replace(source, destination)

    monkeypatch.setattr(mpq.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        build(tiny, tmp_path)
    names = os.listdir(tmp_path)
    assert names == [os.path.basename(reference[0].cache_file) + ".partial"]  # no cache, no temporary file
    monkeypatch.setattr(mpq.os, "replace", real_replace)
    saves = count_saves(monkeypatch)
    tokens = build(tiny, tmp_path)
    assert saves == [] and not tokens.from_cache  # everything was trained: only the cache is written again
    assert_same_build(tokens, reference)


# ---------------------------------------------------------------------------------------------------------------
# a cache from another dataset or setting, under this build's file name
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def amazon(tmp_path_factory):
    return _prepare(tmp_path_factory, **AMAZON, item_feature_source="features")


def test_cache_copied_from_another_dataset_is_rebuilt_not_used(tiny, amazon, reference, tmp_path, caplog):
    fresh = build(amazon, tmp_path / "fresh")
    target = tmp_path / "copied"
    target.mkdir()
    # tiny's cache under the name tiny-amazon's build looks for
    shutil.copy(reference[0].cache_file, target / os.path.basename(fresh.cache_file))
    caplog.set_level(logging.INFO)
    tokens = build(amazon, target)
    assert "is stale: it was built for another dataset" in caplog.text
    assert not tokens.from_cache and tokens.item2tokens.shape == fresh.item2tokens.shape != reference[0].item2tokens.shape
    assert torch.equal(tokens.item2tokens, fresh.item2tokens)
    assert load_checkpoint(tokens.cache_file)["fingerprint"] == mpq.dataset_fingerprint(amazon[1])


@pytest.mark.parametrize("tamper, reason", [
    (lambda cached: {**cached, "settings": {**cached["settings"], "epochs": 99}}, "other tokenizer settings (epochs)"),
    (lambda cached: {**cached, "version": 0}, "another tokenizer version"),
    (lambda cached: {**cached, "item2tokens": cached["item2tokens"][:10]}, "its item table has shape (10, 3)"),
    (None, "is unreadable"),
])
def test_cache_of_other_settings_version_or_a_broken_file_is_rebuilt(tiny, reference, tmp_path, caplog, tamper, reason):
    path = tmp_path / os.path.basename(reference[0].cache_file)
    if tamper is None:
        with open(reference[0].cache_file, "rb") as f:
            path.write_bytes(f.read()[:1000])  # a truncated copy
    else:
        torch.save(tamper(dict(reference[1])), path)
    caplog.set_level(logging.INFO)
    tokens = build(tiny, tmp_path)
    assert reason in caplog.text and "ebuilding it" in caplog.text
    assert not tokens.from_cache
    assert_same_build(tokens, reference)
    assert build(tiny, tmp_path).from_cache  # the rebuilt file is this build's: reused from now on
