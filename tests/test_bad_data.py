"""Malformed datasets fail with the file, the problem and the fix, before anything is written; or follow a documented
rule (missing item features -> ids only, empty feature values -> [PAD], out-of-range ratings -> clamped)."""

import logging
import os
import re

import pytest
import torch
from recbole.data import create_dataset as recbole_create_dataset
from recbole.data import data_preparation
from recbole.utils import init_seed

from conftest import DATA_PATH, TINY_CONFIG, tiny_config
from recbole_reason import create_dataset, get_model, run_recbole_reason
from recbole_reason.data.item_features import item_attributes
from recbole_reason.model.sequential_recommender.r2ec import R2ecVocabulary

TINY = os.path.join(DATA_PATH, "tiny")
# Tiny model sizes: every model below is only constructed (or run for one short epoch), never trained for real.
SMALL = {"hidden_size": 16, "inner_size": 32, "n_layers": 1, "n_heads": 2, "MAX_ITEM_LIST_LENGTH": 5}
REG4REC = {"mpq_num_codebooks": 2, "mpq_codebook_size": 32, "mpq_epochs": 1, "mpq_hidden_dim": 8, "mpq_latent_dim": 4,
           "mpq_input_dim": 8, "mpq_cf_epochs": 1, "mpq_cf_dim": 8, "d_model": 16, "n_enc_layers": 1, "n_dec_layers": 1,
           "ffn_dim": 32, "beam_size": 20}


def _lines(name):
    with open(os.path.join(TINY, f"tiny.{name}")) as f:
        return f.read().splitlines()


def make_dataset(tmp_path, name, inter=None, item=None):
    """A copy of tests/test_data/tiny under tmp_path/data/<name>; `inter` / `item` transform the lines of each file
    (an `item` that returns None leaves the .item file out)."""
    folder = tmp_path / "data" / name
    folder.mkdir(parents=True)
    inter_lines = inter(_lines("inter")) if inter else _lines("inter")
    item_lines = item(_lines("item")) if item else _lines("item")
    (folder / f"{name}.inter").write_text("\n".join(inter_lines) + "\n")
    if item_lines is not None:
        (folder / f"{name}.item").write_text("\n".join(item_lines) + "\n")
    return str(tmp_path / "data")


def config_dict(tmp_path, data_path, name, **overrides):
    return {"dataset": name, "data_path": data_path, "checkpoint_dir": str(tmp_path / "saved"),
            "tokenizer_cache_dir": str(tmp_path / "tokens"), **SMALL, **overrides}


def config(model, tmp_path, data_path, name, **overrides):
    return tiny_config(model, config_dict(tmp_path, data_path, name, **overrides))


def assert_nothing_written(tmp_path):
    """No checkpoint, no token cache, no dataset pickle: an empty or absent folder each."""
    for folder in ("saved", "tokens"):
        path = tmp_path / folder
        assert not path.exists() or not os.listdir(path), (folder, os.listdir(path))


def edit_row(lines, row, column, value):
    cells = lines[row].split("\t")
    cells[column] = value
    return lines[:row] + ["\t".join(cells)] + lines[row + 1:]


def build_model(cfg):
    init_seed(cfg["seed"], cfg["reproducibility"])
    dataset = create_dataset(cfg)
    train_data, _, _ = data_preparation(cfg, dataset)
    init_seed(cfg["seed"], cfg["reproducibility"])
    return get_model(cfg["model"])(cfg, train_data._dataset), train_data


