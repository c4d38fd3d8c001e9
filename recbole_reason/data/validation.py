"""Dataset checks, before RecBole reads (or downloads) anything and before anything is written.

`check_dataset_files` reads the atomic files' headers and rows (a fraction of a second on the Amazon files): a
missing dataset, an empty or untyped file, a row with too many or too few columns, a value that is not a number in
a float column, a row without the ids and time RecBole keys on, duplicate or orphan `.item` / `.user` rows.
`check_sequence_lengths` runs on the loaded dataset, before it is split: users too short for the leave-one-out
split. Each failure is one line naming the file (and line), the problem and the fix. `utils.create_dataset` runs
both; the configuration itself was checked before (`config_checks`, when the Config was built).
"""

import csv
import os
from logging import getLogger

import numpy as np
import pandas as pd
from recbole.data.dataset import SequentialDataset
from recbole.utils import FeatureType, ModelType

FEATURE_TYPES = tuple(feature_type.value for feature_type in FeatureType)


def check_dataset_files(config):
    """Fail fast, before RecBole reads (or downloads) anything and before anything is written, when the atomic files
    are missing or malformed: every message names the file, the problem and the fix."""
    folder = config["data_path"]
    dataset = config["dataset"]
    inter_files = [os.path.join(folder, f"{dataset}.inter")]
    if config["benchmark_filename"]:
        inter_files = [os.path.join(folder, f"{dataset}.{part}.inter") for part in config["benchmark_filename"]]
    for inter_file in inter_files:
        if not os.path.isfile(inter_file):
            raise FileNotFoundError(
                f"Dataset '{dataset}' not found: {inter_file} does not exist. Put the RecBole atomic files in "
                f"<data_path>/{dataset}/ and pass --data_path=<data_path> (e.g. --data_path=../shared/data). "
                "recbole-reason never downloads datasets."
            )
    id_fields = [config["USER_ID_FIELD"], config["ITEM_ID_FIELD"]]
    inter_ids = {}
    for inter_file in inter_files:
        columns = _check_inter_columns(config, inter_file)
        for field, ids in _scan_rows(config, inter_file, columns, "inter", id_fields=id_fields).items():
            inter_ids[field] = inter_ids.get(field, set()) | ids
    for source, id_field in (("item", config["ITEM_ID_FIELD"]), ("user", config["USER_ID_FIELD"])):
        _check_side_file(config, os.path.join(folder, f"{dataset}.{source}"), source, id_field, inter_ids.get(id_field))


def _loaded_columns(config, source, columns):
    """The header columns RecBole loads from one atomic file (its `load_col` / `unload_col` rule)."""
    load_col, unload_col = config["load_col"], config["unload_col"] or {}
    if load_col is None or load_col.get(source) == "*":
        chosen = list(columns)
    else:
        chosen = [column for column in columns if column in (load_col.get(source) or [])]
    return [column for column in chosen if column not in (unload_col.get(source) or [])]


def _read_header(config, path):
    """Typed header of an atomic file -> ([name], {name: type}); an empty file (no header or no row) is an error."""
    with open(path, encoding=config["encoding"] or "utf-8") as f:
        header = f.readline().rstrip("\n")
        has_rows = any(line.strip() for line in f)
    if not header or not has_rows:
        raise ValueError(f"{path} is empty: a RecBole atomic file needs a typed header and at least one row.")
    names, types = [], {}
    for column in header.split(config["field_separator"]):
        name, _, ftype = column.partition(":")
        if ftype not in FEATURE_TYPES:
            raise ValueError(
                f"{path}: header column {column!r} has no valid type. Fix: write each header column as "
                f"name:type with type one of {', '.join(FEATURE_TYPES)} (e.g. item_id:token)."
            )
        names.append(name)
        types[name] = ftype
    return names, types


def _check_inter_columns(config, inter_file):
    """An empty .inter file, or one without a column the config loads, fails here with the file's name rather
    than as a KeyError deep inside RecBole's data processing. Returns the file's typed columns."""
    names, types = _read_header(config, inter_file)
    load_col = config["load_col"] or {}
    required = set(load_col.get("inter", [])) | {config["USER_ID_FIELD"], config["ITEM_ID_FIELD"]}
    if config["MODEL_TYPE"] == ModelType.SEQUENTIAL and config["eval_args"]["order"] == "TO":
        required.add(config["TIME_FIELD"])
    missing = sorted(column for column in required if column and column not in names)
    if missing:
        raise ValueError(
            f"{inter_file} has no column {', '.join(missing)} (its columns: {', '.join(names)}). Fix the file, or "
            "the config: load_col.inter, USER_ID_FIELD / ITEM_ID_FIELD / TIME_FIELD (sequential models order by time)."
        )
    return types


