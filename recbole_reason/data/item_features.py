"""Item side information as the models read it: one shared vocabulary of attribute tokens, and categories.

RecBole remaps every `token` / `token_seq` item field to its own ids (0 = [PAD]). Models that build item
descriptions (R2ec's vocabulary, REG4Rec's tokenizer input and categories) need the fields in one id space:
field f's token t (t >= 1) gets the global id `offset[f] + t`, with 0 kept as padding.

ml-100k: movie_title (title words), release_year, class (genres). Amazon Beauty/Toys: attributes.

Values that are not in a field's vocabulary never reach a model: RecBole reads an empty token / token_seq value of
an `.item` row as [PAD] (id 0: the item simply has no value there), `data.validation.check_dataset_files` refuses
rows for items the `.inter` file never names, and an id outside the shared vocabulary is an error in `describe`.
"""

import os
from dataclasses import dataclass

import torch
from recbole.utils import FeatureSource, FeatureType

# Which field holds an item's category, in order of preference (first token of the first field present).
CATEGORY_FIELDS = ("class", "genre", "categories", "category", "attributes")


@dataclass
class ItemAttributes:
    tokens: torch.LongTensor  # [n_items, T] global attribute ids per item, 0-padded; row 0 is the padding item
    fields: list  # item fields used, in order
    offsets: dict  # field -> offset of its ids in the global vocabulary
    vocab_size: int  # 1 (padding) + number of distinct attribute tokens over all fields

    def describe(self, dataset, global_id):
        """'field:token' for one global attribute id, e.g. 'class:Comedy'."""
        if not 0 <= int(global_id) < self.vocab_size:
            raise ValueError(
                f"Attribute id {int(global_id)} is outside the item attribute vocabulary [0, {self.vocab_size}) of "
                f"fields {self.fields}: it was built for another dataset or load_col.item."
            )
        for field in reversed(self.fields):
            if global_id > self.offsets[field]:
                return f"{field}:{dataset.id2token(field, global_id - self.offsets[field])}"
        return "[PAD]"


def item_feature_fields(dataset):
    """The dataset's token / token_seq item fields other than the item id (empty when no .item file is loaded)."""
    return [
        field
        for field, source in dataset.field2source.items()
        if source == FeatureSource.ITEM
        and field != dataset.iid_field
        and dataset.field2type[field] in (FeatureType.TOKEN, FeatureType.TOKEN_SEQ)
    ]


def missing_item_features(dataset):
    """Why a dataset has no token / token_seq item field, in words naming the file (None when it has one)."""
    if item_feature_fields(dataset):
        return None
    path = os.path.join(dataset.dataset_path, f"{dataset.dataset_name}.item")
    if not os.path.isfile(path):
        return f"{path} does not exist"
    load_col = dataset.config["load_col"]
    wanted = "all columns" if load_col is None else f"load_col.item = {list((load_col or {}).get('item') or [])}"
    return f"{path} has no token / token_seq column loaded ({wanted})"


def item_attributes(dataset, fields=None):
    """All item attribute tokens in one id space, or None when the dataset has no item features."""
    fields = list(fields) if fields is not None else item_feature_fields(dataset)
    if not fields:
        return None
    item_feat = dataset.get_item_feature()
    columns, offsets, offset = [], {}, 0
    for field in fields:
        if field not in item_feat:
            raise ValueError(
                f"Item field '{field}' is not loaded for dataset '{dataset.dataset_name}'. "
                f"Add it to load_col.item in the config (loaded item fields: {item_feature_fields(dataset)})."
            )
        if field not in item_feature_fields(dataset):
            raise ValueError(
                f"Item field '{field}' of dataset '{dataset.dataset_name}' is {dataset.field2type[field].value}: only "
                f"token / token_seq fields are attribute tokens (its values would be truncated to ids). Fix: name "
                f"token fields only (loaded: {item_feature_fields(dataset)})."
            )
        values = item_feat[field].long()
        values = values.unsqueeze(1) if values.dim() == 1 else values
        columns.append(torch.where(values > 0, values + offset, torch.zeros_like(values)))
        offsets[field] = offset
        offset += dataset.num(field) - 1
    return ItemAttributes(torch.cat(columns, dim=1), fields, offsets, offset + 1)


def item_categories(dataset, field=None):
    """[n_items] category id per item (first token of the category field; 0 = none), and the field used.
    Returns (None, None) when the dataset has no category-like field."""
    fields = item_feature_fields(dataset)
    if field is None:
        field = next((f for f in CATEGORY_FIELDS if f in fields), None)
    elif field not in fields:
        raise ValueError(f"category_field '{field}' is not a loaded item field; loaded: {fields}")
    if field is None:
        return None, None
    values = dataset.get_item_feature()[field].long()
    return (values[:, 0] if values.dim() == 2 else values), field


TITLE_FIELDS = ("movie_title", "title")  # ml-100k's and the Amazon datasets' title fields


def item_title(dataset, item):
    """An item's title from the dataset's title field (ml-100k `movie_title`, Amazon `title`), or None."""
    feat = dataset.item_feat
    for field in TITLE_FIELDS:
        if feat is not None and field in feat.columns:
            words = feat[field][item]
            words = words[words > 0].tolist() if words.dim() else [int(words)]
            if words:
                return " ".join(str(dataset.id2token(field, w)) for w in words)
    return None