# ---------------------------------------------------------------------------------------------------------------
# 1. malformed files: one error naming file (and line), problem and fix; nothing written, for every kind of model
# ---------------------------------------------------------------------------------------------------------------
MALFORMED = {
    "missing_column": (dict(inter=lambda L: ["\t".join(line.split("\t")[:3]) for line in L]),
                       r"missing_column\.inter has no column timestamp .*Fix"),
    "empty_inter": (dict(inter=lambda L: L[:1]), r"empty_inter\.inter is empty"),
    "zero_byte_inter": (dict(inter=lambda L: []), r"zero_byte_inter\.inter is empty"),
    "long_row": (dict(inter=lambda L: L[:4] + [L[4] + "\t7"] + L[5:]),
                 r"long_row\.inter, line 5: 5 columns, the header has 4 .*Fix the row"),
    "short_row": (dict(inter=lambda L: L[:4] + ["\t".join(L[4].split("\t")[:3])] + L[5:]),
                  r"short_row\.inter, line 5: 3 columns, the header has 4"),
    "text_in_float": (dict(inter=lambda L: edit_row(L, 7, 3, "yesterday")),
                      r"text_in_float\.inter, line 8, column timestamp: 'yesterday' is not a number, and the header "
                      r"declares timestamp:float\. Fix"),
    "text_in_rating": (dict(inter=lambda L: edit_row(L, 7, 2, "four")),
                       r"text_in_rating\.inter, line 8, column rating: 'four' is not a number.*rating:token"),
    "empty_timestamp": (dict(inter=lambda L: edit_row(L, 9, 3, "")),
                        r"empty_timestamp\.inter, line 10: empty timestamp\. Fix"),
    # NaN in the time column: pandas reads it as a number, RecBole would fill in the mean timestamp silently
    "nan_timestamp": (dict(inter=lambda L: edit_row(L, 9, 3, "NaN")),
                      r"nan_timestamp\.inter, line 10: timestamp is 'NaN', not a number .*mean.*Fix: every row"),
    "untyped_header": (dict(item=lambda L: [L[0].replace("class:token_seq", "class")] + L[1:]),
                       r"untyped_header\.item: header column 'class' has no valid type.*Fix"),
    "item_long_row": (dict(item=lambda L: L[:3] + [L[3].replace(" ", "\t", 1)] + L[4:]),
                      r"item_long_row\.item, line 4: 5 columns.*token_seq values are separated by seq_separator"),
    "item_missing_column": (dict(item=lambda L: ["\t".join(line.split("\t")[:3]) for line in L]),
                            r"item_missing_column\.item has no column class .*Fix"),
    "empty_item": (dict(item=lambda L: L[:1]), r"empty_item\.item is empty"),
    "duplicate_item": (dict(item=lambda L: L + [L[5]]), r"duplicate_item\.item, lines 6 and 1000: two rows for item_id"),
    # 4. ids outside the .inter vocabulary: a feature row for an item no one interacted with, interactions with an
    #    item that has no feature row (RecBole would silently add the first to the catalogue, drop the second)
    "unknown_item_row": (dict(item=lambda L: L + ["99999\tGhost Movie\t1990\tDrama"]),
                         r"unknown_item_row\.item has rows for 1 item\(s\) that never occur in the \.inter file "
                         r"\(e\.g\. '99999'\).*Fix: drop those rows"),
    "item_without_row": (dict(item=lambda L: L[:1] + L[4:]),
                         r"item_without_row\.item has no row for 3 item\(s\) of the \.inter file.*silently drop.*"
                         r"filter_inter_by_user_or_item: False"),
}


# The checks do not depend on the model: three cases show that a plugin model (own dataset class) meets them too.
@pytest.mark.parametrize("case, model", [(case, "SASRec") for case in sorted(MALFORMED)]
                         + [(case, "REG4Rec") for case in ("missing_column", "empty_inter", "unknown_item_row")])
def test_malformed_files_fail_clearly_before_anything_is_written(tmp_path, case, model):
    transforms, message = MALFORMED[case]
    data_path = make_dataset(tmp_path, case, **transforms)
    with pytest.raises(ValueError, match=message):
        run_recbole_reason(model, config_file_list=[TINY_CONFIG],
                           config_dict=config_dict(tmp_path, data_path, case, **REG4REC), saved=True)
    assert_nothing_written(tmp_path)


