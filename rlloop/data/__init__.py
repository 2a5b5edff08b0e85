"""Data sets as lists of `rlloop.types.Sample` and prompt rendering."""

from rlloop.data.loader import DataError, build_datasets, chat_messages, load_samples, render_prompt

__all__ = ["DataError", "build_datasets", "chat_messages", "load_samples", "render_prompt"]
