"""The choices of `minicpm extend`, in a module light enough for the CLI to import when it builds its parser."""

METHODS = ("abf", "ntk", "dynamic", "yarn", "abf-ntk")
"""abf: a larger rope_theta; ntk: the static NTK-aware base change; yarn; dynamic: dynamic NTK (inference only);
abf-ntk: MiniCPM-128K's two steps, ABF to --abf-length, then NTK with a length curriculum to --to-length."""
ABF_BASE_RATIO = 50.0
"""ABF's default new base, as a multiple of the old: Xiong et al. 2023 (Llama-2-Long) raise 10,000 to 500,000 to
train at 32,768 tokens (research/family.md §2.1). The NTK-aware theta·s^(d/(d-2)) is 6-50x lower for 2-32x
extensions, a base chosen for no training at all."""
ABF_LENGTH_SHARE = 4
"""abf-ntk's default ABF step ends at --to-length / 4: MiniCPM-128K extends 4K -> 32K with ABF, then 32K -> 128K
with NTK and a length curriculum (paper §7.2; research/minicpm-paper.md §2.4)."""
LONG_SHARE = 0.44
"""MiniCPM-128K's share of long data in the mix (paper section 6: 44% long, 56% short)."""
