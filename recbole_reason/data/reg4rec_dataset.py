"""`REG4RecDataset`: RecBole's `SequentialDataset` plus what REG4Rec needs beyond item ids.

- Each augmented sample carries `reg4rec_target_pos`, the position of its target in the user's full chronological
  sequence, so MSRA (spec §5) can look up the *next* items after the target.
- After the leave-one-out split, `is_train_position[u, p]` marks which positions of user u's sequence are training
  interactions (position 0, never a target, is history of every training sample). `future_items` only ever returns
  items at such positions, so MSRA cannot read validation or test items, whatever order RecBole's split used.
- `train_sequences()`: the chronological training sequences, for the tokenizer's pretrained ID model and for
  fitting token categories on training items only.
- `attach_item_tokens(tokens)`: the tokenizer's item -> tokens table; `history_tokens` / `target_tokens` hand the
  model the tokens of history and target items (the model keeps its own copy as buffers for checkpoints).
"""

import numpy as np
import torch
from recbole.data.dataset import SequentialDataset
from recbole.utils import FeatureSource, FeatureType

TARGET_POS_FIELD = "reg4rec_target_pos"


class REG4RecDataset(SequentialDataset):
    def __init__(self, config):
        self.full_sequences = None  # [n_users, max_len] item ids, 0-padded
        self.is_train_position = None  # [n_users, max_len] bool, set by build()
        self.item_tokens = None
        super().__init__(config)

    def data_augmentation(self):
        super().data_augmentation()
        uids = self.inter_feat[self.uid_field].numpy()
        targets = self.inter_feat[self.iid_field].numpy()
        first_items = self.inter_feat[self.item_id_list_field][:, 0].numpy()
        # rows are sorted by (user, time); a user with n interactions has n-1 rows, targets at positions 1..n-1
        starts = np.r_[0, np.flatnonzero(uids[1:] != uids[:-1]) + 1]
        pos = np.arange(len(uids)) - np.repeat(starts, np.diff(np.r_[starts, len(uids)])) + 1
        max_len = int(pos.max()) + 1 if len(pos) else 1
        sequences = np.zeros((self.user_num, max_len), dtype=np.int64)
        sequences[uids, pos] = targets
        sequences[uids[starts], 0] = first_items[starts]
        self.full_sequences = torch.from_numpy(sequences)
        self.set_field_property(TARGET_POS_FIELD, FeatureType.FLOAT, FeatureSource.INTERACTION, 1)
        self.inter_feat.update(
            type(self.inter_feat)({TARGET_POS_FIELD: torch.from_numpy(pos.astype(np.float32))})
        )

    def build(self):
        datasets = super().build()
        if self.config["benchmark_filename"] is not None or self.full_sequences is None:
            raise ValueError("REG4Rec needs RecBole's own data augmentation (benchmark_filename must be unset).")
        train = datasets[0].inter_feat
        mask = torch.zeros_like(self.full_sequences, dtype=torch.bool)
        users = train[self.uid_field].long()
        mask[users, train[TARGET_POS_FIELD].long()] = True
        mask[users, 0] = True
        for dataset in datasets:
            dataset.is_train_position = mask
        return datasets

    # -- MSRA ------------------------------------------------------------------------------------------------
    def future_items(self, users, target_pos, n_future):
        """[B, n_future] items at target_pos + 1 .. target_pos + n_future that are *training* interactions; 0 elsewhere."""
        if self.is_train_position is None:
            raise ValueError("future_items needs the split dataset (call build() first).")
        users, target_pos = users.long().cpu(), target_pos.long().cpu()
        positions = target_pos.unsqueeze(1) + torch.arange(1, n_future + 1).unsqueeze(0)
        inside = positions < self.full_sequences.size(1)
        positions = positions.clamp(max=self.full_sequences.size(1) - 1)
        rows = users.unsqueeze(1).expand_as(positions)
        allowed = inside & self.is_train_position[rows, positions]
        return torch.where(allowed, self.full_sequences[rows, positions], torch.zeros_like(positions))

    def train_sequences(self):
        """[(user, [items])]: each user's training interactions in time order (users without any skipped)."""
        if self.is_train_position is None:
            raise ValueError("train_sequences needs the split dataset (call build() first).")
        result = []
        for user in range(self.full_sequences.size(0)):
            items = self.full_sequences[user][self.is_train_position[user]]
            items = items[items > 0]
            if len(items):
                result.append((user, items.tolist()))
        return result

    # -- tokens -------------------------------------------------------------------------------------------------
    def attach_item_tokens(self, tokens):
        self.item_tokens = tokens

    def _tokens(self):
        if self.item_tokens is None:
            raise ValueError("No item tokens attached: run the REG4Rec tokenizer stage (REG4RecTrainer.fit) first.")
        return self.item_tokens.item2tokens

    def history_tokens(self, item_seq):
        """[B, L] item ids -> [B, L, M] local token ids (-1 for padding)."""
        return self._tokens()[item_seq.cpu()]

    def target_tokens(self, items):
        return self._tokens()[items.cpu()]
