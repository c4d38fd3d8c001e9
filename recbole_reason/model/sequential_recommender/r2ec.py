r"""R2ec
################################################
Reference:
    Runyang You, Yongqi Li, Xinyu Lin, Xin Zhang, Wenjie Wang, Wenjie Li, Liqiang Nie.
    "R²ec: Towards Large Recommender Models with Reasoning." NeurIPS 2025 (arXiv 2505.16994).
    Official code: github.com/YRYangang/RRec (commit 449a544); spec: ../shared/specs/r2ec.md.

One causal language model, two heads that share it:
  * the **lm_head** writes a reasoning `[THINK] r_1 .. r_T [ANS]`, stopping at the answer marker or forced to it
    after `r2ec_max_reason_len` tokens;
  * the **rec_head** has no parameters of its own: s(u, v) = cos(h_u, e_v) / tau, where h_u is the state at the
    user's answer marker and e_v the state at the answer marker of item v's own prompt, encoded by the **same** model.

The language model is a backbone (`recbole_reason.model.r2ec_backbone`, protocol documented there): `tiny`, our
small transformer over a closed item/attribute vocabulary (`data/r2ec_vocab.py`), or `hf`, a Hugging Face causal LM
with LoRA (`model/r2ec_llm.py`, the `[llm]` extra). Training (`R2ecTrainer`): the supervised warm-up
(`calculate_loss`, our addition: catalogue softmax of the item head after the model's own greedy reasoning + the
backbone's LM loss on the evaluated format), then RecPO (`recpo_loss`, math in `model/rl.py`): K sampled reasoning
trajectories per user, fused ranking reward, group-normalised advantages **per trajectory**, DAPO-clipped token
surrogate and an item softmax over every item (`recpo_item_candidates: catalogue`, ours) or the in-batch targets
(`in_batch`, the official InfoNCE), on all K rollouts (`recpo_item_trajectories: all`, ours, what the official code
computes through its advantage broadcast) or advantage-weighted on the relabelled best ones (`relabelled`, the paper).
"""

from logging import getLogger
from typing import NamedTuple

import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender

# ANS and R2ecVocabulary are re-exported: other test files import them from here.
from recbole_reason.data.r2ec_vocab import ANS, REASON_TOKEN_KINDS, R2ecVocabulary, item_title  # noqa: F401
from recbole_reason.model.r2ec_backbone import RATIONALES, Reasoning, TinyBackbone
from recbole_reason.model.rl import (
    fused_reward, recpo_group_advantages, recpo_item_loss, recpo_token_loss, relabel_mask,
)

REASONING_CONTENTS = ("generated", "constant", "random")


class Rollouts(NamedTuple):
    """`R2ec.recpo_rollouts`: B users x K rollouts."""
    prompt: object
    reasoning: torch.LongTensor  # [B * K, T]
    sampled: torch.BoolTensor  # [B * K, T]
    h_u: torch.Tensor  # [B * K, d]
    token_logp: torch.Tensor  # [B * K, T]
    rewards: torch.Tensor  # [B, K]
    advantages: torch.Tensor  # [B, K]
    relabel: torch.Tensor  # [B, K]


