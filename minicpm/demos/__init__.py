"""The guided demos on the built-in corpus: quickstart, alignment (SFT then DPO)."""