def _unset(values, ftype):
    """Values of a field RecBole keys or orders on that leave it unset: empty, or NaN in a float field (pandas
    reads 'nan' as NaN, and RecBole fills a NaN timestamp with the mean one, silently)."""
    stripped = values.str.strip()
    unset = stripped == ""
    if ftype == "float":
        unset |= stripped.str.lower().str.lstrip("+-") == "nan"
    return unset


def _key_fields(config, source, id_fields):
    keys = set(id_fields)
    if source == "inter" and config["MODEL_TYPE"] == ModelType.SEQUENTIAL and config["eval_args"]["order"] == "TO":
        keys.add(config["TIME_FIELD"])
    return keys


def _scan_rows(config, path, types, source, id_fields):
    """The rows' checks (see `_scan_rows_exact`), read by pandas' C parser: a fraction of a second on 200k rows.
    Anything suspicious is handed to the line-by-line scan, which finds the line and raises."""
    names = list(types)
    loaded = set(_loaded_columns(config, source, names))
    try:
        frame = pd.read_csv(
            path, sep=config["field_separator"], header=None, skiprows=1, dtype=str, keep_default_na=False,
            quoting=csv.QUOTE_NONE, encoding=config["encoding"] or "utf-8", engine="c",
        )
    except (pd.errors.ParserError, ValueError):
        frame = None
    if frame is None or frame.shape[1] != len(names) or bool(frame.isna().any().any()):
        return _scan_rows_exact(config, path, types, source, id_fields)
    frame.columns = names
    clean = all(not _unset(frame[name], types[name]).any() for name in _key_fields(config, source, id_fields) & loaded)
    for name in [name for name in names if clean and name in loaded and types[name] in ("float", "float_seq")]:
        values = frame[name]
        if types[name] == "float_seq":
            values = values.str.split(config["seq_separator"]).explode().dropna()
        values = values.to_numpy()
        try:
            values[values != ""].astype(np.float64)
        except ValueError:
            clean = False
    ids = {name: set(frame[name]) for name in id_fields if name in loaded}
    if source != "inter":
        clean = clean and all(len(values) == len(frame) for values in ids.values())
    return ids if clean else _scan_rows_exact(config, path, types, source, id_fields)


def _scan_rows_exact(config, path, types, source, id_fields):
    """Every row has the header's number of columns, loaded float columns parse, and the fields RecBole keys on are
    set: pandas would otherwise fill a short row with NaN (a mean timestamp), drop a long row's extra value, or stop
    with an error that names no file. Returns {loaded id field: set of its raw values}."""
    names = list(types)
    sep, seq_sep = config["field_separator"], config["seq_separator"]
    with open(path, encoding=config["encoding"] or "utf-8") as f:
        lines = f.read().split("\n")
    numbered = [(line_no, line) for line_no, line in enumerate(lines[1:], start=2) if line.strip()]
    for line_no, line in numbered:
        if line.count(sep) != len(names) - 1:
            found = line.count(sep) + 1
            raise ValueError(
                f"{path}, line {line_no}: {found} columns, the header has {len(names)} ({', '.join(names)}). Fix the "
                f"row: a separator inside a value (field_separator is {sep!r}; token_seq values are separated by "
                f"seq_separator {seq_sep!r}) or a missing value (leave it empty, keeping the separators)."
            )
    line_numbers = [line_no for line_no, _ in numbered]
    columns = dict(zip(names, zip(*(line.split(sep) for _, line in numbered))))
    loaded = set(_loaded_columns(config, source, names))
    for name in [name for name in names if name in _key_fields(config, source, id_fields) & loaded]:
        unset = np.flatnonzero(_unset(pd.Series(columns[name]), types[name]).to_numpy())
        if len(unset):
            value = columns[name][unset[0]]
            problem = f"empty {name}" if not value.strip() else \
                f"{name} is {value!r}, not a number (RecBole would fill in the column's mean)"
            raise ValueError(f"{path}, line {line_numbers[unset[0]]}: {problem}. Fix: every row needs a {name}.")
    for name in [name for name in names if name in loaded and types[name] in ("float", "float_seq")]:
        values = pd.Series(columns[name])
        if types[name] == "float_seq":
            values = values.str.split(seq_sep).explode()
        values = values[values.str.strip() != ""]
        bad = values[pd.to_numeric(values, errors="coerce").isna() & ~values.str.strip().str.lower().eq("nan")]
        if len(bad):
            raise ValueError(
                f"{path}, line {line_numbers[bad.index[0]]}, column {name}: {columns[name][bad.index[0]]!r} is not a "
                f"number, and the header declares {name}:{types[name]}. Fix the value, or declare the column as "
                f"{name}:{'token_seq' if types[name] == 'float_seq' else 'token'} if it is not a number."
            )
    ids = {name: set(columns[name]) for name in id_fields if name in loaded}
    if source != "inter":
        for name, values in ids.items():
            if len(values) < len(columns[name]):
                first = {}
                for i, value in enumerate(columns[name]):
                    if value in first:
                        raise ValueError(
                            f"{path}, lines {line_numbers[first[value]]} and {line_numbers[i]}: two rows for {name} "
                            f"{value!r}. RecBole would silently keep the first. Fix: merge them into one row."
                        )
                    first[value] = i
    return ids