class R2ec(SequentialRecommender):
    r"""R²ec: a dual-head (reasoning + item scoring) causal language model."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.backbone_kind = config["r2ec_backbone"] or "tiny"
        self.hidden_size = config["hidden_size"]
        self.n_heads = config["n_heads"]
        self.max_reason_len = config["r2ec_max_reason_len"]
        self.reason_tokens = list(config["r2ec_reason_tokens"] or ["items", "attributes"])
        self.group_size = config["r2ec_group_size"]
        self.gen_temperature = config["r2ec_gen_temperature"]
        self.gen_top_k = config["r2ec_gen_top_k"]
        self.gen_top_p = config["r2ec_gen_top_p"]
        self.eval_temperature = config["r2ec_eval_temperature"] or 0.0
        self.sim_temperature = config["r2ec_sim_temperature"]
        self.reward_ndcg_k = config["r2ec_reward_ndcg_k"]
        self.reward_softmax_weight = config["r2ec_reward_softmax_weight"]
        self.advantage_type = config["r2ec_advantage_type"]
        self.relabel_topk = config["r2ec_relabel_topk"]
        self.item_trajectories = config["recpo_item_trajectories"] or "all"
        self.eps_low = config["r2ec_eps_low"]
        self.eps_high = config["r2ec_eps_high"]
        self.num_negatives = config["r2ec_num_negatives"] or 0
        self.item_refresh_steps = config["r2ec_item_refresh_steps"]
        self.item_batch_size = config["r2ec_item_batch_size"] or 1024
        self.warmup_reasoning = config["r2ec_warmup_reasoning"] or "greedy"
        self.warmup_candidates = config["r2ec_warmup_candidates"] or "catalogue"
        recpo_candidates = config["recpo_item_candidates"] or "catalogue"
        self.recpo_candidates = self.warmup_candidates if recpo_candidates == "warmup" else recpo_candidates
        self.sft_rationale = config["r2ec_sft_rationale"] or "none"
        self.lm_loss_weight = config["r2ec_lm_loss_weight"]
        self.lm_positions = config["r2ec_lm_positions"]
        self.token_loss_weight = config["r2ec_token_loss_weight"]
        self.item_loss_weight = config["r2ec_item_loss_weight"]
        self.code_compat = bool(config["r2ec_code_compat"])
        self.control_seed = config["seed"] or 0
        self._validate()

        self.backbone = self._language_model(config, dataset)
        getLogger().info(self.backbone.describe())
        self.hidden_size = self.backbone.hidden_size
        # No-grad item table (the rec head's H_V over the catalogue): re-encoded at each evaluation, for RecPO's
        # rewards every r2ec_item_refresh_steps steps (its in-batch target rows overwritten at every step).
        self.register_buffer("item_table", torch.zeros(self.n_items, self.hidden_size), persistent=False)
        self._table_dirty = True
        self.reasoning_content = "generated"  # the content control (`set_reasoning_content`)

    def _language_model(self, config, dataset):
        if self.backbone_kind == "hf":
            try:  # only this path needs transformers / peft
                from recbole_reason.model.r2ec_llm import HFBackbone
            except ImportError as error:
                raise ValueError(
                    f"r2ec_backbone: hf needs the LLM extra ({error}). Fix: pip install -e \".[llm]\", or use "
                    "r2ec_backbone: tiny."
                ) from None
            return HFBackbone(config, dataset)
        return TinyBackbone(config, dataset)

    def _validate(self):
        def need(ok, key, value, fix):
            if not ok:
                raise ValueError(f"{key} {fix}, got {value!r}.")

        need(self.backbone_kind in ("tiny", "hf"), "r2ec_backbone", self.backbone_kind, "must be 'tiny' or 'hf'")
        need(self.hidden_size % self.n_heads == 0 or self.backbone_kind == "hf", "hidden_size", self.hidden_size,
             f"must be divisible by n_heads={self.n_heads}")
        need(self.max_reason_len >= 1, "r2ec_max_reason_len", self.max_reason_len,
             "must be >= 1 (the reasoning budget in tokens; the paper's 'no reasoning' variant is the warm-up)")
        need(self.group_size >= 2, "r2ec_group_size", self.group_size,
             "must be >= 2 (RecPO normalises advantages within a group of K rollouts)")
        need(set(self.reason_tokens) <= set(REASON_TOKEN_KINDS) and self.reason_tokens, "r2ec_reason_tokens",
             self.reason_tokens, f"must be a non-empty subset of {list(REASON_TOKEN_KINDS)}")
        need(self.gen_temperature > 0, "r2ec_gen_temperature", self.gen_temperature, "must be > 0")
        need(self.gen_top_k >= 0, "r2ec_gen_top_k", self.gen_top_k, "must be >= 0 (0 = no top-k filter)")
        need(0 < self.gen_top_p <= 1, "r2ec_gen_top_p", self.gen_top_p, "must be in (0, 1]")
        need(self.eval_temperature >= 0, "r2ec_eval_temperature", self.eval_temperature, "must be >= 0 (0 = greedy)")
        need(self.sim_temperature > 0, "r2ec_sim_temperature", self.sim_temperature, "must be > 0")
        need(self.reward_ndcg_k >= 1, "r2ec_reward_ndcg_k", self.reward_ndcg_k, "must be >= 1")
        need(0 <= self.reward_softmax_weight <= 1, "r2ec_reward_softmax_weight", self.reward_softmax_weight,
             "must be in [0, 1]")
        need(self.advantage_type in ("gaussian", "leave-one-out"), "r2ec_advantage_type", self.advantage_type,
             "must be 'gaussian' or 'leave-one-out'")
        need(1 <= self.relabel_topk <= self.group_size, "r2ec_relabel_topk", self.relabel_topk,
             f"must be in [1, r2ec_group_size={self.group_size}]")
        need(self.item_trajectories in ("relabelled", "all"), "recpo_item_trajectories", self.item_trajectories,
             "must be 'relabelled' (A_i on the top-r2ec_relabel_topk trajectories) or 'all' (plain CE over all K)")
        need(0 <= self.eps_low < 1, "r2ec_eps_low", self.eps_low, "must be in [0, 1)")
        need(self.eps_high >= 0, "r2ec_eps_high", self.eps_high, "must be >= 0")
        need(self.num_negatives >= 0, "r2ec_num_negatives", self.num_negatives, "must be >= 0")
        need(self.item_refresh_steps >= 1, "r2ec_item_refresh_steps", self.item_refresh_steps, "must be >= 1")
        need(self.warmup_reasoning in ("empty", "greedy", "sampled"), "r2ec_warmup_reasoning",
             self.warmup_reasoning, "must be 'empty', 'greedy' or 'sampled'")
        need(self.warmup_candidates in ("in_batch", "catalogue"), "r2ec_warmup_candidates", self.warmup_candidates,
             "must be 'in_batch' or 'catalogue'")
        need(self.recpo_candidates in ("in_batch", "catalogue"), "recpo_item_candidates", self.recpo_candidates,
             "must be 'in_batch', 'catalogue' or 'warmup' (the warm-up's r2ec_warmup_candidates)")
        need(self.sft_rationale in RATIONALES, "r2ec_sft_rationale", self.sft_rationale, f"must be one of {list(RATIONALES)}")
        need(self.lm_loss_weight >= 0, "r2ec_lm_loss_weight", self.lm_loss_weight, "must be >= 0")
        need(self.lm_positions >= 1, "r2ec_lm_positions", self.lm_positions, "must be >= 1")

    # -- cache bookkeeping ------------------------------------------------------------------------------------------
    def train(self, mode=True):
        # Every switch (RecBole calls eval() before each evaluation) invalidates the no-grad item table.
        self._table_dirty = True
        return super().train(mode)

    def load_state_dict(self, state_dict, strict=True, **kwargs):
        self._table_dirty = True
        return super().load_state_dict(state_dict, strict=strict, **kwargs)

    def set_dropout(self, p):
        """RecPO runs with dropout off so that sampling and update see the same policy (official code)."""
        self.backbone.set_dropout(p)

    # -- the language model (the backbone protocol) -------------------------------------------------------------------
    @property
    def vocab(self):
        return self.backbone.vocab

    @property
    def reason_allowed(self):
        return self.backbone.reason_allowed

    @property
    def item_prompt(self):
        return self.backbone.item_prompts(slice(None))

    def user_prompt(self, interaction):
        return self.backbone.user_prompts(interaction)

    def _shares_prompts(self):
        return self.backbone.shares_prompts()

    def generate_reasoning(self, prompt, temperature=0.0, top_k=0, top_p=1.0, max_len=None, group_size=1):
        """`group_size` reasonings per prompt row (rows grouped per prompt). Returns (tokens [N, <= max_len + 1],
        sampled mask, state at the answer marker [N, d])."""
        if group_size > 1 and not self._shares_prompts():
            prompt, group_size = self.backbone.repeat_prompts(prompt, group_size), 1
        max_len = self.max_reason_len if max_len is None else max_len
        reasoning = self.backbone.generate(prompt, max_len, temperature, top_k, top_p, group_size)
        return reasoning.tokens, reasoning.sampled, reasoning.answer_states

    def forward_with_reasoning(self, prompt, reasoning, group_size=1):
        """One forward with grad: (h_u at the answer marker, log-prob of each reasoning token, None)."""
        if group_size > 1 and not self._shares_prompts():
            prompt, group_size = self.backbone.repeat_prompts(prompt, group_size), 1
        h_u, token_logp = self.backbone.answer_states(prompt, reasoning, group_size)
        return h_u, token_logp, None

    # -- the item head ------------------------------------------------------------------------------------------------
    def encode_items(self, item_ids):
        """e_v: L2-normalised state at the answer marker of each item's own prompt (same model as the users)."""
        return F.normalize(self.backbone.item_states(item_ids), dim=-1)

    @torch.no_grad()
    def refresh_item_table(self):
        """Re-encodes every item without dropout (the table stands in for the model's deterministic encodings)."""
        was_training = self.backbone.training
        self.backbone.eval()
        ids = torch.arange(self.n_items, device=self.item_table.device)
        self.item_table.copy_(torch.cat([self.encode_items(chunk) for chunk in ids.split(self.item_batch_size)]))
        self.backbone.train(was_training)
        self._table_dirty = False

    def rec_head(self, user_states, item_states):
        """s(u, v) = cos(h_u, e_v) / tau."""
        return F.normalize(user_states, dim=-1) @ item_states.t() / self.sim_temperature

    def _candidates(self, targets, source="in_batch"):
        """The candidates of an item-loss softmax and the label of each user among them: every item (`catalogue`),
        or the in-batch targets (+ random negatives), unique (`in_batch`)."""
        if source == "catalogue":
            return torch.arange(1, self.n_items, device=targets.device), targets - 1
        pool = targets
        if self.num_negatives:
            pool = torch.cat([targets, torch.randint(1, self.n_items, (self.num_negatives,), device=targets.device)])
        candidates, inverse = torch.unique(pool, return_inverse=True)
        return candidates, inverse[: len(targets)]

    def _history_mask(self, interaction, rows):
        """[rows, n_items] True at each user's history items (not its target) and at the padding item."""
        items = interaction[self.ITEM_SEQ]
        mask = torch.zeros(items.shape[0], self.n_items, dtype=torch.bool, device=items.device)
        mask.scatter_(1, items, True)
        mask[torch.arange(len(items)), interaction[self.POS_ITEM_ID]] = False
        mask[:, 0] = True
        return mask.repeat_interleave(rows // len(items), dim=0)

    # -- stage A: supervised warm-up ------------------------------------------------------------------------------
    def calculate_loss(self, interaction):
        """Item-head CE after the reasoning the model is evaluated with (`r2ec_warmup_reasoning`, greedy by default),
        against one consistent candidate source: every item encoded fresh with gradient (`catalogue`, the full
        softmax of SASRec), or the in-batch targets + `r2ec_num_negatives` random items (`in_batch`). Never a mix of
        fresh and cached rows: the loss could then fall by telling fresh rows from stale ones."""
        targets = interaction[self.POS_ITEM_ID]
        prompt = self.backbone.user_prompts(interaction)
        h_u, lm_loss = self.backbone.warmup_states(
            prompt, targets, self.warmup_reasoning, self.max_reason_len, self.gen_temperature, self.gen_top_k,
            self.gen_top_p,
        )
        candidates, labels = self._candidates(targets, self.warmup_candidates)
        rec_loss = F.cross_entropy(self.rec_head(h_u, self.encode_items(candidates)), labels)
        self._table_dirty = True
        if self.lm_loss_weight == 0:
            return rec_loss
        return rec_loss, self.lm_loss_weight * lm_loss

    # -- stage B: RecPO ---------------------------------------------------------------------------------------------
    def recpo_rollouts(self, interaction):
        """RecPO's rollouts of a batch: K sampled reasonings per user (flattened user-major, [B * K, ...]), the states
        at their answer markers and token log-probabilities (with gradient, when it is on), and per user [B, K] the
        fused rewards, group advantages and relabel mask (no gradient)."""
        targets = interaction[self.POS_ITEM_ID]
        b, k = len(targets), self.group_size
        prompt = self.user_prompt(interaction)  # K rollouts per user share one prompt forward when they can
        reasoning, sampled, _ = self.generate_reasoning(
            prompt, self.gen_temperature, self.gen_top_k, self.gen_top_p, group_size=k
        )
        h_u, token_logp, _ = self.forward_with_reasoning(prompt, reasoning, group_size=k)
        with torch.no_grad():
            scores = self.rec_head(h_u.detach(), self.item_table).masked_fill(
                self._history_mask(interaction, b * k), float("-inf")
            )
            rewards = fused_reward(
                scores, targets.repeat_interleave(k), min(self.reward_ndcg_k, self.n_items),
                self.reward_softmax_weight,
            ).view(b, k)
            advantages = recpo_group_advantages(rewards, self.advantage_type)
            relabel = relabel_mask(advantages, self.relabel_topk)
        return Rollouts(prompt, reasoning, sampled, h_u, token_logp, rewards, advantages, relabel)

    def recpo_loss(self, interaction):
        """One RecPO step (spec section 2): returns (token loss, item loss) and scalars to log."""
        targets = interaction[self.POS_ITEM_ID]
        b, k = len(targets), self.group_size
        _, reasoning, sampled, h_u, token_logp, rewards, advantages, relabel = self.recpo_rollouts(interaction)
        token_loss = recpo_token_loss(
            token_logp.view(b, k, -1), sampled.view(b, k, -1), advantages, self.eps_low, self.eps_high,
            self.code_compat,
        )
        # in_batch: the official code's in-batch InfoNCE; catalogue: the full softmax the default warm-up optimises
        candidates, labels = self._candidates(targets, self.recpo_candidates)
        cand_states = self.encode_items(candidates)
        with torch.no_grad():  # the reward table's candidate rows overwritten with their fresh encodings
            self.item_table[candidates] = cand_states.detach()
        logits = self.rec_head(h_u, cand_states).view(b, k, -1)
        if self.item_trajectories == "all" and not self.code_compat:  # code_compat: the official broadcast form
            # every rollout, weight 1: no rollout is chosen with the target known (relabelling picks the one whose
            # reasoning ranked the target highest, a choice greedy evaluation cannot make; it lowered valid NDCG@10
            # from a converged warm-up, bench/r2ec_relabel_hindsight.py and docs/r2ec.md)
            item_weights = item_mask = torch.ones_like(advantages)
        else:
            item_weights, item_mask = advantages, relabel
        item_loss = recpo_item_loss(
            logits, labels[:, None].expand(b, k), item_weights, item_mask, self.eps_low, self.eps_high,
            self.code_compat,
        )
        stats = {
            "reward": rewards.mean().item(),
            "advantage_abs_mean": advantages.abs().mean().item(),  # NaN / inf here stops RecPO, naming it
            "reward_best": rewards.max(dim=1).values.mean().item(),
            "reward_spread": (rewards.max(dim=1).values - rewards.min(dim=1).values).mean().item(),
            "reasoning_len": sampled.float().sum(dim=1).mean().item(),
            # a row stopped by itself when its last token (the answer marker) was sampled, not forced
            "stopped_at_ans": sampled.gather(1, (reasoning != self.backbone.pad_id).sum(1, keepdim=True) - 1)
            .float().mean().item(),
        }
        return (self.token_loss_weight * token_loss, self.item_loss_weight * item_loss), stats

    # -- inference ----------------------------------------------------------------------------------------------------
    def _answer(self, prompt):
        """The reasoning at evaluation (greedy unless r2ec_eval_temperature > 0) and h_u; with the content control,
        the generated reasoning's tokens are replaced by constant or random ones of the same lengths."""
        reasoning = self.backbone.generate(prompt, self.max_reason_len, self.eval_temperature, self.gen_top_k,
                                           self.gen_top_p)
        if self.reasoning_content == "generated":
            return reasoning, reasoning.answer_states
        if self.reasoning_content == "constant":
            reasoning = self.backbone.constant_reasoning(reasoning)
        else:
            reasoning = self.backbone.random_reasoning(reasoning, self._control_generator)
        with torch.no_grad():
            h_u, _ = self.backbone.answer_states(prompt, reasoning.tokens)
        return reasoning, h_u

    def _user_scores(self, interaction):
        if self._table_dirty:
            self.refresh_item_table()
        _, h_u = self._answer(self.backbone.user_prompts(interaction))
        return self.rec_head(h_u, self.item_table)

    def full_sort_predict(self, interaction):
        return self._user_scores(interaction)

    def predict(self, interaction):
        scores = self._user_scores(interaction)
        return scores.gather(1, interaction[self.ITEM_ID][:, None]).squeeze(1)

    # -- seeing the reasoning -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def explain(self, dataset, user_ids, topk=5):
        """The reasoning R2ec generates for users, rendered as words and item titles.

        dataset: a RecBole SequentialDataset holding the users' sequences (e.g. `test_data.dataset`, or the dataset
        from `create_dataset`); user_ids: external user tokens (str) or internal ids (int). For each user, the
        row with the longest history is used (the most recent prefix). Returns one dict per user:
        {'user', 'history': [titles], 'reasoning': [words], 'top_items': [titles], 'target': title}."""
        was_training = self.training
        self.eval()
        uid_field = dataset.uid_field
        inter = dataset.inter_feat
        out = []
        for user in user_ids:
            uid = dataset.token2id(uid_field, str(user)) if isinstance(user, str) else int(user)
            rows = torch.nonzero(inter[uid_field] == uid).squeeze(1)
            if len(rows) == 0:
                raise ValueError(f"explain: user {user!r} has no sequence in this dataset.")
            row = rows[inter[self.ITEM_SEQ_LEN][rows].argmax()]
            batch = inter[row: row + 1].to(self.item_table.device)
            if self._table_dirty:
                self.refresh_item_table()
            reasoning, h_u = self._answer(self.backbone.user_prompts(batch))
            scores = self.rec_head(h_u, self.item_table)
            scores.masked_fill_(self._history_mask(batch, 1), float("-inf"))
            history = batch[self.ITEM_SEQ][0, : int(batch[self.ITEM_SEQ_LEN][0])].tolist()
            out.append({
                "user": str(dataset.id2token(uid_field, uid)),
                "history": [item_title(dataset, i) for i in history],
                "reasoning": self.backbone.render(reasoning.tokens[0], dataset),
                "top_items": [item_title(dataset, int(i)) for i in scores[0].topk(topk).indices],
                "target": item_title(dataset, int(batch[self.POS_ITEM_ID][0])),
            })
        self.train(was_training)
        return out

    # -- reasoning length and content at evaluation (recbole_reason.depth_study) ---------------------------------------
    reasoning_depth_key = "r2ec_max_reason_len"

    def set_reasoning_depth(self, value):
        """Generate at most `value` reasoning tokens before the answer marker at evaluation, without retraining;
        returns the previous budget. 0 answers right after [THINK] (no reasoning). The tiny backbone's position
        table is sized for the trained budget: a longer one would reuse its last position, so it is refused."""
        limit = self.backbone.max_reasoning_len
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (limit is not None and value > limit):
            raise ValueError(
                f"r2ec_max_reason_len (the reasoning length) must be an integer in [0, {limit}] for this model (its "
                f"position table holds {limit} reasoning tokens), got {value!r}."
                if limit is not None else f"r2ec_max_reason_len (the reasoning length) must be an integer >= 0, got {value!r}."
            )
        previous, self.max_reason_len = self.max_reason_len, value
        return previous

    @property
    def reasoning_content(self):
        """What h_u reads at evaluation: the `generated` reasoning, or the same number of `constant` tokens (one fixed
        token) or `random` tokens (drawn from a generator seeded with `seed` here: each setting starts the same
        draws). A plain attribute to the comparison's inference-time rows (`R2ec-constant`)."""
        return self._reasoning_content

    @reasoning_content.setter
    def reasoning_content(self, content):
        if content not in REASONING_CONTENTS:
            raise ValueError(f"reasoning content must be one of {list(REASONING_CONTENTS)}, got {content!r}.")
        self._control_generator = torch.Generator().manual_seed(self.control_seed)
        self._reasoning_content = content

    def set_reasoning_content(self, content):
        """Set `reasoning_content`; returns the previous setting."""
        previous, self.reasoning_content = self.reasoning_content, content
        return previous
