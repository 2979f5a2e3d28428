"""The choices of `minicpm extend`, in a module light enough for the CLI to import when it builds its parser."""

METHODS = ("abf", "ntk", "dynamic", "yarn")
"""abf: a larger rope_theta; ntk: the static NTK-aware base change; yarn; dynamic: dynamic NTK (inference only)."""
LONG_SHARE = 0.44
"""MiniCPM-128K's share of long data in the mix (paper section 6: 44% long, 56% short)."""