def _check_side_file(config, path, source, id_field, inter_ids):
    """A .item / .user file that the config loads: its columns, its rows, and the same ids as the .inter file."""
    load_col = config["load_col"]
    if load_col is not None and source not in load_col:
        return  # not loaded: RecBole never reads it
    if not os.path.isfile(path):
        if load_col is not None:
            getLogger().warning(
                f"{path} not found: load_col.{source} {list(load_col[source])} is ignored and the dataset has no "
                f"{source} features. Models that need them say so; the others run on ids alone."
            )
        return
    names, types = _read_header(config, path)
    wanted = [] if load_col is None or load_col[source] == "*" else list(load_col[source])
    missing = [column for column in wanted + [id_field] if column not in names]
    if missing:
        raise ValueError(
            f"{path} has no column {', '.join(dict.fromkeys(missing))} (its columns: {', '.join(names)}). RecBole would "
            f"load the others silently. Fix the file, or load_col.{source} in the config."
        )
    ids = _scan_rows(config, path, types, source, id_fields=[id_field]).get(id_field)
    if ids is None or inter_ids is None:
        return  # the id column is not loaded: RecBole stops on that with its own message
    unused = sorted(ids - inter_ids)
    if unused:
        raise ValueError(
            f"{path} has rows for {len(unused)} {source}(s) that never occur in the .inter file (e.g. "
            f"{', '.join(repr(x) for x in unused[:5])}): RecBole would add them to the "
            f"{'catalogue, and every full-ranking metric would rank them' if source == 'item' else 'user table'}. "
            f"Fix: drop those rows from {os.path.basename(path)}."
        )
    without_row = sorted(inter_ids - ids)
    if without_row:
        if config["filter_inter_by_user_or_item"]:
            raise ValueError(
                f"{path} has no row for {len(without_row)} {source}(s) of the .inter file (e.g. "
                f"{', '.join(repr(x) for x in without_row[:5])}): RecBole's filter_inter_by_user_or_item would "
                f"silently drop all their interactions. Fix: add a row for each (empty feature values are allowed and "
                f"read as [PAD]), or set filter_inter_by_user_or_item: False to keep them without features."
            )
        getLogger().info(
            f"{path} has no row for {len(without_row)} {source}(s) of the .inter file: kept without features "
            "(filter_inter_by_user_or_item is False), their feature values are [PAD]."
        )


def check_sequence_lengths(config, dataset):
    """Leave-one-out ('LS') splitting needs enough interactions per user: RecBole keeps one training target per user
    before it fills valid and test, so a short user silently gets no validation (or no test) sample, and valid and
    test would then score different sets of users. Raises, naming how many users and the key that filters them."""
    split = (config["eval_args"] or {}).get("split") or {}
    if "LS" not in split or config["benchmark_filename"]:
        return
    leave_one_num = 2 if split["LS"] == "valid_and_test" else 1
    # A sequential dataset turns a user's n interactions into n - 1 targets (the first item is only history).
    min_inter = leave_one_num + 1 + int(isinstance(dataset, SequentialDataset))
    _, counts = np.unique(np.asarray(dataset.inter_feat[dataset.uid_field]), return_counts=True)
    short = counts[counts < min_inter]
    if not len(short):
        return
    lengths, users = np.unique(short, return_counts=True)
    breakdown = ", ".join(f"{n} with {k}" for k, n in zip(lengths.tolist(), users.tolist()))
    inter_file = os.path.join(config["data_path"], f"{config['dataset']}.inter")
    raise ValueError(
        f"{inter_file}: {len(short)} of {len(counts)} users have fewer than {min_inter} interactions after RecBole's "
        f"filters ({breakdown} interaction(s)), too few for the leave-one-out split {{'LS': '{split['LS']}'}}: "
        "RecBole would give them no validation or no test sample, so valid and test would score different users. "
        f"Fix: set user_inter_num_interval: \"[{min_inter},inf)\" to drop them (RecBole's own filter), or add "
        "their interactions."
    )
