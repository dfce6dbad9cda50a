"""chatforge: an open, end-to-end ChatGPT system (tokenizer, GPT, pretraining, SFT, RM, PPO, serving, flywheel)."""

__version__ = "0.1.0"
