"""The data flywheel's records: what people do on the chat and labeling pages, and its export
back into training data.

    records.py  conversations (a tree of messages), ratings, edited answers, compare rankings
    queue.py    the labeling page's queue: rank K samples of a prompt, or write a demonstration
    export.py   the records as SFT and rankings JSONL with provenance (`chatforge feedback export`)
    routing.py  A/B: the flywheel's snapshot registry, traffic shares, per-snapshot statistics
    common.py   the refusal error, input checks, reading a conversation's message tree

Everything a person does is a row in the store (store.py), owned by the API key they signed in
with. Every operation checks its input completely before it writes, and writes in one
transaction, so a refused request (`Refused`, with a `reason` that serve/web.py maps to an HTTP
status) leaves nothing behind. What the server and the CLI use is importable from here.
"""

from .common import REASONS, Refused
from .export import ExportSummary, export
from .queue import KINDS, add_demonstration, add_label_items, attach_samples, label_stats, next_label_item, pair_agreement, prompts_from_traffic
from .records import (active_path, add_ranking, add_turn, conversation_view, create_conversation, delete_conversation, list_conversations, rate,
                      rename_conversation)
from .routing import format_stats, pick_model, register_snapshot, registered_snapshots, stats

__all__ = ["REASONS", "Refused", "ExportSummary", "export", "KINDS", "add_demonstration", "add_label_items", "attach_samples", "label_stats",
           "next_label_item", "pair_agreement", "prompts_from_traffic", "active_path", "add_ranking", "add_turn", "conversation_view",
           "create_conversation", "delete_conversation", "list_conversations", "rate", "rename_conversation", "format_stats", "pick_model",
           "register_snapshot", "registered_snapshots", "stats"]