def test_the_well_formed_copy_passes_the_same_checks(tmp_path):
    """Guard for the cases above: an untouched copy loads, so each failure comes from its own defect."""
    data_path = make_dataset(tmp_path, "clean")
    dataset = create_dataset(config("SASRec", tmp_path, data_path, "clean"))
    assert dataset.inter_num == len(_lines("inter")) - 1 and dataset.item_num == len(_lines("item"))


# ---------------------------------------------------------------------------------------------------------------
# 2. users too short for the leave-one-out split
# ---------------------------------------------------------------------------------------------------------------
def _shorten_users(lines, keep):
    """Keep only the first keep[user] interactions of some users; drop the .item rows nobody interacts with then."""
    out, seen = [lines[0]], {}
    for line in lines[1:]:
        user = line.split("\t")[0]
        seen[user] = seen.get(user, 0) + 1
        if seen[user] <= keep.get(user, len(lines)):
            out.append(line)
    return out


def _short_dataset(tmp_path):
    keep = {"1": 1, "10": 2, "100": 3}
    used = {line.split("\t")[1] for line in _shorten_users(_lines("inter"), keep)[1:]}
    return make_dataset(tmp_path, "short", inter=lambda L: _shorten_users(L, keep),
                        item=lambda L: L[:1] + [line for line in L[1:] if line.split("\t")[0] in used])


@pytest.mark.parametrize("model", ["SASRec", "REG4Rec"])
def test_users_too_short_for_leave_one_out_are_refused_with_count_and_key(tmp_path, model):
    data_path = _short_dataset(tmp_path)
    with pytest.raises(ValueError, match=r"short\.inter: 3 of 160 users have fewer than 4 interactions .*"
                                         r"1 with 1, 1 with 2, 1 with 3 .*user_inter_num_interval: \"\[4,inf\)\""):
        run_recbole_reason(model, config_file_list=[TINY_CONFIG],
                           config_dict=config_dict(tmp_path, data_path, "short", save_dataset=True, **REG4REC))
    assert_nothing_written(tmp_path)  # save_dataset: True, yet no pickle of the refused dataset


def test_without_the_check_recbole_would_score_different_users_in_valid_and_test(tmp_path):
    """Why the check exists: RecBole's own split gives the three short users no validation sample (and two of
    them no test sample either), silently."""
    cfg = config("SASRec", tmp_path, _short_dataset(tmp_path), "short")
    _, valid, test = data_preparation(cfg, recbole_create_dataset(cfg))
    n_users = 160
    assert len(valid.dataset) == n_users - 3 and len(test.dataset) == n_users - 2


def test_the_suggested_filter_gives_every_user_a_valid_and_a_test_sample(tmp_path):
    cfg = config("SASRec", tmp_path, _short_dataset(tmp_path), "short", user_inter_num_interval="[4,inf)")
    dataset = create_dataset(cfg)
    _, valid, test = data_preparation(cfg, dataset)
    assert dataset.user_num - 1 == 157 == len(valid.dataset) == len(test.dataset)


# ---------------------------------------------------------------------------------------------------------------
# 3. item features missing: an error for a model that needs them, a log line and a run for the others
# ---------------------------------------------------------------------------------------------------------------
def test_reg4rec_with_features_source_and_no_item_file_fails_naming_the_file(tmp_path):
    data_path = make_dataset(tmp_path, "noitem", item=lambda L: None)
    with pytest.raises(ValueError, match=r"item_feature_source 'features' needs item features, but \S*noitem\.item does "
                                         r"not exist\. Fix: .*item_feature_source: cf"):
        run_recbole_reason("REG4Rec", config_file_list=[TINY_CONFIG],
                           config_dict=config_dict(tmp_path, data_path, "noitem", item_feature_source="features", **REG4REC))
    assert_nothing_written(tmp_path)


