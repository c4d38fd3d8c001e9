"""Text prompts of R²ec on a language model (spec 1.4, the official `prompters/prompts.py`, paraphrased).

Item text: the item's title and the other token / token_seq fields the dataset has, one `Label: values` line each
(ml-100k: title, release year, genres; Amazon atomic files: title, categories, brand, attributes ...). User text: the
history, oldest first, one line per item: time elapsed, title, rating. Both go through the language model's own chat
template (`ChatPrompt`); the assistant turn is left open: the user's for the reasoning that ends at the answer
marker, the item's holding only the marker.
"""

from recbole.utils import FeatureType

from recbole_reason.data.item_features import TITLE_FIELDS, item_feature_fields
from recbole_reason.data.r2ec_vocab import item_title

ANSWER_MARKER = "<answer>"
FIELD_LABELS = {"movie_title": "Title", "title": "Title", "release_year": "Release year", "class": "Genres",
                "genre": "Genres", "categories": "Categories", "category": "Category", "brand": "Brand",
                "attributes": "Attributes"}
MAX_TITLE_WORDS = 20  # the official preprocessing drops titles longer than 20 words; we cut them

ITEM_INSTRUCTION = "Summarize key attributes of the following {noun} inside <answer> and </answer>."
USER_INSTRUCTION = (
    "Analyze my history in depth and finally recommend the next {noun} I might {verb} inside <answer> and "
    "</answer>; for example <answer>a {noun}</answer>.\n"
    "Below are my historical {nouns}{ratings}, oldest first:"
)


def item_noun(dataset):
    """(singular, plural, verb) for the prompts: movies for data with a `movie_title` field (MovieLens), products
    otherwise (the paper's Amazon categories)."""
    if "movie_title" in dataset.field2type or dataset.dataset_name.lower().startswith("ml-"):
        return "movie", "movies", "watch"
    return "product", "products", "buy"


def _field_values(dataset, field, item):
    feat = dataset.get_item_feature()[field][item]
    ids = feat[feat > 0].tolist() if dataset.field2type[field] == FeatureType.TOKEN_SEQ else [int(feat)]
    return [str(dataset.id2token(field, i)) for i in ids if i > 0]


def item_titles(dataset):
    """Every item's title, at most 20 words (index = internal item id; 0, the padding item, is '')."""
    return [""] + [" ".join(item_title(dataset, item).split()[:MAX_TITLE_WORDS]) for item in range(1, dataset.item_num)]


def item_attribute_lines(dataset, fields, max_values_per_field):
    """Every item's fields other than the title as `Label: v1, v2` lines (index = internal id; '' when none)."""
    fields = item_feature_fields(dataset) if fields == "auto" else list(fields)
    others = [f for f in fields if f not in TITLE_FIELDS]
    texts = [""]
    for item in range(1, dataset.item_num):
        lines = []
        for field in others:
            values = _field_values(dataset, field, item)[:max_values_per_field]
            if values:
                lines.append(f"{FIELD_LABELS.get(field, field.replace('_', ' ').capitalize())}: {', '.join(values)}")
        texts.append("\n".join(lines))
    return texts


def item_descriptions(titles, attribute_lines):
    """Every item's text: `Title: ...` then its attribute lines (index = internal id)."""
    return [""] + [f"Title: {t}" + (f"\n{a}" if a else "") for t, a in zip(titles[1:], attribute_lines[1:])]


def elapsed(seconds):
    """'3d 4.2h ago' as the official prompter; '0.5h ago' under a day."""
    hours = max(float(seconds), 0.0) / 3600.0
    days = int(hours // 24)
    return f"{days}d {hours - 24 * days:.1f}h ago" if days else f"{hours:.1f}h ago"


def history_text(titles, items, ratings=None, gaps=None):
    """One line per history item (oldest first): `- 3d 4.2h ago: Toy Story (rating 4)`."""
    lines = []
    for i, item in enumerate(items):
        when = f"{elapsed(gaps[i])}: " if gaps is not None else ""
        rating = f" (rating {ratings[i]:g})" if ratings is not None else ""
        lines.append(f"- {when}{titles[item]}{rating}")
    return "\n".join(lines)


class ChatPrompt:
    """A chat-templated prompt split around its variable part: `prefix` (the same text for every row: the template's
    system turn, the instruction) + body + `tail` (end of the user turn, the assistant header, then `assistant`).
    The prefix is tokenized once and its keys/values are computed once per batch; the template is the model's own."""

    SLOT = "\u241f"  # a character no prompt contains, marking where the body goes

    def __init__(self, tokenizer, instruction, assistant=""):
        messages = [{"role": "user", "content": f"{instruction}\n{self.SLOT}"}]
        if assistant:
            messages.append({"role": "assistant", "content": assistant})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=not assistant,
                                             continue_final_message=bool(assistant))
        self.prefix, self.tail = text.split(self.SLOT)
        self.tokenizer = tokenizer
        self.prefix_ids = tokenizer(self.prefix, add_special_tokens=False)["input_ids"]

    def body_ids(self, bodies):
        """Token ids of `body + tail` for each body text (the prefix is not repeated)."""
        return self.tokenizer([body + self.tail for body in bodies], add_special_tokens=False)["input_ids"]