def test_reg4rec_with_features_source_and_no_feature_column_loaded_fails(tmp_path):
    data_path = make_dataset(tmp_path, "idonly")
    cfg = config("REG4Rec", tmp_path, data_path, "idonly", item_feature_source="features+cf",
                 load_col={"inter": ["user_id", "item_id", "rating", "timestamp"], "item": ["item_id"]}, **REG4REC)
    with pytest.raises(ValueError, match=r"idonly\.item has no token / token_seq column loaded \(load_col\.item = "
                                         r"\['item_id'\]\)"):
        build_model(cfg)
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("model, log_line", [
    ("REG4Rec", r"REG4Rec: no item features \(\S*noitem\.item does not exist\): the MPQ tokenizer reads the item "
                r"embeddings of a pretrained ID model instead \(item_feature_source auto -> cf"),
    ("R2ec", r"R2ec: dataset 'noitem' has no token/token_seq item features \(\S*noitem\.item does not exist\); items "
             r"are described by their ID token alone"),
    ("ReaRec", None),
    ("LARES", None),
])
def test_models_that_can_run_without_item_features_log_it_and_continue(tmp_path, caplog, model, log_line):
    data_path = make_dataset(tmp_path, "noitem", item=lambda L: None)
    caplog.set_level(logging.INFO)
    built, train_data = build_model(config(model, tmp_path, data_path, "noitem", item_feature_source="auto", **REG4REC))
    # the dataset-level line, for every model: what was asked for and is not there
    assert "noitem.item not found: load_col.item ['item_id', 'movie_title', 'release_year', 'class'] is ignored" in caplog.text
    if log_line:
        assert any(re.search(log_line, record.getMessage()) for record in caplog.records), caplog.text
    if model == "R2ec":
        assert built.vocab.attributes is None and built.item_prompt.shape[1] == 3  # [ITEMP] <ID> [ANS]
    if model in ("ReaRec", "LARES"):  # they never read item features: a loss on a real batch is all they need
        batch = next(iter(train_data))[:16]
        loss = built.calculate_loss(batch)
        loss = sum(loss) if isinstance(loss, tuple) else loss
        assert torch.isfinite(loss).all()


# ---------------------------------------------------------------------------------------------------------------
# 4. values outside a vocabulary: documented rules
# ---------------------------------------------------------------------------------------------------------------
def test_items_without_feature_row_are_kept_with_pad_features_when_the_filter_is_off(tmp_path, caplog):
    data_path = make_dataset(tmp_path, "partial", item=lambda L: L[:1] + L[4:])
    caplog.set_level(logging.INFO)
    cfg = config("SASRec", tmp_path, data_path, "partial", filter_inter_by_user_or_item=False)
    full = create_dataset(cfg)
    assert "partial.item has no row for 3 item(s) of the .inter file: kept without features" in caplog.text
    assert full.inter_num == len(_lines("inter")) - 1  # no interaction dropped
    dataset = data_preparation(cfg, full)[0]._dataset  # models read the item features of the built split
    attributes = item_attributes(dataset)
    for external in (line.split("\t")[0] for line in _lines("item")[1:4]):
        assert attributes.tokens[dataset.token2id("item_id", external)].eq(0).all()  # [PAD] in every field
    assert attributes.tokens[dataset.token2id("item_id", _lines("item")[4].split("\t")[0])].gt(0).any()


def test_empty_token_seq_value_means_no_attribute(tmp_path):
    """An empty token_seq (and token) value is [PAD]: the item has no value there, not an 'empty' token."""
    data_path = make_dataset(tmp_path, "blank", item=lambda L: edit_row(edit_row(L, 1, 3, ""), 1, 2, ""))
    cfg = config("SASRec", tmp_path, data_path, "blank")
    dataset = data_preparation(cfg, create_dataset(cfg))[0]._dataset
    item = dataset.token2id("item_id", _lines("item")[1].split("\t")[0])
    feat = dataset.get_item_feature()
    assert feat["class"][item].eq(0).all() and int(feat["release_year"][item]) == 0
    assert "" not in set(dataset.field2id_token["class"].tolist()) | set(dataset.field2id_token["release_year"].tolist())
    attributes = item_attributes(dataset)
    title_width = feat["movie_title"].shape[1]
    assert attributes.tokens[item, :title_width].gt(0).any() and attributes.tokens[item, title_width:].eq(0).all()


def test_attribute_and_r2ec_token_ids_outside_the_vocabulary_raise(tmp_path):
    cfg = config("SASRec", tmp_path, make_dataset(tmp_path, "vocab"), "vocab")
    dataset = data_preparation(cfg, create_dataset(cfg))[0]._dataset
    attributes = item_attributes(dataset)
    assert attributes.describe(dataset, 1).startswith("movie_title:")
    with pytest.raises(ValueError, match=r"Attribute id .* is outside the item attribute vocabulary"):
        attributes.describe(dataset, attributes.vocab_size)
    vocab = R2ecVocabulary(size=20, item_offset=8, n_items=5, attr_offset=13, attr_global=torch.arange(1, 5),
                           rating_offset=17, n_ratings=3, gap_offset=20, n_gaps=0, attributes=None)
    assert [vocab.kind(t) for t in (0, 8, 13, 17, 19)] == ["special", "item", "attribute", "rating", "rating"]
    for token in (20, -1):
        with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 20\)"):
            vocab.kind(token)


def test_item_attributes_refuse_a_float_field(tmp_path):
    data_path = make_dataset(tmp_path, "floaty", item=lambda L: [L[0].replace("release_year:token", "release_year:float")] + L[1:])
    cfg = config("SASRec", tmp_path, data_path, "floaty")
    dataset = data_preparation(cfg, create_dataset(cfg))[0]._dataset
    with pytest.raises(ValueError, match=r"Item field 'release_year' of dataset 'floaty' is float"):
        item_attributes(dataset, ["movie_title", "release_year"])


def test_r2ec_rating_scale_outside_its_tokens_is_an_error(tmp_path):
    data_path = make_dataset(tmp_path, "percent", inter=lambda L: L[:1] + [
        "\t".join(cells[:2] + [str(int(cells[2]) * 20)] + cells[3:]) for cells in (line.split("\t") for line in L[1:])])
    with pytest.raises(ValueError, match=r"r2ec_use_rating_token: the ratings \(rating\) of dataset 'percent' span "
                                         r"\[20, 100\].*Fix: rescale the ratings to 1\.\.10, or set r2ec_use_rating_token: false"):
        build_model(config("R2ec", tmp_path, data_path, "percent"))
    model, _ = build_model(config("R2ec", tmp_path, data_path, "percent", r2ec_use_rating_token=False))
    assert model.vocab.n_ratings == 0


def test_r2ec_history_ratings_outside_the_training_range_are_clamped_into_it(tmp_path):
    """Rule: rating tokens cover the training split's range; a later split's rating beyond it takes the nearest one."""
    model, train_data = build_model(config("R2ec", tmp_path, make_dataset(tmp_path, "ratings"), "ratings",
                                           r2ec_hist_tokens_per_item=0, r2ec_item_id_token=True))
    vocab = model.vocab
    batch = next(iter(train_data))[:2]
    ratings = batch["rating_list"].clone()
    ratings[:, 0] = torch.tensor([9.0, -3.0])  # beyond 5 and below 1, in the first history slot
    batch.update(type(batch)({"rating_list": ratings, "item_length": torch.full((2,), 1)}))
    prompt = model.user_prompt(batch)
    rating_tokens = prompt[(prompt >= vocab.rating_offset) & (prompt < vocab.rating_offset + vocab.n_ratings)]
    assert rating_tokens.tolist() == [vocab.rating_offset + vocab.n_ratings - 1, vocab.rating_offset]
